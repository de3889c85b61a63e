"""Ternary weights ``{-a, 0, +a}`` and BitNet's 8-bit absmax activations: the formulas and
their straight-through gradients (docs/QUANTIZERS.md, ``ternary`` and ``absmax``).

Three ways to pick the levels of a weight tensor ``w`` (``per_channel``: one threshold and
scale per output channel, dim 0; else one for the tensor):

- ``twn`` (Li & Liu 2016, Ternary Weight Networks): ``delta = 0.7 * mean|w|``; ``t = sign(w)``
  where ``|w| > delta`` else 0; ``alpha = mean(|w| where |w| > delta)`` (0 when none);
  ``y = alpha * t``. Gradient ``dw = dy``.
- ``ttq`` (Zhu et al. 2017, Trained Ternary Quantization): ``delta = t * max|w|``;
  ``y = wp`` where ``w > delta``, ``-wn`` where ``w < -delta``, else 0, with ``wp``, ``wn``
  learned. Gradients: ``dw = dy * (wp | 1 | wn)`` on the three regions,
  ``d wp = sum(dy where w > delta)``, ``d wn = -sum(dy where w < -delta)``.
- ``absmean`` (Ma et al. 2024, BitNet b1.58): ``gamma = max(mean|w|, eps)``;
  ``y = clamp(round_half_away(w / gamma), -1, 1) * gamma``. Gradient ``dw = dy``.

Means and sums accumulate in float64 and are rounded once to the input's dtype (float32 for
half precision, whose result is rounded back once), so they do not depend on the summation
order. NaN/inf input raises ``ValueError`` (:func:`fewbits._checks.check_finite`).

    >>> import torch
    >>> twn(torch.tensor([[1.0, -0.1, -2.0, 0.5]]))
    tensor([[ 1.5000,  0.0000, -1.5000,  0.0000]])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import (
    check_bits,
    check_finite,
    check_positive,
    in_onnx_export,
    torchscript_onnx_export,
)
from ._core import capturing, widen

__all__ = [
    "ABSMEAN_EPS",
    "TWN_FACTOR",
    "absmax",
    "absmax_scale",
    "absmean",
    "absmean_scale",
    "channel_view",
    "check_absmax_args",
    "checked",
    "round_half_away",
    "straight",
    "ternary_levels",
    "ttq",
    "ttq_threshold",
    "twn",
    "twn_threshold_scale",
    "unwrapped",
]

#: TWN's threshold factor: ``delta = 0.7 * mean|w|`` (Li & Liu 2016, eq. 10).
TWN_FACTOR = 0.7
#: BitNet b1.58's floor on ``gamma = mean|w|``: an all-zero tensor quantizes to zeros.
ABSMEAN_EPS = 1e-5


def unwrapped(t: Tensor) -> Tensor:
    """``t`` without torch.func's wrappers (``grad``, ``vmap`` levels): the plain tensor holding
    every value, which host-side checks can read (a batched tensor refuses ``.item()``)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def checked(t: Tensor, fn: str, arg: str) -> None:
    """The NaN/inf check of every quantizer (:func:`fewbits._checks.check_finite`), on the
    values under torch.func's wrappers too; and the refusal of the TorchScript ONNX exporter,
    which records these straight-through functions wrongly (``torch.onnx.export(...,
    dynamo=True)`` and :func:`fewbits.export.onnx.export_onnx` export them exactly)."""
    if in_onnx_export():
        if torchscript_onnx_export():
            raise RuntimeError(
                f"{fn}: the TorchScript ONNX exporter (dynamo=False) cannot export this "
                "quantizer exactly; use fewbits.export.onnx.export_onnx(model, path, "
                "example_inputs) or torch.onnx.export(..., dynamo=True)")
        return
    check_finite(t if capturing() else unwrapped(t), fn, arg)


