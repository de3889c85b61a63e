"""Pure tensor formulas of the quantizers (no autograd, no validation).

Every function here follows ``docs/QUANTIZERS.md`` operation for operation in the input's
dtype, so that float32 results match a NumPy float32 reference bit for bit. Two rules hold
throughout:

* ``round_half_away`` is C's ``std::round`` (ties away from zero), never ``torch.round``.
* ``log2`` is never evaluated in floating point. For ``|x| = m * 2**e`` with ``m`` in
  ``[0.5, 1)`` (``frexp``), ``round(log2|x|) = e if m >= 2**-0.5 else e - 1`` (no ties exist:
  ``log2|x|`` is never a half-integer), and the INQ rounding
  ``floor(log2|x|) + (frac(log2|x|) >= log2 1.5) = e - 1 + (m >= 0.75)``. This is what the
  formulas mean mathematically; a float ``log2`` can round ``k + 0.5 - tiny`` up to ``k + 0.5``
  and disagree across CPU and CUDA.

Scalars enter as 0-d tensors on the input's device: CUDA turns division by a CPU scalar into a
multiplication by its reciprocal, which is not bit-identical.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SQRT_HALF_UP",
    "fixed_point",
    "fixed_point_bounds",
    "fixed_point_mask",
    "inq_levels",
    "is_compiling",
    "min_max",
    "min_max_range",
    "pow2",
    "pow2_bit_args",
    "pow2_exponent",
    "pow2_mask",
    "round_half_away",
]

# The smallest float32 >= 2**-0.5: for float32 m, ``m >= 2**-0.5`` iff ``m >= SQRT_HALF_UP``.
_c = np.float32(2.0**-0.5)
SQRT_HALF_UP: float = float(_c if float(_c) >= 2.0**-0.5 else np.nextafter(_c, np.float32(1)))


def _t(value: float, like: Tensor) -> Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def round_half_away(v: Tensor) -> Tensor:
    """C ``std::round``: nearest integer, ties away from zero; ``2.5 -> 3``, ``-0.5 -> -1``.

    Not ``floor(|v| + 0.5)`` evaluated in float: that sum rounds, so ``0.49999997 -> 1`` and
    odd integers above ``2**23`` move. Computed as ``r = round_half_even(|v|)`` (exact), plus 1
    where ``|v| - r == 0.5`` (exact: the ties half-even sent down), with the sign of ``v``
    (``copysign``, so ``-0.3 -> -0.0`` as ``trunc`` gives): six vectorised passes, where
    ``trunc`` and ``where`` with a bool condition are scalar loops on CPU.
    """
    a = v.abs()
    r = torch.round(a)
    r.add_(a.sub_(r).eq_(0.5))
    return r.copysign_(v)


def pow2_exponent(a: Tensor) -> Tensor:
    """Exact ``round_half_away(log2 a)`` for ``a > 0`` as an integer tensor (see module doc)."""
    mant, exp = torch.frexp(a)
    return exp - (mant < SQRT_HALF_UP).to(exp.dtype)


_NUMPY_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}
# Pure functions of Python constants: torch.compile may evaluate them once at trace time.
_constant = getattr(torch.compiler, "assume_constant_result", lambda f: f)


@_constant
def _as_dtype(value: float, dtype: torch.dtype) -> float | None:
    """``value`` rounded to ``dtype`` (what ``_t(value, x)`` holds), as a Python float, computed
    without a tensor (no host sync, no graph break under ``torch.compile``); ``None`` for dtypes
    other than float32/float64 (one rounding from float64 in both NumPy and torch)."""
    t = _NUMPY_FLOAT.get(dtype)
    if t is None:
        return None
    with np.errstate(over="ignore"):
        return float(t(value))


@_constant
def _exact_reciprocal(delta: float, dtype: torch.dtype) -> float | None:
    """``1 / d`` for ``d = delta`` rounded to ``dtype`` when ``d`` is a power of two whose
    reciprocal is a normal number of ``dtype``, else ``None``. Then ``v * (1 / d)`` and ``v / d``
    round the same real number, so they are bit-identical (a multiply is ~4x cheaper than a
    divide on CPU)."""
    d = _as_dtype(delta, dtype)
    if d is None or not 0 < d < math.inf or math.frexp(d)[0] != 0.5:
        return None
    inv = 1.0 / d
    fi = torch.finfo(dtype)
    return inv if fi.tiny <= inv <= fi.max else None


def is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing (host-side shortcuts must not run then)."""
    f = getattr(torch.compiler, "is_compiling", None)
    return bool(f()) if f is not None else False


