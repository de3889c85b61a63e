"""ONNX operator forms of fewbits' quantizers: the graph builder and, per quantizer, the
operators that compute it (see the table in :mod:`fewbits.export.onnx`).

Grids come from the quantizers themselves (:meth:`~fewbits.quantizers.FixedPoint.int_grid`,
:meth:`~fewbits.quantizers.MinMax.int_grid`, :meth:`~fewbits.quantizers.Pow2.exponent_range`);
rounding that ``QuantizeLinear`` cannot express (grids wider than 16 bits) is
:func:`round_half_away`, exact for every float32 input.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import _math
from ..quantizers import (
    INQ,
    BinaryConnect,
    BinarySigmoid,
    BinaryTanh,
    BinaryWeight,
    Codes,
    FixedPoint,
    MinMax,
    Pow2,
    Quantizer,
)

__all__ = [
    "ATEN_FIXES",
    "INT_TYPES",
    "Graph",
    "act",
    "as_function",
    "avg_pool2d",
    "describe_constant",
    "float_module_op",
    "function_op",
    "int_type",
    "layer_op",
    "pair",
    "qdq",
    "round_half_away",
    "weight_input",
]


def pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def layer_op(g: Graph, name: str, m: nn.Module, ins: list[str]) -> str:
    """``Conv`` (numeric zero padding) or ``Gemm`` (``transB``) of layer ``m`` on ``ins``."""
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"{name}: only numeric zero padding can be exported "
                             f"(got padding={m.padding!r}, padding_mode={m.padding_mode!r})")
        ph, pw = pair(m.padding)
        return g.op("Conv", ins, name, kernel_shape=list(pair(m.kernel_size)),
                    strides=list(pair(m.stride)), pads=[ph, pw, ph, pw],
                    dilations=list(pair(m.dilation)), group=m.groups)
    return g.op("Gemm", ins, name, transB=1)

# --------------------------------------------------------------------------- graph builder

INT_TYPES = {  # ONNX type, numpy dtype, min, max
    "uint8": (2, np.uint8, 0, 255), "int8": (3, np.int8, -128, 127),
    "uint16": (4, np.uint16, 0, 65535), "int16": (5, np.int16, -32768, 32767),
}


def int_type(lo: int, hi: int) -> str | None:
    """Smallest ONNX quantized integer type holding ``[lo, hi]``."""
    for name in ("uint8", "int8", "uint16", "int16"):
        _, _, tmin, tmax = INT_TYPES[name]
        if tmin <= lo and hi <= tmax:
            return name
    return None


class Graph:
    """Collects ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.h, self.nh = helper, numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = Counter()

    def name(self, base: str) -> str:
        base = base.replace(".", "_") or "t"
        self._n[base] += 1
        return base if self._n[base] == 1 else f"{base}_{self._n[base]}"

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        arr = np.asarray(value.detach().cpu().numpy() if isinstance(value, Tensor) else value)
        name = self.name(base)
        # ascontiguousarray makes 0-d arrays 1-d: keep scalars scalar (ONNX Runtime fuses QDQ
        # pairs only with scalar scales and zero points)
        data = np.ascontiguousarray(arr.astype(dtype)).reshape(arr.shape)
        self.inits.append(self.nh.from_array(data, name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


# --------------------------------------------------------------------------- weights

def weight_input(g: Graph, key: str, value: Tensor,
                  coded: tuple[Quantizer, Codes] | None) -> tuple[str, str]:
    """The ONNX input for a quantized layer's weight/bias and a description of its form."""
    if coded is not None:
        q, c = coded
        a = q.affine(c)  # uniform grids only: scale, zero point and integer bounds
        kind = int_type(a.qmin, a.qmax) if a is not None else None
        if a is not None and kind is not None:
            int_dtype = INT_TYPES[kind][1]
            ints = g.const(key + "_q", a.int_repr.numpy(), int_dtype)
            s = g.const(key + "_scale", a.scale.float().numpy())
            z = g.const(key + "_zp", a.zero_point.numpy(), int_dtype)
            attrs = {"axis": a.axis} if a.axis is not None else {}
            return (g.op("DequantizeLinear", [ints, s, z], key, **attrs),
                    f"{kind} DequantizeLinear" + (" per channel" if a.axis is not None else ""))
    return g.const(key, value.detach().float()), "float constant"


def describe_constant(q: Quantizer | None, default: str) -> str:
    if isinstance(q, (BinaryConnect, BinaryWeight)):
        return "binarized float constant"
    if isinstance(q, (Pow2, INQ)):
        return "power-of-two float constant"
    return default


# --------------------------------------------------------------------------- activations

def _clip(g: Graph, x: str, lo: float | None, hi: float | None, base: str) -> str:
    ins = [x, g.const(base + "_lo", np.float32(lo)) if lo is not None else "",
           g.const(base + "_hi", np.float32(hi)) if hi is not None else ""]
    while ins[-1] == "":
        ins.pop()
    return g.op("Clip", ins, base + "_clip")


def qdq(g: Graph, x: str, scale: float, zp: int, kind: str, base: str) -> str:
    s = g.const(base + "_scale", np.float32(scale))
    z = g.const(base + "_zp", np.array(zp), INT_TYPES[kind][1])
    q = g.op("QuantizeLinear", [x, s, z], base + "_q")
    return g.op("DequantizeLinear", [q, s, z], base + "_dq")


def round_half_away(g: Graph, v: str, base: str) -> str:
    """ONNX form of :func:`fewbits._math.round_half_away`, exact for every float32 ``v``:
    ``r = Round(|v|)`` (half to even, exact), plus 1 where ``|v| - r == 0.5`` (exact: ``r`` is
    within 0.5 of ``|v|``), times ``Sign(v)``. Not ``Floor(|v| + 0.5)``: that sum rounds, so
    ``0.49999997 -> 1`` and odd integers above ``2^23`` move by one."""
    a = g.op("Abs", [v], base + "_abs")
    r = g.op("Round", [a], base + "_rne")
    tie = g.op("Equal", [g.op("Sub", [a, r], base + "_frac"),
                         g.const(base + "_half", np.float32(0.5))], base + "_tie")
    r = g.op("Add", [r, g.op("Cast", [tie], base + "_up", to=1)], base + "_away")
    return g.op("Mul", [g.op("Sign", [v], base + "_sign"), r], base + "_round")


def _fixed_point_act(g: Graph, x: str, q: FixedPoint, base: str) -> tuple[str, str]:
    grid = q.int_grid()
    c = _clip(g, x, grid.qmin * grid.scale, grid.qmax * grid.scale, base)
    kind = int_type(grid.qmin, grid.qmax)
    if kind is not None:
        return qdq(g, c, grid.scale, 0, kind, base), f"Clip + {kind} Q/DQ"
    d = g.const(base + "_delta", np.float32(grid.scale))
    r = round_half_away(g, g.op("Div", [c, d], base + "_div"), base)
    return g.op("Mul", [r, d], base + "_out"), "Clip + exact rounding (float)"


def _min_max_act(g: Graph, x: str, q: MinMax, base: str) -> tuple[str, str]:
    if q.qr_min.numel() != 1:
        raise ValueError(f"{base}: per-channel min-max activation ranges cannot be exported")
    _, _, lo, hi = (float(t) for t in q.grid(torch.zeros(())))
    grid = q.int_grid()
    scale, zp = grid.scale, grid.zero_point
    kind = int_type(grid.qmin, grid.qmax)
    if kind is not None:
        _, _, tmin, tmax = INT_TYPES[kind]
        full = (q.ql_min, q.ql_max) == (tmin, tmax)
        c = x if full else _clip(g, x, lo, hi, base)
        return qdq(g, c, scale, int(zp), kind, base), ("" if full else "Clip + ") + \
            f"{kind} Q/DQ"
    c = _clip(g, x, lo, hi, base)
    lo_c, s_c = g.const(base + "_lo", np.float32(lo)), g.const(base + "_s", np.float32(scale))
    r = round_half_away(g, g.op("Div", [g.op("Sub", [c, lo_c], base + "_sub"), s_c],
                                 base + "_div"), base)
    return g.op("Add", [g.op("Mul", [r, s_c], base + "_mul"), lo_c], base + "_out"), \
        "Clip + exact rounding (float)"


def _pow2_act(g: Graph, x: str, q: Pow2, base: str) -> tuple[str, str]:
    """Exact power-of-two quantization (docs/QUANTIZERS.md, ``pow2``) from ONNX operators.

    ``p = 2^floor(log2 a)`` is looked up in a table of exact powers of two at the index
    ``floor(Log(a) / ln 2)``; the float ``Log`` may be one off next to a power of two, so ``p`` is
    halved where ``p > a`` and doubled where ``2p <= a``, which makes it exact. Then
    ``round(log2 a)`` picks ``2p`` where ``a >= 2p * 2^-0.5`` (the float32 threshold of
    :data:`fewbits._math.SQRT_HALF_UP`, the same comparison the PyTorch code makes), and the
    result is clamped to ``[p_min, p_max]`` with the zero rule and sign of the spec.
    """
    e_min, e_max = q.exponent_range()
    if e_min - 2 < -126 or e_max + 2 > 126:
        # the rounding thresholds 2^e * 2^-0.5 must be normal floats to be exact
        raise ValueError(f"{base}: pow2 activation exponents [{e_min}, {e_max}] leave the float32 "
                         "normal range; use fewer bits (n <= 8 with zero, n <= 7 without)")
    lo_e = e_min - 2
    table = np.array([math.ldexp(1.0, e) for e in range(lo_e, e_max + 2)], np.float32)
    p_min, p_max = np.float32(math.ldexp(1.0, e_min)), np.float32(math.ldexp(1.0, e_max))
    thr = np.float32(p_min * np.float32(2.0**-0.5))
    f = lambda v, n: g.const(f"{base}_{n}", np.float32(v))  # noqa: E731
    a = g.op("Abs", [x], base + "_abs")
    k = g.op("Floor", [g.op("Mul", [g.op("Log", [a], base + "_log"),
                                    f(1.0 / math.log(2.0), "inv_ln2")], base + "_log2")],
             base + "_k")
    k = g.op("Clip", [k, f(lo_e, "kmin"), f(e_max + 1, "kmax")], base + "_kc")
    idx = g.op("Cast", [g.op("Sub", [k, f(lo_e, "k0")], base + "_ki")], base + "_idx", to=7)
    p = g.op("Gather", [g.const(base + "_pow2", table), idx], base + "_p")
    half, two = f(0.5, "half"), f(2.0, "two")
    p = g.op("Where", [g.op("Greater", [p, a], base + "_gt"),
                       g.op("Mul", [p, half], base + "_ph"), p], base + "_p1")
    p2 = g.op("Mul", [p, two], base + "_p2x")
    p = g.op("Where", [g.op("LessOrEqual", [p2, a], base + "_le"), p2, p], base + "_p2")
    p2 = g.op("Mul", [p, two], base + "_p3x")
    up = g.op("GreaterOrEqual", [a, g.op("Mul", [p2, f(_math.SQRT_HALF_UP, "sqh")],
                                         base + "_t")], base + "_up")
    r = g.op("Where", [up, p2, p], base + "_r")
    r = g.op("Min", [r, f(p_max, "pmax")], base + "_rmax")
    pm = f(p_min, "pmin")
    zero = f(0.0, "zero")
    if q.with_zero:
        low = g.op("Where", [g.op("Less", [a, f(thr, "thr")], base + "_small"), zero, pm],
                   base + "_low")
        r = g.op("Where", [g.op("Less", [r, pm], base + "_below"), low, r], base + "_rz")
    else:
        r = g.op("Max", [r, pm], base + "_rmin")
    neg = g.op("Less", [x, zero], base + "_neg")
    if q.sign:
        out = g.op("Where", [neg, g.op("Neg", [r], base + "_minus"), r], base + "_out")
    else:
        out = g.op("Where", [neg, zero if q.with_zero else pm, r], base + "_out")
    return out, "exact pow2 subgraph"


def act(g: Graph, x: str, q: Quantizer | None, base: str) -> tuple[str, str | None]:
    if q is None:
        return x, None
    if isinstance(q, BinaryTanh):
        gt = g.op("Greater", [x, g.const(base + "_zero", np.float32(0))], base + "_gt")
        return g.op("Where", [gt, g.const(base + "_one", np.float32(1)),
                              g.const(base + "_mone", np.float32(-1))], base + "_sign"), \
            "Where(x > 0, 1, -1)"
    if isinstance(q, BinarySigmoid):
        gt = g.op("Greater", [x, g.const(base + "_zero", np.float32(0))], base + "_gt")
        return g.op("Cast", [gt], base + "_step", to=1), "Cast(x > 0)"
    if isinstance(q, FixedPoint):
        return _fixed_point_act(g, x, q, base)
    if isinstance(q, MinMax):
        return _min_max_act(g, x, q, base)
    if isinstance(q, Pow2):
        return _pow2_act(g, x, q, base)
    raise ValueError(f"{base}: activation quantizer {type(q).__name__} has no ONNX form")


# --------------------------------------------------------------------------- float operations

def float_module_op(g: Graph, name: str, m: nn.Module, x: str) -> str:
    """The ONNX form of a float module (batch norm, ReLU, pooling, flatten, identity) applied
    to ``x``; ``ValueError`` naming any other module."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.running_mean is None:
            raise ValueError(f"{name}: batch norm without running statistics cannot be exported")
        c = m.num_features
        gamma = m.weight if m.affine else torch.ones(c)
        beta = m.bias if m.affine else torch.zeros(c)
        ins = [x, g.const(name + "_gamma", gamma), g.const(name + "_beta", beta),
               g.const(name + "_mean", m.running_mean), g.const(name + "_var", m.running_var)]
        return g.op("BatchNormalization", ins, name, epsilon=float(m.eps))
    if isinstance(m, nn.ReLU):
        return g.op("Relu", [x], name)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise ValueError(f"{name}: MaxPool2d(return_indices=True) has no ONNX form in "
                             "fewbits' exporter")
        return _max_pool(g, name, x, m.kernel_size, m.stride, m.padding, m.dilation,
                         m.ceil_mode)
    if isinstance(m, nn.AvgPool2d):
        ph, pw = pair(m.padding)
        stride = m.stride if m.stride is not None else m.kernel_size
        return g.op("AveragePool", [x], name, kernel_shape=list(pair(m.kernel_size)),
                    strides=list(pair(stride)), pads=[ph, pw, ph, pw],
                    ceil_mode=int(m.ceil_mode), count_include_pad=int(m.count_include_pad))
    if isinstance(m, nn.AdaptiveAvgPool2d) and pair(m.output_size) == (1, 1):
        return g.op("GlobalAveragePool", [x], name)
    if isinstance(m, nn.Flatten) and m.end_dim == -1:
        return g.op("Flatten", [x], name, axis=m.start_dim)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return x
    raise ValueError(f"{name}: module {type(m).__name__} has no ONNX form in fewbits' exporter")


def _max_pool(g: Graph, name: str, x: str, kernel: Any, stride: Any, padding: Any,
              dilation: Any, ceil_mode: bool) -> str:
    ph, pw = pair(padding)
    stride = stride if stride not in (None, ()) else kernel  # PyTorch: stride defaults to kernel
    return g.op("MaxPool", [x], name, kernel_shape=list(pair(kernel)),
                strides=list(pair(stride)), pads=[ph, pw, ph, pw],
                dilations=list(pair(dilation)), ceil_mode=int(ceil_mode))


_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                  "return_indices")


#: Tensor methods the exporter reads as the function of the same name (``x.flatten(1)``).
_METHODS = {"flatten": torch.flatten, "relu": torch.relu, "add": torch.add}


def as_function(node: Any) -> Any:
    """The function a ``call_function`` or ``call_method`` node of :mod:`torch.fx` computes
    (methods take their tensor as the first argument, as the function does)."""
    return _METHODS.get(node.target, node.target) if node.op == "call_method" else node.target


def function_op(g: Graph, node: Any, args: list[Any]) -> str:
    """The ONNX form of a function or tensor-method node of :mod:`torch.fx` on ``args`` (ONNX
    names); ``ValueError`` naming any other operation."""
    fn, kw = as_function(node), node.kwargs
    if fn in (nn.functional.max_pool2d, torch.max_pool2d):
        a = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
             "return_indices": False, **dict(zip(_MAX_POOL_ARGS, args, strict=False)), **kw}
        if not a["return_indices"]:
            return _max_pool(g, node.name, a["input"], a["kernel_size"], a["stride"],
                             a["padding"], a["dilation"], a["ceil_mode"])
    if fn in (operator.add, torch.add) and len(args) == 2 and not kw:
        return g.op("Add", args, node.name)
    if fn in (torch.flatten,):
        start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
        if end == -1:
            return g.op("Flatten", [args[0]], node.name, axis=int(start))
    if fn in (nn.functional.relu, torch.relu):
        return g.op("Relu", [args[0]], node.name)
    if fn is nn.functional.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else kw.get("output_size")
        if pair(size) == (1, 1):
            return g.op("GlobalAveragePool", [args[0]], node.name)
    raise ValueError(f"operation {getattr(fn, '__name__', fn)!r} (node {node.name}) has no ONNX "
                     "form in fewbits' exporter")


# --------------------------------------------------------------------------- PyTorch exporter fixes

def avg_pool2d(x: Any, kernel_size: Any, stride: Any = (), padding: Any = (0, 0),
               ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Any:
    """ONNX translation of ``aten.avg_pool2d`` for PyTorch's exporter, whose own translation
    drops ``divisor_override`` (a silently wrong plain average). With it: the window sums as a
    depthwise convolution with a kernel of ones (zero padding), divided by the divisor -- equal
    to PyTorch to float rounding (the sum's order). Without it: PyTorch's translation."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.nn import aten_avg_pool2d

    if divisor_override is None:
        return aten_avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    if ceil_mode:
        raise ValueError("avg_pool2d(divisor_override=..., ceil_mode=True) has no exact ONNX form "
                         "in fewbits' exporter; use ceil_mode=False")
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride) if stride else (kh, kw)
    ph, pw = pair(padding)
    shape = getattr(x, "shape", None)
    channels = shape[1] if shape is not None and len(shape) == 4 else None
    if not isinstance(channels, int):
        raise ValueError("avg_pool2d(divisor_override=...) needs a static channel count to export")
    import onnx_ir as ir

    ones = op.Constant(value=ir.tensor(np.ones((channels, 1, kh, kw), np.float32)))
    s = op.Conv(x, ones, group=channels, kernel_shape=[kh, kw], strides=[sh, sw],
                pads=[ph, pw, ph, pw])
    return op.Div(s, op.Constant(value=ir.tensor(np.float32(divisor_override))))


#: PyTorch operator -> fewbits' translation, where PyTorch's own is wrong.
ATEN_FIXES: dict[Any, Any] = {torch.ops.aten.avg_pool2d.default: avg_pool2d}
