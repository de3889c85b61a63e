"""Pure tensor formulas of the quantizers (no autograd, no validation).

Every function here follows ``QUANTIZERS.md`` operation for operation in the input's dtype, so
that float32 results match a NumPy float32 reference bit for bit. Two rules hold throughout:

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

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SQRT_HALF_UP",
    "fixed_point",
    "inq_levels",
    "min_max",
    "min_max_range",
    "pow2",
    "pow2_exponent",
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
    odd integers above ``2**23`` move. ``v - trunc(v)`` is exact, so comparing it with 0.5 is.
    """
    t = torch.trunc(v)
    return torch.where((v - t).abs() >= 0.5, t + torch.sign(v), t)


def pow2_exponent(a: Tensor) -> Tensor:
    """Exact ``round_half_away(log2 a)`` for ``a > 0`` as an integer tensor (see module doc)."""
    mant, exp = torch.frexp(a)
    return exp - (mant < SQRT_HALF_UP).to(exp.dtype)


def fixed_point(x: Tensor, sign: bool, n: int, delta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of the fixed-point quantizer; returns ``(y, xmin, xmax)``."""
    nb = n - 1 if sign else n
    xmax_f = (2.0**nb - 1.0) * delta
    xmax = _t(xmax_f, x)
    xmin = _t(-xmax_f if sign else 0.0, x)
    c = torch.minimum(torch.maximum(x, xmin), xmax)
    d = _t(delta, x)
    y = round_half_away(c / d) * d
    return y, xmin, xmax


def pow2(
    x: Tensor, sign: bool, with_zero: bool, n: int, m: int
) -> tuple[Tensor, Tensor]:
    """Forward of the power-of-two quantizer; returns ``(y, in_range)``.

    ``in_range`` is the straight-through mask ``2**round(log2|x|) <= p_max`` (True at 0).
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
    """``round_half_away((clamp(x, lo, hi) - lo) / scale) * scale + lo``."""
    c = torch.minimum(torch.maximum(x, lo), hi)
    return round_half_away((c - lo) / scale) * scale + lo
