"""ONNX export of fewbits networks, and running them in ONNX Runtime.

The network is traced with :mod:`torch.fx` (fewbits layers and quantizers are kept as leaves) and
each node is written as ONNX operators by hand, so that every quantizer becomes the operators that
express it, not whatever a generic exporter makes of its autograd function:

===================  ===========================================================================
quantizer            ONNX form
===================  ===========================================================================
fixed point          weights: int8 (int16 for n <= 16) initializer -> ``DequantizeLinear``
                     (scale ``delta``, zero point 0); activations: ``Clip(+-(2^(n-1)-1) delta)``
                     -> ``QuantizeLinear`` -> ``DequantizeLinear``
min-max              weights and activations: ``QuantizeLinear`` / ``DequantizeLinear`` with the
                     scale and integer zero point of :meth:`fewbits.quantizers.MinMax.grid`
                     (uint8 when ``0 <= ql_min < ql_max <= 255``), preceded by ``Clip(lo, hi)``
                     when ``[ql_min, ql_max]`` is narrower than the integer type
binary (all three)   weights: the binarized float constants (``+-1``, ``+-alpha`` per channel)
binary tanh/sigmoid  ``Where(x > 0, 1, -1)`` / ``Cast(x > 0)``: exact
pow2 / INQ weights   float constants holding the quantized powers of two (exact values; ONNX has no
                     power-of-two integer type)
pow2 activations     an exact subgraph: ``floor(log2|x|)`` from ``Log``, corrected by comparisons
                     with exact powers of two from a table, rounded at ``2^-0.5``, clamped as the
                     spec says (see :func:`_pow2_act`)
===================  ===========================================================================

Numerics. Batch norm, convolutions and sums in ONNX Runtime may round differently from PyTorch in
the last bit. ``QuantizeLinear`` rounds half to even while fewbits rounds half away from zero, and
computes ``round(x / scale) + zp`` where fewbits computes ``round((x - lo) / scale)``; these agree
except at (near-)exact ties. Weight-only families therefore reproduce PyTorch's logits to float
rounding. Families with activation quantizers do too, except where a value lands within that last
bit of a level boundary (or on a tie) and one quantization level flips: a few logits move by up to
a few percent, predictions practically never (``tests/test_onnx.py`` states the bounds and what
was measured on real data).

    >>> import tempfile, os
    >>> from fewbits.models import create_model
    >>> m = create_model("mnist_fp_net_mlp", width=32).eval()
    >>> report = export_onnx(m, os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> report.nodes["QuantizeLinear"] > 0
    True
"""

from __future__ import annotations

import math
import operator
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from .. import _math
from .._io import atomic_write
from ..layers import QuantAct, QuantConv2d, QuantLinear, quant_layers
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
from .container import MAGIC, decode_tensor

__all__ = [
    "DEFAULT_OPSET",
    "OnnxReport",
    "compare_onnx",
    "export_onnx",
    "input_shape_of",
    "onnx_session",
    "resolve_source",
    "to_onnx",
]

DEFAULT_OPSET = 21  # int16 QuantizeLinear and per-axis DequantizeLinear

_LEAVES = (QuantAct, QuantConv2d, QuantLinear)


# --------------------------------------------------------------------------- sources

