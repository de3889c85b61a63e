"""The fused ONNX form (``to_onnx(..., fuse=True)``) as a pass over the graph PyTorch's exporter
wrote (:func:`fewbits.export.onnx.to_onnx`'s plain form): batch norm folded into the
convolution or ``Gemm`` before it, integer weights, and the QDQ pattern ONNX Runtime runs as
``QLinearConv`` (chains of :mod:`fewbits.export.onnx_qdq`).

What the pass reads of the plain graph: the exporter's node metadata
(``pkg.torch.onnx.name_scopes``) names the module each node came from, so the nodes of one call
of an activation quantizer form a *region* (connected nodes under one quantizer's scope, one
float input, one output); weights are initializers named after their parameter
(``"conv1.weight"``). It asks the quantizer of a region (the family, never ``isinstance``):

* a chain ``Conv/Gemm [-> Relu] -> BatchNormalization [-> region [-> Relu]]`` becomes one folded
  layer (:func:`~fewbits.export.onnx_qdq.emit_chain`) when the region's quantizer has an integer
  grid of at most 256 levels (:meth:`~fewbits.quantizers.Quantizer.int_grid`); a batch norm
  whose output reaches a binary activation (:meth:`~fewbits.quantizers.Quantizer.step_levels`)
  through any nodes but another quantizer's (a ReLU, a residual ``Add``, a pool) stays unfolded
  and noted: folded into the float weights it moves exact integer sums (often exactly 0) across
  the sign threshold (the binary_net ResNet-18 of ``examples/``: logits off by 1.1 of their
  range before);
* any other region becomes its family's fused nodes
  (:meth:`~fewbits.quantizers.Quantizer.onnx_act`); a family without them, a binary one (exact
  as it is) or a region that is not one input -> one output stays the plain, exact subgraph, and
  ``OnnxReport.notes`` says so;
* a uniform weight (its codes) becomes integer initializers + ``DequantizeLinear``, except one
  that feeds a ``MatMul`` (ONNX Runtime's default optimisations make that ``MatMulNBits``,
  which rounds the float input to 8 bits) or whose codes do not give PyTorch's values: a float
  constant, noted;
* ``MaxPool`` / ``Reshape`` / ``Flatten`` ... of a uint8 grid is requantized to it, and with
  ``checked_sums`` ``relu(a + b)`` of two uint8 grids of one scale becomes a checked uint8 sum.

Everything else stays as PyTorch's exporter wrote it, so any model the plain export handles
(several inputs, token ids, any output structure) exports fused; the parts that do not match a
pattern are plain and exact. Equivalence: see :mod:`fewbits.export.onnx_qdq`.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn

from ..quantizers import Codes, Quantizer
from .fold import fold_batch_norm, int8_weight
from .onnx_ops import (
    Graph,
    GraphOps,
    codes_reproduce,
    describe_constant,
    matmul_inputs,
    weight_input,
)
from .onnx_qdq import (
    SUM_PEAK,
    Chain,
    checked_sum,
    const_values,
    emit_chain,
    requantize,
    uint8_levels,
)

__all__ = ["fuse_graph"]

#: Operators whose output holds values of their input only: a uint8 grid stays one through them.
_ON_GRID = ("MaxPool", "Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose")


def _scopes(n: Any) -> list[str]:
    """The module path of node ``n`` as the exporter recorded it (last entry: the fx node)."""
    for p in n.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                v = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in v] if isinstance(v, list) else []
    return []


class _Region:
    """The nodes of one call of an activation quantizer: ``x`` in, ``y`` out (None when the
    call is not one input -> one output)."""

    def __init__(self, path: str, q: Quantizer, idx: list[int]) -> None:
        self.path, self.q, self.idx = path, q, idx
        self.x: str | None = None
        self.y: str | None = None
        self.ins: set[str] = set()

    @property
    def key(self) -> str:
        """The report's name: ``"act"`` (a ``QuantAct``), ``"conv.input"``, ``"conv.output"``."""
        parent, _, attr = self.path.rpartition(".")
        role = attr[: -len("_quantizer")] if attr.endswith("_quantizer") else ""
        return parent + ("." + role if role else "") if parent else self.path


