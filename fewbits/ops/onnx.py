"""Exact ONNX translations of the fewbits operators, for PyTorch's ONNX exporter.

``TRANSLATIONS`` maps each forward operator of :mod:`fewbits.ops` to an ONNX Script function
building the same computation from standard ONNX operators; pass it as
``torch.onnx.export(model, args, dynamo=True, custom_translation_table=...)`` (what
:func:`fewbits.export.onnx.to_onnx` does). Each family declares which of these translate its
operators (:meth:`fewbits.quantizers.Quantizer.onnx_translations`); the table is gathered from
the registered families (:func:`fewbits.quantizers.base.family_translations`), and a family may
keep its translation in its own module instead (pow2: :func:`fewbits.quantizers.pow2.pow2_onnx`).
Imported only when exporting (it needs ``onnxscript``).

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
from onnxscript import opset18 as op

from .onnx_form import const
from .onnx_form import round_half_away as _round_half_away

__all__ = ["REGISTERED", "binary_act", "binary_connect", "binary_weight", "fixed_point",
           "float32_only", "inq", "min_max", "no_mask", "register_globally", "round_half_away"]

#: Whether :func:`register_globally` added the translations to PyTorch's exporter.
REGISTERED = False

_F32 = ir.DataType.FLOAT


def _c(value: Any, dtype: Any = np.float32) -> Any:
    """An exact constant (``np.float32(value)``, or an array)."""
    return const(op, value, dtype)


def float32_only(x: Any, name: str) -> None:
    """Refuse a non-float32 input of operator ``fewbits::name`` (the translations are exact for
    float32 only), naming the fix."""
    dt = getattr(x, "dtype", None)
    if dt is not None and dt != _F32:
        raise ValueError(f"fewbits::{name}: ONNX export is exact for float32 only, got {dt}; "
                         "export model.float()")


def no_mask() -> Any:
    """The second output of a masked operator: an empty uint8 tensor (inference graphs do not
    read straight-through masks)."""
    return _c(np.zeros(0, np.uint8), np.uint8)


def round_half_away(v: Any) -> Any:
    """ONNX form of :func:`fewbits._math.round_half_away` (exact for every float32 ``v``;
    :func:`fewbits.ops.onnx_form.round_half_away` with ONNX Script's operators)."""
    return _round_half_away(op, v)


# --------------------------------------------------------------------------- binary

def binary_connect(w: Any, zero_to: float, stochastic: bool, check: int, fn: str) -> Any:
    """``Where(w > 0, 1, -1)``, ``zero_to`` at 0."""
    float32_only(w, "binary_connect")
    if stochastic:
        raise ValueError(f"{fn}: stochastic binarization draws random numbers; export a model "
                         "in eval mode with deterministic binarization")
    y = op.Where(op.Greater(w, _c(0.0)), _c(1.0), _c(-1.0))
    return op.Where(op.Equal(w, _c(0.0)), _c(zero_to), y)


def binary_weight(w: Any, check: int, fn: str) -> Any:
    """``alpha[o] * sign(w[o])`` with ``alpha[o] = mean |w[o]|`` accumulated in float64."""
    float32_only(w, "binary_weight")
    flat = op.Flatten(w, axis=1)
    a = op.ReduceMean(op.Abs(op.Cast(flat, to=ir.DataType.DOUBLE)),
                      _c([1], np.int64), keepdims=1)
    a = op.Cast(a, to=ir.DataType.FLOAT)
    return op.Reshape(op.Where(op.GreaterOrEqual(flat, _c(0.0)), a, op.Neg(a)), op.Shape(w))


def binary_act(x: Any, low: float, grad_scale: float, want_mask: bool, check: int,
               fn: str) -> tuple[Any, Any]:
    """``Where(x > 0, 1, low)``: a comparison, exact."""
    float32_only(x, "binary_act")
    return op.Where(op.Greater(x, _c(0.0)), _c(1.0), _c(low)), no_mask()


# --------------------------------------------------------------------------- fixed point

def fixed_point(x: Any, sign: bool, n: int, delta: float, want_mask: bool, check: int,
                fn: str) -> tuple[Any, Any]:
    """:func:`fewbits._math.fixed_point_mask`: clamp, ``* (1/delta)`` (or ``/ delta``),
    :func:`round_half_away`, ``* delta``."""
    float32_only(x, "fixed_point")
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
    return op.Mul(round_half_away(v), _c(d)), no_mask()


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
    float32_only(w, "inq")
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
    float32_only(x, "min_max")
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
    return op.Add(op.Mul(r, scale), lo), no_mask()


def register_globally(table: dict[Any, Callable[..., Any]]) -> bool:
    """Add the translations ``table`` to PyTorch's default ONNX registry, so that a plain
    ``torch.onnx.export(model, args, dynamo=True)`` started afterwards uses them. PyTorch has no
    public hook for this; where its private registry is not what this expects, nothing is
    registered and ``False`` is returned (the fewbits operators then refuse that export and name
    :func:`fewbits.export.onnx.export_onnx`)."""
    global REGISTERED
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
        for target, fn in table.items():
            if target not in known:
                registry.append(meta(onnx_function=fn, fx_target=target, signature=None,
                                     is_custom=True))
    except Exception:  # a changed private API: keep the refusal
        return False
    REGISTERED = True
    return True
