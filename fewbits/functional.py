"""Straight-through quantizer functions: the nine families' forward and backward.

Each public function validates its arguments, refuses non-finite input, and calls a
``torch.autograd.Function`` whose forward is the formula of ``docs/QUANTIZERS.md`` (see
:mod:`fewbits._math`) and whose backward is the straight-through estimator (STE) of the spec.
Backward passes keep only a ``bool`` mask per element, never a float copy of the input.

Example:
    >>> import torch
    >>> from fewbits.functional import fixed_point_quantize
    >>> fixed_point_quantize(torch.tensor([0.125, -0.375, 9.0]), n=4, delta=0.25)
    tensor([ 0.2500, -0.5000,  1.7500])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from . import _kernels, _math

__all__ = [
    "binary_connect",
    "binary_sigmoid",
    "binary_tanh",
    "binary_weight",
    "finite_checks",
    "fixed_point_quantize",
    "inq_quantize",
    "min_max_grid",
    "min_max_quantize",
    "pow2_quantize",
]

_CHECK_FINITE = True


@contextlib.contextmanager
def finite_checks(enabled: bool) -> Iterator[None]:
    """Turn the NaN/inf checks of every quantizer on or off inside a ``with`` block.

    The checks cost one reduction (and, on CUDA, one host sync) per quantizer call; turn them off
    for ``torch.compile`` or maximum speed once a model is known to train stably.
    """
    global _CHECK_FINITE
    old, _CHECK_FINITE = _CHECK_FINITE, bool(enabled)
    try:
        yield
    finally:
        _CHECK_FINITE = old


def _all_finite(x: Tensor) -> bool:
    """``torch.isfinite(x).all()`` at the cost of one sum: a NaN or inf element makes the sum
    NaN or inf, so a finite sum proves every element finite; only a non-finite sum (a NaN/inf, or
    finite values whose sum overflows) pays for the exact elementwise check."""
    if math.isfinite(float(x.detach().sum())):
        return True
    return bool(torch.isfinite(x).all())


def _float_tensor(x: Tensor, fn: str, arg: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {arg} must be a floating-point tensor, got {x.dtype}")


def _finite(x: Tensor, fn: str, arg: str, known_finite: bool | None = None) -> None:
    """Type checks, then (when checks are on) the NaN/inf check; ``known_finite`` is the answer
    of a fused kernel that already looked at every element."""
    _float_tensor(x, fn, arg)
    if known_finite is None:
        known_finite = not _CHECK_FINITE or _all_finite(x)
    if _CHECK_FINITE and not known_finite:
        bad = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise ValueError(
            f"{fn}: {arg} contains {bad}; quantizers need finite input. The usual cause is a "
            "diverging run: lower the learning rate, or check the data for NaN/inf."
        )


# Integer dtype of the same width, to zero gradient elements with an integer multiply.
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64,
                   torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _keep(g: Tensor, mask: Tensor, scale: float = 1.0) -> Tensor:
    """``torch.where(mask, g * scale, 0.0)`` bit for bit (kept ``-0.0``/NaN stay, dropped ones
    become ``+0.0``; ``scale`` 1 leaves ``g`` as it is), as the bits of ``g`` times the 0/1 mask:
    one vectorised pass, where ``where`` with a bool condition is a scalar loop on CPU (~8x
    slower on a 64x64x32x32 gradient). A uint8 mask comes from a fused kernel and goes back to
    one (one pass for the scale and the mask, no conversion)."""
    if mask.dtype == torch.uint8:
        dx = _kernels.keep(g, mask, 1, scale)
        if dx is not None:
            return dx
        mask = mask.view(torch.bool)
    if scale != 1.0:
        g = g * scale
    it = _SAME_WIDTH_INT.get(g.dtype)
    if it is None or g.shape != mask.shape:
        return torch.where(mask, g, torch.zeros_like(g))
    # Built from the mask: the output takes the memory layout torch.where(mask, ...) gives, so
    # that sums of the result (min-max range gradients) add in the same order; converting the
    # mask first and multiplying in place beats a bool * int multiply with inline casts.
    return mask.to(it).mul_(g.view(it)).view(g.dtype)


def _bits(fn: str, name: str, value: int, low: int = 1) -> None:
    if isinstance(value, bool) or int(value) != value or not low <= value <= 32:
        raise ValueError(f"{fn}: {name} must be an integer in [{low}, 32], got {value!r}")


def _positive(fn: str, name: str, value: float) -> None:
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")


# --------------------------------------------------------------------------- binary


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, zero_to: float, stochastic: bool) -> Tensor:
        if stochastic:
            p = torch.clamp((w + 1) * 0.5, 0, 1)
            return torch.where(torch.rand_like(w) < p, 1.0, -1.0).to(w.dtype)
        one = torch.ones_like(w)
        y = torch.where(w > 0, one, -one)
        return torch.where(w == 0, torch.full_like(w, zero_to), y)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None]:
        return dy, None, None


def binary_connect(w: Tensor, quantize_zero_to: float = 1.0, stochastic: bool = False) -> Tensor:
    """BinaryConnect weights (Courbariaux et al., NeurIPS 2015).

    Forward: ``sign(w)`` with ``sign(0) = quantize_zero_to``; with ``stochastic=True``, ``+1`` with
    probability ``hard_sigmoid(w) = clamp((w + 1) / 2, 0, 1)``, else ``-1``.
    Backward: identity, ``dw = dy`` (no ``|w| <= 1`` mask, as the seed).

    >>> binary_connect(torch.tensor([-0.3, 0.0, 2.0]))
    tensor([-1.,  1.,  1.])
    """
    _finite(w, "binary_connect", "w")
    return _SignSTE.apply(w, float(quantize_zero_to), bool(stochastic))


class _BinaryActSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, low: float, grad_scale: float, fn: str) -> Tensor:
        ctx.grad_scale = grad_scale
        if _kernels.usable(x):  # one pass for y, the mask and the finite check
            y, inside, finite = _kernels.binary_act(x, low, ctx.needs_input_grad[0])
            _finite(x, fn, "x", finite)
            ctx.save_for_backward(inside)
            return y
        _finite(x, fn, "x")
        ctx.save_for_backward(x.abs() < 1)
        # where(x > 0, 1, low) as arithmetic on the 0/1 step: where with a bool condition is
        # a branchy scalar loop on CPU, ~4x slower than the convert + multiply-add.
        y = (x > 0).to(x.dtype)
        if low == -1.0:
            return y.mul_(2.0).sub_(1.0)
        if low == 0.0:
            return y
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, low))

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None, None]:
        (inside,) = ctx.saved_tensors
        return _keep(dy, inside, ctx.grad_scale), None, None, None


def binary_tanh(x: Tensor) -> Tensor:
    """BinaryNet activation: ``+1 if x > 0 else -1``; backward ``dy * [|x| < 1]``.

    >>> binary_tanh(torch.tensor([-2.0, 0.0, 0.5]))
    tensor([-1., -1.,  1.])
    """
    _float_tensor(x, "binary_tanh", "x")
    return _BinaryActSTE.apply(x, -1.0, 1.0, "binary_tanh")


def binary_sigmoid(x: Tensor) -> Tensor:
    """Binary sigmoid: ``1 if x > 0 else 0``; backward ``0.5 * dy * [|x| < 1]``.

    >>> binary_sigmoid(torch.tensor([-2.0, 0.0, 0.5]))
    tensor([0., 0., 1.])
    """
    _float_tensor(x, "binary_sigmoid", "x")
    return _BinaryActSTE.apply(x, 0.0, 0.5, "binary_sigmoid")


def _channel_view(v: Tensor, ndim: int) -> Tensor:
    return v.reshape((-1,) + (1,) * (ndim - 1))


def binary_weight_scale(w: Tensor) -> Tensor:
    """Per-output-channel ``alpha[o] = mean |w[o, ...]|`` (float64 accumulation, then ``w.dtype``).

    Accumulating in float64 makes the float32 result independent of the summation order.
    """
    if w.dim() < 2:
        raise ValueError(
            f"binary_weight: w must have an output-channel axis (dim >= 2), got shape "
            f"{tuple(w.shape)}; use binary_connect for biases and vectors"
        )
    return w.detach().abs().double().flatten(1).mean(1).to(w.dtype)


class _ScaledSignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, alpha: Tensor) -> Tensor:
        a = _channel_view(alpha, w.dim())
        return torch.where(w >= 0, a, -a)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:
        return dy, None


def binary_weight(w: Tensor) -> Tensor:
    """XNOR-Net binary weights (BWN, Rastegari et al., ECCV 2016).

    Forward: ``alpha[o] * sign(w[o, ...])`` with ``alpha[o] = mean |w[o, ...]|`` over all
    non-output axes and ``sign(0) = +1``. Backward: identity to ``w`` (no alpha factor, no
    gradient through alpha), as the seed.

    >>> binary_weight(torch.tensor([[1.0, -3.0], [0.0, 0.5]]))
    tensor([[ 2.0000, -2.0000],
            [ 0.2500,  0.2500]])
    """
    _finite(w, "binary_weight", "w")
    return _ScaledSignSTE.apply(w, binary_weight_scale(w))


# --------------------------------------------------------------------------- fixed point


class _MaskSTE(torch.autograd.Function):
    """``y`` precomputed, backward ``dy * mask`` (mask None = identity)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
        ctx.has_mask = mask is not None
        if mask is not None:
            ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None]:
        if not ctx.has_mask:
            return dy, None, None
        (mask,) = ctx.saved_tensors
        return _keep(dy, mask), None, None


