"""Independent NumPy float32 reference ("oracle") of the quantizer contract (docs/QUANTIZERS.md).

Written from the spec and the cross-module contract only (never from ``fewbits.functional``), so
that ``tests/test_functional.py`` can hold the PyTorch implementation to it bit for bit.
Every function takes and returns NumPy arrays; all arithmetic is float32, one IEEE operation at a
time, in the order the spec writes it (NumPy never fuses ``a * b + c``), so an implementation that
follows the same formulas gives the same bits.  Backward passes are given as separate ``*_grad``
functions that return what the straight-through estimator sends to the input (and, for min-max,
to the ranges).

Spec ambiguities and how this oracle resolves them
--------------------------------------------------
1. ``round_half_away(v)`` is *defined* as ``sign(v) * floor(|v| + 0.5)`` "(C std::round)".  Done
   literally in float32 the two disagree: ``0.49999997 + 0.5`` rounds to ``1.0`` and, for odd
   integers ``v >= 2**23``, ``v + 0.5`` is a tie that rounds to the even ``v + 1``.  The oracle
   implements the exact operation, i.e. ``std::round`` (nearest integer, .5 away from zero), on
   the float32 value ``v`` (see :func:`round_half_away`).
2. Scalar arguments (``delta``, ``eps``, ``ql_min``, ...) are converted to float32 first, and
   derived constants are computed in float32 in the spec's order: ``xmax = f32(2**nb - 1) *
   f32(delta)`` (so for ``n = 32`` unsigned ``f32(2**32 - 1)`` is ``2**32``), ``thr = f32(p_min) *
   f32(2**-0.5)``, ``scale = (qr_max - qr_min) / (f32(ql_max) - f32(ql_min))`` with the *nudged*
   ``qr_max``.  Powers of two ``2**k`` are exact (0 below 2**-149, inf from 2**128).
3. log2 rounding is exact, per the contract: with ``|x| = mant * 2**e``, ``mant`` in [0.5, 1),
   ``round_half_away(log2|x|) = e`` iff ``mant >= 2**-0.5`` *as real numbers*.  float32(2**-0.5)
   = 0.70710677 lies below the true value, so ``mant = 0.70710677`` rounds DOWN to ``e - 1``.
   INQ's ``floor(log2) + (frac >= log2 1.5)`` is ``(e - 1) + (mant >= 0.75)``.
4. pow2's zero threshold ``|x| < thr`` uses the float32 ``thr`` of point 2, literally.  With exact
   log2 rounding ``q < p_min`` already means ``|x| < p_min / sqrt(2)`` (real), so the threshold
   only matters for ``|x| == p_min * 0.70710677`` exactly: there ``q < p_min`` but ``|x| < thr``
   is false, so the oracle gives ``p_min`` (not 0).
5. Smallest bit widths.  pow2 with ``nb < 0`` (``n = 1, sign=True, with_zero=True``) has no
   level set: refused (ValueError).  pow2 with ``nb = 0`` is a real level set with ``p_min =
   p_max`` (``n = 2`` signed with zero = ternary ``{-2**m, 0, 2**m}``; ``n = 1`` signed without
   zero = ``±2**m``) and the contract only refuses ``n < 1``, so it is valid here.  Fixed point
   with ``nb = 0`` (``n = 1`` signed) has no nonzero level at all (``xmax = 0``): refused, like
   the implementation does.
6. The sign of a zero result (``+0`` vs ``-0``) is not specified anywhere; the tests compare bits
   after mapping ``-0`` to ``+0``.  ``binary_connect``: ``-0`` counts as zero (gets
   ``quantize_zero_to``); ``binary_weight``: ``-0`` gets ``+alpha``; ``binary_tanh(±0) = -1``.
7. ``binary_weight`` needs an output-channel axis plus at least one axis to average over
   (``ndim >= 2``); a vector would make ``alpha[o] = |w[o]|`` and the layer an identity, so it
   is refused (ValueError) and ``binary_connect`` is the tool for biases.
8. min-max range gradients are sums; float32 summation order is implementation defined, so the
   oracle sums in float64 and rounds once (bit exact whenever every partial sum is exact, e.g.
   dyadic ``dy``; otherwise compare with a tolerance).  They are given regardless of
   ``ste_fine_grained`` (the spec does not tie them to it).
9. INQ with ``max|W| >= 1.5 * 2**127`` gives ``2**128 = inf`` by the formula; the oracle does the
   same and the tests stay away from it.  A ``(qr_min + eps) - qr_min == 0`` in float32 (huge
   ranges) gives ``scale = 0``; likewise unspecified and untested.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "SQRT_HALF_F32",
    "binary_connect",
    "binary_connect_grad",
    "binary_sigmoid",
    "binary_sigmoid_grad",
    "binary_tanh",
    "binary_tanh_grad",
    "binary_weight",
    "binary_weight_grad",
    "exact_inq_log2",
    "exact_round_log2",
    "fixed_point_limits",
    "fixed_point_quantize",
    "fixed_point_quantize_grad",
    "inq_levels",
    "inq_quantize",
    "inq_quantize_grad",
    "min_max_params",
    "min_max_quantize",
    "min_max_quantize_grad",
    "pow2_exact",
    "pow2_levels",
    "pow2_quantize",
    "pow2_quantize_grad",
    "round_half_away",
]

F32 = np.float32
# float32 nearest to 2**-0.5; it is BELOW the real value (checked at import).
SQRT_HALF_F32 = F32(2.0**-0.5)
assert float(SQRT_HALF_F32) < math.sqrt(0.5) < float(np.nextafter(SQRT_HALF_F32, F32(1)))


def _f32(a) -> np.ndarray:
    a = np.asarray(a)
    assert a.dtype == np.float32, f"oracle wants float32, got {a.dtype}"
    assert np.all(np.isfinite(a)), "oracle inputs must be finite"
    return a


def pow2_exact(k) -> np.ndarray:
    """float32 ``2**k`` for integer ``k`` (array ok): exact, 0 below 2**-149, inf from 2**128."""
    k = np.clip(np.asarray(k, dtype=np.int64), -400, 400)
    with np.errstate(over="ignore", under="ignore"):
        return np.ldexp(np.ones(k.shape, np.float32), k).astype(np.float32)


def round_half_away(v) -> np.ndarray:
    """Exact ``std::round`` of float32 ``v``: nearest integer, ties away from zero.

    ``v - trunc(v)`` is exact in float32, and ``trunc(v) ± 1`` is exact whenever a fraction exists
    (``|v| < 2**23``), so no intermediate rounding happens (unlike ``floor(|v| + 0.5)``).
    """
    v = np.asarray(v, dtype=np.float32)
    t = np.trunc(v)
    frac = v - t
    return np.where(np.abs(frac) >= F32(0.5), t + np.sign(v), t).astype(np.float32)


def exact_round_log2(a) -> np.ndarray:
    """``round_half_away(log2 a)`` for float32 ``a > 0``, exactly (int64; garbage where a == 0)."""
    mant, e = np.frexp(np.asarray(a, dtype=np.float32))
    # mant >= sqrt(0.5) (real)  <=>  mant > SQRT_HALF_F32 (its float32 predecessor-or-equal).
    return np.where(mant > SQRT_HALF_F32, e, e - 1).astype(np.int64)


def exact_inq_log2(a) -> np.ndarray:
    """``floor(log2 a) + (frac(log2 a) >= log2 1.5)`` for ``a > 0``, exactly (int64)."""
    mant, e = np.frexp(np.asarray(a, dtype=np.float32))
    return (e.astype(np.int64) - 1) + (mant >= F32(0.75))


# --------------------------------------------------------------------------- binary families


def binary_connect(w, quantize_zero_to: float = 1.0) -> np.ndarray:
    """Deterministic BinaryConnect: ``+1 if w > 0, -1 if w < 0, quantize_zero_to if w == 0``."""
    w = _f32(w)
    return np.where(w > 0, F32(1), np.where(w < 0, F32(-1), F32(quantize_zero_to))).astype(
        np.float32
    )


def binary_connect_grad(w, dy) -> np.ndarray:
    """Identity straight-through estimator."""
    return np.asarray(dy, dtype=np.float32).copy()


def binary_tanh(x) -> np.ndarray:
    """``+1 if x > 0 else -1`` (so ``±0 -> -1``)."""
    x = _f32(x)
    return np.where(x > 0, F32(1), F32(-1)).astype(np.float32)


def binary_tanh_grad(x, dy) -> np.ndarray:
    """``dy * [|x| < 1]``."""
    x = _f32(x)
    dy = np.asarray(dy, dtype=np.float32)
    return np.where(np.abs(x) < 1, dy, F32(0)).astype(np.float32)


def binary_sigmoid(x) -> np.ndarray:
    """``1 if x > 0 else 0``."""
    x = _f32(x)
    return np.where(x > 0, F32(1), F32(0)).astype(np.float32)


def binary_sigmoid_grad(x, dy) -> np.ndarray:
    """``0.5 * dy * [|x| < 1]``."""
    x = _f32(x)
    dy = np.asarray(dy, dtype=np.float32)
    return np.where(np.abs(x) < 1, F32(0.5) * dy, F32(0)).astype(np.float32)


def binary_weight(w) -> np.ndarray:
    """XNOR-Net BWN: ``alpha[o] * sign(w)``, ``alpha[o] = mean |w[o, ...]|`` (float64, to f32)."""
    w = _f32(w)
    assert w.ndim >= 2, "binary_weight needs an output axis and an axis to average over"
    axes = tuple(range(1, w.ndim))
    alpha = np.abs(w.astype(np.float64)).mean(axis=axes, keepdims=True).astype(np.float32)
    sgn = np.where(w < 0, F32(-1), F32(1))  # sign(0) = sign(-0) = +1
    return (alpha * sgn).astype(np.float32)


def binary_weight_grad(w, dy) -> np.ndarray:
    """Identity: no alpha factor, no gradient through alpha."""
    return np.asarray(dy, dtype=np.float32).copy()


# --------------------------------------------------------------------------- fixed point


def fixed_point_limits(sign: bool, n: int, delta: float) -> tuple[np.float32, np.float32]:
    """``(xmin, xmax)`` in float32: ``xmax = f32(2**nb - 1) * f32(delta)``."""
    assert 1 <= n <= 32 and delta > 0
    nb = n - 1 if sign else n
    assert nb >= 1, "signed n=1 has no nonzero level"
    xmax = F32(2**nb - 1) * F32(delta)
    xmin = -xmax if sign else F32(0)
    return F32(xmin), F32(xmax)


def fixed_point_quantize(x, sign: bool = True, n: int = 8, delta: float = 2**-4) -> np.ndarray:
    """``sign(xc) * round_half_away(|xc| / delta) * delta`` with ``xc = clamp(x, xmin, xmax)``."""
    x = _f32(x)
    xmin, xmax = fixed_point_limits(sign, n, delta)
    d = F32(delta)
    xc = np.minimum(np.maximum(x, xmin), xmax)
    r = round_half_away(np.abs(xc) / d)
    return (np.sign(xc) * (r * d)).astype(np.float32)


def fixed_point_quantize_grad(
    x, dy, sign: bool = True, n: int = 8, delta: float = 2**-4, ste_fine_grained: bool = True
) -> np.ndarray:
    """``dy * [xmin <= x <= xmax]`` (``dy`` if not fine grained)."""
    x = _f32(x)
    dy = np.asarray(dy, dtype=np.float32)
    if not ste_fine_grained:
        return dy.copy()
    xmin, xmax = fixed_point_limits(sign, n, delta)
    return np.where((x >= xmin) & (x <= xmax), dy, F32(0)).astype(np.float32)


# --------------------------------------------------------------------------- power of two


def pow2_levels(
    sign: bool, with_zero: bool, n: int, m: int
) -> tuple[np.float32, np.float32, np.float32]:
    """``(p_max, p_min, thr)`` in float32."""
    assert 1 <= n <= 32 and isinstance(m, int)
    nb = n - 1 if sign else n
    nb = nb - 1 if with_zero else nb
    assert nb >= 0, "no level set for nb < 0"
    p_max = pow2_exact(m)[()]
    p_min = pow2_exact(max(m - (2**nb - 1), -400))[()]
    thr = F32(p_min * SQRT_HALF_F32)
    return F32(p_max), F32(p_min), thr


def _pow2_q_raw(ax: np.ndarray) -> np.ndarray:
    """``2**round_half_away(log2|x|)`` in float32 (0 where |x| == 0)."""
    k = exact_round_log2(np.where(ax == 0, F32(1), ax))
    return np.where(ax == 0, F32(0), pow2_exact(k)).astype(np.float32)


def pow2_quantize(
    x, sign: bool = True, with_zero: bool = True, n: int = 8, m: int = 1
) -> np.ndarray:
    """The spec's section 6/7 forward, step by step."""
    x = _f32(x)
    p_max, p_min, thr = pow2_levels(sign, with_zero, n, m)
    ax = np.abs(x)
    q = _pow2_q_raw(ax)
    q = np.where(q > p_max, p_max, q)
    if with_zero:
        q = np.where(q < p_min, np.where(ax < thr, F32(0), p_min), q)
    else:
        q = np.where(q < p_min, p_min, q)
    if sign:
        y = np.where(x < 0, -q, q)
    else:
        y = np.where(x < 0, F32(0) if with_zero else p_min, q)
    return y.astype(np.float32)


