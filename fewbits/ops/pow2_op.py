"""The power-of-two family's operator and straight-through function (docs/QUANTIZERS.md,
``pow2``): ``torch.ops.fewbits.pow2(x, sign, with_zero, n, m, ...)`` returns ``(y, in-range
mask)``; its backward is ``keep`` (``dx = dy`` where ``2**round(log2|x|) <= 2**m``, else 0).

Backends: the fused C kernel of :mod:`fewbits._kernels` (float32, dense CPU) where it can,
else the PyTorch formula :func:`fewbits._math.pow2_mask` (any device); float16 and bfloat16
are decided in float32 (exact ``log2`` rounding) and rounded back once. The module is
``pow2_op`` because ``fewbits.ops.pow2`` names the operator.

    >>> import torch
    >>> pow2_quantize(torch.tensor([0.3, -0.8, 5.0]), n=8, m=1)
    tensor([ 0.2500, -1.0000,  2.0000])
"""

from __future__ import annotations

from torch import Tensor

from .. import _kernels, _math
from .._checks import check_float_tensor, check_mode, check_pow2_args, graph_guard
from ._core import call_masked, check_values, grad_wanted, like, mask_out, masked_op, widen

__all__ = ["pow2_op", "pow2_quantize"]


def _pow2(x: Tensor, sign: bool, with_zero: bool, n: int, m: int, want_mask: bool, check: int,
          fn: str) -> tuple[Tensor, Tensor]:
    """``(power-of-two level of x, 2**round(log2|x|) <= 2**m)`` (see :func:`_math.pow2`)."""
    xw = widen(x)
    args = _math.pow2_bit_args(sign, with_zero, n, m, xw.dtype)
    if args is not None and _kernels.usable(xw):  # one pass: y, mask, finite check
        y, mask, finite = _kernels.pow2(xw, args, sign, with_zero, want_mask)
        check_values(xw, fn, "x", check, finite)
    else:
        check_values(xw, fn, "x", check)
        y, mask = _math.pow2_mask(xw, sign, with_zero, n, m, want_mask)
    return like(y, x), mask_out(mask, x)


pow2_op = masked_op("fewbits::pow2", _pow2)


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

    >>> import torch
    >>> pow2_quantize(torch.tensor([0.3, -0.8, 5.0]), n=8, m=1)
    tensor([ 0.2500, -1.0000,  2.0000])
    """
    fn = "pow2_quantize"
    check_float_tensor(x, fn, "x")
    check_pow2_args(fn, sign, with_zero, n, m)
    graph_guard(fn, "pow2")
    want_mask = bool(ste_fine_grained) and grad_wanted(x)
    args = (bool(sign), bool(with_zero), int(n), int(m), want_mask, check_mode(x), fn)
    return call_masked(pow2_op, x, args, 1.0, want_mask)