def _ste(x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    # Build y under no_grad so autograd stores nothing but the bool mask.
    return _MaskSTE.apply(x, y, mask)


def fixed_point_quantize(
    x: Tensor,
    sign: bool = True,
    n: int = 8,
    delta: float = 2**-4,
    ste_fine_grained: bool = True,
) -> Tensor:
    """Uniform fixed-point quantization with step ``delta`` and ``n`` bits.

    Forward (``nb = n - 1`` if ``sign`` else ``n``, ``xmax = (2**nb - 1) * delta``,
    ``xmin = -xmax`` if ``sign`` else 0)::

        y = round_half_away(c / delta) * delta,   c = clamp(x, xmin, xmax)

    (the spec's ``sign(c) * floor(|c| / delta + 0.5) * delta``, rounded exactly).

    Backward: ``dx = dy * [xmin <= x <= xmax]`` (``ste_fine_grained``), else ``dx = dy``.

    >>> fixed_point_quantize(torch.tensor([0.09375, 100.0]), n=8, delta=2**-4)
    tensor([0.1250, 7.9375])
    """
    fn = "fixed_point_quantize"
    _float_tensor(x, fn, "x")
    _bits(fn, "n", n, low=2 if sign else 1)
    _positive(fn, "delta", delta)
    want_mask = bool(ste_fine_grained) and x.requires_grad
    bounds = _math.fixed_point_bounds(bool(sign), int(n), float(delta), x.dtype)
    if bounds is not None and _kernels.usable(x):  # one pass: y, mask, finite check
        y, mask, finite = _kernels.fixed_point(x, *bounds, want_mask)
        _finite(x, fn, "x", finite)
        return _ste(x, y, mask)
    _finite(x, fn, "x")
    with torch.no_grad():
        y, mask = _math.fixed_point_mask(x, bool(sign), int(n), float(delta), want_mask)
    return _ste(x, y, mask)


# --------------------------------------------------------------------------- power of two


def _pow2_check(fn: str, sign: bool, with_zero: bool, n: int, m: int) -> None:
    # n = sign + with_zero leaves no exponent bits: one magnitude 2**m (binary / ternary).
    low = max(1, int(bool(sign)) + int(bool(with_zero)))
    _bits(fn, "n", n, low=low)
    if isinstance(m, bool) or int(m) != m or not -126 <= m <= 127:
        raise ValueError(f"{fn}: m (log2 of the largest level) must be an integer in "
                         f"[-126, 127] so that 2**m is a float32, got {m!r}")


def pow2_quantize(
    x: Tensor,
    sign: bool = True,
    with_zero: bool = True,
    n: int = 8,
    m: int = 1,
    ste_fine_grained: bool = True,
) -> Tensor:
    """Power-of-two (logarithmic) quantization to ``n`` bits with largest level ``2**m``.

    Forward (``nb = n - sign - with_zero``, ``p_max = 2**m``, ``p_min = 2**(m - (2**nb - 1))``,
    ``thr = p_min / sqrt(2)``): ``q = 2**round_half_away(log2|x|)`` (0 at 0), clipped to
    ``p_max``; below ``p_min`` it becomes ``0 if |x| < thr else p_min`` (``with_zero``) or
    ``p_min``; the sign is restored (``sign``) or negatives map to ``0``/``p_min``.
    Backward: ``dx = dy * [2**round(log2|x|) <= p_max]`` (and 0 at ``x < 0`` when unsigned) if
    ``ste_fine_grained``, else ``dx = dy``. Miyashita et al. 2016, "Convolutional Neural Networks
    using Logarithmic Data Representation".

    >>> pow2_quantize(torch.tensor([0.3, -0.8, 5.0]), n=8, m=1)
    tensor([ 0.2500, -1.0000,  2.0000])
    """
    fn = "pow2_quantize"
    _float_tensor(x, fn, "x")
    _pow2_check(fn, sign, with_zero, n, m)
    want_mask = bool(ste_fine_grained) and x.requires_grad
    args = _math.pow2_bit_args(bool(sign), bool(with_zero), int(n), int(m), x.dtype)
    if args is not None and _kernels.usable(x):  # one pass: y, mask, finite check
        y, mask, finite = _kernels.pow2(x, args, bool(sign), bool(with_zero), want_mask)
        _finite(x, fn, "x", finite)
        return _ste(x, y, mask)
    _finite(x, fn, "x")
    with torch.no_grad():
        y, mask = _math.pow2_mask(x, bool(sign), bool(with_zero), int(n), int(m), want_mask)
    return _ste(x, y, mask)


# --------------------------------------------------------------------------- INQ


def inq_quantize(w: Tensor, num_bits: int = 4) -> Tensor:
    """Incremental Network Quantization levels (Zhou et al., ICLR 2017) of a whole tensor.

    Forward: with ``s = max|w|`` (1 if 0), ``n1 = floor(log2 s) + (frac(log2 s) >= log2 1.5)``,
    ``n2 = n1 + 1 - 2**(num_bits - 2)``: ``0`` where ``|w| < 2**(n2 - 1)``, else
    ``sign(w) * 2**clamp(floor(log2|w|) + (frac(log2|w|) >= log2 1.5), n2, n1)``.
    Backward: identity (INQ itself stops gradients of fixed weights with its mask; see
    :class:`fewbits.quantizers.INQ`).

    >>> inq_quantize(torch.tensor([0.9, -0.3, 0.01]), num_bits=4)
    tensor([ 1.0000, -0.2500,  0.0000])
    """
    fn = "inq_quantize"
    _finite(w, fn, "w")
    _bits(fn, "num_bits", num_bits, low=2)
    with torch.no_grad():
        y = inq_levels(w, int(num_bits), fn)
    return _ste(w, y, None)


def inq_levels(w: Tensor, num_bits: int, fn: str = "inq_quantize") -> Tensor:
    """:func:`fewbits._math.inq_levels`, refusing a tensor whose largest level ``2**n1`` is
    beyond its dtype, which would give inf from finite weights: ``max|w| >= 1.5 * 2**emax``
    (``emax`` the dtype's largest exponent, 127 for float32) rounds to ``2**(emax + 1)``."""
    emax = math.frexp(torch.finfo(w.dtype).max)[1] - 1
    s = float(w.detach().abs().max()) if w.numel() else 0.0
    if s >= 1.5 * 2.0**emax:
        raise ValueError(
            f"{fn}: max|w| = {s:.6g} rounds to the level 2**{emax + 1}, beyond {w.dtype}: "
            "weights this large mean a diverged run (lower the learning rate), or quantize "
            "in a wider dtype")
    return _math.inq_levels(w, num_bits)


# --------------------------------------------------------------------------- min-max


class _MinMaxSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qr_min, qr_max, y, below, above, fine):
        ctx.fine = fine
        ctx.min_shape, ctx.max_shape = qr_min.shape, qr_max.shape
        ctx.save_for_backward(below, above)
        return y

    @staticmethod
    def backward(ctx, dy):
        below, above = ctx.saved_tensors
        return (*_MinMaxSTE.backward_masks(ctx, dy, below, above), None)

    @staticmethod
    def backward_masks(ctx, dy, below, above):
        dx = _keep(dy, ~(below | above)) if ctx.fine else dy
        d_min = d_max = None
        if ctx.needs_input_grad[1]:
            d_min = _reduce_to(_keep(dy, below), ctx.min_shape)
        if ctx.needs_input_grad[2]:
            d_max = _reduce_to(_keep(dy, above), ctx.max_shape)
        return dx, d_min, d_max, None, None, None


