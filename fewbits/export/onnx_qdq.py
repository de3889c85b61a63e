"""The fused ONNX form: batch norm folded, written in the QDQ pattern ONNX Runtime turns into
``QLinearConv`` / ``QLinearMatMul``.

ONNX Runtime fuses ``DequantizeLinear(x) -> Conv(DequantizeLinear(w), DequantizeLinear(b)) ->
QuantizeLinear`` into one integer convolution when ``x`` and the output have the same 8-bit type,
the weights are int8 with zero point 0 (per output channel allowed) and the bias is int32 with
scale ``x_scale * w_scale``. fewbits' recipes put batch norm (and ReLU) between the convolution
and its activation quantizer, which blocks that; here each chain

* ``conv -> bn [-> q [-> relu]]`` (fixed point / min-max nets, and the float stem), and
* ``conv -> relu -> bn -> q`` (the min-max recipe)

is written as one folded convolution (:mod:`fewbits.export.fold`) followed by a uint8
``QuantizeLinear`` whose zero point makes the quantizer's lowest needed level code 0, then at
most two uint8 ``Min`` / ``Max`` nodes for what the uint8 saturation does not do (the fixed-point
range ``[-127, 127]``, the ReLU before batch norm as a per-channel bound), and a
``DequantizeLinear``. A convolution whose input is such a ``DequantizeLinear`` gets an int32 bias
and fuses; one whose input is float (the stem, and the first convolution of a residual unit,
whose input is a sum of two grids wider than 8 bits) stays a float convolution.

Equivalence to PyTorch (see the fold's tolerance): the integer convolution sums exactly, but the
folded scale, the int32 rounding of the bias (at most half a step of ``x_scale * w_scale``) and
``QuantizeLinear``'s rounding (half to even, where fewbits rounds half away from zero) put a
value within a few float32 ulps of a level boundary (or on an exact tie) on the neighbouring
level. Such flips are rare and move logits by a small fraction of their range;
``tests/test_deploy.py`` asserts the bound and equal top-1 per family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..quantizers import IntGrid, Quantizer
from .fold import Fold, IntWeight
from .onnx_ops import Graph

__all__ = ["SUM_PEAK", "Chain", "binary_thresholds", "checked_sum", "const_values", "emit_chain",
           "fold_binary_thresholds", "prune_unused", "requantize", "uint8_levels"]

#: Name of the graph output holding the largest code of the checked uint8 residual sums.
SUM_PEAK = "sum_peak"


@dataclass
class Chain:
    """A ``Conv`` / ``Gemm`` node (``node``) and what is folded into it: ``nodes`` (indices of
    the plain graph's nodes it replaces), the fold, the activation quantizer after it and whether
    a ReLU follows that; ``out`` is the name of the chain's output tensor, ``region`` the
    report's name of the folded quantizer."""

    layer: str
    nodes: list[int]
    fold: Fold
    act: Quantizer | None = None
    relu_after: bool = False
    node: Any = None
    out: str = ""
    region: str | None = None


def uint8_levels(q: Quantizer, relu_after: bool) -> tuple[IntGrid, int, int] | None:
    """``(grid, kl, kh)``: the quantizer's grid and the levels its (ReLU'd) output can take,
    when they span at most 256 codes; else None."""
    try:
        grid = q.int_grid()
    except ValueError:  # one grid per channel (per-channel min-max ranges)
        return None
    if grid is None:  # not a uniform family
        return None
    kl = max(grid.qmin, grid.zero_point) if relu_after else grid.qmin
    kh = grid.qmax
    return (grid, kl, kh) if kh - kl <= 255 and kl <= kh else None


def _bcast(v: np.ndarray, dims: int) -> np.ndarray:
    """A scalar when all channels agree, else ``(C, 1, 1)`` / ``(C,)`` for broadcasting."""
    if (v == v[0]).all():
        return np.array(v[0])
    return v.reshape((-1,) + (1,) * (dims - 2)) if dims > 2 else v


def emit_chain(g: Graph, chain: Chain, x: str, x_grid: tuple[float, str, str] | None,
               clamp_codes: bool = True) -> tuple[str, Any, str]:
    """Write ``chain`` (its layer node's operator and attributes) on input ``x``
    (``x_grid``: ``(scale, scale name, zero point name)`` of the uint8 ``DequantizeLinear``
    that produced ``x``, or None for a float input). Returns ``(output, its uint8 grid or None,
    description)``. ``clamp_codes``: the bounds that uint8 saturation does not give are
    ``Max`` / ``Min`` on the codes (ONNX Runtime's pattern), else on the float values before
    ``QuantizeLinear`` (OpenVINO's: it fuses them into the conv and keeps ``Q -> DQ`` as one
    fake-quantize); both give the same codes."""
    x_scale = x_grid[0] if x_grid is not None else None
    name, f = chain.layer.replace(".", "_"), chain.fold
    iw = f.int_weight if x_scale is not None else None  # int8 only where the input is
    out = f.weight.shape[0]
    ins = [x]
    if iw is not None:
        # The int32 bias lies on the accumulator's grid x_scale * w_scale: its rounding (half a
        # step) is the main source of level flips. Codes times a power of two 2^j (up to the
        # int8 range) with the scale divided by 2^j are the same weights, on a 2^j finer grid.
        kmax = iw.codes.reshape(out, -1).abs().amax(1).clamp_min(1).double()
        up = torch.exp2(torch.floor(torch.log2(127.0 / kmax)))
        view = (-1,) + (1,) * (iw.codes.dim() - 1)
        iw = IntWeight((iw.codes.to(torch.int64) * up.to(torch.int64).view(view))
                       .to(torch.int8), (iw.scale.double() / up).float())
        bs = (np.float32(x_scale) * iw.scale.numpy()).astype(np.float32)
        bq = torch.round(f.bias.double() / torch.from_numpy(bs).double())
        if not bool((bq.abs() < 2**31 - 1).all()):
            iw = None
    if iw is not None:
        wq = g.const(name + "_wq", iw.codes.numpy(), np.int8)
        ws = g.const(name + "_ws", iw.scale.numpy())
        wz = g.const(name + "_wz", np.zeros(out, np.int8), np.int8)
        bi = g.const(name + "_bq", bq.numpy(), np.int32)
        bz = g.const(name + "_bz", np.zeros(out), np.int32)
        ins += [g.op("DequantizeLinear", [wq, ws, wz], name + "_w", axis=0),
                g.op("DequantizeLinear", [bi, g.const(name + "_bs", bs), bz], name + "_b",
                     axis=0)]
    else:  # a float input: float weights, which ONNX Runtime runs in its blocked layout
        ins += [g.const(name + "_w", f.weight), g.const(name + "_b", f.bias)]
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in chain.node.attribute}
    y = g.op(chain.node.op_type, ins, name, **attrs)
    dims = f.weight.dim()
    how = "folded " + ("int8 per-channel" if iw is not None else "float") + " weights"
    if chain.act is None:
        return y, None, how
    grid, kl, kh = uint8_levels(chain.act, chain.relu_after)  # type: ignore[misc]
    zp_u = grid.zero_point - kl  # level kl -> code 0
    s = g.const(name + "_ys", np.float32(grid.scale))
    z = g.const(name + "_yz", np.array(zp_u), np.uint8)
    lo = np.zeros(out, np.int64)
    hi = np.full(out, kh - kl, np.int64)
    if f.bound is not None:  # relu before bn: per-channel bound at the quantized level of c
        q = chain.act
        v = q.infer(f.bound.float())
        k = (torch.round(v / grid.scale) + grid.zero_point).to(torch.int64).numpy() - kl
        sign = f.sign.numpy()
        lo = np.where(sign >= 0, np.maximum(lo, k), lo)
        hi = np.where(sign <= 0, np.minimum(hi, k), hi)
    if clamp_codes:  # uint8 Max / Min after QuantizeLinear (ONNX Runtime fuses Conv -> Q)
        u = g.op("QuantizeLinear", [y, s, z], name + "_q")
        if (lo > 0).any():
            u = g.op("Max", [u, g.const(name + "_lo", _bcast(lo, dims), np.uint8)],
                     name + "_max")
        if (hi < 255).any():
            u = g.op("Min", [u, g.const(name + "_hi", _bcast(hi, dims), np.uint8)],
                     name + "_min")
    else:  # the same bounds as float values before it (OpenVINO fuses them into the conv)
        val = lambda c: ((c - zp_u) * grid.scale).astype(np.float32)  # noqa: E731
        if (lo > 0).any():
            y = g.op("Max", [y, g.const(name + "_lo", _bcast(val(lo), dims))], name + "_max")
        if (hi < 255).any():
            y = g.op("Min", [y, g.const(name + "_hi", _bcast(val(hi), dims))], name + "_min")
        u = g.op("QuantizeLinear", [y, s, z], name + "_q")
    return (g.op("DequantizeLinear", [u, s, z], name + "_dq"), (grid.scale, s, z),
            how + " + uint8 Q/DQ")