def _regions(nodes: list[Any], modules: dict[str, nn.Module], consts: dict[str, Any],
             outputs: set[str]) -> list[_Region]:
    owner: dict[int, str] = {}
    for i, n in enumerate(nodes):
        for s in reversed(_scopes(n)[:-1]):
            if isinstance(modules.get(s), Quantizer):
                owner[i] = s
                break
    prod = {o: i for i, n in enumerate(nodes) for o in n.output}
    parent = {i: i for i in owner}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in owner:
        for t in nodes[i].input:
            j = prod.get(t)
            if j is not None and owner.get(j) == owner[i]:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in sorted(owner):
        groups[find(i)].append(i)
    readers: dict[str, set[int]] = defaultdict(set)
    for i, n in enumerate(nodes):
        for t in n.input:
            readers[t].add(i)
    regions = []
    for idx in groups.values():
        r = _Region(owner[idx[0]], modules[owner[idx[0]]], idx)
        mine = set(idx)
        made = {o for i in idx for o in nodes[i].output}
        ins = {t for i in idx for t in nodes[i].input if t and t not in made and t not in consts}
        outs = {o for o in made if (readers[o] - mine) or o in outputs}
        r.ins = ins
        if len(ins) == 1 and len(outs) == 1:
            r.x, r.y = next(iter(ins)), next(iter(outs))
        regions.append(r)
    return regions


def _batch_norm(n: Any, consts: dict[str, np.ndarray]) -> nn.Module | None:
    """An evaluation batch norm module holding the constants of ``BatchNormalization`` ``n``."""
    from onnx import helper

    if n.op_type != "BatchNormalization" or len(n.input) != 5 or \
            not all(t in consts for t in n.input[1:]) or len([o for o in n.output if o]) != 1:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    if attrs.get("training_mode", 0):
        return None
    gamma, beta, mean, var = (torch.from_numpy(np.array(consts[t], np.float32).reshape(-1))
                              for t in n.input[1:])
    bn = nn.BatchNorm1d(gamma.numel(), eps=float(attrs.get("epsilon", 1e-5))).eval()
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return bn


def _binary_reached(t: str, nodes: list[Any], users: dict[str, list[Any]]) -> str | None:
    """The name of a binary activation (:meth:`~fewbits.quantizers.Quantizer.step_levels`)
    that tensor ``t`` reaches through nodes that are no other quantizer (a ReLU, a residual
    ``Add``, a pool ...), or None. A batch norm folded into the convolution before it changes
    its values in the last bits (the folded weights are products computed in another order):
    on a binary network the convolution's sum is an exact integer, often exactly on the
    threshold (an exact 0 before ``sign``), and a last-bit move flips a +-1 activation, which
    no tolerance covers. Any other quantizer reached first re-grids the values (a last-bit
    move changes at most one level: the fused form's stated tolerance)."""
    seen, todo = {t}, [t]
    while todo:
        for u in users.get(todo.pop(), []):
            if isinstance(u, _Region):
                if u.q.step_levels() is not None:
                    return u.key
                continue
            for o in nodes[u].output:
                if o and o not in seen:
                    seen.add(o)
                    todo.append(o)
    return None


def _plan(nodes: list[Any], regions: list[_Region], consts: dict[str, np.ndarray],
          outputs: set[str], layers: dict[str, nn.Module], quantizers: dict[str, Any],
          codes: dict[str, tuple[Quantizer, Codes]], kept: dict[int, str]) -> dict[int, Chain]:
    """The foldable chains, keyed by the index of their ``Conv`` / ``Gemm`` node; ``kept``
    gets the index of each batch norm left unfolded on purpose, with the reason."""
    from onnx import helper

    in_region = {i: r for r in regions for i in r.idx}
    users: dict[str, list[Any]] = defaultdict(list)
    for i, n in enumerate(nodes):
        r = in_region.get(i)
        for t in dict.fromkeys(n.input):
            if r is None:
                users[t].append(i)
            elif t in r.ins and r not in users[t]:
                users[t].append(r)

    def single(t: str) -> Any:
        u = users.get(t, [])
        return u[0] if len(u) == 1 and t not in outputs else None

    def node(u: Any, op: str) -> bool:
        return isinstance(u, int) and nodes[u].op_type == op

    chains: dict[int, Chain] = {}
    for i, n in enumerate(nodes):
        if n.op_type not in ("Conv", "Gemm") or i in in_region or len(n.input) < 2 or \
                n.input[1] not in consts or not n.input[1].endswith(".weight"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("transB", 0) != 1 or
                                    attrs.get("alpha", 1.0) != 1.0 or
                                    attrs.get("beta", 1.0) != 1.0):
            continue
        seq, t = [i], n.output[0]
        u = single(t)
        relu_before = node(u, "Relu")
        if relu_before:
            seq.append(u)
            t = nodes[u].output[0]
            u = single(t)
        bn = _batch_norm(nodes[u], consts) if isinstance(u, int) else None
        if bn is None:
            continue
        seq.append(u)
        u_bn, t = u, nodes[u].output[0]
        u = single(t)
        binary = _binary_reached(t, nodes, users)
        if binary is not None:  # folding moves values across its sign threshold: keep it
            kept[u_bn] = f"batch norm after {n.input[1][: -len('.weight')]} left unfolded " \
                f"(it reaches the binary activation {binary}, whose sign threshold folding " \
                "into the convolution's float weights would move values across)"
            continue
        q, relu_after, last = None, False, t
        if isinstance(u, _Region) and u.x == t and u.y is not None:
            after = single(u.y)
            relu_after = node(after, "Relu")
            if uint8_levels(u.q, relu_after) is not None:
                q, last = u.q, u.y
                seq += u.idx
                if relu_after:
                    seq.append(after)
                    last = nodes[after].output[0]
            else:
                relu_after = False
        if relu_before and q is None:
            continue  # relu -> bn folds only into a quantizer's integer bounds
        wname = n.input[1]
        w = torch.from_numpy(np.array(consts[wname], np.float32))
        layer = wname[: -len(".weight")]
        if len(n.input) > 2 and n.input[2]:
            if n.input[2] in consts:
                b = torch.from_numpy(np.array(consts[n.input[2]], np.float32))
            elif getattr(layers.get(layer), "bias", 0) is None:  # the exporter's zero bias
                b = None
            else:
                continue
        else:
            b = None
        coded = codes.get(wname)
        wq = coded[0] if coded else quantizers.get(wname)
        iw = int8_weight(wq, w, coded[1] if coded else None)
        fold = fold_batch_norm(w, b, bn, relu_before=relu_before, int_weight=iw)
        chains[i] = Chain(layer, seq, fold, q, relu_after, node=n, out=last,
                          region=u.key if q is not None else None)
    return chains


