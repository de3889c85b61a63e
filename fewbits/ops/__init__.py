"""The quantizers as PyTorch custom operators (``torch.ops.fewbits.*``).

Each family's forward is one operator, and each straight-through backward another, registered
with :mod:`torch.library` together with a fake (meta) kernel and an autograd formula. PyTorch's
graph tools therefore see one opaque call per quantizer, never the ctypes kernel behind it:
``torch.compile(fullgraph=True)``, ``torch.export.export`` and ``torch.jit.trace`` record the
operator and run exactly the eager computation. One operator has several backends, chosen when
it runs: the fused C kernels of :mod:`fewbits._kernels` (float32, dense CPU tensors), else the
PyTorch formulas of :mod:`fewbits._math` (any device: CPU, CUDA).

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

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _kernels, _math
from ._core import (  # the machinery (checks, widening, autograd glue)
    CHECK_ASYNC,
    CHECK_OFF,
    CHECK_RAISE,
    U8,
    all_finite,
    call_identity,
    call_masked,
    capturing,
    check_grid,
    check_values,
    define_op,
    eager_impl,
    fake_y_mask,
    keep,
    like,
    mask_out,
    min_max_grad,
    nonfinite_error,
    recomputing,
    register_identity,
    register_masked,
    transforming,
    vmap_loop,
    widen,
    wrapped,
)

#: float32's largest finite value: a min-max grid wider than this has an inf scale.
_F32_MAX = float(torch.finfo(torch.float32).max)

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

# --------------------------------------------------------------------------- a new family's


def straight_through_op(name: str, impl: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Define a family's forward as the custom operator ``name`` (``"namespace::op"``) and
    return its straight-through function ``f(x, *args)``.

    ``impl(x, *args) -> Tensor`` (type-annotated, as :func:`torch.library.custom_op` needs;
    ``args`` ints, floats, bools, strings) computes the quantized value, of ``x``'s shape and
    dtype, with any backends it chooses (a fused kernel where it can, PyTorch operators else).
    The operator gets a fake kernel (``empty_like(x)``) and one autograd formula, the identity
    (``dx = dy``); ``f`` runs it in eager mode, under ``torch.func`` and in captured graphs as
    the nine families' operators run (:func:`call_identity`). Give the operator an ONNX
    translation through the family's :meth:`~fewbits.quantizers.Quantizer.onnx_translations`
    (``torch.ops.<namespace>.<op>.default``). A masked gradient or one for a learned parameter
    is the family's own ``torch.library.register_autograd`` (see ``fixed_point`` and
    ``min_max`` here).

        >>> f = straight_through_op("fewbits_doc::halves",
        ...                         lambda x, s: torch.round(x / s) * s)  # doctest: +SKIP
    """
    n_args = len(inspect.signature(impl).parameters) - 1
    op = define_op(name, impl)
    op.register_fake(lambda x, *args: torch.empty_like(x))
    register_identity(op, n_args)

    def apply(x: Tensor, *args: object) -> Tensor:
        return call_identity(op, x, *args)

    apply.__name__ = apply.__qualname__ = name.split("::")[-1]
    apply.__doc__ = impl.__doc__
    return apply


# --------------------------------------------------------------------------- binary


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


binary_connect = define_op("fewbits::binary_connect", _binary_connect)


@binary_connect.register_fake
def _(w, zero_to, stochastic, check, fn):
    return torch.empty_like(w)


register_identity(binary_connect, 4)


def binary_weight_scale(w: Tensor) -> Tensor:
    """Per-output-channel ``alpha[o] = mean |w[o, ...]|`` (float64 accumulation, then
    ``w.dtype``): independent of the summation order."""
    return w.detach().abs().double().flatten(1).mean(1).to(w.dtype)


def _binary_weight(w: Tensor, check: int, fn: str) -> Tensor:
    """``alpha[o] * sign(w[o, ...])``, ``sign(0) = +1``, ``alpha`` per output channel."""
    check_values(w, fn, "w", check)
    a = binary_weight_scale(w).reshape((-1,) + (1,) * (w.dim() - 1))
    return like(torch.where(w >= 0, a, -a), w)


binary_weight = define_op("fewbits::binary_weight", _binary_weight)


@binary_weight.register_fake
def _(w, check, fn):
    return torch.empty_like(w)


register_identity(binary_weight, 2)


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


binary_act = define_op("fewbits::binary_act", _binary_act)


@binary_act.register_fake
def _(x, low, grad_scale, want_mask, check, fn):
    return fake_y_mask(x, want_mask)


register_masked(binary_act, 2, 3, 5)


# --------------------------------------------------------------------------- fixed point


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


fixed_point = define_op("fewbits::fixed_point", _fixed_point)