def requantize(g: Graph, y: str, grid: tuple[float, str, str], base: str) -> str:
    """``DequantizeLinear(QuantizeLinear(y))`` on the grid ``(scale, scale name, zero point
    name)`` its input came from: exact after a max-pool or flatten of a uint8 grid (they only
    select or move values), and it lets ONNX Runtime run them on uint8 and fuse the next
    layer."""
    _, s, z = grid
    return g.op("DequantizeLinear", [g.op("QuantizeLinear", [y, s, z], base + "_rq"), s, z],
                base + "_rdq")



def checked_sum(g: Graph, xs: list[str], scale: float, base: str
                ) -> tuple[str, tuple[float, str, str], str]:
    """``relu(a + b)`` of two uint8 grids of step ``scale`` as a uint8 grid (``QuantizeLinear``
    with zero point 0 saturates negatives to 0: the ReLU), which ONNX Runtime runs as
    ``QLinearAdd``. A sum of two grid values is on the grid, so the codes are exact unless the
    sum passes code 255; the returned ``ReduceMax`` of the codes tells (255: possibly
    saturated). Returns ``(output, its grid, peak)``."""
    s = g.const(base + "_s", np.float32(scale))
    z = g.const(base + "_z", np.array(0), np.uint8)
    u = g.op("QuantizeLinear", [g.op("Add", xs, base), s, z], base + "_q")
    peak = g.op("ReduceMax", [u], base + "_peak", keepdims=0)
    return g.op("DequantizeLinear", [u, s, z], base + "_dq"), (scale, s, z), peak


