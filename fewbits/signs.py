"""Which layers read a ReLU's output, read off the ``torch.fx`` graph: ``quantize_`` makes
their LSQ input quantizers unsigned (Esser et al., 2020), signed wherever fx cannot tell.

An unsigned quantizer on signed data clips every negative value to 0 without a word, so this
module answers "unsigned" only for what it can see is ``>= 0`` when the layer reads it.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
from torch import fx, nn

from .layer_kinds import global_hooks, runs_hooks
from .layers import QuantLayer

__all__ = ["nonnegative_inputs"]

# What keeps an input >= 0 (the ReLUs) and what passes its sign through unchanged, read off an
# fx graph by nonnegative_inputs.
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_CALLS = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu6,
               torch.nn.functional.relu_}
_KEEP_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten,
                 nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_KEEP_CALLS = {torch.flatten, torch.reshape, torch.nn.functional.max_pool1d,
               torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool1d,
               torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool1d,
               torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.dropout}
_KEEP_METHODS = {"view", "reshape", "flatten", "contiguous"}


_FRESH = {operator.neg, torch.cat, torch.stack, torch.matmul}  # never alias nor mutate args[0]
#: fx records ``y += b`` as ``operator.add(y, b)``: an in-place update of ``y`` at run time
_AUGMENTED = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
              operator.mod, operator.pow, operator.matmul, operator.and_, operator.or_,
              operator.xor, operator.lshift, operator.rshift}


def _inplace(model: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` may write into its first argument's memory (or its ``out=``)."""
    if "out" in node.kwargs:
        return True
    if node.op == "call_module":
        m = model.get_submodule(str(node.target))
        return bool(getattr(m, "inplace", False)) and \
            not isinstance(m, _RELU_MODULES + _KEEP_MODULES)  # in place, yet sign-keeping
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_method" or (node.op == "call_function" and node.target not in _RELU_CALLS):
        if node.target in _AUGMENTED or node.target is operator.setitem or \
                (str(name).endswith("_") and name not in ("relu_", "__getitem__")):
            return True
    if node.op != "call_function" or node.target in _RELU_CALLS | _KEEP_CALLS:
        return False
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return "inplace" in node.kwargs
    return bound.arguments.get("inplace", False) is not False


def _mutated(model: nn.Module, seeds: list[fx.Node], order: dict, before: int) -> bool:
    """Whether any tensor that may share memory with ``seeds`` is written in place by a node
    that runs before node number ``before`` (fx records ``y.sub_(1)``, ``y += 1`` on an alias
    of ``y``, an inplace module, without them feeding the layer)."""
    alias, todo = set(seeds), list(seeds)
    while todo:
        for user in todo.pop().users:
            if user.op == "output" or user in alias:
                continue
            target = user.kwargs.get("out", user.args[0] if user.args else None)
            if order[user] < before and target in alias and _inplace(model, user):
                return True
            if user.op == "call_module":  # a module's output is new unless it may be its input
                m = model.get_submodule(str(user.target))
                fresh = not (getattr(m, "inplace", False) or isinstance(m, nn.Identity))
            else:
                fresh = user.target in _FRESH or user.target in _AUGMENTED
            if not fresh:
                alias.add(user)
                todo.append(user)
    return False


def _positive(divisor: Any) -> bool:
    """Whether average pooling's ``divisor_override`` keeps the sign (a negative one flips it)."""
    return divisor is None or (isinstance(divisor, int) and divisor > 0)


def _after_relu(model: nn.Module, node: Any, order: dict, before: int) -> bool:
    """Whether fx ``node``'s value is a ReLU's output, through sign-keeping ops (pooling,
    flatten, reshape, dropout), untouched by hooks and in-place writes until node number
    ``before`` (the layer's call) runs."""
    chain = []
    while isinstance(node, fx.Node):
        chain.append(node)
        if node.op == "call_module":
            m = model.get_submodule(str(node.target))
            if runs_hooks(m) or not isinstance(m, _RELU_MODULES + _KEEP_MODULES) or \
                    not _positive(getattr(m, "divisor_override", None)):
                return False
            if isinstance(m, _RELU_MODULES):
                break
        elif (node.op == "call_function" and node.target in _RELU_CALLS) or \
                (node.op == "call_method" and node.target in ("relu", "relu_")):
            break
        elif not ((node.op == "call_function" and node.target in _KEEP_CALLS) or
                  (node.op == "call_method" and node.target in _KEEP_METHODS)):
            return False
        elif node.target is torch.nn.functional.avg_pool2d and not _positive(node.kwargs.get(
                "divisor_override", node.args[6] if len(node.args) > 6 else None)):
            return False
        node = node.args[0] if node.args else None
    else:
        return False
    src = chain[-1].args[0] if chain[-1].args else None  # an in-place ReLU's input aliases it
    if isinstance(src, fx.Node):  # (whatever made it: conv(x) in relu(conv(x), inplace=True))
        chain.append(src)
        src = src.args[0] if src.args and src.op != "call_module" else None
    while isinstance(src, fx.Node) and src.op in ("call_function", "call_method") and \
            src.target not in _FRESH:
        chain.append(src)
        src = src.args[0] if src.args else None
    return not _mutated(model, chain, order, before)


def _reads(node: fx.Node, layer: nn.Module) -> list[Any]:
    """The arguments of the layer call ``node`` that its input quantizer sees (query, key and
    value of attention; the first otherwise)."""
    if isinstance(layer, nn.MultiheadAttention):
        keys = ("query", "key", "value")
        return [node.args[i] if i < len(node.args) else node.kwargs.get(k)
                for i, k in enumerate(keys)]
    return [node.args[0] if node.args else node.kwargs.get("input")]


def nonnegative_inputs(model: nn.Module, names: list[str]) -> set[str]:
    """Those of the layers ``names`` (module names in ``model``) whose every call reads a
    ReLU's output (``nn.ReLU``/``ReLU6``, ``F.relu``, ``torch.relu``, ``x.relu()``), possibly
    through pooling, flatten, reshape or dropout, which keep it ``>= 0``: their inputs can be
    quantized unsigned. Read off the model's ``torch.fx`` graph (the layers and fewbits
    layers kept as leaves), traced in train and in eval mode; signed (never wrong, only a
    level poorer) wherever fx cannot tell: a model fx cannot trace, a tensor written in place
    (``y.sub_(1)``, ``y += b`` through an alias, an inplace module) before the layer reads
    it, a hook on the layer or on a module between the ReLU and the layer (or a global one).
    A forward that asks whether it is being traced is beyond this check.

        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))
        >>> sorted(nonnegative_inputs(net, ["0", "2", "3"]))
        ['2']
    """
    wanted = set(names)
    if global_hooks():
        return set()

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in wanted or isinstance(m, QuantLayer) or \
                super().is_leaf_module(m, qualname)

    modes = {m: m.training for m in model.modules()}
    seen: dict[str, bool] = {}
    try:
        for training in (True, False):  # a forward may branch on self.training
            model.train(training)
            graph = _Tracer().trace(model)
            order = {n: i for i, n in enumerate(graph.nodes)}
            for node in graph.nodes:
                if node.op == "call_module" and node.target in wanted:
                    layer = model.get_submodule(str(node.target))
                    ok = not runs_hooks(layer) and all(
                        _after_relu(model, a, order, order[node]) for a in _reads(node, layer))
                    seen[node.target] = seen.get(node.target, True) and ok
    except Exception:  # fx raises many kinds for data-dependent control flow
        return set()
    finally:
        for m, training in modes.items():
            m.training = training
    return {n for n, ok in seen.items() if ok}
