"""The quantizers as PyTorch custom operators (``torch.ops.fewbits.*``).

Each family's forward is one operator, and each straight-through backward another, registered
with :mod:`torch.library` together with a fake (meta) kernel and one autograd formula. PyTorch's
graph tools therefore see one opaque call per quantizer, never the ctypes kernel behind it:
``torch.compile(fullgraph=True)``, ``torch.export.export`` and ``torch.jit.trace`` record the
operator and run exactly the eager computation. One operator has several backends, chosen when
it runs: the fused C kernels of :mod:`fewbits._kernels` (float32, dense CPU tensors), else the
PyTorch formulas of :mod:`fewbits._math` (any device: CPU, CUDA).

One module per family holds its operators and its straight-through functions (which
:mod:`fewbits.functional` re-exports): ``binary`` (``binary_connect``, ``binary_weight``,
``binary_act``), ``fixed_point_op``, ``pow2_op``, ``inq_op``, ``min_max_op`` (``min_max``,
``min_max_grad``; a module is ``<family>_op`` where ``<family>`` names its operator here), and
beyond the seed ``ternary``, ``lsq``, ``stochastic``. ``_core`` is the shared machinery
(NaN/inf checks, half-precision widening, ``keep``, the autograd glue). This package
re-exports the operators:

=====================================  ========================================  ==============
operator                               returns                                   backward
=====================================  ========================================  ==============
``binary_connect(w, zero_to, stoch)``  ``sign(w)`` (+-1)                         identity
``binary_weight(w)``                   ``mean|w[o]| * sign(w[o])``               identity
``binary_act(x, low, grad_scale)``     ``(1 if x > 0 else low, |x| < 1 mask)``   ``keep``
``fixed_point(x, sign, n, delta)``     ``(y, in-range mask)``                    ``keep``
``pow2(x, sign, with_zero, n, m)``     ``(y, in-range mask)``                    ``keep``
``inq(w, num_bits)``                   INQ levels of ``w``                       identity
``min_max(x, qr_min, qr_max, ...)``    ``(y, code 0 inside / 1 below / 2 above)`` ``min_max_grad``
``keep(dy, mask, scale)``              ``where(mask, dy * scale, +0.0)``
``min_max_grad(dy, code, ...)``        ``(dx, d qr_min, d qr_max)``
=====================================  ========================================  ==============

Masks are uint8 tensors of the input's shape (empty when the gradient does not need them).

Half precision: float16 and bfloat16 inputs are quantized exactly: every decision (rounding,
thresholds, STE masks) is taken on the float32 value (the widening is exact) and the result is
rounded back to the input's dtype once. The binary families compare with 0 and 1, which is exact
in any dtype, and keep the input's dtype throughout.

Non-finite input (``check``): ``0`` no check; ``1`` raise ``ValueError`` naming the function and
argument (on CPU the fused kernels count NaN/inf in the same pass; on CUDA this reads one flag
back, a host sync); ``2`` the same on CPU, and on CUDA a device-side assertion
(``torch._assert_async``) that fails the step asynchronously without a host sync: what
:mod:`fewbits.functional` passes inside ``torch.compile``/``torch.export`` graphs.

    >>> import torch
    >>> y, mask = torch.ops.fewbits.fixed_point(torch.tensor([0.3, 9.0]), True, 4, 0.25, True,
    ...                                         1, "example")
    >>> y, mask
    (tensor([0.2500, 1.7500]), tensor([1, 0], dtype=torch.uint8))
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .._checks import CHECK_ASYNC, CHECK_OFF, CHECK_RAISE, all_finite, capturing, nonfinite_error
from ._core import call_identity, call_masked, identity_op, keep, recomputing, widen
from .binary import binary_act_op as binary_act
from .binary import binary_connect_op as binary_connect
from .binary import binary_weight_op as binary_weight
from .binary import channel_weight_scale as binary_weight_scale
from .fixed_point_op import fixed_point_op as fixed_point
from .inq_op import inq_op as inq
from .min_max_op import call_min_max, check_grid, range_view
from .min_max_op import min_max_grad_op as min_max_grad
from .min_max_op import min_max_op as min_max
from .pow2_op import pow2_op as pow2

__all__ = [
    "CHECK_ASYNC",
    "CHECK_OFF",
    "CHECK_RAISE",
    "all_finite",
    "binary_act",
    "binary_connect",
    "binary_weight",
    "binary_weight_scale",
    "call_identity",
    "call_masked",
    "call_min_max",
    "capturing",
    "check_grid",
    "fixed_point",
    "inq",
    "keep",
    "min_max",
    "min_max_grad",
    "nonfinite_error",
    "pow2",
    "range_view",
    "recomputing",
    "straight_through_op",
    "widen",
]


def straight_through_op(name: str, impl: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Define a family's forward as the custom operator ``name`` (``"namespace::op"``) and
    return its straight-through function ``f(x, *args)``.

    ``impl(x, *args) -> Tensor`` (type-annotated, as :func:`torch.library.custom_op` needs;
    ``args`` ints, floats, bools, strings) computes the quantized value, of ``x``'s shape and
    dtype, with any backends it chooses (a fused kernel where it can, PyTorch operators else).
    The operator gets a fake kernel (``empty_like(x)``) and one autograd formula, the identity
    (``dx = dy``); ``f`` runs it in eager mode, under ``torch.func`` and in captured graphs as
    the seed families' operators run (:func:`call_identity`; ``binary_connect``, ``inq``).
    Give the operator an ONNX translation through the family's
    :meth:`~fewbits.quantizers.Quantizer.onnx_translations`
    (``torch.ops.<namespace>.<op>.default``). A masked gradient is
    ``fewbits.ops._core.masked_op`` (``fixed_point``, ``pow2``); one for a learned parameter
    the family's own ``torch.library.register_autograd`` (``min_max_op``).

        >>> f = straight_through_op("fewbits_doc::halves",
        ...                         lambda x, s: torch.round(x / s) * s)  # doctest: +SKIP
    """
    op = identity_op(name, impl)

    def apply(x: Tensor, *args: object) -> Tensor:
        return call_identity(op, x, *args)

    apply.__name__ = apply.__qualname__ = name.split("::")[-1]
    apply.__doc__ = impl.__doc__
    return apply