def pow2_quantize_grad(
    x, dy, sign: bool = True, with_zero: bool = True, n: int = 8, m: int = 1,
    ste_fine_grained: bool = True,
) -> np.ndarray:
    """``dy * [2**round_half_away(log2|x|) <= p_max]`` (and 0 where x < 0 if unsigned)."""
    x = _f32(x)
    dy = np.asarray(dy, dtype=np.float32)
    if not ste_fine_grained:
        return dy.copy()
    p_max, _, _ = pow2_levels(sign, with_zero, n, m)
    keep = _pow2_q_raw(np.abs(x)) <= p_max
    if not sign:
        keep &= ~(x < 0)
    return np.where(keep, dy, F32(0)).astype(np.float32)


# --------------------------------------------------------------------------- INQ


def inq_levels(w, num_bits: int = 4) -> tuple[int, int, np.float32]:
    """``(n1, n2, prune)`` for the whole tensor ``w``."""
    w = _f32(w)
    assert num_bits >= 2
    s = np.max(np.abs(w)) if w.size else F32(0)
    s = F32(1) if s == 0 else F32(s)
    n1 = int(exact_inq_log2(s))
    n2 = n1 + 1 - 2 ** (num_bits - 2)
    prune = F32(pow2_exact(n2 - 1)[()])
    return n1, n2, prune