# --------------------------------------------------------------------------- binary thresholds

def _keys_to_float(k: np.ndarray) -> np.ndarray:
    """float32 values of order keys (``key(f) < key(g)`` iff ``f < g``; +-0 share key 0)."""
    bits = np.where(k >= 0, k, (-k) | 0x80000000).astype(np.uint32)
    return bits.view(np.float32)


def binary_thresholds(bn: dict[str, Any], offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Per channel ``(s, t)`` with ``fl(batch_norm(c) + offset) > 0  <=>  s * c >= t`` for
    every finite float32 ``c`` (``s`` in ``{1, -1, 0}``), found by bisection over the float32
    values with PyTorch's own batch norm: exact for PyTorch's arithmetic, since every rounding
    step is monotone in ``c``."""
    mean, var, gamma, beta = (torch.from_numpy(np.array(bn[k], np.float32))
                              for k in ("mean", "var", "scale", "bias"))
    c = mean.numel()

    def holds(keys: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(_keys_to_float(keys).copy()).reshape(1, c, 1).expand(1, c, 8)
        y = nn.functional.batch_norm(x.contiguous(), mean, var, gamma, beta, False, 0.0,
                                     bn["eps"])[0, :, 0]
        return ((y + np.float32(offset)) > 0).numpy()

    top = int(np.float32(np.finfo(np.float32).max).view(np.int32))
    lo_k, hi_k = np.full(c, -top, np.int64), np.full(c, top, np.int64)
    p_lo, p_hi = holds(lo_k), holds(hi_k)
    rising = ~p_lo & p_hi
    falling = p_lo & ~p_hi
    # bisection: for rising channels the smallest key where it holds, for falling the largest
    lo, hi = lo_k.copy(), hi_k.copy()
    for _ in range(34):
        mid = (lo + hi) // 2
        h = holds(mid)
        true_side = np.where(rising, h, ~h)  # the side that moves `hi` down (rising)
        hi = np.where(true_side, mid, hi)
        lo = np.where(true_side, lo, mid)
    s = np.where(rising, 1.0, np.where(falling, -1.0, 0.0)).astype(np.float32)
    t_rise, t_fall = _keys_to_float(hi), _keys_to_float(lo)
    const_t = np.where(p_lo, np.float32(0), np.float32(1))  # 0 >= 0 holds, 0 >= 1 does not
    t = np.where(rising, t_rise, np.where(falling, -t_fall, const_t)).astype(np.float32)
    return s, t


def const_values(proto: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    vals = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals


_VALUE_KEEPING = ("MaxPool", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                  "Transpose")


def fold_binary_thresholds(proto: Any) -> int:
    """Rewrite ``Greater(BatchNormalization(c), 0)`` and ``Greater(Add(BatchNormalization(c),
    s), 0)`` (``s`` a two-valued binary activation, possibly max-pooled), either with ``Relu``
    before the ``Greater`` (``relu(v) > 0`` is ``v > 0``: ``sign(relu(bn(c)))``, a binary
    ResNet block's inner activation), as per-channel comparisons ``s_k * c >= t_k``
    (:func:`binary_thresholds`), in place; returns how many. No batch norm is then left on
    these binary decisions for a runtime to fuse into the convolution. (A batch norm whose sum
    with a float tensor reaches the decision stays: its threshold would depend on that
    tensor.)"""
    from onnx import helper, numpy_helper

    g = proto.graph
    consts = const_values(proto)
    prod = {o: n for n in g.node for o in n.output}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             list(g.value_info) + list(g.input) + list(g.output)
             if v.type.tensor_type.HasField("shape")}
    new_inits: list[Any] = []
    count = 0

    def bn_of(name: str) -> dict[str, Any] | None:
        n = prod.get(name)
        if n is None or n.op_type != "BatchNormalization" or len(n.input) < 5:
            return None
        if not all(i in consts for i in n.input[1:5]) or n.input[0] not in ranks:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("training_mode", 0):
            return None
        return {"x": n.input[0], "scale": consts[n.input[1]], "bias": consts[n.input[2]],
                "mean": consts[n.input[3]], "var": consts[n.input[4]],
                "eps": float(attrs.get("epsilon", 1e-5)), "rank": ranks[n.input[0]]}

    def two_values(name: str) -> tuple[float, float] | None:
        n = prod.get(name)
        while n is not None and n.op_type in _VALUE_KEEPING:
            n = prod.get(n.input[0])
        if n is None or n.op_type != "Where" or n.input[1] not in consts or \
                n.input[2] not in consts:
            return None
        a, b = consts[n.input[1]], consts[n.input[2]]
        return (float(a), float(b)) if a.size == 1 and b.size == 1 and a.dtype == np.float32 \
            else None

    nodes = list(g.node)
    out_nodes = []
    for n in nodes:
        zero = consts.get(n.input[1]) if n.op_type == "Greater" else None
        if zero is None or zero.size != 1 or float(zero) != 0.0:
            out_nodes.append(n)
            continue
        v = n.input[0]
        while v in prod and prod[v].op_type == "Relu":  # relu(v) > 0 <=> v > 0 (NaN: false)
            v = prod[v].input[0]
        src = prod.get(v)
        cases: list[tuple[dict, float]] = []
        sel = None
        bn = bn_of(v)
        if bn is not None:
            cases = [(bn, 0.0)]
        elif src is not None and src.op_type == "Add":
            for i, j in ((0, 1), (1, 0)):
                bn, vals = bn_of(src.input[i]), two_values(src.input[j])
                if bn is not None and vals is not None:
                    cases, sel = [(bn, vals[0]), (bn, vals[1])], (src.input[j], vals[0])
                    break
        if not cases:
            out_nodes.append(n)
            continue
        base = f"{n.output[0]}_thr"
        shape = [1, -1] + [1] * (cases[0][0]["rank"] - 2)
        outs = []
        for k, (b, off) in enumerate(cases):
            s, t = binary_thresholds(b, off)
            sn, tn = f"{base}{k}_s", f"{base}{k}_t"
            new_inits += [numpy_helper.from_array(s.reshape(shape), sn),
                          numpy_helper.from_array(t.reshape(shape), tn)]
            out_nodes.append(helper.make_node("Mul", [b["x"], sn], [f"{base}{k}_m"]))
            outs.append(f"{base}{k}_ge" if sel else n.output[0])
            out_nodes.append(helper.make_node("GreaterOrEqual", [f"{base}{k}_m", tn],
                                              [outs[-1]]))
        if sel is not None:
            vn = f"{base}_v"
            new_inits.append(numpy_helper.from_array(np.float32(sel[1]), vn))
            out_nodes.append(helper.make_node("Equal", [sel[0], vn], [f"{base}_is"]))
            # (s == a and ge_a) or (s != a and ge_b); ONNX Runtime has no boolean Where
            out_nodes += [helper.make_node("And", [f"{base}_is", outs[0]], [f"{base}_a"]),
                          helper.make_node("Not", [f"{base}_is"], [f"{base}_not"]),
                          helper.make_node("And", [f"{base}_not", outs[1]], [f"{base}_b"]),
                          helper.make_node("Or", [f"{base}_a", f"{base}_b"], [n.output[0]])]
        count += 1
    del g.node[:]
    g.node.extend(out_nodes)
    g.initializer.extend(new_inits)
    return count


def prune_unused(proto: Any) -> None:
    """Drop nodes whose outputs nothing reads (and then unused initializers), in place."""
    g = proto.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [n for n in g.node if any(o in used for o in n.output if o)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