@fixed_point.register_fake
def _(x, sign, n, delta, want_mask, check, fn):
    return fake_y_mask(x, want_mask)


register_masked(fixed_point, None, 4, 6)


# --------------------------------------------------------------------------- power of two


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


pow2 = define_op("fewbits::pow2", _pow2)


@pow2.register_fake
def _(x, sign, with_zero, n, m, want_mask, check, fn):
    return fake_y_mask(x, want_mask)


register_masked(pow2, None, 5, 7)


# --------------------------------------------------------------------------- INQ


def _inq(w: Tensor, num_bits: int, check: int, fn: str) -> Tensor:
    """INQ power-of-two levels of the whole tensor (see :func:`_math.inq_levels`)."""
    check_values(w, fn, "w", check)
    return like(_math.inq_levels(widen(w), num_bits), w)


inq = define_op("fewbits::inq", _inq)


@inq.register_fake
def _(w, num_bits, check, fn):
    return torch.empty_like(w)


register_identity(inq, 3)


# --------------------------------------------------------------------------- min-max


def range_view(r: Tensor, x: Tensor, fn: str, arg: str) -> Tensor:
    """A range as a 0-d tensor, or ``(C,)`` viewed to broadcast over ``x``'s channel axis 0."""
    if r.numel() == 1:
        return r.reshape(())
    if r.dim() != 1 or x.dim() < 1 or r.shape[0] != x.shape[0]:
        raise ValueError(
            f"{fn}: {arg} must be a scalar or have shape (C,) = (x.shape[0],) for per-channel "
            f"ranges; got {tuple(r.shape)} for x of shape {tuple(x.shape)}"
        )
    return r.reshape((-1,) + (1,) * (x.dim() - 1))


def _scalar_grid(xw: Tensor, qr_min: Tensor, qr_max: Tensor, ql_min: int, ql_max: int,
                 eps: float) -> tuple[float, float, float] | None:
    """``(lo, hi, scale)`` for the fused kernel when it can take ``xw`` and the ranges are two
    finite CPU values with a grid that needs no error (scale > 0, ``hi - lo`` finite): the
    common case, computed by :func:`_kernels.min_max_grid` without tensor operations. Else None:
    the general path computes (and checks) the grid with tensors, as it always did."""
    if not (qr_min.numel() == 1 and qr_max.numel() == 1 and qr_min.device.type == "cpu"
            and qr_max.device.type == "cpu" and _kernels.usable(xw)):
        return None
    rmin, rmax = float(qr_min), float(qr_max)
    if not (math.isfinite(rmin) and math.isfinite(rmax)):
        return None
    scale, lo, hi = _kernels.min_max_grid(rmin, rmax, ql_min, ql_max, eps)
    if not (scale > 0 and math.isfinite(hi - lo) and abs(hi - lo) <= _F32_MAX):
        return None
    return lo, hi, scale


def _min_max(x: Tensor, qr_min: Tensor, qr_max: Tensor, ql_min: int, ql_max: int, eps: float,
            fine: bool, want_code: bool, check: int, fn: str) -> tuple[Tensor, Tensor]:
    """``(y, code)`` of the min-max quantizer (see :func:`_math.min_max_range`); ``code`` is 1
    where ``x < lo``, 2 where ``x > hi``, else 0 (``fine`` is for the backward)."""
    xw = widen(x)
    grid = _scalar_grid(xw, qr_min, qr_max, ql_min, ql_max, eps)
    if grid is not None:  # one pass: y, code, finite check
        y, code, finite = _kernels.min_max(xw, *grid, want_code)
        check_values(xw, fn, "x", check, finite)
        return like(y, x), mask_out(code, x)
    check_values(qr_min, fn, "qr_min", check)
    check_values(qr_max, fn, "qr_max", check)
    rmin, rmax = range_view(qr_min, xw, fn, "qr_min"), range_view(qr_max, xw, fn, "qr_max")
    rmin, rmax = rmin.to(xw.dtype), rmax.to(xw.dtype)
    scale, _zp, lo, hi = _math.min_max_range(rmin, rmax, float(ql_min), float(ql_max), float(eps))
    if scale.numel() == 1 and _kernels.usable(xw):  # one pass: y, code, finite check
        lo_f, hi_f, scale_f = float(lo), float(hi), float(scale)
        if check != CHECK_OFF and not (scale_f > 0 and math.isfinite(hi_f - lo_f)
                                       and abs(hi_f - lo_f) <= _F32_MAX):
            check_grid(rmin, rmax, scale, lo, hi, ql_min, ql_max, eps, fn)  # raises, naming it
        y, code, finite = _kernels.min_max(xw, lo_f, hi_f, scale_f, want_code)
        check_values(xw, fn, "x", check, finite)
    else:
        if check != CHECK_OFF:
            check_grid(rmin, rmax, scale, lo, hi, ql_min, ql_max, eps, fn, check)
        check_values(xw, fn, "x", check)
        y = _math.min_max(xw, scale, lo, hi)
        code = None
        if want_code:
            code = (xw < lo).view(U8) | (xw > hi).view(U8).mul_(2)
    return like(y, x), mask_out(code, x)