class _MinMaxCodeSTE(torch.autograd.Function):
    """:class:`_MinMaxSTE` for the fused kernel's one uint8 code (0 inside, 1 below, 2 above):
    ``dx`` and both range sums in one pass."""

    @staticmethod
    def forward(ctx, x, qr_min, qr_max, y, code, fine):
        ctx.fine = fine
        ctx.min_shape, ctx.max_shape = qr_min.shape, qr_max.shape
        ctx.save_for_backward(code)
        return y

    @staticmethod
    def backward(ctx, dy):
        (code,) = ctx.saved_tensors
        want_sums = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        want_dx = ctx.fine and ctx.needs_input_grad[0]
        fused = _kernels.min_max_grad(dy, code, want_dx, want_sums)
        if fused is None:  # dy in another layout than the code: the PyTorch path
            return _MinMaxSTE.backward_masks(ctx, dy, code == 1, code == 2)
        dx, s_below, s_above = fused
        if not ctx.fine:
            dx = dy
        d_min = d_max = None
        if ctx.needs_input_grad[1]:
            d_min = torch.tensor(s_below, dtype=dy.dtype).reshape(ctx.min_shape)
        if ctx.needs_input_grad[2]:
            d_max = torch.tensor(s_above, dtype=dy.dtype).reshape(ctx.max_shape)
        return dx, d_min, d_max, None, None, None