def inq_quantize(w, num_bits: int = 4) -> np.ndarray:
    """``0 if |w| < prune else sign(w) * 2**clamp(inq_log2|w|, n2, n1)``."""
    w = _f32(w)
    n1, n2, prune = inq_levels(w, num_bits)
    a = np.abs(w)
    e = np.where(a == 0, n2, exact_inq_log2(np.where(a == 0, F32(1), a)))
    mag = pow2_exact(np.clip(e, n2, n1))
    return np.where(a < prune, F32(0), np.sign(w) * mag).astype(np.float32)


def inq_quantize_grad(w, dy) -> np.ndarray:
    """Identity straight-through estimator."""
    return np.asarray(dy, dtype=np.float32).copy()


# --------------------------------------------------------------------------- min-max


def _channel_view(p, x_ndim: int) -> np.ndarray:
    p = np.asarray(p, dtype=np.float32)
    assert p.ndim in (0, 1)
    return p if p.ndim == 0 else p.reshape((-1,) + (1,) * (x_ndim - 1))


def min_max_params(qr_min, qr_max, ql_min=0, ql_max=255, eps=0.01) -> dict[str, np.ndarray]:
    """The derived float32 ``qr_max`` (after the eps nudge), ``scale``, ``zp``, ``lo``, ``hi``."""
    qr_min = _f32(np.asarray(qr_min, dtype=np.float32))
    qr_max = _f32(np.asarray(qr_max, dtype=np.float32))
    lmin, lmax, e = F32(ql_min), F32(ql_max), F32(eps)
    assert lmin < lmax and e > 0
    qr_max = np.where(qr_max - qr_min < e, qr_min + e, qr_max).astype(np.float32)
    scale = ((qr_max - qr_min) / (lmax - lmin)).astype(np.float32)
    zp = (lmin - qr_min / scale).astype(np.float32)
    zp = np.where(zp <= lmin, lmin, np.where(zp >= lmax, lmax, round_half_away(zp)))
    zp = zp.astype(np.float32)
    lo = ((lmin - zp) * scale).astype(np.float32)
    hi = ((lmax - zp) * scale).astype(np.float32)
    return {"qr_max": qr_max, "scale": scale, "zp": zp, "lo": lo, "hi": hi}


