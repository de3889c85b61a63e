"""The machinery behind :mod:`fewbits.ops` that the families' modules share: the NaN/inf
check of an operator, half-precision widening, the masked backward operator ``keep``, and the
autograd glue (:func:`identity_op`, :func:`masked_op`, :func:`call_identity`,
:func:`call_masked`) that gives a family operator its one straight-through gradient, in eager
mode, under torch.func and inside captured graphs. No family's formula lives here."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _kernels
from .._checks import (  # the primitives the checks outside the operators share
    CHECK_ASYNC,
    CHECK_OFF,
    all_finite,
    capturing,
    nonfinite_error,
)

_HALF = (torch.float16, torch.bfloat16)

#: op -> its Python implementation, run directly in eager mode (:func:`call_identity`).
_EAGER: dict[Any, Callable[..., Any]] = {}


def define_op(name: str, impl: Callable[..., Any]) -> Any:
    """``impl`` registered as the pure PyTorch custom operator ``name``
    (``torch.library.custom_op``, no mutated arguments); :func:`call_identity`,
    :func:`call_masked` and :func:`eager_impl` find ``impl`` again from the operator."""
    op = torch.library.custom_op(name, impl, mutates_args=())
    _EAGER[op] = impl
    return op


def eager_impl(op: Any) -> Callable[..., Any]:
    """The Python implementation behind operator ``op`` (of :func:`define_op`)."""
    return _EAGER[op]


U8 = torch.uint8


def check_values(x: Tensor, fn: str, arg: str, mode: int, known_finite: bool | None = None) -> None:
    """The NaN/inf check of ``mode`` (see the module doc); ``known_finite`` is the answer of a
    fused kernel that already looked at every element."""
    if mode == CHECK_OFF:
        return
    if known_finite is None:
        if mode == CHECK_ASYNC and x.device.type != "cpu":
            torch._assert_async(torch.isfinite(x).all(),
                                f"{fn}: {arg} contains NaN or inf; quantizers need finite input")
            return
        known_finite = all_finite(x)
    if not known_finite:
        raise nonfinite_error(x, fn, arg)


def widen(x: Tensor) -> Tensor:
    """float32 copy of a half-precision tensor (exact), else ``x``."""
    return x.float() if x.dtype in _HALF else x


def like(t: Tensor, ref: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` in ``dtype`` (default ``ref.dtype``) with the strides ``empty_like(ref)`` has, which
    is what the fake kernels promise the graph compilers (a copy only where they differ)."""
    dtype = ref.dtype if dtype is None else dtype
    if t.dtype == dtype and t.stride() == ref.stride():
        return t
    out = torch.empty_like(ref, dtype=dtype)
    return out.copy_(t)


def mask_out(mask: Tensor | None, x: Tensor) -> Tensor:
    if mask is None:
        return x.new_empty(0, dtype=U8)
    return like(mask.view(U8) if mask.dtype == torch.bool else mask, x, U8)


def fake_y_mask(x: Tensor, want_mask: bool) -> tuple[Tensor, Tensor]:
    m = torch.empty_like(x, dtype=U8) if want_mask else x.new_empty(0, dtype=U8)
    return torch.empty_like(x), m


# --------------------------------------------------------------------------- backward ops

# Integer dtype of the same width, to zero gradient elements with an integer multiply.
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64,
                   torch.float16: torch.int16, torch.bfloat16: torch.int16}


def keep_where(g: Tensor, mask: Tensor, scale: float = 1.0) -> Tensor:
    """``torch.where(mask, g * scale, 0.0)`` bit for bit (kept ``-0.0``/NaN stay, dropped ones
    become ``+0.0``; ``scale`` 1 leaves ``g`` as it is), as the bits of ``g`` times the 0/1 mask:
    one vectorised pass, where ``where`` with a bool condition is a scalar loop on CPU (~8x
    slower on a 64x64x32x32 gradient). A uint8 mask takes the fused kernel when it can (one
    pass for the scale and the mask, no conversion)."""
    if wrapped(g) or wrapped(mask):  # torch.func: plain ops (no kernel, no dtype view)
        kept = mask if mask.dtype == torch.bool else mask != 0
        return torch.where(kept, g * scale, torch.zeros_like(g))
    if mask.dtype == U8:
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