def round_half_away(v: Tensor) -> Tensor:
    """:func:`fewbits._math.round_half_away` (nearest integer, ties away from zero, exact) in
    operators every exporter has: ``r = round(|v|)`` (ties to even, exact), plus 1 where
    ``|v| - r == 0.5``, negated where ``v < 0`` (``copysign`` becomes ``prims.signbit``, which
    ONNX has no function for). Only the sign of a zero result can differ."""
    a = v.abs()
    r = torch.round(a)
    r = r + (a - r == 0.5).to(r.dtype)
    return torch.where(v < 0, -r, r)


def straight(y: Tensor, x: Tensor) -> Tensor:
    """``y`` with the identity gradient to ``x``: ``y + (x - x.detach())``, whose forward adds an
    exact ``+0.0`` (``x`` is finite), so the value is ``y``'s bits (``-0.0`` becomes ``+0.0``)."""
    if not x.requires_grad:
        return y
    return y + (x - x.detach())


def channel_view(t: Tensor, w: Tensor, per_channel: bool) -> Tensor:
    """A per-tensor (``()``) or per-channel (``(C,)``) statistic shaped to broadcast over ``w``."""
    return t.reshape((-1,) + (1,) * (w.dim() - 1)) if per_channel else t.reshape(())


def _rows(a: Tensor, per_channel: bool) -> Tensor:
    if per_channel:
        if a.dim() < 2:
            raise ValueError(f"ternary per_channel needs a weight with an output-channel axis "
                             f"(dim >= 2), got shape {tuple(a.shape)}; use per_channel=False "
                             "for biases and vectors")
        return a.flatten(1)
    return a.reshape(1, -1)