min_max = define_op("fewbits::min_max", _min_max)


@min_max.register_fake
def _(x, qr_min, qr_max, ql_min, ql_max, eps, fine, want_code, check, fn):
    return fake_y_mask(x, want_code)


def _min_max_setup(ctx, inputs, output):
    qr_min, qr_max, fine = inputs[1], inputs[2], inputs[6]
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the code output
    ctx.fine = bool(fine)
    ctx.min_shape, ctx.max_shape = list(qr_min.shape), list(qr_max.shape)
    ctx.save_for_backward(output[1])


def _min_max_grads(ctx, dy: Tensor, code: Tensor, grad_fn) -> tuple:
    need_x, need_min, need_max = ctx.needs_input_grad[:3]
    want_dx = ctx.fine and need_x
    dx, d_min, d_max = grad_fn(dy, code, want_dx, need_min, need_max, ctx.min_shape,
                               ctx.max_shape)
    if not want_dx:
        dx = dy if need_x else None
    return dx, d_min if need_min else None, d_max if need_max else None


def _min_max_backward(ctx, dy, _dcode):
    if dy is None:
        return (None,) * 10
    grads = _min_max_grads(ctx, dy, ctx.saved_tensors[0], torch.ops.fewbits.min_max_grad)
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd(min_max, _min_max_backward, setup_context=_min_max_setup)


class _FuncMinMax(torch.autograd.Function):
    # torch.func's form (forward without ctx, setup_context, vmap), used only under torch.func
    # transforms: apply() binds arguments with inspect.signature for it (~0.3 ms a call)
    @staticmethod
    def forward(x: Tensor, qr_min: Tensor, qr_max: Tensor, args: tuple):
        return _min_max(x, qr_min, qr_max, *args)  # (y, code)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, qr_min, qr_max, args = inputs
        ctx.set_materialize_grads(False)
        ctx.fine = bool(args[3])
        ctx.min_shape, ctx.max_shape = list(qr_min.shape), list(qr_max.shape)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, dy: Tensor, _dcode: Tensor):
        if dy is None:
            return None, None, None, None
        code = ctx.saved_tensors[0]
        grad_fn = _plain_min_max_grad if wrapped(dy) or wrapped(code) else \
            eager_impl(min_max_grad)
        return (*_min_max_grads(ctx, dy, code, grad_fn), None)

    @staticmethod
    def vmap(info, in_dims, x, qr_min, qr_max, args):
        return vmap_loop(info, in_dims[:3], lambda *t: _min_max(*t, *args), x, qr_min, qr_max)


class _EagerMinMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, qr_min: Tensor, qr_max: Tensor, args: tuple) -> Tensor:
        y, code = _min_max(x, qr_min, qr_max, *args)
        ctx.fine = bool(args[3])
        ctx.min_shape, ctx.max_shape = list(qr_min.shape), list(qr_max.shape)
        ctx.save_for_backward(code)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        return (*_min_max_grads(ctx, dy, ctx.saved_tensors[0], eager_impl(min_max_grad)), None)


def _plain_min_max_grad(dy: Tensor, code: Tensor, want_dx: bool, want_min: bool,
                        want_max: bool, min_shape: list[int], max_shape: list[int]) -> tuple:
    """:func:`min_max_grad` in plain PyTorch ops, for the wrapped tensors of torch.func."""
    zero = torch.zeros_like(dy)

    def part(c: int, shape: list[int]) -> Tensor:
        g = torch.where(code == c, dy, zero)
        if len(shape) == 0 or math.prod(shape) == 1:
            return g.sum().reshape(shape)
        return g.flatten(1).sum(1).reshape(shape)

    return (torch.where(code == 0, dy, zero) if want_dx else None,
            part(1, min_shape) if want_min else None, part(2, max_shape) if want_max else None)


def call_min_max(x: Tensor, qr_min: Tensor, qr_max: Tensor, ql_min: int, ql_max: int,
                 eps: float, fine: bool, want_code: bool, check: int, fn: str) -> Tensor:
    """``min_max(...)[0]`` with its straight-through gradients (see :func:`call_identity`)."""
    args = (ql_min, ql_max, eps, fine, want_code, check, fn)
    if capturing():
        return min_max(x, qr_min, qr_max, *args)[0]
    if transforming():
        return _FuncMinMax.apply(x, qr_min, qr_max, args)[0]
    return _EagerMinMax.apply(x, qr_min, qr_max, args)