def _is_packed_file(source: Any) -> bool:
    if isinstance(source, nn.Module) or not os.path.isfile(source):
        return False
    with open(source, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _file_codes(path: str | os.PathLike, model_spec: dict) -> dict[str, tuple[Quantizer, Codes]]:
    """The stored codes of a ``.fewbits`` file with the quantizer that made them."""
    from ..models import create_model
    from .packed import _read

    header, blobs = _read(path)
    fresh = dict(quant_layers(create_model(model_spec["name"], **model_spec["kwargs"])))
    params: dict[str, dict[str, Tensor]] = {}
    for t in header["tensors"]:
        if t.get("kind") == "param":
            arr = decode_tensor(t, blobs[t["name"]]).reshape(t["param_shape"])
            params.setdefault(t["param_of"], {})[t["param"]] = torch.from_numpy(arr.copy())
    out: dict[str, tuple[Quantizer, Codes]] = {}
    for t in header["tensors"]:
        if t.get("kind") != "codes":
            continue
        lname, role = t["name"].rsplit(".", 1)
        q = getattr(fresh.get(lname), f"{role}_quantizer", None)
        if q is None:
            continue
        arr = decode_tensor(t, blobs[t["name"]]).astype(np.int64).reshape(-1)
        out[t["name"]] = (q, Codes(torch.from_numpy(arr), t["bits"], tuple(t["shape"]),
                                   params.get(t["name"], {})))
    return out


def resolve_source(source: nn.Module | str | os.PathLike
                   ) -> tuple[nn.Module, dict[str, tuple[Quantizer, Codes]]]:
    """``(model in eval mode, {"layer.weight": (quantizer, codes)})`` for a model, a ``.fewbits``
    file or a run folder / checkpoint.

    Codes are given for the uniform quantizers (fixed point, min-max), whose integer form the ONNX
    graph and the int8 path use; a live model's are computed with ``quantizer.encode``, a packed
    file's are read from it. A model rebuilt by :func:`~fewbits.export.load_packed` has no weight
    quantizers left, so pass the file itself to keep the integer form.
    """
    if _is_packed_file(source):
        from .packed import load_packed

        model = load_packed(source)
        return model, _file_codes(source, model.fewbits_spec)
    from .packed import _as_model

    model = _as_model(source).eval()
    codes: dict[str, tuple[Quantizer, Codes]] = {}
    with torch.no_grad():
        for lname, layer in quant_layers(model):
            for role in ("weight", "bias"):
                q, p = getattr(layer, f"{role}_quantizer"), getattr(layer, role)
                if isinstance(q, (FixedPoint, MinMax)) and p is not None:
                    codes[f"{lname}.{role}"] = (q, q.encode(p.detach()))
    return model, codes


def input_shape_of(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` a zoo model takes: CIFAR nets ``(3, 32, 32)``, MNIST nets ``(C, 28, 28)``."""
    spec = getattr(model, "fewbits_spec", None) or {}
    name, kw = spec.get("name", ""), spec.get("kwargs", {})
    if name.startswith("cifar10_"):
        return (int(kw.get("in_channels", 3)), 32, 32)
    if name.startswith("mnist_"):
        return (int(kw.get("in_channels", 1)), 28, 28)
    raise ValueError(f"cannot tell the input shape of model {name or type(model).__name__!r}; "
                     "pass input_shape=(C, H, W)")


# --------------------------------------------------------------------------- tracing

class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as e:  # fx raises many kinds for data-dependent control flow
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx for export: {e}; "
                         "the forward must not branch on tensor values") from e


# --------------------------------------------------------------------------- graph builder

_INT_TYPES = {  # ONNX type, numpy dtype, min, max
    "uint8": (2, np.uint8, 0, 255), "int8": (3, np.int8, -128, 127),
    "uint16": (4, np.uint16, 0, 65535), "int16": (5, np.int16, -32768, 32767),
}


def _int_type(lo: int, hi: int) -> str | None:
    """Smallest ONNX quantized integer type holding ``[lo, hi]``."""
    for name in ("uint8", "int8", "uint16", "int16"):
        _, _, tmin, tmax = _INT_TYPES[name]
        if tmin <= lo and hi <= tmax:
            return name
    return None


class _Graph:
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
        self.inits.append(self.nh.from_array(np.ascontiguousarray(arr.astype(dtype)), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


# --------------------------------------------------------------------------- weights

def _weight_input(g: _Graph, key: str, value: Tensor,
                  coded: tuple[Quantizer, Codes] | None) -> tuple[str, str]:
    """The ONNX input for a quantized layer's weight/bias and a description of its form."""
    if coded is not None:
        q, c = coded
        if isinstance(q, FixedPoint):
            levels = c.codes.reshape(c.shape) - q._offset
            kind = _int_type(int(levels.min()), int(levels.max())) if levels.numel() else None
            if kind is not None and q.n <= 16:
                ints = g.const(key + "_q", levels.numpy(), _INT_TYPES[kind][1])
                s = g.const(key + "_scale", np.float32(q.delta))
                z = g.const(key + "_zp", np.array(0), _INT_TYPES[kind][1])
                return g.op("DequantizeLinear", [ints, s, z], key), f"{kind} DequantizeLinear"
        elif isinstance(q, MinMax):
            levels = c.codes.reshape(c.shape) + q.ql_min
            zp = c.params["zero_point"].reshape(-1)
            kind = _int_type(q.ql_min, q.ql_max)
            if kind is not None:
                ints = g.const(key + "_q", levels.numpy(), _INT_TYPES[kind][1])
                per_channel = c.params["scale"].numel() > 1
                scale = c.params["scale"].reshape(-1).float().numpy()
                s = g.const(key + "_scale", scale if per_channel else scale[0])
                z = g.const(key + "_zp", zp.numpy() if per_channel else zp.numpy()[0],
                            _INT_TYPES[kind][1])
                attrs = {"axis": 0} if per_channel else {}
                return (g.op("DequantizeLinear", [ints, s, z], key, **attrs),
                        f"{kind} DequantizeLinear" + (" per channel" if per_channel else ""))
    return g.const(key, value.detach().float()), "float constant"


def _describe_constant(q: Quantizer | None, default: str) -> str:
    if isinstance(q, (BinaryConnect, BinaryWeight)):
        return "binarized float constant"
    if isinstance(q, (Pow2, INQ)):
        return "power-of-two float constant"
    return default


# --------------------------------------------------------------------------- activations

def _clip(g: _Graph, x: str, lo: float | None, hi: float | None, base: str) -> str:
    ins = [x, g.const(base + "_lo", np.float32(lo)) if lo is not None else "",
           g.const(base + "_hi", np.float32(hi)) if hi is not None else ""]
    while ins[-1] == "":
        ins.pop()
    return g.op("Clip", ins, base + "_clip")


def _qdq(g: _Graph, x: str, scale: float, zp: int, kind: str, base: str) -> str:
    s = g.const(base + "_scale", np.float32(scale))
    z = g.const(base + "_zp", np.array(zp), _INT_TYPES[kind][1])
    q = g.op("QuantizeLinear", [x, s, z], base + "_q")
    return g.op("DequantizeLinear", [q, s, z], base + "_dq")


def _round_half_away(g: _Graph, v: str, base: str) -> str:
    a = g.op("Abs", [v], base + "_abs")
    fl = g.op("Floor", [g.op("Add", [a, g.const(base + "_half", np.float32(0.5))], base + "_h")],
              base + "_floor")
    return g.op("Mul", [g.op("Sign", [v], base + "_sign"), fl], base + "_round")


def _fixed_point_act(g: _Graph, x: str, q: FixedPoint, base: str) -> tuple[str, str]:
    kmax = 2 ** (q.n - 1) - 1 if q.sign else 2**q.n - 1
    kmin = -kmax if q.sign else 0
    c = _clip(g, x, kmin * q.delta, kmax * q.delta, base)
    kind = _int_type(kmin, kmax)
    if kind is not None:
        return _qdq(g, c, q.delta, 0, kind, base), f"Clip + {kind} Q/DQ"
    d = g.const(base + "_delta", np.float32(q.delta))
    r = _round_half_away(g, g.op("Div", [c, d], base + "_div"), base)
    return g.op("Mul", [r, d], base + "_out"), "Clip + exact rounding (float)"


def _min_max_act(g: _Graph, x: str, q: MinMax, base: str) -> tuple[str, str]:
    if q.qr_min.numel() != 1:
        raise ValueError(f"{base}: per-channel min-max activation ranges cannot be exported")
    scale, zp, lo, hi = (float(t) for t in q.grid(torch.zeros(())))
    kind = _int_type(q.ql_min, q.ql_max)
    if kind is not None:
        _, _, tmin, tmax = _INT_TYPES[kind]
        full = (q.ql_min, q.ql_max) == (tmin, tmax)
        c = x if full else _clip(g, x, lo, hi, base)
        return _qdq(g, c, scale, int(zp), kind, base), ("" if full else "Clip + ") + \
            f"{kind} Q/DQ"
    c = _clip(g, x, lo, hi, base)
    lo_c, s_c = g.const(base + "_lo", np.float32(lo)), g.const(base + "_s", np.float32(scale))
    r = _round_half_away(g, g.op("Div", [g.op("Sub", [c, lo_c], base + "_sub"), s_c],
                                 base + "_div"), base)
    return g.op("Add", [g.op("Mul", [r, s_c], base + "_mul"), lo_c], base + "_out"), \
        "Clip + exact rounding (float)"


def _pow2_act(g: _Graph, x: str, q: Pow2, base: str) -> tuple[str, str]:
    """Exact power-of-two quantization (QUANTIZERS.md section 6) from ONNX operators.

    ``p = 2^floor(log2 a)`` is looked up in a table of exact powers of two at the index
    ``floor(Log(a) / ln 2)``; the float ``Log`` may be one off next to a power of two, so ``p`` is
    halved where ``p > a`` and doubled where ``2p <= a``, which makes it exact. Then
    ``round(log2 a)`` picks ``2p`` where ``a >= 2p * 2^-0.5`` (the float32 threshold of
    :data:`fewbits._math.SQRT_HALF_UP`, the same comparison the PyTorch code makes), and the
    result is clamped to ``[p_min, p_max]`` with the zero rule and sign of the spec.
    """
    nb = q.n - int(q.sign) - int(q.with_zero)
    e_max, e_min = q.m, q.m - (2**nb - 1)
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


def _act(g: _Graph, x: str, q: Quantizer | None, base: str) -> tuple[str, str | None]:
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


# --------------------------------------------------------------------------- nodes

def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _layer(g: _Graph, name: str, m: nn.Module, x: str, codes: dict,
           report: OnnxReport) -> str:
    is_q = isinstance(m, (QuantConv2d, QuantLinear))
    if is_q:
        x, how = _act(g, x, m.input_quantizer, name + "_in")
        if how:
            report.activations[name + ".input"] = how
    w_q = getattr(m, "weight_quantizer", None)
    with torch.no_grad():
        w_val = m.quantized_weight() if is_q else m.weight
        b_val = (m.quantized_bias() if is_q else m.bias)
    coded = codes.get(f"{name}.weight")
    w, how = _weight_input(g, name + "_weight", w_val, coded)
    report.weights[name + ".weight"] = _describe_constant(coded[0] if coded else w_q, how)
    ins = [x, w]
    if b_val is not None:
        coded = codes.get(f"{name}.bias")
        b, how = _weight_input(g, name + "_bias", b_val, coded)
        report.weights[name + ".bias"] = _describe_constant(
            coded[0] if coded else getattr(m, "bias_quantizer", None), how)
        ins.append(b)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"{name}: only numeric zero padding can be exported "
                             f"(got padding={m.padding!r}, padding_mode={m.padding_mode!r})")
        ph, pw = _pair(m.padding)
        y = g.op("Conv", ins, name, kernel_shape=list(_pair(m.kernel_size)),
                 strides=list(_pair(m.stride)), pads=[ph, pw, ph, pw],
                 dilations=list(_pair(m.dilation)), group=m.groups)
    else:
        y = g.op("Gemm", ins, name, transB=1)
    if is_q:
        y, how = _act(g, y, m.output_quantizer, name + "_out")
        if how:
            report.activations[name + ".output"] = how
    return y


def _module(g: _Graph, name: str, m: nn.Module, x: str, codes: dict,
            report: OnnxReport) -> str:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return _layer(g, name, m, x, codes, report)
    if isinstance(m, QuantAct):
        y, how = _act(g, x, m.quantizer, name)
        if how:
            report.activations[name] = how
        return y
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
        ph, pw = _pair(m.padding)
        stride = m.stride if m.stride is not None else m.kernel_size
        return g.op("MaxPool", [x], name, kernel_shape=list(_pair(m.kernel_size)),
                    strides=list(_pair(stride)), pads=[ph, pw, ph, pw],
                    dilations=list(_pair(m.dilation)), ceil_mode=int(m.ceil_mode))
    if isinstance(m, nn.AvgPool2d):
        ph, pw = _pair(m.padding)
        stride = m.stride if m.stride is not None else m.kernel_size
        return g.op("AveragePool", [x], name, kernel_shape=list(_pair(m.kernel_size)),
                    strides=list(_pair(stride)), pads=[ph, pw, ph, pw],
                    ceil_mode=int(m.ceil_mode), count_include_pad=int(m.count_include_pad))
    if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1):
        return g.op("GlobalAveragePool", [x], name)
    if isinstance(m, nn.Flatten) and m.end_dim == -1:
        return g.op("Flatten", [x], name, axis=m.start_dim)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return x
    raise ValueError(f"{name}: module {type(m).__name__} has no ONNX form in fewbits' exporter")


def _function(g: _Graph, node: fx.Node, args: list[Any]) -> str:
    fn, kw = node.target, node.kwargs
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
        if _pair(size) == (1, 1):
            return g.op("GlobalAveragePool", [args[0]], node.name)
    raise ValueError(f"operation {getattr(fn, '__name__', fn)!r} (node {node.name}) has no ONNX "
                     "form in fewbits' exporter")


# --------------------------------------------------------------------------- public API

@dataclass
class OnnxReport:
    """What :func:`export_onnx` wrote: operator counts and the form of every quantized tensor."""

    path: str
    model: str
    opset: int
    file_bytes: int = 0
    nodes: dict[str, int] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    activations: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        forms = Counter(self.weights.values())
        acts = Counter(self.activations.values())
        lines = [f"{self.model} -> {self.path} (opset {self.opset}, {self.file_bytes:,} bytes)",
                 "weights:     " + "; ".join(f"{n} x {k}" for k, n in sorted(forms.items())),
                 "activations: " + ("; ".join(f"{n} x {k}" for k, n in sorted(acts.items()))
                                    or "float"),
                 "operators:   " + ", ".join(f"{k} {n}" for k, n in sorted(self.nodes.items()))]
        return "\n".join(lines)


def to_onnx(source: nn.Module | str | os.PathLike, *, opset: int = DEFAULT_OPSET,
            input_shape: tuple[int, int, int] | None = None) -> tuple[Any, OnnxReport]:
    """Build the ``onnx.ModelProto`` of ``source`` (see the module doc) without writing it.

    The graph has one input ``images`` (float32, ``(N, C, H, W)``, ``N`` dynamic, values in
    ``[0, 1]``) and one output ``logits``.
    """
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the onnx extra is installed in dev
        raise ImportError("ONNX export needs the onnx package: pip install 'fewbits[onnx]'") \
            from e
    model, codes = resolve_source(source)
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(model)
    spec = getattr(model, "fewbits_spec", {"name": type(model).__name__})
    report = OnnxReport("", spec["name"], opset)
    graph = _trace(model)
    modules = dict(model.named_modules())
    g = _Graph()
    env: dict[str, str] = {}
    out_name = None

    def arg(a: Any) -> Any:
        return env[a.name] if isinstance(a, fx.Node) else a

    was_training = model.training
    model.eval()
    try:
        for node in graph.nodes:
            if node.op == "placeholder":
                if env:
                    raise ValueError("only single-input models can be exported")
                env[node.name] = "images"
            elif node.op == "call_module":
                if node.kwargs or len(node.args) != 1:
                    raise ValueError(f"{node.target}: modules must take one tensor")
                env[node.name] = _module(g, str(node.target), modules[node.target],
                                         arg(node.args[0]), codes, report)
            elif node.op == "call_function":
                env[node.name] = _function(g, node, [arg(a) for a in node.args])
            elif node.op == "output":
                out_name = arg(node.args[0])
            else:
                raise ValueError(f"node {node.name} ({node.op} {node.target}) has no ONNX form")
    finally:
        model.train(was_training)
    if not isinstance(out_name, str):
        raise ValueError("the model must return one tensor (the logits)")
    g.nodes.append(g.h.make_node("Identity", [out_name], ["logits"], name="logits"))
    h = g.h
    graph_proto = h.make_graph(
        g.nodes, spec["name"],
        [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", *shape])],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", None])],
        g.inits)
    proto = h.make_model(graph_proto, opset_imports=[h.make_opsetid("", opset)],
                         producer_name="fewbits")
    proto.ir_version = min(proto.ir_version, 10)  # what current ONNX Runtime builds accept
    proto.doc_string = f"fewbits model {spec['name']}; input: images in [0, 1]"
    onnx.checker.check_model(proto)
    report.nodes = dict(Counter(n.op_type for n in proto.graph.node))
    return proto, report


def export_onnx(source: nn.Module | str | os.PathLike, path: str | os.PathLike, *,
                opset: int = DEFAULT_OPSET,
                input_shape: tuple[int, int, int] | None = None) -> OnnxReport:
    """Write ``source`` (model, ``.fewbits`` file, run folder or checkpoint) as ONNX to ``path``.

    Atomic write; returns an :class:`OnnxReport`. See the module doc for each quantizer's form.
    """
    proto, report = to_onnx(source, opset=opset, input_shape=input_shape)
    data = proto.SerializeToString()
    path = os.fspath(path)
    atomic_write(path, data)
    report.path, report.file_bytes = path, len(data)
    return report


def onnx_session(model: Any, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for a path, bytes or ``ModelProto``."""
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    so = ort.SessionOptions()
    # Idle workers sleep instead of spinning: spinning threads steal the cores from whatever
    # runs next (PyTorch, in a benchmark that interleaves both).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def compare_onnx(source: nn.Module | str | os.PathLike, onnx_model: Any,
                 images: Tensor) -> dict[str, float]:
    """Run ``images`` (float ``[0, 1]``) through PyTorch and ONNX Runtime; return
    ``{"max_abs": max |logit difference|, "max_rel": max_abs / max |logit|,
    "top1_agreement": fraction of equal argmax}``."""
    model, _ = resolve_source(source)
    with torch.no_grad():
        ref = model(images).float()
    got = torch.from_numpy(onnx_session(onnx_model).run(
        None, {"images": images.float().numpy()})[0])
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    return {"max_abs": diff, "max_rel": diff / scale if scale else diff,
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean())}
