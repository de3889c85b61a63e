"""The min-max family's operators and straight-through function (docs/QUANTIZERS.md,
``min_max``; Jacob et al., CVPR 2018): ``torch.ops.fewbits.min_max(x, qr_min, qr_max, ...)``
returns ``(y, code)``, ``code`` 0 inside the grid, 1 below, 2 above; its one backward formula
is the operator ``min_max_grad(dy, code, ...) -> (dx, d qr_min, d qr_max)``.

Backends: the fused C kernels of :mod:`fewbits._kernels` (float32, dense CPU, scalar ranges)
where they can, else the PyTorch formulas of :mod:`fewbits._math` (any device, per-channel
ranges); float16 and bfloat16 are decided in float32 and rounded back once. The module is
``min_max_op`` because ``fewbits.ops.min_max`` names the operator.

    >>> import torch
    >>> min_max_quantize(torch.tensor([-1.0, 0.3, 9.0]), torch.tensor(-1.0), torch.tensor(1.0),
    ...                  ql_max=3)
    tensor([-0.6667,  0.0000,  0.6667])
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _kernels, _math
from .._checks import (
    CHECK_ASYNC,
    CHECK_OFF,
    CHECK_RAISE,
    capturing,
    check_finite,
    check_float_tensor,
    check_mode,
    check_positive,
    graph_guard,
)
from ._core import (
    U8,
    arg_index,
    check_values,
    define_op,
    fake_y_mask,
    grad_wanted,
    keep_where,
    like,
    mask_out,
    transforming,
    vmap_loop,
    widen,
    wrapped,
)

__all__ = [
    "call_min_max",
    "check_grid",
    "checked_range_view",
    "min_max_grad_op",
    "min_max_grid",
    "min_max_op",
    "min_max_quantize",
    "range_view",
]

#: float32's largest finite value: a min-max grid wider than this has an inf scale.
_F32_MAX = float(torch.finfo(torch.float32).max)


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


def checked_range_view(r: Tensor | float, x: Tensor, fn: str, arg: str) -> Tensor:
    """:func:`range_view` of ``r`` (a tensor or a number, made a tensor of ``x``'s dtype and
    device) after the eager NaN/inf check (:func:`fewbits._checks.check_finite`): for the
    quantizer's state outside the operator."""
    if not isinstance(r, Tensor):
        r = torch.tensor(float(r), dtype=x.dtype, device=x.device)
    check_finite(r, fn, arg)
    return range_view(r, x, fn, arg)


def check_grid(rmin: Tensor, rmax: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, ql_min: int,
               ql_max: int, eps: float, fn: str, check: int = CHECK_RAISE) -> None:
    """Refuse a min-max grid the dtype cannot hold: finite ranges whose width overflows
    (``qr_max - qr_min`` beyond float32's 3.4e38 makes the scale inf, every output NaN) or whose
    ``eps`` nudge is absorbed (``qr_min + eps == qr_min``, scale 0). With ``hi - lo`` finite and
    the scale > 0 every output ``r * scale + lo`` lies in ``[lo, hi]``: finite. NaN/inf ranges
    are left to the finite check, which names the argument. Inside captured graphs: a
    device-side assertion (``check == CHECK_ASYNC``), no host sync."""
    ok = (scale > 0) & torch.isfinite(hi - lo) | ~(torch.isfinite(rmin) & torch.isfinite(rmax))
    if check == CHECK_ASYNC:
        torch._assert_async(ok.all(), f"{fn}: a min-max range has no grid in its dtype")
        return
    if bool(ok.all()):
        return
    r0, r1, ok = torch.broadcast_tensors(rmin, rmax, ok)
    i = int((~ok).reshape(-1).nonzero()[0, 0])
    lo_v, hi_v = float(r0.reshape(-1)[i]), float(r1.reshape(-1)[i])
    raise ValueError(
        f"{fn}: the range [qr_min, qr_max] = [{lo_v:.6g}, {hi_v:.6g}] has no {scale.dtype} "
        f"grid of {ql_max - ql_min} steps (its width overflows, or eps={eps} vanishes "
        "next to it): values this large usually mean a diverged run; otherwise scale the "
        "data down or quantize in float64")