def min_max_quantize(x, qr_min, qr_max, ql_min=0, ql_max=255, eps=0.01) -> np.ndarray:
    """``round_half_away((clamp(x, lo, hi) - lo) / scale) * scale + lo``.

    ``qr_min``/``qr_max`` are 0-d (per tensor) or shape ``(C,)`` (per channel along dim 0).
    """
    x = _f32(x)
    p = min_max_params(qr_min, qr_max, ql_min, ql_max, eps)
    scale, lo, hi = (_channel_view(p[k], x.ndim) for k in ("scale", "lo", "hi"))
    xc = np.minimum(np.maximum(x, lo), hi)
    r = round_half_away((xc - lo) / scale)
    return ((r * scale) + lo).astype(np.float32)


def min_max_quantize_grad(
    x, qr_min, qr_max, dy, ql_min=0, ql_max=255, eps=0.01, ste_fine_grained: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx, d qr_min, d qr_max)``: ``dx = dy * [lo <= x <= hi]`` (``dy`` if not fine grained),
    ``d qr_min = sum(dy * [x < lo])``, ``d qr_max = sum(dy * [x > hi])`` per tensor or per channel
    (summed in float64, rounded once to float32)."""
    x = _f32(x)
    dy = np.asarray(dy, dtype=np.float32)
    p = min_max_params(qr_min, qr_max, ql_min, ql_max, eps)
    lo, hi = (_channel_view(p[k], x.ndim) for k in ("lo", "hi"))
    inside = (x >= lo) & (x <= hi)
    dx = np.where(inside, dy, F32(0)).astype(np.float32) if ste_fine_grained else dy.copy()
    per_channel = np.asarray(qr_min).ndim == 1
    axes = tuple(range(1, x.ndim)) if per_channel else None
    d64 = dy.astype(np.float64)
    dmin = np.where(x < lo, d64, 0.0).sum(axis=axes).astype(np.float32)
    dmax = np.where(x > hi, d64, 0.0).sum(axis=axes).astype(np.float32)
    return dx, dmin, dmax


# --------------------------------------------------------------------------- 8-bit pixels
def on_uint8_grid(x) -> bool:
    """Every value of ``x`` is ``float32(k) / float32(255)`` (IEEE division, correctly rounded)
    for an integer ``k`` in ``[0, 255]`` (``uint8 / 255`` bit for bit); ``-0`` equals ``+0``.
    The engines' check of images of 8-bit pixels, from its definition."""
    x = np.asarray(x)
    with np.errstate(invalid="ignore"):
        k = np.rint(x.astype(np.float64) * 255.0)
        if not (np.isfinite(k) & (k >= 0) & (k <= 255)).all():
            return False
        return bool((k.astype(F32) / F32(255) == x).all())


