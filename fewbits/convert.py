"""Quantize any PyTorch model in one call, and set activation ranges from data.

:func:`quantize_` swaps, in place, every ``nn.Conv2d`` / ``nn.Linear`` of a model for the fewbits
layer built by :meth:`~fewbits.layers.QuantConv2d.from_float` (same parameters, options, device and
dtype), as torchao's ``quantize_`` and Brevitas' ``layerwise_quantize`` do. The model then trains in
any PyTorch loop, and :func:`fewbits.export.export_packed` writes it at its real width.

A *config* says what each layer gets:
- a family name (one of :data:`fewbits.models.FAMILIES`): the family's weight quantizer (its
  bias quantizer on layers with a bias) and, for the families that quantize activations
  (``binary_net``, ``fp_net``, ``pow2_net``, ``min_max``), its activation quantizer as the layer's
  input quantizer; :func:`family_config` gives the same with options (``bit_width=4`` ...);
- a dict of quantizer specs by role, ``{"weight": ..., "bias": ..., "input": ..., "output": ...}``
  (each spec as :func:`fewbits.quantizers.get` takes it; a quantizer instance is copied per
  layer, since quantizers hold per-layer state);
- a callable ``(qualified_name, module) -> config or None`` for per-layer choices (``None`` keeps
  the layer in float).

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    >>> _ = net(torch.zeros(1, 3, 8, 8))             # materialise the lazy layer
    >>> net = quantize_(net, "binary_weight", skip=["0"])   # first conv stays float
    >>> [type(m).__name__ for m in net]
    ['Conv2d', 'ReLU', 'Flatten', 'QuantLinear']
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layers import QuantAct, QuantConv2d, QuantLinear, quant_layers
from .models.families import QuantConfig, family
from .quantizers import MinMax, Quantizer
from .quantizers import optim as qoptim

__all__ = ["ROLES", "calibrate", "family_config", "quantize_"]

#: The quantizer roles of a fewbits layer, as keys of a dict config.
ROLES = ("weight", "bias", "input", "output")

Config = str | dict[str, Any] | Callable[[str, nn.Module], Any] | None

_LAYERS: dict[type[nn.Module], type[QuantConv2d] | type[QuantLinear]] = {
    nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear,
}
# Torch layers fewbits has no quantized form of: converting a model that holds one must not
# quietly leave it in float.
_NO_FORM = (nn.modules.conv._ConvNd, nn.Bilinear)


def family_config(name: str, **options: Any) -> dict[str, Any]:
    """The dict config of family ``name`` with :class:`fewbits.models.QuantConfig` options
    (``bit_width``, ``delta``, ``inq_iterations`` ...): weight, bias and (for the families that
    quantize activations) input quantizer specs, from the family table.

    Raises ``ValueError`` listing the known families or naming an option the family does not
    use (``bit_width`` for ``binary_connect``; ``None``, "the family default", is never
    refused), ``TypeError`` listing the known options.

        >>> family_config("fp_connect", bit_width=4)["weight"]["n"]
        4
    """

    fam = family(name)
    cfg = QuantConfig.from_kwargs(options)
    # None is "not set" (the family default), as QuantConfig reads it: never refused
    ignored = fam.ignored(cfg, [k for k, v in options.items() if v is not None])
    if ignored:
        raise ValueError(f"family {name!r} does not use {', '.join(ignored)}; it would be "
                         "ignored (docs/QUANTIZERS.md, 'The families')")
    return fam.specs(cfg)


def _role_specs(config: Any, where: str) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, str):
        return family_config(config)
    if isinstance(config, dict):
        bad = sorted(set(config) - set(ROLES))
        if bad:
            hint = (" (a quantizer spec goes under a role: {'weight': {'name': ...}})"
                    if "name" in bad else "")
            raise ValueError(f"{where}: unknown config key(s) {bad}; known roles: "
                             f"{', '.join(ROLES)}{hint}")
        return {r: copy.deepcopy(v) if isinstance(v, Quantizer) else v
                for r, v in config.items()}
    raise TypeError(f"{where}: a config is a family name, a dict of quantizer specs by role or "
                    f"None; got {type(config).__name__}")


def _skip_matcher(skip: str | Sequence[str] | None, names: list[str]) -> Callable[[str], bool]:
    patterns = [skip] if isinstance(skip, str) else list(skip or [])

    def hit(p: str, n: str) -> bool:  # a pattern, or a module under a matched container
        return fnmatch.fnmatchcase(n, p) or n.startswith(p + ".")

    unused = [p for p in patterns if not any(hit(p, n) for n in names)]
    if unused:
        shown = ", ".join(names[:60]) + (f" ... ({len(names)} in all)" if len(names) > 60 else "")
        raise ValueError(f"skip pattern(s) {unused} match no conv/linear layer of the model; "
                         f"its layers: {shown or '(none)'}")
    return lambda n: any(hit(p, n) for p in patterns)


def _occurrences(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(qualified name, parent, attribute, module)`` of every child, shared ones repeated."""
    out = []
    for pname, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():  # named_children() drops repeats
            if child is None:
                continue
            out.append((f"{pname}.{attr}" if pname else attr, parent, attr, child))
    return out


