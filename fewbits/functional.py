"""Straight-through quantizer functions: the nine families' forward and backward.

Each public function validates its arguments and calls the family's custom operator
(:mod:`fewbits.ops`, ``torch.ops.fewbits.*``), whose forward is the formula of
``docs/QUANTIZERS.md`` (see :mod:`fewbits._math`; float16/bfloat16 decided in float32),
refuses non-finite input (see :func:`finite_checks`), and whose backward is the
straight-through estimator (STE) of the spec.
Backward passes keep only a ``uint8`` mask per element, never a float copy of the input. Under
``torch.onnx.export`` they raise, naming fewbits' own exporter.

Example:
    >>> import torch
    >>> from fewbits.functional import fixed_point_quantize
    >>> fixed_point_quantize(torch.tensor([0.125, -0.375, 9.0]), n=4, delta=0.25)
    tensor([ 0.2500, -0.5000,  1.7500])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _math, ops
from ._checks import (
    check_bits,
    check_float_tensor,
    check_mode,
    check_positive,
    check_pow2_args,
    finite_checks,
    graph_guard,
)

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

# --------------------------------------------------------------------------- binary


def binary_connect(w: Tensor, quantize_zero_to: float = 1.0, stochastic: bool = False) -> Tensor:
    """BinaryConnect weights (Courbariaux et al., NeurIPS 2015).

    Forward: ``sign(w)`` with ``sign(0) = quantize_zero_to``; with ``stochastic=True``, ``+1`` with
    probability ``hard_sigmoid(w) = clamp((w + 1) / 2, 0, 1)``, else ``-1``.
    Backward: identity, ``dw = dy`` (no ``|w| <= 1`` mask, as the seed).

    >>> binary_connect(torch.tensor([-0.3, 0.0, 2.0]))
    tensor([-1.,  1.,  1.])
    """
    fn = "binary_connect"
    check_float_tensor(w, fn, "w")
    graph_guard(fn, "binary_connect")
    return ops.call_identity(ops.binary_connect, w, float(quantize_zero_to),
                             bool(stochastic), check_mode(w), fn)


def _grad_wanted(x: Tensor) -> bool:
    """Whether the operator must keep its gradient mask: when ``x`` requires grad, and always
    in a captured graph, which fixes the choice as a constant for every later call (a graph
    traced or exported from an inference input and then trained through took ``dx = dy``)."""
    return x.requires_grad or ops.capturing()


def _binary_act(x: Tensor, low: float, grad_scale: float, fn: str) -> Tensor:
    check_float_tensor(x, fn, "x")
    graph_guard(fn, "binary_act")
    want = _grad_wanted(x)
    return ops.call_masked(ops.binary_act, x,
                           (low, grad_scale, want, check_mode(x), fn), grad_scale, want)


def binary_tanh(x: Tensor) -> Tensor:
    """BinaryNet activation: ``+1 if x > 0 else -1``; backward ``dy * [|x| < 1]``.

    >>> binary_tanh(torch.tensor([-2.0, 0.0, 0.5]))
    tensor([-1., -1.,  1.])
    """
    return _binary_act(x, -1.0, 1.0, "binary_tanh")


def binary_sigmoid(x: Tensor) -> Tensor:
    """Binary sigmoid: ``1 if x > 0 else 0``; backward ``0.5 * dy * [|x| < 1]``.

    >>> binary_sigmoid(torch.tensor([-2.0, 0.0, 0.5]))
    tensor([0., 0., 1.])
    """
    return _binary_act(x, 0.0, 0.5, "binary_sigmoid")


def binary_weight_scale(w: Tensor) -> Tensor:
    """Per-output-channel ``alpha[o] = mean |w[o, ...]|`` (float64 accumulation, then ``w.dtype``).

    Accumulating in float64 makes the float32 result independent of the summation order.
    """
    _channel_axis(w)
    return ops.binary_weight_scale(w)


def _channel_axis(w: Tensor) -> None:
    if w.dim() < 2:
        raise ValueError(
            f"binary_weight: w must have an output-channel axis (dim >= 2), got shape "
            f"{tuple(w.shape)}; use binary_connect for biases and vectors"
        )


def binary_weight(w: Tensor) -> Tensor:
    """XNOR-Net binary weights (BWN, Rastegari et al., ECCV 2016).

    Forward: ``alpha[o] * sign(w[o, ...])`` with ``alpha[o] = mean |w[o, ...]|`` over all
    non-output axes and ``sign(0) = +1``. Backward: identity to ``w`` (no alpha factor, no
    gradient through alpha), as the seed.

    >>> binary_weight(torch.tensor([[1.0, -3.0], [0.0, 0.5]]))
    tensor([[ 2.0000, -2.0000],
            [ 0.2500,  0.2500]])
    """
    fn = "binary_weight"
    check_float_tensor(w, fn, "w")
    _channel_axis(w)
    graph_guard(fn, "binary_weight")
    return ops.call_identity(ops.binary_weight, w, check_mode(w), fn)


# --------------------------------------------------------------------------- fixed point


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

    (the spec's ``sign(c) * floor(|c| / delta + 0.5) * delta``, rounded exactly; float16 and
    bfloat16 inputs are quantized in float32 and rounded back once).

    Backward: ``dx = dy * [xmin <= x <= xmax]`` (``ste_fine_grained``), else ``dx = dy``.

    >>> fixed_point_quantize(torch.tensor([0.09375, 100.0]), n=8, delta=2**-4)
    tensor([0.1250, 7.9375])
    """
    fn = "fixed_point_quantize"
    check_float_tensor(x, fn, "x")
    check_bits(fn, "n", n, low=2 if sign else 1)
    check_positive(fn, "delta", delta)
    graph_guard(fn, "fixed_point")
    want_mask = bool(ste_fine_grained) and _grad_wanted(x)
    args = (bool(sign), int(n), float(delta), want_mask, check_mode(x), fn)
    return ops.call_masked(ops.fixed_point, x, args, 1.0, want_mask)