_K255 = np.arange(256, dtype=F32) / F32(255)
#: values put into an image of 8-bit pixels, one at a time: on the grid (0, -0, 1, ties of
#: k * 255 rounding) and just off it (one ulp either side, k / 256, out of [0, 1], 0.5)
UINT8_GRID_EDGES = [
    0.0, -0.0, 1.0, float(_K255[1]), float(_K255[127]), float(_K255[128]), float(_K255[254]),
    float(np.nextafter(_K255[100], F32(1))), float(np.nextafter(_K255[100], F32(0))),
    float(np.nextafter(F32(1), F32(2))), float(F32(1e-30)), float(F32(255 / 256)), 0.5,
    256 / 255, -1 / 255, 2.0, -1.0, 1e30]


def uint8_grid_edge_rows(base, stride: int) -> tuple[list[np.ndarray], list[bool]]:
    """Copies of the image ``base`` (float32), the ``i``-th with value ``i`` of
    :data:`UINT8_GRID_EDGES` at flat index ``stride * i`` (mod its size), and whether each is
    on the grid (:func:`on_uint8_grid`)."""
    rows = []
    for i, v in enumerate(UINT8_GRID_EDGES):
        x = np.array(np.asarray(base), F32)  # a copy
        x.reshape(-1)[(stride * i) % x.size] = v
        rows.append(x)
    return rows, [on_uint8_grid(r) for r in rows]