def _clamp(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``minimum(maximum(x, lo), hi)`` bit for bit. With finite nonzero 0-d CPU bounds this is
    ``clamp`` with scalar bounds (one pass, no ternary iterator; the Python floats are the exact
    bound values). A zero bound keeps the two ops: ``maximum(-0.0, 0.0)`` returns either zero
    depending on the element's position in the vectorised loop, and the formula inherits that."""
    if lo.numel() == 1 and hi.numel() == 1 and lo.device.type == "cpu" and not is_compiling():
        lo_f, hi_f = float(lo), float(hi)
        if lo_f != 0 and hi_f != 0 and math.isfinite(lo_f) and math.isfinite(hi_f):
            return torch.clamp(x, lo_f, hi_f)
    return torch.minimum(torch.maximum(x, lo), hi)


def fixed_point_mask(
    x: Tensor, sign: bool, n: int, delta: float, want_mask: bool
) -> tuple[Tensor, Tensor | None]:
    """Forward of the fixed-point quantizer and, if ``want_mask``, its STE mask
    ``xmin <= x <= xmax``: the values of :func:`fixed_point`, computed on one buffer in place
    (no division when ``delta`` is a power of two), the mask as ``clamp(x) == x``."""
    nb = n - 1 if sign else n
    xmax_f = (2.0**nb - 1.0) * delta
    hi, d_f = _as_dtype(xmax_f, x.dtype), _as_dtype(delta, x.dtype)
    symmetric = sign and hi is not None and hi > 0 and d_f is not None and 0 < d_f < math.inf
    if symmetric:
        # -hi < 0 < hi: no zero bound, so clamp with these exact scalars is min(max(.)) bit for
        # bit (hi may be inf, like _t(xmax_f, x)), and c has the sign of x, -0.0 included; with
        # 0 < d < inf so has v = c / d (never NaN)
        c = torch.clamp(x, -hi, hi)
    else:
        c = _clamp(x, _t(-xmax_f if sign else 0.0, x), _t(xmax_f, x))
    mask = (c == x) if want_mask else None  # clamp(x) == x  <=>  xmin <= x <= xmax (finite x)
    inv = _exact_reciprocal(delta, x.dtype)
    d = _t(delta, x)
    v = c.mul_(inv) if inv is not None else c.div_(d)
    if not symmetric:
        return round_half_away(v).mul_(d), mask
    # round_half_away(v) on v's own buffer: v (and c) have x's sign, so copysign from x
    r = torch.round(v.abs_())
    r.add_(v.sub_(r).eq_(0.5))
    return r.copysign_(x).mul_(d), mask


@functools.lru_cache(maxsize=512)  # pure function of its arguments, called per step
def fixed_point_bounds(
    sign: bool, n: int, delta: float, dtype: torch.dtype
) -> tuple[float, float, float, float] | None:
    """``(lo, hi, inv, d)`` for the fused kernel: the exact float32 clamp bounds, ``1 / d`` when
    :func:`fixed_point_mask` multiplies (else 0.0) and ``d``; None where the kernel does not
    apply (other dtypes; an infinite or non-positive bound or step)."""
    if dtype != torch.float32:
        return None
    nb = n - 1 if sign else n
    hi, d = _as_dtype((2.0**nb - 1.0) * delta, dtype), _as_dtype(delta, dtype)
    if hi is None or d is None or not (0 < hi < math.inf and 0 < d < math.inf):
        return None
    inv = _exact_reciprocal(delta, dtype)
    return (-hi if sign else 0.0), hi, (inv if inv is not None else 0.0), d


def fixed_point(x: Tensor, sign: bool, n: int, delta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of the fixed-point quantizer; returns ``(y, xmin, xmax)``.

    ``y = round_half_away(c / delta) * delta`` with ``c = clamp(x, xmin, xmax)``.
    """
    nb = n - 1 if sign else n
    xmax_f = (2.0**nb - 1.0) * delta
    y, _ = fixed_point_mask(x, sign, n, delta, False)
    return y, _t(-xmax_f if sign else 0.0, x), _t(xmax_f, x)


@_constant
def _f32_bits(v: float) -> int:
    """The IEEE bits of ``float32(v)`` as a Python int."""
    return int(np.array(v, dtype=np.float32).view(np.int32))


_F32_ABS = 0x7FFFFFFF
_F32_EXP = 0x7F800000
# For a normal float32 a with exponent field E and mantissa field F, frexp gives m = 1.F / 2, so
# round(log2 a) = E - 127 + [m >= SQRT_HALF_UP] = E - 127 + [F >= F_T], F_T the mantissa field of
# 2 * SQRT_HALF_UP. Adding 2**23 - F_T to the bits carries into the exponent exactly when
# F >= F_T, so the bits of q = 2**round(log2 a) are (bits(a) + _POW2_ROUND) & _F32_EXP (the
# largest finite a gives inf, as ldexp(1, 128) does).
_POW2_ROUND = 0x00800000 - (_f32_bits(2.0 * SQRT_HALF_UP) & 0x007FFFFF)


@_constant
def _thr_bits(p_min: float) -> int:
    """Bits of ``thr = p_min * float32(2**-0.5)`` as the formula's float32 product gives it."""
    thr = np.float32(p_min) * np.float32(2.0**-0.5)
    return int(np.array(thr, dtype=np.float32).view(np.int32))


def _pow2_bits(
    x: Tensor, sign: bool, with_zero: bool, m: int, p_min: float, want_mask: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`pow2` for float32 on the integer bits: no frexp/ldexp (each ~10x an add) and no
    ``where``; every step but the first is in place. Exact when ``p_min`` is normal (and above
    the smallest normal when ``with_zero``): then a subnormal |x|, whose rounded exponent the bit
    trick gets wrong, lands below ``p_min`` either way and only its comparison with
    ``thr = p_min / sqrt 2`` matters, which is done on the exact bits."""
    a = x.view(torch.int32) & _F32_ABS  # |x| as bits; nonnegative floats order like their bits
    pmin_b, pmax_b = _f32_bits(p_min), _f32_bits(2.0**m)
    # q <= p_max  <=>  (a + R) >> 23 <= m + 127  <=>  a < ((m + 128) << 23) - R
    in_range = (a < ((m + 128) << 23) - _POW2_ROUND) if want_mask else None
    keep = None
    if with_zero:  # q < p_min and |x| < thr  ->  0; |x| < thr implies q < p_min
        keep = a >= _thr_bits(p_min)
    neg = x < 0
    a.add_(_POW2_ROUND).bitwise_and_(_F32_EXP).clamp_(pmin_b, pmax_b)
    if sign:
        if keep is not None:
            a.mul_(keep)
        a.add_(neg, alpha=-(2**31))  # set the sign bit where x < 0 (not at -0.0)
    else:
        if in_range is not None:
            in_range &= ~neg
        keep = ~neg if keep is None else keep & ~neg
        a.mul_(keep)
        if not with_zero:
            a.add_(neg, alpha=pmin_b)
    return a.view(torch.float32), in_range


@functools.lru_cache(maxsize=512)  # pure function of its arguments, called per step
def pow2_bit_args(
    sign: bool, with_zero: bool, n: int, m: int, dtype: torch.dtype
) -> tuple[int, int, int, int, int] | None:
    """``(limit, thr, round, pmin, pmax)``: the int32 constants of :func:`_pow2_bits` for the
    fused kernel, or None where that path does not apply (other dtypes, a ``p_min`` the bit
    trick cannot take, constants outside int32)."""
    nb = n - 1 if sign else n
    nb = nb - 1 if with_zero else nb
    e_min = m - (2**nb - 1)
    if dtype != torch.float32 or not (e_min > -126 or (e_min == -126 and not with_zero)):
        return None
    limit = ((m + 128) << 23) - _POW2_ROUND
    if not -(2**31) <= limit < 2**31 or m > 127:
        return None
    p_min = 2.0**e_min
    return limit, _thr_bits(p_min), _POW2_ROUND, _f32_bits(p_min), _f32_bits(2.0**m)


def pow2_mask(
    x: Tensor, sign: bool, with_zero: bool, n: int, m: int, want_mask: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`pow2`, skipping the mask unless ``want_mask``; float32 takes an exact bit path."""
    nb = n - 1 if sign else n
    nb = nb - 1 if with_zero else nb
    e_min = m - (2**nb - 1)
    if x.dtype == torch.float32 and (e_min > -126 or (e_min == -126 and not with_zero)):
        return _pow2_bits(x, sign, with_zero, m, 2.0**e_min, want_mask)
    y, in_range = pow2(x, sign, with_zero, n, m)
    return y, (in_range if want_mask else None)


def pow2(
    x: Tensor, sign: bool, with_zero: bool, n: int, m: int
) -> tuple[Tensor, Tensor]:
    """Forward of the power-of-two quantizer; returns ``(y, in_range)``.

    ``in_range`` is the straight-through mask ``2**round(log2|x|) <= p_max`` (True at 0).
    This is the formula as written (any dtype); :func:`pow2_mask` is the fast equivalent.
    """
    nb = n - 1 if sign else n
    nb = nb - 1 if with_zero else nb
    p_max = _t(2.0**m, x)
    # 2**(m - (2**nb - 1)) underflows to 0 for wide codes; that is the float32 value of p_min.
    p_min_f = math.ldexp(1.0, m - (2**nb - 1)) if m - (2**nb - 1) > -1100 else 0.0
    p_min = _t(p_min_f, x)
    thr = p_min * _t(2.0**-0.5, x)
    a = x.abs()
    q = torch.ldexp(torch.ones_like(x), pow2_exponent(a))
    q = torch.where(a == 0, torch.zeros_like(q), q)
    in_range = q <= p_max
    q = torch.where(q > p_max, p_max, q)
    if with_zero:
        low = torch.where(a < thr, torch.zeros_like(q), p_min)
    else:
        low = p_min.expand_as(q)
    q = torch.where(q < p_min, low, q)
    if sign:
        y = torch.where(x < 0, -q, q)
    else:
        neg = torch.zeros_like(q) if with_zero else p_min.expand_as(q)
        y = torch.where(x < 0, neg, q)
        in_range = in_range & (x >= 0)
    return y, in_range


def inq_levels(w: Tensor, num_bits: int) -> Tensor:
    """The INQ power-of-two levels of a whole tensor (Zhou et al. 2017, eq. 2-4)."""
    a = w.abs()
    s = a.max() if a.numel() else a.new_tensor(0.0)
    s = torch.where(s == 0, torch.ones_like(s), s)
    ms, es = torch.frexp(s)
    n1 = es - 1 + (ms >= 0.75).to(es.dtype)
    n2 = n1 + 1 - 2 ** (num_bits - 2)
    prune = torch.ldexp(torch.ones_like(s), n2 - 1)
    mw, ew = torch.frexp(a)
    k = torch.minimum(torch.maximum(ew - 1 + (mw >= 0.75).to(ew.dtype), n2), n1)
    q = torch.sign(w) * torch.ldexp(torch.ones_like(w), k)
    return torch.where(a < prune, torch.zeros_like(w), q)


def min_max_range(
    qr_min: Tensor, qr_max: Tensor, ql_min: float, ql_max: float, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nudged quantization grid: returns ``(scale, zero_point, lo, hi)`` (float tensors)."""
    qr_max = torch.where(qr_max - qr_min < eps, qr_min + _t(eps, qr_min), qr_max)
    lmin, lmax = _t(ql_min, qr_min), _t(ql_max, qr_min)
    scale = (qr_max - qr_min) / (lmax - lmin)
    zp = lmin - qr_min / scale
    zp = torch.where(zp <= lmin, lmin, torch.where(zp >= lmax, lmax, round_half_away(zp)))
    lo = (lmin - zp) * scale
    hi = (lmax - zp) * scale
    return scale, zp, lo, hi


def min_max(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``round_half_away((clamp(x, lo, hi) - lo) / scale) * scale + lo``, in place after the
    clamp.

    ``v = (clamp(x) - lo) / scale`` is ``>= 0``, ``-0.0`` or NaN, so ``round_half_away`` needs
    no ``abs``/``copysign``: ``round_half_even(v)`` plus 1 at the ties it sent down. The one
    difference, ``+0.0`` for ``v = -0.0``, cannot show: ``c - lo = -0.0`` needs ``lo = +0.0``,
    and then ``+-0.0 * scale + lo`` is ``+0.0`` either way.
    """
    v = _clamp(x, lo, hi).sub_(lo).div_(scale)
    r = torch.round(v)
    r.add_(v.sub_(r).eq_(0.5))
    return r.mul_(scale).add_(lo)
