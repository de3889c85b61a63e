"""Exact ONNX translations of the fewbits operators, for PyTorch's ONNX exporter.

``TRANSLATIONS`` maps each forward operator of :mod:`fewbits.ops` to an ONNX Script function
building the same computation from standard ONNX operators; pass it as
``torch.onnx.export(model, args, dynamo=True, custom_translation_table=TRANSLATIONS)`` (what
:func:`fewbits.export.onnx.to_onnx` does). Imported only when exporting (it needs ``onnxscript``).

Exactness (float32). ONNX ``Round`` rounds ties to even; fewbits rounds them away from zero, so
:func:`round_half_away` builds ``r = Round(|v|)`` (exact) plus 1 where ``|v| - r == 0.5`` (exact),
with the sign of ``v`` -- not ``Floor(|v| + 0.5)``, whose sum rounds (``0.49999997 -> 1``).
Clamps, the fixed-point multiply by an exact reciprocal, the min-max grid (``scale``, nudged zero
point, ``lo``, ``hi``: the float32 operations of :func:`fewbits._math.min_max_range`, in the same
order) and every comparison are the ones PyTorch makes, so each operator gives PyTorch's values
bit for bit on every finite input. Powers of two come from tables of exact constants or from
``Pow(2, k)`` with an integer ``k``, ``floor(log2 a)`` from ``Log`` corrected by exact
comparisons. The straight-through masks are not exported (inference graphs do not read them):
the second output of a masked operator is an empty uint8 tensor.

Weight operators (``binary_connect``, ``binary_weight``, ``inq``) are translated too, for a plain
``torch.onnx.export``; :func:`fewbits.export.onnx.to_onnx` stores the quantized weights as
constants instead (computed by PyTorch, no graph work at run time).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op

from .. import _math

__all__ = ["REGISTERED", "TRANSLATIONS", "register_globally", "round_half_away"]

#: Whether :func:`register_globally` added the translations to PyTorch's exporter.
REGISTERED = False

_F32 = ir.DataType.FLOAT


def _c(value: Any, dtype: Any = np.float32) -> Any:
    """An exact constant (``np.float32(value)``, or an array)."""
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


def _float32(x: Any, name: str) -> None:
    dt = getattr(x, "dtype", None)
    if dt is not None and dt != _F32:
        raise ValueError(f"fewbits::{name}: ONNX export is exact for float32 only, got {dt}; "
                         "export model.float()")


def _no_mask() -> Any:
    return _c(np.zeros(0, np.uint8), np.uint8)


def round_half_away(v: Any) -> Any:
    """ONNX form of :func:`fewbits._math.round_half_away` (exact for every float32 ``v``)."""
    a = op.Abs(v)
    r = op.Round(a)
    r = op.Add(r, op.Cast(op.Equal(op.Sub(a, r), _c(0.5)), to=ir.DataType.FLOAT))
    return op.Where(op.Less(v, _c(0.0)), op.Neg(r), r)


# --------------------------------------------------------------------------- binary

def binary_connect(w: Any, zero_to: float, stochastic: bool, check: int, fn: str) -> Any:
    """``Where(w > 0, 1, -1)``, ``zero_to`` at 0."""
    _float32(w, "binary_connect")
    if stochastic:
        raise ValueError(f"{fn}: stochastic binarization draws random numbers; export a model "
                         "in eval mode with deterministic binarization")
    y = op.Where(op.Greater(w, _c(0.0)), _c(1.0), _c(-1.0))
    return op.Where(op.Equal(w, _c(0.0)), _c(zero_to), y)


def binary_weight(w: Any, check: int, fn: str) -> Any:
    """``alpha[o] * sign(w[o])`` with ``alpha[o] = mean |w[o]|`` accumulated in float64."""
    _float32(w, "binary_weight")
    flat = op.Flatten(w, axis=1)
    a = op.ReduceMean(op.Abs(op.Cast(flat, to=ir.DataType.DOUBLE)),
                      _c([1], np.int64), keepdims=1)
    a = op.Cast(a, to=ir.DataType.FLOAT)
    return op.Reshape(op.Where(op.GreaterOrEqual(flat, _c(0.0)), a, op.Neg(a)), op.Shape(w))


def binary_act(x: Any, low: float, grad_scale: float, want_mask: bool, check: int,
               fn: str) -> tuple[Any, Any]:
    """``Where(x > 0, 1, low)``: a comparison, exact."""
    _float32(x, "binary_act")
    return op.Where(op.Greater(x, _c(0.0)), _c(1.0), _c(low)), _no_mask()


# --------------------------------------------------------------------------- fixed point

def fixed_point(x: Any, sign: bool, n: int, delta: float, want_mask: bool, check: int,
                fn: str) -> tuple[Any, Any]:
    """:func:`fewbits._math.fixed_point_mask`: clamp, ``* (1/delta)`` (or ``/ delta``),
    :func:`round_half_away`, ``* delta``."""
    _float32(x, "fixed_point")
    nb = n - 1 if sign else n
    with np.errstate(over="ignore"):
        hi, d = np.float32((2.0**nb - 1.0) * delta), np.float32(delta)
    lo = -hi if sign else np.float32(0.0)
    c = op.Min(op.Max(x, _c(lo)), _c(hi))
    # 1/d where d is a power of two with a normal reciprocal: x * (1/d) == x / d bit for bit,
    # and PyTorch multiplies then (fewbits._math.fixed_point_mask)
    inv = None
    if 0 < d < np.inf and math.frexp(float(d))[0] == 0.5:
        r = 1.0 / float(d)
        inv = r if np.finfo(np.float32).tiny <= r <= np.finfo(np.float32).max else None
    v = op.Mul(c, _c(inv)) if inv is not None else op.Div(c, _c(d))
    return op.Mul(round_half_away(v), _c(d)), _no_mask()


# --------------------------------------------------------------------------- power of two

def _pow2_exponents(n: int, sign: bool, with_zero: bool, m: int) -> tuple[int, int]:
    nb = (n - 1 if sign else n) - (1 if with_zero else 0)
    return m - (2**nb - 1), m


def pow2(x: Any, sign: bool, with_zero: bool, n: int, m: int, want_mask: bool, check: int,
         fn: str) -> tuple[Any, Any]:
    """Power-of-two quantization (docs/QUANTIZERS.md ``pow2``).

    ``p = 2^floor(log2 a)`` is looked up in a table of exact powers of two at
    ``floor(Log(a) / ln 2)``, then halved where ``p > a`` and doubled where ``2p <= a`` (exact);
    ``round(log2 a)`` picks ``2p`` where ``a >= 2p * 2^-0.5`` (the float32 threshold
    :data:`fewbits._math.SQRT_HALF_UP`, PyTorch's comparison); then the clamp, zero rule and
    sign of the spec."""
    _float32(x, "pow2")
    e_min, e_max = _pow2_exponents(n, sign, with_zero, m)
    # the table reaches 2^(e_min - 2) (exact, subnormal below 2^-126); a level below 2^-126,
    # or the zero threshold p_min * 2^-0.5 below it, would not be exact
    if e_min < -126 or (with_zero and e_min == -126) or e_max + 2 > 127:
        raise ValueError(f"{fn}: pow2 exponents [{e_min}, {e_max}] leave the float32 normal "
                         "range; ONNX export needs n <= 8 (with zero: n <= 8 and m > -62)")
    lo_e = e_min - 2
    table = np.array([math.ldexp(1.0, e) for e in range(lo_e, e_max + 2)], np.float32)
    p_min, p_max = np.float32(math.ldexp(1.0, e_min)), np.float32(math.ldexp(1.0, e_max))
    thr = np.float32(p_min * np.float32(2.0**-0.5))
    a = op.Abs(x)
    k = op.Floor(op.Mul(op.Log(a), _c(1.0 / math.log(2.0))))
    k = op.Clip(k, _c(lo_e), _c(e_max + 1))
    idx = op.Cast(op.Sub(k, _c(lo_e)), to=ir.DataType.INT64)
    p = op.Gather(_c(table), idx)
    p = op.Where(op.Greater(p, a), op.Mul(p, _c(0.5)), p)
    p2 = op.Mul(p, _c(2.0))
    p = op.Where(op.LessOrEqual(p2, a), p2, p)
    p2 = op.Mul(p, _c(2.0))
    r = op.Where(op.GreaterOrEqual(a, op.Mul(p2, _c(_math.SQRT_HALF_UP))), p2, p)
    r = op.Min(r, _c(p_max))
    pm, zero = _c(p_min), _c(0.0)
    if with_zero:
        low = op.Where(op.Less(a, _c(thr)), zero, pm)
        r = op.Where(op.Less(r, pm), low, r)
    else:
        r = op.Max(r, pm)
    neg = op.Less(x, zero)
    y = op.Where(neg, op.Neg(r), r) if sign else op.Where(neg, zero if with_zero else pm, r)
    return y, _no_mask()


def _floor_log2(a: Any) -> tuple[Any, Any]:
    """``(k, 2^k)`` with ``k = floor(log2 a)`` for ``a > 0`` (float32, exact): ``Log`` may be
    one off next to a power of two; exact comparisons correct it."""
    k = op.Floor(op.Mul(op.Log(a), _c(1.0 / math.log(2.0))))
    p = op.Pow(_c(2.0), k)
    over = op.Greater(p, a)
    k = op.Where(over, op.Sub(k, _c(1.0)), k)
    p = op.Where(over, op.Mul(p, _c(0.5)), p)
    up = op.LessOrEqual(op.Mul(p, _c(2.0)), a)
    return op.Where(up, op.Add(k, _c(1.0)), k), op.Where(up, op.Mul(p, _c(2.0)), p)


def inq(w: Any, num_bits: int, check: int, fn: str) -> Any:
    """:func:`fewbits._math.inq_levels`: ``frexp`` as :func:`_floor_log2`, the ``>= 0.75``
    mantissa test as ``a >= 1.5 * 2^k`` (exact)."""
    _float32(w, "inq")
    a = op.Abs(w)
    s = op.ReduceMax(op.Reshape(a, _c([-1], np.int64)), keepdims=0)
    s = op.Where(op.Equal(s, _c(0.0)), _c(1.0), s)
    ks, ps = _floor_log2(s)
    n1 = op.Add(ks, op.Cast(op.GreaterOrEqual(s, op.Mul(ps, _c(1.5))), to=ir.DataType.FLOAT))
    n2 = op.Sub(n1, _c(float(2 ** (num_bits - 2) - 1)))
    prune = op.Pow(_c(2.0), op.Sub(n2, _c(1.0)))
    safe = op.Where(op.Equal(a, _c(0.0)), _c(1.0), a)
    kw, pw = _floor_log2(safe)
    kw = op.Add(kw, op.Cast(op.GreaterOrEqual(safe, op.Mul(pw, _c(1.5))), to=ir.DataType.FLOAT))
    kw = op.Min(op.Max(kw, n2), n1)
    q = op.Mul(op.Sign(w), op.Pow(_c(2.0), kw))
    return op.Where(op.Less(a, prune), _c(0.0), q)


# --------------------------------------------------------------------------- min-max

def _range(r: Any, x: Any) -> Any:
    """A 0-d range, or ``(C,)`` viewed over ``x``'s axis 0 (:func:`fewbits.ops.range_view`)."""
    shape = getattr(r, "shape", None)
    if shape is not None and len(shape) == 1 and shape[0] != 1:
        rank = len(x.shape)
        return op.Reshape(r, _c([-1] + [1] * (rank - 1), np.int64))
    return op.Reshape(r, _c(np.zeros(0, np.int64), np.int64))


def min_max(x: Any, qr_min: Any, qr_max: Any, ql_min: int, ql_max: int, eps: float, fine: bool,
            want_code: bool, check: int, fn: str) -> tuple[Any, Any]:
    """:func:`fewbits._math.min_max_range` then :func:`fewbits._math.min_max`, operation for
    operation in float32 (the grid folds to constants when the ranges are)."""
    _float32(x, "min_max")
    rmin, rmax = _range(qr_min, x), _range(qr_max, x)
    rmax = op.Where(op.Less(op.Sub(rmax, rmin), _c(eps)), op.Add(rmin, _c(eps)), rmax)
    lmin, lmax = _c(float(ql_min)), _c(float(ql_max))
    scale = op.Div(op.Sub(rmax, rmin), op.Sub(lmax, lmin))
    zp = op.Sub(lmin, op.Div(rmin, scale))
    zp = op.Where(op.LessOrEqual(zp, lmin), lmin,
                  op.Where(op.GreaterOrEqual(zp, lmax), lmax, round_half_away(zp)))
    lo = op.Mul(op.Sub(lmin, zp), scale)
    hi = op.Mul(op.Sub(lmax, zp), scale)
    v = op.Div(op.Sub(op.Min(op.Max(x, lo), hi), lo), scale)
    r = op.Round(v)  # v >= 0: half to even, plus 1 at the ties it sent down
    r = op.Add(r, op.Cast(op.Equal(op.Sub(v, r), _c(0.5)), to=ir.DataType.FLOAT))
    return op.Add(op.Mul(r, scale), lo), _no_mask()


#: operator overload -> its ONNX Script translation.
TRANSLATIONS: dict[Any, Callable[..., Any]] = {
    torch.ops.fewbits.binary_connect.default: binary_connect,
    torch.ops.fewbits.binary_weight.default: binary_weight,
    torch.ops.fewbits.binary_act.default: binary_act,
    torch.ops.fewbits.fixed_point.default: fixed_point,
    torch.ops.fewbits.pow2.default: pow2,
    torch.ops.fewbits.inq.default: inq,
    torch.ops.fewbits.min_max.default: min_max,
}


def register_globally() -> bool:
    """Add :data:`TRANSLATIONS` to PyTorch's default ONNX registry, so that a plain
    ``torch.onnx.export(model, args, dynamo=True)`` started afterwards uses them. PyTorch has no
    public hook for this; where its private registry is not what this expects, nothing is
    registered and ``False`` is returned (the fewbits operators then refuse that export and name
    :func:`fewbits.export.onnx.export_onnx`)."""
    global REGISTERED
    if REGISTERED:
        return True
    try:
        from torch.onnx._internal.exporter import _registration
        from torch.onnx._internal.exporter._torchlib import _torchlib_registry as reg
    except ImportError:
        return False
    registry = getattr(reg, "_registry", None)
    meta = getattr(_registration, "OnnxDecompMeta", None)
    if not isinstance(registry, list) or meta is None:
        return False
    known = {getattr(m, "fx_target", None) for m in registry}
    try:  # what torch.onnx.export(custom_translation_table=...) registers, made permanent
        for target, fn in TRANSLATIONS.items():
            if target not in known:
                registry.append(meta(onnx_function=fn, fx_target=target, signature=None,
                                     is_custom=True))
    except Exception:  # a changed private API: keep the refusal
        return False
    REGISTERED = True
    return True
