"""The binary families' operators and straight-through functions: BinaryConnect and BinaryNet
weights (``sign``), XNOR-Net's scaled binary weights (BWN) and the binary activations
(``binary_tanh``, ``binary_sigmoid``) of docs/QUANTIZERS.md.

=====================================  ======================================  ===============
operator (``torch.ops.fewbits.*``)     returns                                 backward
=====================================  ======================================  ===============
``binary_connect(w, zero_to, stoch)``  ``sign(w)`` (+-1)                       identity
``binary_weight(w)``                   ``mean|w[o]| * sign(w[o])``             identity
``binary_act(x, low, grad_scale)``     ``(1 if x > 0 else low, |x| < 1 mask)``  ``keep``
=====================================  ======================================  ===============

Backends: the fused C kernel of :mod:`fewbits._kernels` (float32, dense CPU) where it can,
PyTorch operators else (any device). The binary families compare with 0 and 1, exact in any
dtype, and keep the input's dtype throughout.

    >>> import torch
    >>> binary_tanh(torch.tensor([-2.0, 0.0, 0.5]))
    tensor([-1., -1.,  1.])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _kernels
from .._checks import check_float_tensor, check_mode, graph_guard
from ._core import (
    call_identity,
    call_masked,
    check_values,
    grad_wanted,
    identity_op,
    like,
    mask_out,
    masked_op,
)

__all__ = [
    "binary_act_op",
    "binary_connect",
    "binary_connect_op",
    "binary_sigmoid",
    "binary_tanh",
    "binary_weight",
    "binary_weight_op",
    "binary_weight_scale",
    "channel_weight_scale",
]


# --------------------------------------------------------------------------- operators


def _binary_connect(w: Tensor, zero_to: float, stochastic: bool, check: int, fn: str) -> Tensor:
    """``sign(w)`` with ``sign(0) = zero_to``; stochastic: ``+1`` with probability
    ``clamp((w + 1) / 2, 0, 1)``."""
    if not stochastic and _kernels.usable(w):  # one pass: y and the finite check
        y, _, finite = _kernels.binary_act(w, -1.0, False, zero_to)
        check_values(w, fn, "w", check, finite)
        return y
    check_values(w, fn, "w", check)
    if stochastic:
        p = torch.clamp((w + 1) * 0.5, 0, 1)
        return torch.where(torch.rand_like(w) < p, 1.0, -1.0).to(w.dtype)
    one = torch.ones_like(w)
    y = torch.where(w > 0, one, -one)
    return like(torch.where(w == 0, torch.full_like(w, zero_to), y), w)


binary_connect_op = identity_op("fewbits::binary_connect", _binary_connect)


def channel_weight_scale(w: Tensor) -> Tensor:
    """Per-output-channel ``alpha[o] = mean |w[o, ...]|`` (float64 accumulation, then
    ``w.dtype``): independent of the summation order."""
    return w.detach().abs().double().flatten(1).mean(1).to(w.dtype)


def _binary_weight(w: Tensor, check: int, fn: str) -> Tensor:
    """``alpha[o] * sign(w[o, ...])``, ``sign(0) = +1``, ``alpha`` per output channel."""
    check_values(w, fn, "w", check)
    a = channel_weight_scale(w).reshape((-1,) + (1,) * (w.dim() - 1))
    return like(torch.where(w >= 0, a, -a), w)


binary_weight_op = identity_op("fewbits::binary_weight", _binary_weight)


def _binary_act(x: Tensor, low: float, grad_scale: float, want_mask: bool, check: int,
                fn: str) -> tuple[Tensor, Tensor]:
    """``(1 if x > 0 else low, |x| < 1)``; the backward scales by ``grad_scale``."""
    if _kernels.usable(x):  # one pass for y, the mask and the finite check
        y, inside, finite = _kernels.binary_act(x, low, want_mask)
        check_values(x, fn, "x", check, finite)
        return y, mask_out(inside, x)
    check_values(x, fn, "x", check)
    inside = (x.abs() < 1) if want_mask else None
    # where(x > 0, 1, low) as arithmetic on the 0/1 step: where with a bool condition is
    # a branchy scalar loop on CPU, ~4x slower than the convert + multiply-add.
    y = (x > 0).to(x.dtype)
    if low == -1.0:
        y = y.mul_(2.0).sub_(1.0)
    elif low != 0.0:
        y = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, low))
    return like(y, x), mask_out(inside, x)


binary_act_op = masked_op("fewbits::binary_act", _binary_act, scale="grad_scale")


# --------------------------------------------------------------------------- functions


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
    return call_identity(binary_connect_op, w, float(quantize_zero_to), bool(stochastic),
                         check_mode(w), fn)


def _binary_act_fn(x: Tensor, low: float, grad_scale: float, fn: str) -> Tensor:
    check_float_tensor(x, fn, "x")
    graph_guard(fn, "binary_act")
    want = grad_wanted(x)
    return call_masked(binary_act_op, x, (low, grad_scale, want, check_mode(x), fn), grad_scale,
                       want)


def binary_tanh(x: Tensor) -> Tensor:
    """BinaryNet activation: ``+1 if x > 0 else -1``; backward ``dy * [|x| < 1]``.

    >>> binary_tanh(torch.tensor([-2.0, 0.0, 0.5]))
    tensor([-1., -1.,  1.])
    """
    return _binary_act_fn(x, -1.0, 1.0, "binary_tanh")


def binary_sigmoid(x: Tensor) -> Tensor:
    """Binary sigmoid: ``1 if x > 0 else 0``; backward ``0.5 * dy * [|x| < 1]``.

    >>> binary_sigmoid(torch.tensor([-2.0, 0.0, 0.5]))
    tensor([0., 0., 1.])
    """
    return _binary_act_fn(x, 0.0, 0.5, "binary_sigmoid")


def binary_weight_scale(w: Tensor) -> Tensor:
    """Per-output-channel ``alpha[o] = mean |w[o, ...]|`` (float64 accumulation, then ``w.dtype``).

    Accumulating in float64 makes the float32 result independent of the summation order.
    """
    _channel_axis(w)
    return channel_weight_scale(w)


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
    return call_identity(binary_weight_op, w, check_mode(w), fn)
