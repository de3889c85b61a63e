"""Independent NumPy float32 oracle of the families beyond the seed's nine (issue 25): ternary
weights (TWN, TTQ, BitNet b1.58 absmean), BitNet's absmax activations, LSQ / LSQ+ and stochastic
binarization, forward and gradient.

Written from the papers and docs/QUANTIZERS.md only, never from fewbits' code:

- TWN, Li & Liu 2016, eq. (9)-(10): ``delta = 0.7 * E|W|``, ``alpha = mean(|W_i|, |W_i| > delta)``,
  ternary ``alpha * sign(W_i)`` above the threshold, else 0; straight-through gradient.
- TTQ, Zhu et al. 2017, eq. (6)-(8): ``delta = t * max|W|``; ``W^p``, 0, ``-W^n``; gradients
  ``dW^p = sum_{I_p} dy``, ``dW^n = -sum_{I_n} dy`` (chain rule of ``-W^n``; the paper's eq. 7
  prints no sign), latent ``dW = W^p dy | dy | W^n dy``.
- BitNet b1.58, Ma et al. 2024, eq. (1)-(3): ``gamma = mean|W|``, ``RoundClip(W / gamma, -1, 1)``;
  absmax activations ``Q_b = 2**(b-1) - 1`` levels each side of ``max|x|``.
- LSQ, Esser et al. 2020, eq. (1)-(5): ``v = x / s``, ``round(clip(v, -Q_N, Q_P)) * s``; ``ds``
  of eq. (3) scaled by ``g = 1 / sqrt(N * Q_P)``; ``s0 = 2 <|v|> / sqrt(Q_P)``.
  LSQ+, Bhalgat et al. 2020: ``(x - beta)`` before the division, ``+ beta`` after.
- BinaryConnect, Courbariaux et al. 2015, eq. (3): ``+1`` with probability ``hard_sigmoid(w) =
  clip((w + 1) / 2, 0, 1)``.

fewbits' own conventions, from docs/QUANTIZERS.md: rounding ties away from zero; float32
arithmetic one operation at a time; means and sums in float64, rounded once to float32; a weight
exactly at a threshold is 0 (strict ``>``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["absmax", "absmean", "lsq", "lsq_grad", "lsq_init_step", "rha", "stochastic_sign",
           "ttq", "ttq_grad", "twn"]

F32 = np.float32


def rha(v) -> np.ndarray:
    """``std::round`` on float32: nearest integer, ties away from zero (exact)."""
    v = np.asarray(v, dtype=F32)
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= F32(0.5), t + np.sign(v), t).astype(F32)


def _rows(w: np.ndarray, per_channel: bool) -> np.ndarray:
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def _back(stat: np.ndarray, w: np.ndarray, per_channel: bool) -> np.ndarray:
    return stat.reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else stat.reshape(())


def twn(w: np.ndarray, per_channel: bool = True) -> np.ndarray:
    w = np.asarray(w, dtype=F32)
    r = np.abs(_rows(w, per_channel))
    y_rows = np.zeros_like(r)
    out = []
    for i, row in enumerate(r):
        mean = F32(row.astype(np.float64).mean()) if row.size else F32(0)
        delta = F32(0.7) * mean
        keep = row > delta
        alpha = F32(row[keep].astype(np.float64).sum() / keep.sum()) if keep.any() else F32(0)
        out.append((delta, alpha))
        y_rows[i] = np.where(keep, alpha, F32(0))
    y = y_rows.reshape(w.shape) * np.sign(w).astype(F32)
    return (y + F32(0)).astype(F32)  # alpha * sign(w): -0 folded


def ttq(w, wp, wn, t: float = 0.05, per_channel: bool = False) -> np.ndarray:
    w = np.asarray(w, dtype=F32)
    r = np.abs(_rows(w, per_channel))
    delta = _back(np.array([F32(t) * row.max() for row in r], F32), w, per_channel)
    p = _back(np.asarray(wp, F32), w, per_channel)
    n = _back(np.asarray(wn, F32), w, per_channel)
    return np.where(w > delta, p, np.where(w < -delta, -n, F32(0))).astype(F32)


def ttq_grad(w, wp, wn, dy, t: float = 0.05, per_channel: bool = False):
    """``(dw, dwp, dwn)``."""
    w, dy = np.asarray(w, F32), np.asarray(dy, F32)
    r = np.abs(_rows(w, per_channel))
    delta = _back(np.array([F32(t) * row.max() for row in r], F32), w, per_channel)
    pos, neg = w > delta, w < -delta
    p = _back(np.asarray(wp, F32), w, per_channel)
    n = _back(np.asarray(wn, F32), w, per_channel)
    dw = np.where(pos, dy * p, np.where(neg, dy * n, dy)).astype(F32)

    def total(mask):
        g = np.where(mask, dy, F32(0)).astype(np.float64)
        s = _rows(g, per_channel).sum(1)
        return s.astype(F32).reshape(np.shape(wp))

    return dw, total(pos), (-total(neg)).astype(F32)


def absmean(w, per_channel: bool = False, eps: float = 1e-5) -> np.ndarray:
    w = np.asarray(w, dtype=F32)
    r = np.abs(_rows(w, per_channel))
    gam = np.array([max(F32(row.astype(np.float64).mean()), F32(eps)) for row in r], F32)
    g = _back(gam, w, per_channel)
    return (np.clip(rha(w / g), F32(-1), F32(1)) * g).astype(F32)


def absmax(x, bits: int = 8, per: str = "token", eps: float = 1e-5) -> np.ndarray:
    x = np.asarray(x, dtype=F32)
    q = F32(2 ** (bits - 1) - 1)
    a = np.abs(x)
    if per == "token":
        m = a.max(-1, keepdims=True)
    elif per == "sample":
        m = a.reshape(a.shape[0], -1).max(1).reshape((-1,) + (1,) * (x.ndim - 1))
    else:
        m = a.max()
    scale = (np.maximum(m, F32(eps)) / q).astype(F32)
    return (np.clip(rha(x / scale), -q, q) * scale).astype(F32)


def _levels(bits: int, signed: bool) -> tuple[int, int]:
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def lsq(x, s, bits: int, signed: bool = True, beta=None) -> np.ndarray:
    x, s = np.asarray(x, F32), F32(s)
    qn, qp = _levels(bits, signed)
    v = (x - F32(beta)) if beta is not None else x
    v = (v / s).astype(F32)
    y = rha(np.clip(v, F32(-qn), F32(qp))) * s
    if beta is not None:
        y = y + F32(beta)
    return y.astype(F32)


def lsq_grad(x, s, bits: int, dy, signed: bool = True, beta=None, n: int | None = None):
    """``(dx, ds, dbeta)`` (``dbeta`` None without an offset); ``n`` the N of ``g``
    (default ``x.size``)."""
    x, s, dy = np.asarray(x, F32), F32(s), np.asarray(dy, F32)
    qn, qp = _levels(bits, signed)
    g = 1.0 / math.sqrt((x.size if n is None else n) * qp)
    v = ((x - F32(beta)) if beta is not None else x) / s
    v = v.astype(F32)
    below, above = v < F32(-qn), v > F32(qp)
    inside = ~(below | above)
    r = rha(np.clip(v, F32(-qn), F32(qp)))
    k = np.where(inside, r - v, np.where(below, F32(-qn), F32(qp))).astype(F32)
    dx = np.where(inside, dy, F32(0)).astype(F32)
    ds = F32((dy * k).astype(F32).astype(np.float64).sum() * g)
    db = None
    if beta is not None:
        db = F32(np.where(inside, F32(0), dy).astype(np.float64).sum() * g)
    return dx, ds, db


def lsq_init_step(x, bits: int, signed: bool = True) -> float:
    """LSQ's ``2 * mean|x| / sqrt(Q_P)`` (float64)."""
    return 2.0 * float(np.abs(np.asarray(x, np.float64)).mean()) / math.sqrt(
        _levels(bits, signed)[1])


def stochastic_sign(w, u) -> np.ndarray:
    w, u = np.asarray(w, F32), np.asarray(u, F32)
    p = np.clip((w + F32(1)) * F32(0.5), F32(0), F32(1)).astype(F32)
    return np.where(u < p, F32(1), F32(-1)).astype(F32)