def quantize_(model: nn.Module, config: Config, *,
              skip: str | Sequence[str] | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Convert, in place, every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` into the fewbits
    layer given by ``config`` (see the module doc); returns ``model``.

    Each new layer holds the same weight and bias parameters, keeps stride, padding, dilation,
    groups, padding mode, device and dtype, and starts min-max weight ranges from its weights.
    A module shared at several places is converted once.

    - ``optimizer``: an optimizer built before this call. Learned min-max ranges are new
      parameters, which it does not hold: passing it adds them as one new parameter group (its
      defaults). Without it, the first ``step()`` of an optimizer that holds the model's
      weights but not the new ranges raises ``RuntimeError`` saying this
      (:mod:`fewbits.quantizers.optim`); an optimizer built after ``quantize_`` holds all.

    - ``skip``: layer names or shell patterns (``"layer4.*"``, ``"fc"``; a container's name skips
      everything in it) left in float. A pattern that matches no conv/linear layer raises
      ``ValueError`` listing the layer names.
    - Layers that already are fewbits layers are left exactly as they are, so a second call
      converts only what is still float (``quantize_`` is idempotent).
    - A subclass of ``nn.Conv2d`` / ``nn.Linear`` (whose forward may differ), a parametrized or
      lazy layer, and other convolutions (``Conv1d``, ``Conv3d``, transposed) have no exact
      fewbits form: ``ValueError`` naming them (the model is then left unchanged), unless they
      are skipped or the callable config returns ``None`` for them. Other modules (batch norm,
      embeddings ...) stay as they are.
    - A model without any conv or linear layer raises ``ValueError``.

    Errors name the layer: ``"layer1.0.conv1: ..."``.
    """
    before = {id(p) for p in model.parameters()}
    found = [(n, p, a, m) for n, p, a, m in _occurrences(model)
             if isinstance(m, (nn.Linear, *_NO_FORM))]
    names = list(dict.fromkeys(n for n, *_ in found))
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to "
                         "quantize")
    skipped = _skip_matcher(skip, names)
    converted: dict[int, nn.Module] = {}
    problems: list[str] = []
    for name, _, _, module in found:
        if id(module) in converted:  # shared module: converted once
            continue
        if isinstance(module, (QuantConv2d, QuantLinear)) or skipped(name):
            continue
        specs = _role_specs(config(name, module) if callable(config) else config, name)
        if specs is None:
            continue
        cls = _LAYERS.get(type(module))
        if cls is None:
            problems.append(f"{name}: {type(module).__module__}.{type(module).__qualname__} has "
                            "no fewbits form (fewbits converts exactly nn.Conv2d and nn.Linear; "
                            "a subclass may compute differently)")
            continue
        try:
            new = cls.from_float(module, **{f"{r}_quantizer": s for r, s in specs.items()})
        except (TypeError, ValueError) as e:
            problems.append(f"{name}: {e}")
            continue
        converted[id(module)] = new
    if problems:  # all or nothing: the model is left as it was
        raise ValueError("cannot quantize these layers (add them to skip= to keep them float):\n"
                         + "\n".join(f"  {p}" for p in problems))
    for _, parent, attr, module in found:
        if id(module) in converted:  # a shared module gets the same layer everywhere
            setattr(parent, attr, converted[id(module)])
    added = [(n, p) for n, p in model.named_parameters() if id(p) not in before]
    if optimizer is not None:
        qoptim.add_to_optimizer(optimizer, [p for _, p in added])
    qoptim.require_companions([p for p in model.parameters() if id(p) in before], added)
    return model


def _activation_quantizers(model: nn.Module) -> list[tuple[str, MinMax]]:
    out = []
    for lname, layer in quant_layers(model):
        for role in ("input", "output"):
            q = getattr(layer, f"{role}_quantizer")
            if isinstance(q, MinMax):
                out.append((f"{lname}.{role}_quantizer" if lname else f"{role}_quantizer", q))
    out += [(f"{n}.quantizer", m.quantizer) for n, m in model.named_modules()
            if isinstance(m, QuantAct) and isinstance(m.quantizer, MinMax)]
    return out


def _to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor in it (nested tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch if device is None else batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _run_batch(model: nn.Module, batch: Any, device: torch.device | None) -> None:
    if isinstance(batch, dict):  # HF-style: model(**batch); labels are ignored
        model(**_to_device(batch, device))
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("calibrate: a batch is an empty tuple; give (inputs, ...) or a "
                             "tensor")
        _run_batch(model, batch[0], device)
    elif isinstance(batch, Tensor):
        model(_to_device(batch, device))
    else:
        raise TypeError(f"calibrate: a batch is a tensor, a tuple/list whose first item is the "
                        f"input, or a dict of model keyword arguments; got {type(batch).__name__}")


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any]) -> dict[str, tuple[float, float]]:
    """Set every min-max activation range of ``model`` (layers' input/output quantizers and
    :class:`~fewbits.layers.QuantAct`) to the min and max its input takes over ``batches``,
    widened to hold 0: ``[min(lo, 0), max(hi, 0)]`` (the grid of a min-max quantizer always
    holds zero, as Jacob et al.'s nudging and the learned-range projection require; activations
    all in ``[0.5, 1]`` get ``[0, 1]``, never a grid that clips every value).

    ``batches`` yields input tensors, tuples/lists whose first item is the input (a
    ``DataLoader`` of ``(x, y)``), or dicts of keyword arguments, run as ``model(**batch)`` (a
    HuggingFace tokenizer's output); tensors, nested ones included, are moved to the model's
    device. The forwards run in
    evaluation mode with the activation quantizers passing values through unquantized (the
    float activations are observed, as Brevitas' calibration does), so batch-norm statistics,
    INQ counters, weights and every other state stay as they were; the training flag is
    restored. Fixed-grid activation quantizers (fixed point, pow2, binary) have no range to set.

    Returns ``{quantizer name: (min, max)}`` of the ranges set (empty when the model has no
    min-max activation quantizer). Raises ``ValueError`` for an empty ``batches`` or a
    per-channel activation quantizer, ``TypeError`` for a batch of another kind.

        >>> from fewbits.layers import QuantLinear
        >>> net = QuantLinear(2, 2, input_quantizer="min_max")
        >>> calibrate(net, [{"x": torch.tensor([[0.5, 1.0]])}])
        {'input_quantizer': (0.0, 1.0)}
    """
    targets = _activation_quantizers(model)
    for name, q in targets:
        if q.per_channel:
            raise ValueError(f"{name}: per-channel activation ranges cannot be calibrated")
    seen: dict[str, list[float]] = {}
    hooks = []
    for name, q in targets:
        def observe(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor, name: str = name
                    ) -> Tensor:
            lo, hi = (float(v) for v in torch.aminmax(args[0].detach().float()))
            r = seen.setdefault(name, [0.0, 0.0])  # the range holds zero
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
            return args[0]  # observe the float activations

        hooks.append(q.register_forward_hook(observe))
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else None
    was = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            _run_batch(model, batch, device)
            n += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if n == 0:
        raise ValueError("calibrate: batches is empty; give at least one batch of inputs")
    out = {}
    for name, q in targets:
        if name in seen:
            lo, hi = seen[name]
            q.qr_min.fill_(lo)
            q.qr_max.fill_(hi)
            out[name] = (lo, hi)
    return out