def _reduce_to(g: Tensor, shape: torch.Size) -> Tensor:
    if len(shape) == 0 or shape.numel() == 1:
        return g.sum().reshape(shape)
    return (g.flatten(1).sum(1) if g.dim() > 1 else g).reshape(shape)


def _range_view(r: Tensor, x: Tensor, fn: str, arg: str) -> Tensor:
    if not isinstance(r, Tensor):
        r = torch.tensor(float(r), dtype=x.dtype, device=x.device)
    _finite(r, fn, arg)
    if r.numel() == 1:
        return r.reshape(())
    if r.dim() != 1 or x.dim() < 1 or r.shape[0] != x.shape[0]:
        raise ValueError(
            f"{fn}: {arg} must be a scalar or have shape (C,) = (x.shape[0],) for per-channel "
            f"ranges; got {tuple(r.shape)} for x of shape {tuple(x.shape)}"
        )
    return _channel_view(r, x.dim())


def min_max_grid(rmin: Tensor, rmax: Tensor, ql_min: int, ql_max: int, eps: float,
                 fn: str = "min_max_quantize") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(scale, zero_point, lo, hi)`` of :func:`fewbits._math.min_max_range`, refusing a
    grid the dtype cannot hold: finite ranges whose width overflows (``qr_max - qr_min`` beyond
    float32's 3.4e38 makes the scale inf, every output NaN) or whose ``eps`` nudge is absorbed
    (``qr_min + eps == qr_min`` for ``|qr_min|`` above ~1e6 * eps makes the scale 0). With
    ``hi - lo`` finite and the scale > 0, every output ``r * scale + lo`` lies in
    ``[lo, hi]``: finite."""
    scale, zp, lo, hi = _math.min_max_range(rmin, rmax, float(ql_min), float(ql_max),
                                            float(eps))
    ok = (scale > 0) & torch.isfinite(hi - lo)
    if not bool(ok.all()):
        r0, r1, ok = torch.broadcast_tensors(rmin, rmax, ok)
        i = int((~ok).reshape(-1).nonzero()[0, 0])
        lo_v, hi_v = float(r0.reshape(-1)[i]), float(r1.reshape(-1)[i])
        raise ValueError(
            f"{fn}: the range [qr_min, qr_max] = [{lo_v:.6g}, {hi_v:.6g}] has no {scale.dtype} "
            f"grid of {ql_max - ql_min} steps (its width overflows, or eps={eps} vanishes "
            "next to it): values this large usually mean a diverged run; otherwise scale the "
            "data down or quantize in float64")
    return scale, zp, lo, hi


def min_max_quantize(
    x: Tensor,
    qr_min: Tensor,
    qr_max: Tensor,
    ql_min: int = 0,
    ql_max: int = 255,
    eps: float = 0.01,
    ste_fine_grained: bool = True,
) -> Tensor:
    """Min-max (asymmetric, zero-point) quantization (Jacob et al., CVPR 2018).

    Forward: nudge ``qr_max = qr_min + eps`` if the range is narrower than ``eps``;
    ``scale = (qr_max - qr_min) / (ql_max - ql_min)``; ``zp = ql_min - qr_min / scale`` clamped
    to ``[ql_min, ql_max]`` and rounded half away; ``lo = (ql_min - zp) * scale``,
    ``hi = (ql_max - zp) * scale``; ``y = round_half_away((clamp(x, lo, hi) - lo) / scale) *
    scale + lo``.
    Backward: ``dx = dy * [lo <= x <= hi]`` (``ste_fine_grained``, else ``dy``);
    ``d qr_min = sum(dy * [x < lo])``, ``d qr_max = sum(dy * [x > hi])`` (per channel when the
    ranges have shape ``(C,)``), when they require grad. State updates (per-batch and EMA
    ranges) live in :class:`fewbits.quantizers.MinMax`.

    >>> min_max_quantize(torch.tensor([-1.0, 0.3, 9.0]), torch.tensor(-1.0), torch.tensor(1.0),
    ...                  ql_max=3)
    tensor([-0.6667,  0.0000,  0.6667])
    """
    fn = "min_max_quantize"
    _float_tensor(x, fn, "x")
    for name, v in (("ql_min", ql_min), ("ql_max", ql_max)):
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"{fn}: {name} must be an integer, got {v!r}")
    if not ql_min < ql_max:
        raise ValueError(f"{fn}: need ql_min < ql_max, got ql_min={ql_min}, ql_max={ql_max}")
    if ql_max - ql_min > 2**32 - 1:
        raise ValueError(f"{fn}: ql_max - ql_min must fit 32 bits, got {ql_max - ql_min}")
    _positive(fn, "eps", eps)
    rmin = _range_view(qr_min, x, fn, "qr_min")
    rmax = _range_view(qr_max, x, fn, "qr_max")
    needs = x.requires_grad or (isinstance(qr_min, Tensor) and qr_min.requires_grad) or (
        isinstance(qr_max, Tensor) and qr_max.requires_grad
    )
    qmin_t = qr_min if isinstance(qr_min, Tensor) else rmin
    qmax_t = qr_max if isinstance(qr_max, Tensor) else rmax
    with torch.no_grad():
        scale, _zp, lo, hi = min_max_grid(rmin.to(x.dtype), rmax.to(x.dtype), ql_min, ql_max,
                                          eps, fn)
        code = None
        if scale.numel() == 1 and _kernels.usable(x):  # one pass: y, masks, finite check
            y, code, finite = _kernels.min_max(x, float(lo), float(hi), float(scale), needs)
            _finite(x, fn, "x", finite)
        else:
            _finite(x, fn, "x")
            y = _math.min_max(x, scale, lo, hi)
    if not needs:
        return y
    fine = bool(ste_fine_grained)
    if code is not None:
        return _MinMaxCodeSTE.apply(x, qmin_t, qmax_t, y, code, fine)
    with torch.no_grad():
        below, above = x < lo, x > hi
    return _MinMaxSTE.apply(x, qmin_t, qmax_t, y, below, above, fine)