# --------------------------------------------------------------------------- power of two


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
    ``p_min``; the sign is restored (``sign``) or negatives map to ``0``/``p_min``. float16 and
    bfloat16 inputs are decided in float32 (exact ``log2`` rounding) and rounded back once.
    Backward: ``dx = dy * [2**round(log2|x|) <= p_max]`` (and 0 at ``x < 0`` when unsigned) if
    ``ste_fine_grained``, else ``dx = dy``. Miyashita et al. 2016, "Convolutional Neural Networks
    using Logarithmic Data Representation".

    >>> pow2_quantize(torch.tensor([0.3, -0.8, 5.0]), n=8, m=1)
    tensor([ 0.2500, -1.0000,  2.0000])
    """
    fn = "pow2_quantize"
    check_float_tensor(x, fn, "x")
    check_pow2_args(fn, sign, with_zero, n, m)
    graph_guard(fn, "pow2")
    want_mask = bool(ste_fine_grained) and _grad_wanted(x)
    args = (bool(sign), bool(with_zero), int(n), int(m), want_mask, check_mode(x), fn)
    return ops.call_masked(ops.pow2, x, args, 1.0, want_mask)


# --------------------------------------------------------------------------- INQ


def inq_quantize(w: Tensor, num_bits: int = 4) -> Tensor:
    """Incremental Network Quantization levels (Zhou et al., ICLR 2017) of a whole tensor.

    Forward: with ``s = max|w|`` (1 if 0), ``n1 = floor(log2 s) + (frac(log2 s) >= log2 1.5)``,
    ``n2 = n1 + 1 - 2**(num_bits - 2)``: ``0`` where ``|w| < 2**(n2 - 1)``, else
    ``sign(w) * 2**clamp(floor(log2|w|) + (frac(log2|w|) >= log2 1.5), n2, n1)`` (float16 and
    bfloat16 in float32, rounded back once).
    Backward: identity (INQ itself stops gradients of fixed weights with its mask; see
    :class:`fewbits.quantizers.INQ`).

    >>> inq_quantize(torch.tensor([0.9, -0.3, 0.01]), num_bits=4)
    tensor([ 1.0000, -0.2500,  0.0000])
    """
    fn = "inq_quantize"
    check_float_tensor(w, fn, "w")
    check_bits(fn, "num_bits", num_bits, low=2)
    graph_guard(fn, "inq")
    if not ops.capturing():  # eager only: the check reads max|w| on the host
        _inq_dtype_check(w, fn)
    return ops.call_identity(ops.inq, w, int(num_bits), check_mode(w), fn)


def inq_levels(w: Tensor, num_bits: int, fn: str = "inq_quantize") -> Tensor:
    """:func:`fewbits._math.inq_levels`, refusing a tensor whose largest level ``2**n1`` is
    beyond its dtype (see :func:`_inq_dtype_check`; half precision decided in float32, as the
    operator does; the check is eager only, as in :func:`inq_quantize`)."""
    if not ops.capturing():  # it reads max|w| on the host
        _inq_dtype_check(w, fn)
    return _math.inq_levels(ops.widen(w), num_bits).to(w.dtype)


def _inq_dtype_check(w: Tensor, fn: str) -> None:
    """Refuse weights whose largest INQ level would be inf in their dtype: ``max|w| >= 1.5 *
    2**emax`` (``emax`` the dtype's largest exponent, 127 for float32) rounds to
    ``2**(emax + 1)``, an inf from finite weights."""
    emax = math.frexp(torch.finfo(w.dtype).max)[1] - 1
    s = float(w.detach().abs().max()) if w.numel() else 0.0
    if math.isfinite(s) and s >= 1.5 * 2.0**emax:  # NaN/inf: the operator's check names them
        raise ValueError(
            f"{fn}: max|w| = {s:.6g} rounds to the level 2**{emax + 1}, beyond {w.dtype}: "
            "weights this large mean a diverged run (lower the learning rate), or quantize "
            "in a wider dtype")


# --------------------------------------------------------------------------- min-max


def min_max_grid(rmin: Tensor, rmax: Tensor, ql_min: int, ql_max: int, eps: float,
                 fn: str = "min_max_quantize") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(scale, zero_point, lo, hi)`` of :func:`fewbits._math.min_max_range`, refusing a
    grid the dtype cannot hold: finite ranges whose width overflows (``qr_max - qr_min`` beyond
    float32's 3.4e38 makes the scale inf, every output NaN) or whose ``eps`` nudge is absorbed
    (``qr_min + eps == qr_min`` for ``|qr_min|`` above ~1e6 * eps makes the scale 0). With
    ``hi - lo`` finite and the scale > 0, every output ``r * scale + lo`` lies in
    ``[lo, hi]``: finite (:func:`fewbits.ops.check_grid`, which the operator also runs)."""
    scale, zp, lo, hi = _math.min_max_range(rmin, rmax, float(ql_min), float(ql_max),
                                            float(eps))
    ops.check_grid(rmin, rmax, scale, lo, hi, ql_min, ql_max, eps, fn)
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
    scale + lo`` (float16 and bfloat16 inputs in float32, rounded back once).
    Backward: ``dx = dy * [lo <= x <= hi]`` (``ste_fine_grained``, else ``dy``);
    ``d qr_min = sum(dy * [x < lo])``, ``d qr_max = sum(dy * [x > hi])`` (per channel when the
    ranges have shape ``(C,)``), when they require grad. State updates (per-batch and EMA
    ranges) live in :class:`fewbits.quantizers.MinMax`.

    >>> min_max_quantize(torch.tensor([-1.0, 0.3, 9.0]), torch.tensor(-1.0), torch.tensor(1.0),
    ...                  ql_max=3)
    tensor([-0.6667,  0.0000,  0.6667])
    """
    fn = "min_max_quantize"
    check_float_tensor(x, fn, "x")
    for name, v in (("ql_min", ql_min), ("ql_max", ql_max)):
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"{fn}: {name} must be an integer, got {v!r}")
    if not ql_min < ql_max:
        raise ValueError(f"{fn}: need ql_min < ql_max, got ql_min={ql_min}, ql_max={ql_max}")
    if ql_max - ql_min > 2**32 - 1:
        raise ValueError(f"{fn}: ql_max - ql_min must fit 32 bits, got {ql_max - ql_min}")
    check_positive(fn, "eps", eps)
    ranges = []
    for r, arg in ((qr_min, "qr_min"), (qr_max, "qr_max")):
        if not isinstance(r, Tensor):
            r = torch.tensor(float(r), dtype=x.dtype, device=x.device)
        check_float_tensor(r, fn, arg)
        ops.range_view(r, x, fn, arg)  # shape check
        ranges.append(r)
    graph_guard(fn, "min_max")
    needs = _grad_wanted(x) or ranges[0].requires_grad or ranges[1].requires_grad
    return ops.call_min_max(x, ranges[0], ranges[1], int(ql_min), int(ql_max), float(eps),
                            bool(ste_fine_grained), needs, check_mode(x), fn)