def twn_threshold_scale(w: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """TWN's ``(delta, alpha)``, each of shape ``(C,)`` (per channel) or ``()``, in ``w``'s dtype:
    ``delta = f(0.7) * f(mean|w|)``, ``alpha = f(mean(|w| where |w| > delta))`` (0 where no
    element lies above ``delta``), ``f`` the rounding to ``w``'s dtype."""
    a = _rows(w.detach().abs(), per_channel)
    mean = a.double().mean(1).to(a.dtype) if a.shape[1] else a.new_zeros(a.shape[0])
    delta = mean * torch.tensor(TWN_FACTOR, dtype=a.dtype, device=a.device)
    above = a > delta[:, None]
    total = torch.where(above, a, torch.zeros_like(a)).double().sum(1)
    count = above.sum(1)
    alpha = torch.where(count > 0, total / count.clamp(min=1), 0.0).to(a.dtype)
    shape = (a.shape[0],) if per_channel else ()
    return delta.reshape(shape), alpha.reshape(shape)


def ternary_levels(w: Tensor, delta: Tensor) -> Tensor:
    """``t`` in ``{-1, 0, +1}`` (``w``'s dtype): ``sign(w)`` where ``|w| > delta`` (strict: a
    weight at the threshold is 0), ``delta`` broadcast over ``w``."""
    one = torch.ones_like(w)
    return torch.where(w > delta, one, torch.where(w < -delta, -one, torch.zeros_like(w)))


def twn(w: Tensor, per_channel: bool = True, fn: str = "ternary_twn") -> Tensor:
    """Ternary Weight Networks (Li & Liu 2016): ``alpha * t`` (see the module doc); ``dw = dy``.

    ``w``: any float tensor (``per_channel`` needs dim >= 2). Returns ``w``'s shape and dtype.
    """
    checked(w, fn, "w")
    ww = widen(w.detach())
    delta, alpha = twn_threshold_scale(ww, per_channel)
    t = ternary_levels(ww, channel_view(delta, ww, per_channel))
    y = (t * channel_view(alpha, ww, per_channel)).to(w.dtype)
    return straight(y, w)


def ttq_threshold(w: Tensor, threshold: float, per_channel: bool) -> Tensor:
    """TTQ's ``delta = f(t) * max|w|`` (shape ``(C,)`` per channel, else ``()``)."""
    a = _rows(w.detach().abs(), per_channel)
    amax = a.amax(1) if a.shape[1] else a.new_zeros(a.shape[0])
    delta = amax * torch.tensor(threshold, dtype=a.dtype, device=a.device)
    return delta.reshape((a.shape[0],) if per_channel else ())


def _ttq_forward(w: Tensor, wp: Tensor, wn: Tensor, threshold: float,
                 per_channel: bool) -> tuple[Tensor, Tensor, Tensor]:
    ww = widen(w)
    delta = channel_view(ttq_threshold(ww, threshold, per_channel), ww, per_channel)
    pos, neg = ww > delta, ww < -delta
    p = channel_view(widen(wp), ww, per_channel).expand_as(ww)
    n = channel_view(widen(wn), ww, per_channel).expand_as(ww)
    zero = torch.zeros_like(ww)
    y = torch.where(pos, p, torch.where(neg, -n, zero)).to(w.dtype)
    return y, pos, neg


def _reduce(g: Tensor, like: Tensor, per_channel: bool) -> Tensor:
    """Sum ``g`` in float64 to ``like``'s shape (per channel: over all but dim 0)."""
    s = g.double().flatten(1).sum(1) if per_channel else g.double().sum()
    return s.to(like.dtype).reshape(like.shape)


class _TTQ(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(w: Tensor, wp: Tensor, wn: Tensor, threshold: float, per_channel: bool):
        y, pos, neg = _ttq_forward(w, wp, wn, threshold, per_channel)
        return y, pos, neg

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, wp, wn, _, per_channel = inputs
        _, pos, neg = output
        ctx.mark_non_differentiable(pos, neg)
        ctx.per_channel = per_channel
        ctx.save_for_backward(pos, neg, wp, wn)

    @staticmethod
    def backward(ctx, dy: Tensor, _dpos, _dneg):
        pos, neg, wp, wn = ctx.saved_tensors
        pc = ctx.per_channel
        zero = torch.zeros_like(dy)
        dw = dwp = dwn = None
        if ctx.needs_input_grad[0]:
            p = channel_view(wp.to(dy.dtype), dy, pc).expand_as(dy)
            n = channel_view(wn.to(dy.dtype), dy, pc).expand_as(dy)
            dw = torch.where(pos, dy * p, torch.where(neg, dy * n, dy))
        if ctx.needs_input_grad[1]:
            dwp = _reduce(torch.where(pos, dy, zero), wp, pc)
        if ctx.needs_input_grad[2]:
            dwn = -_reduce(torch.where(neg, dy, zero), wn, pc)
        return dw, dwp, dwn, None, None


def ttq(w: Tensor, wp: Tensor, wn: Tensor, threshold: float = 0.05, per_channel: bool = False,
        fn: str = "ternary_ttq") -> Tensor:
    """Trained Ternary Quantization (Zhu et al., ICLR 2017): ``wp``, 0 or ``-wn`` (module doc).

    ``wp``, ``wn``: float tensors of shape ``()`` (per tensor) or ``(C,)`` (``per_channel``, C =
    ``w.shape[0]``). Gradients (eq. 7-8 of the paper; ``d wn`` with the minus sign the chain
    rule of ``y = -wn`` gives): ``dw = dy * wp`` above ``delta``, ``dy`` between, ``dy * wn``
    below ``-delta``; ``d wp = sum(dy)`` over the positives, ``d wn = -sum(dy)`` over the
    negatives (float64 sums, per channel when ``per_channel``).
    """
    checked(w, fn, "w")
    checked(wp, fn, "wp")
    checked(wn, fn, "wn")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"{fn}: threshold must be in [0, 1) (delta = threshold * max|w|), got "
                         f"{threshold!r}")
    want = (w.dim() and w.shape[0],) if per_channel else ()
    if per_channel and w.dim() < 2:
        _rows(w, True)  # raises, naming the fix
    for name, t in (("wp", wp), ("wn", wn)):
        if tuple(t.shape) != tuple(want) and t.numel() != (want[0] if want else 1):
            raise ValueError(f"{fn}: {name} must have shape {want}, got {tuple(t.shape)}")
    if not (w.requires_grad or wp.requires_grad or wn.requires_grad):
        return _ttq_forward(w, wp, wn, float(threshold), bool(per_channel))[0]
    return _TTQ.apply(w, wp.reshape(want), wn.reshape(want), float(threshold),
                      bool(per_channel))[0]


def absmean_scale(w: Tensor, per_channel: bool = False, eps: float = ABSMEAN_EPS) -> Tensor:
    """BitNet b1.58's ``gamma = max(f(mean|w|), eps)`` (float64 mean), ``(C,)`` or ``()``."""
    a = _rows(w.detach().abs(), per_channel)
    mean = a.double().mean(1).to(a.dtype) if a.shape[1] else a.new_zeros(a.shape[0])
    gamma = mean.clamp(min=eps)
    return gamma.reshape((a.shape[0],) if per_channel else ())


def absmean(w: Tensor, per_channel: bool = False, eps: float = ABSMEAN_EPS,
            fn: str = "ternary_absmean") -> Tensor:
    """BitNet b1.58 ternary weights (Ma et al. 2024): ``clamp(round_half_away(w / gamma), -1, 1)
    * gamma`` with ``gamma = max(mean|w|, eps)``; ``dw = dy``. Ties (``|w| = gamma / 2``) go
    away from zero, as every fewbits rounding (the paper's PyTorch code uses ``torch.round``,
    ties to even)."""
    checked(w, fn, "w")
    check_positive(fn, "eps", eps)  # eps = 0: an all-zero tensor would give 0 / 0
    ww = widen(w.detach())
    gamma = channel_view(absmean_scale(ww, per_channel, eps), ww, per_channel)
    t = round_half_away(ww / gamma).clamp_(-1.0, 1.0)
    return straight((t * gamma).to(w.dtype), w)


def absmax(x: Tensor, bits: int = 8, per: str = "token", eps: float = ABSMEAN_EPS,
           fn: str = "absmax") -> Tensor:
    """BitNet's absmax activations: ``scale = max(max|x|, eps) / Q`` with ``Q = 2**(bits-1) - 1``
    over the last dim (``per="token"``, the paper), over all but dim 0 (``"sample"``) or the
    whole tensor (``"tensor"``); ``y = clamp(round_half_away(x / scale), -Q, Q) * scale``.
    Gradient ``dx = dy`` (every value lies inside its own range). Ma et al. 2024 (BitNet
    b1.58), Wang et al. 2023 (BitNet)."""
    checked(x, fn, "x")
    check_absmax_args(fn, bits, eps)
    xw = widen(x.detach())
    scale = absmax_scale(xw, bits, per, eps, fn)
    q = float(2 ** (bits - 1) - 1)
    t = round_half_away(xw / scale).clamp_(-q, q)
    return straight((t * scale).to(x.dtype), x)


def check_absmax_args(fn: str, bits: int, eps: float) -> None:
    """``bits`` in ``[2, 16]`` (1 bit has ``Q = 0``: every value would be NaN) and ``eps`` a
    finite number > 0 (0 gives ``0 / 0`` for an all-zero row); ``ValueError`` naming it."""
    check_bits(fn, "bits", bits, low=2)
    if int(bits) > 16:
        raise ValueError(f"{fn}: bits must be in [2, 16], got {bits}")
    check_positive(fn, "eps", eps)


def absmax_scale(x: Tensor, bits: int = 8, per: str = "token", eps: float = ABSMEAN_EPS,
                 fn: str = "absmax") -> Tensor:
    """``max(max|x|, eps) / (2**(bits-1) - 1)`` over the last dim (``"token"``), all but dim 0
    (``"sample"``) or all (``"tensor"``), shaped to broadcast over ``x`` (keepdim)."""
    q = float(2 ** (bits - 1) - 1)
    a = x.detach().abs()
    if per == "token":
        m = a.amax(-1, keepdim=True) if a.dim() else a
    elif per == "sample":
        m = a.flatten(1).amax(1).reshape((-1,) + (1,) * (a.dim() - 1)) if a.dim() > 1 else a
    elif per == "tensor":
        m = a.amax() if a.numel() else a.new_zeros(())
    else:
        raise ValueError(f"{fn}: per must be 'token', 'sample' or 'tensor', got {per!r}")
    return m.clamp(min=eps) / torch.tensor(q, dtype=a.dtype, device=a.device)