def _toposort(nodes: list[Any]) -> list[Any]:
    """``nodes`` in an order where each is after the producers of its inputs (stable)."""
    prod = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    done: set[int] = set()
    order: list[Any] = []
    for k in range(len(nodes)):
        stack = [k]
        while stack:
            j = stack[-1]
            if j in done:
                stack.pop()
                continue
            todo = [prod[t] for t in nodes[j].input if t in prod and prod[t] not in done]
            if todo:
                stack.extend(todo)
                continue
            done.add(j)
            order.append(nodes[j])
            stack.pop()
    return order


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """``nodes`` less those whose outputs nothing reads (the plain graph's leftovers)."""
    while True:
        used = {t for n in nodes for t in n.input} | outputs
        keep = [n for n in nodes if any(o in used for o in n.output if o)]
        if len(keep) == len(nodes):
            return keep
        nodes = keep


def _rename(new: list[Any], old: str, to: str) -> None:
    for n in new:
        for k, t in enumerate(n.output):
            if t == old:
                n.output[k] = to
        for k, t in enumerate(n.input):
            if t == old:
                n.input[k] = to


def fuse_graph(proto: Any, model: nn.Module, frozen: nn.Module,
               codes: dict[str, tuple[Quantizer, Codes]], quantizers: dict[str, Any],
               report: Any, clamp_codes: bool = True, checked_sums: bool = False) -> None:
    """Rewrite the plain export ``proto`` of ``model`` into the fused form, in place (see the
    module doc). ``frozen``: the copy that was exported (quantized weights as parameters);
    ``codes``: the uniform weights' codes by parameter name; ``quantizers``: each quantized
    parameter's quantizer by name; ``report``: the :class:`~fewbits.export.onnx.OnnxReport`,
    whose ``weights``, ``activations`` and ``notes`` it fills. ``clamp_codes=False``: the
    OpenVINO variant of the bounds (:func:`~fewbits.export.onnx_qdq.emit_chain`)."""
    from onnx import helper

    g = proto.graph
    nodes = list(g.node)
    consts = const_values(proto)
    outputs = {o.name for o in g.output}
    modules = dict(model.named_modules())
    regions = _regions(nodes, modules, consts, outputs)
    kept: dict[int, str] = {}
    chains = _plan(nodes, regions, consts, outputs, dict(frozen.named_modules()), quantizers,
                   codes, kept)
    taken = {t for n in nodes for t in (*n.input, *n.output)} | set(consts) | \
        {i.name for i in g.input}
    gb = Graph(taken)
    absorbed = {j for c in chains.values() for j in c.nodes}
    first = {r.idx[0]: r for r in regions if not absorbed & set(r.idx)}
    in_region = {j for r in first.values() for j in r.idx}
    report.activations.clear()
    notes = report.notes
    u8: dict[str, Any] = {}  # tensors that are uint8 DequantizeLinear outputs: their grid
    peaks: list[str] = []
    out: list[Any] = []
    skip: set[int] = set()

    def add_new(start: int) -> None:
        out.extend(gb.nodes[start:])

    for i, n in enumerate(nodes):
        if i in skip:
            continue
        start = len(gb.nodes)
        if i in chains:
            c = chains[i]
            y, grid, how = emit_chain(gb, c, c.node.input[0], u8.get(c.node.input[0]),
                                      clamp_codes)
            _rename(gb.nodes[start:], y, c.out)
            add_new(start)
            report.weights[c.layer + ".weight"] = how
            if c.region is not None:
                report.activations[c.region] = f"folded into {c.layer}: uint8 Q/DQ"
            if grid is not None:
                u8[c.out] = grid
            continue
        if i in absorbed:
            continue
        if i in first:
            r = first[i]
            reason = "not one input and one output" if r.y is None else \
                ("binary: exact thresholds" if r.q.step_levels() is not None else None)
            if reason is None:
                try:
                    y, how = r.q.onnx_act(GraphOps(gb, r.key), r.x)
                except ValueError as e:
                    reason = str(e).split(";")[0]
            if reason is None:
                _rename(gb.nodes[start:], y, r.y)
                add_new(start)
                report.activations[r.key] = how
                skip.update(r.idx)
                continue
            report.activations[r.key] = "exact ONNX subgraph"
            if not reason.startswith("binary"):
                notes.append(f"activation {r.key} left plain ({reason})")
        if i in in_region:
            out.append(n)
            continue
        x = n.input[0] if n.input else None
        if n.op_type in _ON_GRID and x in u8 and len(n.output) == 1:
            y = n.output[0]
            n.output[0] = gb.name(y + "_on_grid")
            out.append(n)
            rq = requantize(gb, n.output[0], u8[x], y)
            _rename(gb.nodes[start:], rq, y)
            add_new(start)
            u8[y] = u8[x]
            continue
        if checked_sums and n.op_type == "Add" and len(n.input) == 2 and \
                all(t in u8 for t in n.input) and u8[n.input[0]][0] == u8[n.input[1]][0]:
            users = [j for j, m in enumerate(nodes) if n.output[0] in m.input]
            if len(users) == 1 and nodes[users[0]].op_type == "Relu" and \
                    n.output[0] not in outputs:
                relu = nodes[users[0]]
                y, grid, peak = checked_sum(gb, list(n.input), u8[n.input[0]][0],
                                            n.output[0])
                _rename(gb.nodes[start:], y, relu.output[0])
                add_new(start)
                u8[relu.output[0]] = grid
                peaks.append(peak)
                skip.add(users[0])
                continue
        if i in kept:
            notes.append(kept[i])
        elif n.op_type == "BatchNormalization":
            notes.append(f"batch norm {n.output[0]} left unfolded (not after a conv / linear "
                         "layer that only it reads, or before a binary decision)")
        out.append(n)

    # uniform weights not folded: integer initializers + DequantizeLinear
    out = _live(out, outputs | set(peaks))
    used = {t for n in out for t in n.input}
    to_matmul = matmul_inputs(out)
    start = len(gb.nodes)
    for key in sorted(set(codes) | set(quantizers)):
        if key not in used or key not in consts:
            continue
        coded = codes.get(key)
        value = torch.from_numpy(np.array(consts[key], np.float32))
        if coded is not None and key in to_matmul:
            report.weights[key] = describe_constant(coded[0], "float constant")
            notes.append(f"weight {key} left a float constant (it feeds a MatMul: ONNX "
                         "Runtime's default optimisations turn int8 DequantizeLinear -> MatMul "
                         "into MatMulNBits, which rounds its float input to 8 bits)")
            continue
        if coded is not None and not codes_reproduce(coded, value):
            report.weights[key] = describe_constant(coded[0], "float constant")
            notes.append(f"weight {key} left a float constant (its codes' affine form does "
                         "not give the values PyTorch computes)")
            continue
        if coded is None:
            report.weights[key] = describe_constant(quantizers.get(key), "float constant")
            continue
        y, how = weight_input(gb, key + "_int", value, coded)
        report.weights[key] = describe_constant(coded[0], how) if how == "float constant" \
            else how
        if how != "float constant":
            _rename(gb.nodes[start:], y, key)
            out.extend(gb.nodes[start:])
            keep = [t for t in g.initializer if t.name != key]
            del g.initializer[:]
            g.initializer.extend(keep)
        start = len(gb.nodes)
    if peaks:
        out.append(helper.make_node("Max", peaks, [SUM_PEAK], name=SUM_PEAK))
        from onnx import TensorProto
        g.output.append(helper.make_tensor_value_info(SUM_PEAK, TensorProto.UINT8, []))
    del g.node[:]
    g.node.extend(_toposort(out))
    g.initializer.extend(gb.inits)
    made = {o for n in g.node for o in n.output}
    keep_vi = [v for v in g.value_info if v.name in made]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
