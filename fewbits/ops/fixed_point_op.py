"""The fixed-point family's operator and straight-through function (docs/QUANTIZERS.md,
``fixed_point``): ``torch.ops.fewbits.fixed_point(x, sign, n, delta, ...)`` returns ``(y,
in-range mask)``; its backward is ``keep`` (``dx = dy`` inside ``[xmin, xmax]``, else 0).

Backends: the fused C kernel of :mod:`fewbits._kernels` (float32, dense CPU) where it can,
else the PyTorch formula :func:`fewbits._math.fixed_point_mask` (any device); float16 and
bfloat16 are decided in float32 and rounded back once. The module is ``fixed_point_op``
because ``fewbits.ops.fixed_point`` names the operator.

    >>> import torch
    >>> fixed_point_quantize(torch.tensor([0.125, -0.375, 9.0]), n=4, delta=0.25)
    tensor([ 0.2500, -0.5000,  1.7500])
"""

from __future__ import annotations

from torch import Tensor

from .. import _kernels, _math
from .._checks import check_bits, check_float_tensor, check_mode, check_positive, graph_guard
from ._core import call_masked, check_values, grad_wanted, like, mask_out, masked_op, widen

__all__ = ["fixed_point_op", "fixed_point_quantize"]


def _fixed_point(x: Tensor, sign: bool, n: int, delta: float, want_mask: bool, check: int,
                 fn: str) -> tuple[Tensor, Tensor]:
    """``(round_half_away(clamp(x, xmin, xmax) / delta) * delta, xmin <= x <= xmax)``."""
    xw = widen(x)
    bounds = _math.fixed_point_bounds(sign, n, delta, xw.dtype)
    if bounds is not None and _kernels.usable(xw):  # one pass: y, mask, finite check
        y, mask, finite = _kernels.fixed_point(xw, *bounds, want_mask)
        check_values(xw, fn, "x", check, finite)
    else:
        check_values(xw, fn, "x", check)
        y, mask = _math.fixed_point_mask(xw, sign, n, delta, want_mask)
    return like(y, x), mask_out(mask, x)


fixed_point_op = masked_op("fewbits::fixed_point", _fixed_point)


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

    >>> import torch
    >>> fixed_point_quantize(torch.tensor([0.09375, 100.0]), n=8, delta=2**-4)
    tensor([0.1250, 7.9375])
    """
    fn = "fixed_point_quantize"
    check_float_tensor(x, fn, "x")
    check_bits(fn, "n", n, low=2 if sign else 1)
    check_positive(fn, "delta", delta)
    graph_guard(fn, "fixed_point")
    want_mask = bool(ste_fine_grained) and grad_wanted(x)
    args = (bool(sign), int(n), float(delta), want_mask, check_mode(x), fn)
    return call_masked(fixed_point_op, x, args, 1.0, want_mask)