# --------------------------------------------------------------------------- forward


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


min_max_op = define_op("fewbits::min_max", _min_max)


@min_max_op.register_fake
def _(x, qr_min, qr_max, ql_min, ql_max, eps, fine, want_code, check, fn):
    return fake_y_mask(x, want_code)


# --------------------------------------------------------------------------- backward


def _reduce_to(g: Tensor, shape: Sequence[int]) -> Tensor:
    if len(shape) == 0 or math.prod(shape) == 1:
        return g.sum().reshape(shape)
    return (g.flatten(1).sum(1) if g.dim() > 1 else g).reshape(shape)


def _min_max_grad(dy: Tensor, code: Tensor, want_dx: bool, want_min: bool, want_max: bool,
                  min_shape: list[int], max_shape: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Min-max backward from the forward's code: ``dx = dy`` where code is 0 (else +0.0),
    ``d qr_min = sum(dy where code == 1)``, ``d qr_max = sum(dy where code == 2)``, per channel
    for ``(C,)`` ranges. Outputs not wanted are empty. The one formula of every path (the
    fused kernel where it can read the tensors, PyTorch operators else: torch.func's
    wrapped tensors too)."""
    def empty() -> Tensor:  # a fresh one per output: outputs must not alias each other
        return dy.new_empty(0)

    fused = None
    if math.prod(min_shape) == 1 and math.prod(max_shape) == 1 and not (
            wrapped(dy) or wrapped(code)):
        fused = _kernels.min_max_grad(dy, code, want_dx, want_min or want_max)
    if fused is not None:  # float64 sums in one pass (last bit may differ from Tensor.sum)
        dx, s_below, s_above = fused
        d_min = torch.tensor(s_below, dtype=dy.dtype).reshape(min_shape) if want_min else empty()
        d_max = torch.tensor(s_above, dtype=dy.dtype).reshape(max_shape) if want_max else empty()
        return (like(dx, code, dy.dtype) if want_dx else empty()), d_min, d_max
    dx = like(keep_where(dy, code == 0), code, dy.dtype) if want_dx else empty()
    d_min = _reduce_to(keep_where(dy, code == 1), min_shape) if want_min else empty()
    d_max = _reduce_to(keep_where(dy, code == 2), max_shape) if want_max else empty()
    return dx, d_min, d_max


min_max_grad_op = define_op("fewbits::min_max_grad", _min_max_grad)


@min_max_grad_op.register_fake
def _(dy, code, want_dx, want_min, want_max, min_shape, max_shape):
    return (torch.empty_like(code, dtype=dy.dtype) if want_dx else dy.new_empty(0),
            dy.new_empty(min_shape) if want_min else dy.new_empty(0),
            dy.new_empty(max_shape) if want_max else dy.new_empty(0))


class _Saved:
    """What the backward needs of a forward (one record for the three autograd paths)."""

    @staticmethod
    def save(ctx, qr_min: Tensor, qr_max: Tensor, fine: bool, code: Tensor) -> None:
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the code output
        ctx.fine = bool(fine)
        ctx.min_shape, ctx.max_shape = list(qr_min.shape), list(qr_max.shape)
        ctx.save_for_backward(code)

    @staticmethod
    def grads(ctx, dy: Tensor, grad_fn) -> tuple:
        """``(dx, d qr_min, d qr_max)`` by ``grad_fn`` (the operator in captured graphs, its
        implementation in eager mode): the straight-through ``dy`` when ``fine`` is off."""
        code = ctx.saved_tensors[0]
        need_x, need_min, need_max = ctx.needs_input_grad[:3]
        want_dx = ctx.fine and need_x
        dx, d_min, d_max = grad_fn(dy, code, want_dx, need_min, need_max, ctx.min_shape,
                                   ctx.max_shape)
        if not want_dx:
            dx = dy if need_x else None
        return dx, d_min if need_min else None, d_max if need_max else None


#: Where the operator's inputs the backward reads are (by name, from ``_min_max``).
_AT = {name: arg_index(_min_max, name) for name in ("qr_min", "qr_max", "fine")}
_N_INPUTS = len(inspect.signature(_min_max).parameters)


def _setup(ctx, inputs, output):
    _Saved.save(ctx, inputs[_AT["qr_min"]], inputs[_AT["qr_max"]], inputs[_AT["fine"]],
                output[1])


def _backward(ctx, dy, _dcode):
    if dy is None:
        return (None,) * _N_INPUTS
    return (*_Saved.grads(ctx, dy, torch.ops.fewbits.min_max_grad), *(None,) * (_N_INPUTS - 3))


torch.library.register_autograd(min_max_op, _backward, setup_context=_setup)


class _FuncMinMax(torch.autograd.Function):
    # torch.func's form (forward without ctx, setup_context, vmap), used only under torch.func
    # transforms: apply() binds arguments with inspect.signature for it (~0.3 ms a call)
    @staticmethod
    def forward(x: Tensor, qr_min: Tensor, qr_max: Tensor, args: tuple):
        return _min_max(x, qr_min, qr_max, *args)  # (y, code)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, qr_min, qr_max, args = inputs
        ctx.mark_non_differentiable(output[1])
        _Saved.save(ctx, qr_min, qr_max, args[3], output[1])

    @staticmethod
    def backward(ctx, dy: Tensor, _dcode: Tensor):
        if dy is None:
            return None, None, None, None
        return (*_Saved.grads(ctx, dy, _min_max_grad), None)

    @staticmethod
    def vmap(info, in_dims, x, qr_min, qr_max, args):
        return vmap_loop(info, in_dims[:3], lambda *t: _min_max(*t, *args), x, qr_min, qr_max)


class _EagerMinMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, qr_min: Tensor, qr_max: Tensor, args: tuple) -> Tensor:
        y, code = _min_max(x, qr_min, qr_max, *args)
        _Saved.save(ctx, qr_min, qr_max, args[3], code)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        return (*_Saved.grads(ctx, dy, _min_max_grad), None)


def call_min_max(x: Tensor, qr_min: Tensor, qr_max: Tensor, ql_min: int, ql_max: int,
                 eps: float, fine: bool, want_code: bool, check: int, fn: str) -> Tensor:
    """``min_max(...)[0]`` with its straight-through gradients (see
    :func:`fewbits.ops.call_identity`)."""
    args = (ql_min, ql_max, eps, fine, want_code, check, fn)
    if capturing():
        return min_max_op(x, qr_min, qr_max, *args)[0]
    if transforming():
        return _FuncMinMax.apply(x, qr_min, qr_max, args)[0]
    return _EagerMinMax.apply(x, qr_min, qr_max, args)


# --------------------------------------------------------------------------- functions


def min_max_grid(rmin: Tensor, rmax: Tensor, ql_min: int, ql_max: int, eps: float,
                 fn: str = "min_max_quantize") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(scale, zero_point, lo, hi)`` of :func:`fewbits._math.min_max_range`, refusing a
    grid the dtype cannot hold: finite ranges whose width overflows (``qr_max - qr_min`` beyond
    float32's 3.4e38 makes the scale inf, every output NaN) or whose ``eps`` nudge is absorbed
    (``qr_min + eps == qr_min`` for ``|qr_min|`` above ~1e6 * eps makes the scale 0). With
    ``hi - lo`` finite and the scale > 0, every output ``r * scale + lo`` lies in
    ``[lo, hi]``: finite (:func:`check_grid`, which the operator also runs)."""
    scale, zp, lo, hi = _math.min_max_range(rmin, rmax, float(ql_min), float(ql_max),
                                            float(eps))
    check_grid(rmin, rmax, scale, lo, hi, ql_min, ql_max, eps, fn)
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
        range_view(r, x, fn, arg)  # shape check
        ranges.append(r)
    graph_guard(fn, "min_max")
    needs = grad_wanted(x) or ranges[0].requires_grad or ranges[1].requires_grad
    return call_min_max(x, ranges[0], ranges[1], int(ql_min), int(ql_max), float(eps),
                        bool(ste_fine_grained), needs, check_mode(x), fn)
