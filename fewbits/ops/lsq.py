"""Learned step size quantization (LSQ, Esser et al., ICLR 2020) and its learned offset (LSQ+,
Bhalgat et al., CVPR-W 2020): the formula and the paper's gradients (docs/QUANTIZERS.md,
``lsq``).

With ``b`` bits, signed ``Q_N = 2**(b-1)``, ``Q_P = 2**(b-1) - 1``; unsigned ``Q_N = 0``,
``Q_P = 2**b - 1``; step ``s > 0``, offset ``beta`` (LSQ+; 0 without it)::

    v = (x - beta) / s                 r = round_half_away(clamp(v, -Q_N, Q_P))
    y = r * s + beta                   (y = r * s without an offset)
    dx    = dy * [-Q_N <= v <= Q_P]
    ds    = g * sum(dy * (r - v  if -Q_N <= v <= Q_P,  -Q_N if v < -Q_N,  Q_P if v > Q_P))
    dbeta = g * sum(dy * [v < -Q_N or v > Q_P])
    g     = 1 / sqrt(N * Q_P)          (the gradient scale; N = the weights of the layer, or
                                        the features of one sample for activations)

Sums accumulate in float64 and are rounded once to ``s``'s dtype. Float16/bfloat16 input is
quantized in float32 and rounded back once. NaN/inf input and ``s <= 0`` raise ``ValueError``.

    >>> import torch
    >>> lsq(torch.tensor([-3.0, 0.3, 0.5, 9.0]), torch.tensor(0.5), bits=3)
    tensor([-2.0000,  0.5000,  0.5000,  1.5000])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._core import capturing, widen
from .ternary import checked, round_half_away, unwrapped

__all__ = ["grad_scale", "init_step", "lsq", "lsq_levels", "lsq_range"]


def lsq_levels(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: the grid is ``k * s + beta`` for integers ``k`` in ``[-Q_N, Q_P]``."""
    if isinstance(bits, bool) or int(bits) != bits or not 2 <= bits <= 8:
        raise ValueError(f"lsq: bits must be an integer in [2, 8], got {bits!r}")
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def grad_scale(n: int, qp: int) -> float:
    """LSQ's gradient scale ``g = 1 / sqrt(N * Q_P)`` (section 2.2 of the paper)."""
    return 1.0 / math.sqrt(max(int(n), 1) * qp)


def init_step(x: Tensor, qp: int) -> float:
    """The paper's initial step ``s = 2 * mean|x| / sqrt(Q_P)`` (float64 mean), or 1.0 when
    ``x`` is empty or all zero (no scale to learn from)."""
    if not x.numel():
        return 1.0
    s = 2.0 * float(x.detach().abs().double().mean()) / math.sqrt(qp)
    return s if 0.0 < s < math.inf else 1.0


def lsq_range(x: Tensor, qn: int, qp: int) -> tuple[float, float]:
    """LSQ+'s initial ``(s, beta)`` from the range of ``x``: ``s = (max - min) / (Q_P + Q_N)``,
    ``beta = min + Q_N * s`` (so ``-Q_N`` and ``Q_P`` land on ``min`` and ``max``); ``(1, 0)``
    for an empty or constant ``x``."""
    if not x.numel():
        return 1.0, 0.0
    lo, hi = float(x.detach().min()), float(x.detach().max())
    s = (hi - lo) / (qp + qn)
    if not 0.0 < s < math.inf:
        return 1.0, 0.0
    return s, lo + qn * s


def _forward(x: Tensor, s: Tensor, beta: Tensor | None, qn: int, qp: int) -> tuple[Tensor, ...]:
    xw = widen(x)
    sw = s.to(xw.dtype)
    v = xw - beta.to(xw.dtype) if beta is not None else xw
    v = v / sw
    r = round_half_away(v.clamp(-float(qn), float(qp)))
    y = r * sw
    if beta is not None:
        y = y + beta.to(xw.dtype)
    return y.to(x.dtype), v, r


class _LSQ(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, s: Tensor, beta: Tensor | None, qn: int, qp: int, g: float):
        y, v, r = _forward(x, s, beta, qn, qp)
        return y, v, r

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, s, beta, qn, qp, g = inputs
        _, v, r = output
        ctx.mark_non_differentiable(v, r)
        ctx.qn, ctx.qp, ctx.g, ctx.has_beta = qn, qp, g, beta is not None
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(v, r, s, *(() if beta is None else (beta,)))

    @staticmethod
    def backward(ctx, dy: Tensor, _dv, _dr):
        v, r, s = ctx.saved_tensors[:3]
        lo, hi = float(-ctx.qn), float(ctx.qp)
        below, above = v < lo, v > hi
        inside = ~(below | above)
        dyw = widen(dy)
        zero = torch.zeros_like(dyw)
        dx = ds = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.where(inside, dyw, zero).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            k = torch.where(inside, r - v, torch.where(below, torch.full_like(v, lo),
                                                       torch.full_like(v, hi)))
            ds = ((dyw * k).double().sum() * ctx.g).to(s.dtype).reshape(s.shape)
        if ctx.has_beta and ctx.needs_input_grad[2]:
            beta = ctx.saved_tensors[3]
            out = torch.where(inside, zero, dyw)
            db = (out.double().sum() * ctx.g).to(beta.dtype).reshape(beta.shape)
        return dx, ds, db, None, None, None


def lsq(x: Tensor, s: Tensor, bits: int = 4, signed: bool = True, beta: Tensor | None = None,
        g: float | None = None, fn: str = "lsq") -> Tensor:
    """LSQ (and LSQ+ with ``beta``) of ``x`` with step ``s`` (module doc for the formula and
    gradients). ``s`` and ``beta``: one-element float tensors (parameters when learned);
    ``g`` defaults to ``1 / sqrt(x.numel() * Q_P)``. Returns ``x``'s shape and dtype."""
    qn, qp = lsq_levels(bits, signed)
    checked(x, fn, "x")
    for name, t in (("s", s), ("beta", beta)):
        if t is None:
            continue
        checked(t, fn, name)
        if t.numel() != 1:
            raise ValueError(f"{fn}: {name} must hold one value (per-tensor LSQ), got shape "
                             f"{tuple(t.shape)}")
    s0 = None if capturing() else unwrapped(s).detach()
    if s0 is not None and not s0.is_meta and float(s0) <= 0:
        raise ValueError(f"{fn}: the step s must be > 0, got {float(s0)!r}; a learned "
                         "step is kept positive by LSQ.after_optimizer_step")
    g = grad_scale(x.numel(), qp) if g is None else float(g)
    s1 = s.reshape(())
    b1 = None if beta is None else beta.reshape(())
    if not (x.requires_grad or s.requires_grad or (beta is not None and beta.requires_grad)):
        return _forward(x, s1, b1, qn, qp)[0]
    return _LSQ.apply(x, s1, b1, qn, qp, g)[0]