def _keep_op(dy: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Straight-through backward: ``where(mask != 0, dy * scale, +0.0)`` (uint8 ``mask``)."""
    return like(keep_where(dy, mask, scale), mask, dy.dtype)


keep = define_op("fewbits::keep", _keep_op)


@keep.register_fake
def _(dy: Tensor, mask: Tensor, scale: float) -> Tensor:
    return torch.empty_like(mask, dtype=dy.dtype)


# --------------------------------------------------------------------------- autograd glue


def masked_grad(dy: Tensor, mask: Tensor | None, scale: float, keep_fn=None) -> Tensor:
    """The one straight-through gradient of a ``(y, mask)`` operator: ``where(mask, dy * scale,
    +0.0)`` when the mask was made (fine-grained STE), else ``dy * scale``. ``keep_fn``: the
    ``keep`` operator inside captured graphs; eager mode runs its implementation directly
    (plain PyTorch operators on torch.func's wrapped tensors, see :func:`keep_where`)."""
    if mask is None:
        return dy if scale == 1.0 else dy * scale
    return (keep_fn or _keep_op)(dy, mask, scale)


def arg_index(impl: Callable[..., Any], name: str) -> int:
    """The position of ``impl``'s parameter ``name`` (``ValueError`` naming the known ones)."""
    names = list(inspect.signature(impl).parameters)
    if name not in names:
        raise ValueError(f"{impl.__name__} has no argument {name!r}; it has {', '.join(names)}")
    return names.index(name)


def identity_op(name: str, impl: Callable[..., Tensor]) -> Any:
    """``impl(x, *args) -> y`` as the operator ``name`` with a fake kernel (``empty_like(x)``)
    and the identity straight-through gradient ``dx = dy`` (call it with
    :func:`call_identity`)."""
    op = define_op(name, impl)
    n_args = len(inspect.signature(impl).parameters) - 1
    op.register_fake(lambda x, *args: torch.empty_like(x))

    def backward(ctx, dy):
        return (dy, *([None] * n_args))

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)
    return op


def masked_op(name: str, impl: Callable[..., tuple[Tensor, Tensor]], want: str = "want_mask",
              scale: str | None = None) -> Any:
    """``impl(x, *args) -> (y, mask)`` as the operator ``name``: a fake kernel, and the
    gradient :func:`masked_grad` with the mask when ``impl``'s argument ``want`` is true and
    the factor of its argument ``scale`` (1 without one). Call it with :func:`call_masked`."""
    op = define_op(name, impl)
    n_args = len(inspect.signature(impl).parameters) - 1
    want_at = arg_index(impl, want)
    scale_at = None if scale is None else arg_index(impl, scale)
    op.register_fake(lambda x, *args: fake_y_mask(x, args[want_at - 1]))

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the mask output
        ctx.has_mask = bool(inputs[want_at])
        ctx.scale = 1.0 if scale_at is None else float(inputs[scale_at])
        if ctx.has_mask:
            ctx.save_for_backward(output[1])

    def backward(ctx, dy, _dmask):
        if dy is None:
            return (None, *([None] * n_args))
        mask = ctx.saved_tensors[0] if ctx.has_mask else None
        return (masked_grad(dy, mask, ctx.scale, torch.ops.fewbits.keep), *([None] * n_args))

    torch.library.register_autograd(op, backward, setup_context=setup)
    return op


def recomputing() -> bool:
    """True while a forward runs inside the autograd engine's backward pass: the recomputation
    of activation checkpointing (``torch.utils.checkpoint``, reentrant or not), which runs each
    checkpointed forward a second time. Quantizer state (EMA ranges, the INQ counter) must
    not advance then: the step already counted it."""
    if torch.compiler.is_compiling():  # compiled backwards replay a graph, never Python
        return False
    return torch._C._current_graph_task_id() != -1


def grad_wanted(x: Tensor) -> bool:
    """Whether an operator must keep its gradient mask: when ``x`` requires grad, and always
    in a captured graph, which fixes the choice as a constant for every later call (a graph
    traced or exported from an inference input and then trained through took ``dx = dy``)."""
    return x.requires_grad or capturing()


def wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a torch.func (functorch) wrapper: inside ``grad`` / ``vmap`` the
    backward works on these, which the fused C kernels cannot read; plain PyTorch ops can."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def vmap_loop(info: Any, in_dims: Sequence[int | None], fn: Callable[..., Any],
              *tensors: Tensor) -> tuple[Any, Any]:
    """A ``vmap`` rule for any of the operators: ``fn`` on each sample of the batched
    ``tensors`` (those whose ``in_dims`` is not None), the results stacked on dim 0. Exact
    (each sample is quantized as on its own: per-tensor grids stay per sample)."""
    outs = []
    for i in range(info.batch_size):
        outs.append(fn(*(t if d is None else t.select(d, i)
                         for t, d in zip(tensors, in_dims, strict=True))))
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs, strict=True)), tuple(0 for _ in outs[0])
    return torch.stack(outs), 0


class _FuncIdentity(torch.autograd.Function):
    # torch.func's form (forward without ctx, setup_context, vmap): works under grad and vmap.
    # Only under torch.func transforms: apply() binds the arguments with inspect.signature
    # for this form (~0.3 ms a call), so the plain eager path keeps the classic form.
    @staticmethod
    def forward(x: Tensor, impl, args: tuple) -> Tensor:
        return impl(x, *args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, dy: Tensor):
        return dy, None, None

    @staticmethod
    def vmap(info, in_dims, x, impl, args):
        return vmap_loop(info, in_dims[:1], lambda xi: impl(xi, *args), x)


class _FuncMasked(torch.autograd.Function):
    # torch.func's form, as _FuncIdentity
    @staticmethod
    def forward(x: Tensor, impl, args: tuple, scale: float, has_mask: bool):
        return impl(x, *args)  # (y, mask)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.has_mask = inputs[3], inputs[4]
        ctx.mark_non_differentiable(output[1])
        if ctx.has_mask:
            ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, dy: Tensor, _dmask: Tensor):
        if dy is None:
            return None, None, None, None, None
        mask = ctx.saved_tensors[0] if ctx.has_mask else None
        return masked_grad(dy, mask, ctx.scale), None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, impl, args, scale, has_mask):
        return vmap_loop(info, in_dims[:1], lambda xi: impl(xi, *args), x)


class _EagerIdentity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, impl, args: tuple) -> Tensor:
        return impl(x, *args)

    @staticmethod
    def backward(ctx, dy: Tensor):
        return dy, None, None


class _EagerMasked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, impl, args: tuple, scale: float, has_mask: bool) -> Tensor:
        y, mask = impl(x, *args)
        ctx.scale, ctx.has_mask = scale, has_mask
        if has_mask:
            ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        mask = ctx.saved_tensors[0] if ctx.has_mask else None
        return masked_grad(dy, mask, ctx.scale), None, None, None, None


def transforming() -> bool:
    """True inside a torch.func transform (``grad``, ``vmap``, ``jacrev`` ...)."""
    return torch._C._are_functorch_transforms_active()


def call_identity(op, x: Tensor, *args) -> Tensor:
    """``op(x, *args)`` with the identity straight-through gradient. While a graph is being
    captured this is the registered operator; in eager mode the same implementation runs under
    an equivalent ``autograd.Function`` (the dispatcher's Python layers cost ~0.1 ms a call)."""
    if capturing():
        return op(x, *args)
    if transforming():
        return _FuncIdentity.apply(x, _EAGER[op], args)
    return _EagerIdentity.apply(x, _EAGER[op], args)


def call_masked(op, x: Tensor, args: tuple, scale: float, has_mask: bool) -> Tensor:
    """``op(x, *args)[0]`` with the gradient of :func:`masked_grad` (see
    :func:`call_identity`)."""
    if capturing():
        return op(x, *args)[0]
    if transforming():
        return _FuncMasked.apply(x, _EAGER[op], args, scale, has_mask)[0]
    return _EagerMasked.apply(x, _EAGER[op], args, scale, has_mask)
