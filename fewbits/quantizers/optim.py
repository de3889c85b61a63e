"""What every PyTorch optimizer does for fewbits without being asked: two global optimizer step
hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``..._post_hook``),
installed once when :mod:`fewbits.quantizers` is imported.

- After every ``optimizer.step()``: each learned min-max range the optimizer holds is projected
  onto a valid range (:meth:`fewbits.quantizers.MinMax.after_optimizer_step`), so a user's own
  loop gets what the trainer's :func:`fewbits.layers.apply_weight_constraints` gives (calling
  that as well changes nothing: the projection of a valid range is the identity).
- Around every ``optimizer.step()``: the update of each parameter registered with
  :func:`scale_updates` (a quantizer's :meth:`~fewbits.quantizers.Quantizer.update_scale`, such
  as BinaryConnect's ``glorot_lr_scale``) is multiplied by its factor,
  ``p <- p_old + s * (p_new - p_old)`` (BinaryConnect's code scales Adam's update the same
  way), before the trainer's constraints (the ``[-1, 1]`` clip) apply.
- Before every ``optimizer.step()``: an optimizer that holds parameters of a model converted by
  :func:`fewbits.quantize_` but not the parameters that conversion added (learned min-max
  ranges), which would then never train, is refused with ``RuntimeError`` saying how to give
  them to it (``quantize_(model, ..., optimizer=opt)``, building the optimizer after
  ``quantize_``, or ``opt.add_param_group``). Parameters with ``requires_grad=False`` are
  left out of the check: that is how ranges are kept fixed on purpose.

- Learning-rate groups: a quantizer parameter may declare the factor its learning rate gets
  under an adaptive optimizer (:func:`register_lr_scale`; LSQ's steps and offsets: 0.01).
  :func:`param_groups` (used by ``fewbits train``) and :func:`add_to_optimizer` (used by
  ``quantize_(..., optimizer=opt)``) put such parameters in their own group with
  ``lr = lr * lr_scale`` and the factor kept as ``group["lr_scale"]`` for schedules.

What it cannot see: an optimizer that holds *none* of the model's parameters, or a step taken
by other means than ``Optimizer.step`` (a hand-written SGD update). Those loops call
:func:`fewbits.layers.apply_weight_constraints` after each update, as before.

    >>> import torch
    >>> from fewbits.quantizers import MinMax
    >>> q = MinMax(init_min=-1.0, init_max=1.0)
    >>> opt = torch.optim.SGD(q.parameters(), lr=1.0)
    >>> q.qr_min.grad = torch.tensor(-2.0)        # the step moves qr_min to 1.0 > 0
    >>> opt.step()
    >>> float(q.qr_min.detach()), float(q.qr_max.detach())   # projected: the range holds 0
    (0.0, 1.0)
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

__all__ = [
    "add_to_optimizer",
    "lr_scale",
    "param_groups",
    "register_lr_scale",
    "register_range",
    "require_companions",
    "scale_updates",
]

# id(range parameter) -> (weakref to it, weakref to the quantizer that owns it)
_RANGES: dict[int, tuple[weakref.ref, weakref.ref]] = {}
# id(parameter) -> (weakref to it, [(name, weakref) of the parameters quantize_ added with it])
_COMPANIONS: dict[int, tuple[weakref.ref, list[tuple[str, weakref.ref]]]] = {}
# id(parameter) -> (weakref to it, factor on its updates)
_SCALES: dict[int, tuple[weakref.ref, float]] = {}
# optimizer -> [(parameter, its value before the step, factor)] during a step
_BEFORE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# id(parameter) -> (weakref to it, its learning-rate factor under an adaptive optimizer)
_LR_SCALES: dict[int, tuple[weakref.ref, float]] = {}
_generation = 0  # bumped when _COMPANIONS changes: cached optimizer checks are then redone
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forget(table: dict[int, Any], key: int) -> None:
    table.pop(key, None)


def register_range(param: Tensor, owner: nn.Module) -> None:
    """Let the post-step hook project ``param`` by calling ``owner.after_optimizer_step()``
    after every optimizer step that holds it (``owner`` keeps the range valid)."""
    entry = _RANGES.get(id(param))
    if entry is not None and entry[0]() is param and entry[1]() is owner:
        return
    _RANGES[id(param)] = (weakref.ref(param), weakref.ref(owner))
    weakref.finalize(param, _forget, _RANGES, id(param))


def scale_updates(param: Tensor, factor: float) -> None:
    """Multiply every optimizer update of ``param`` by ``factor`` (finite, > 0) from now on:
    after each ``optimizer.step()`` that holds it, ``p <- p_old + factor * (p_new - p_old)``.
    ``factor == 1`` removes the scaling. Raises ``ValueError`` for another factor."""
    factor = float(factor)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"scale_updates: the factor must be finite and > 0, got {factor}")
    entry = _SCALES.get(id(param))
    fresh = entry is None or entry[0]() is not param
    if factor == 1.0:
        if not fresh:
            del _SCALES[id(param)]
        return
    if fresh:
        weakref.finalize(param, _forget, _SCALES, id(param))
    elif entry[1] == factor:
        return
    _SCALES[id(param)] = (weakref.ref(param), factor)


def register_lr_scale(param: Tensor, scale: float) -> None:
    """Declare that ``param`` trains with ``lr * scale`` under an adaptive optimizer (Adam and
    the like, which normalise each parameter's update to about ``lr`` whatever its gradient's
    scale); :func:`param_groups` and :func:`add_to_optimizer` read it."""
    scale = float(scale)
    if not 0.0 < scale < float("inf"):
        raise ValueError(f"register_lr_scale: scale must be a finite number > 0, got {scale!r}")
    _LR_SCALES[id(param)] = (weakref.ref(param), scale)
    weakref.finalize(param, _forget, _LR_SCALES, id(param))


def lr_scale(param: Tensor, adaptive: bool = True) -> float:
    """The learning-rate factor of ``param``: the registered one under an ``adaptive``
    optimizer, else 1 (plain SGD sees the quantizer's own gradient scale)."""
    entry = _LR_SCALES.get(id(param))
    if not adaptive or entry is None or entry[0]() is not param:
        return 1.0
    return entry[1]


def param_groups(params: Iterable[Tensor], lr: float, adaptive: bool = True
                 ) -> list[dict[str, Any]]:
    """``params`` as optimizer parameter groups: those with a learning-rate factor
    (:func:`register_lr_scale`) in a group of their own with ``"lr": lr * factor`` and
    ``"lr_scale": factor``; the rest in one group with the optimizer's ``lr``.

        >>> from fewbits.quantizers import LSQ
        >>> lin, q = torch.nn.Linear(4, 2), LSQ(bits=4, init_step=0.1)
        >>> groups = param_groups([*lin.parameters(), *q.parameters()], lr=1e-3)
        >>> [(len(g["params"]), g.get("lr_scale")) for g in groups]
        [(2, None), (1, 0.01)]
    """
    plain: list[Tensor] = []
    scaled: dict[float, list[Tensor]] = {}
    for p in params:
        f = lr_scale(p, adaptive)
        (plain if f == 1.0 else scaled.setdefault(f, [])).append(p)
    out: list[dict[str, Any]] = [{"params": plain}] if plain else []
    out += [{"params": ps, "lr": lr * f, "lr_scale": f} for f, ps in scaled.items()]
    return out


def require_companions(old: Iterable[Tensor], new: Iterable[tuple[str, Tensor]]) -> None:
    """Record that an optimizer holding any of ``old`` must also hold every trainable
    parameter of ``new`` (``(qualified name, parameter)``): what :func:`fewbits.quantize_`
    declares for the parameters it adds to a model."""
    global _generation
    news = [(n, weakref.ref(p)) for n, p in new]
    if not news:
        return
    for p in old:
        entry = _COMPANIONS.get(id(p))
        if entry is not None and entry[0]() is p:
            entry[1].extend(news)
        else:
            _COMPANIONS[id(p)] = (weakref.ref(p), list(news))
            weakref.finalize(p, _forget, _COMPANIONS, id(p))
    _generation += 1


def add_to_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> int:
    """Add the trainable ``params`` that ``optimizer`` does not hold yet as new parameter
    groups (the optimizer's defaults: learning rate, weight decay ...; a parameter with a
    learning-rate factor gets ``lr * factor`` unless ``optimizer`` is plain SGD, as
    :func:`param_groups`); returns how many."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    todo = [p for p in params if p.requires_grad and id(p) not in held]
    adaptive = not isinstance(optimizer, torch.optim.SGD)
    for g in param_groups(todo, float(optimizer.defaults.get("lr", 0.0)), adaptive):
        optimizer.add_param_group(g)
    return len(todo)


def _params(optimizer: torch.optim.Optimizer) -> Iterable[Tensor]:
    for g in optimizer.param_groups:
        yield from g["params"]


def _check_companions(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _COMPANIONS:
        return
    sig = (_generation, tuple(len(g["params"]) for g in optimizer.param_groups))
    if _CHECKED.get(optimizer) == sig:
        return
    held = {id(p) for p in _params(optimizer)}
    lacking: dict[int, str] = {}
    for p in _params(optimizer):
        entry = _COMPANIONS.get(id(p))
        if entry is None or entry[0]() is not p:
            continue
        for name, ref in entry[1]:
            c = ref()
            if c is not None and c.requires_grad and id(c) not in held:
                lacking[id(c)] = name
    if lacking:
        names = list(lacking.values())
        shown = ", ".join(names[:4]) + (f" ... ({len(names)} in all)" if len(names) > 4 else "")
        raise RuntimeError(
            f"{type(optimizer).__name__} holds parameters of a model that fewbits.quantize_ "
            f"converted, but not the parameters quantize_ added ({shown}: learned quantizer "
            "ranges), which would never train. Build the optimizer after quantize_, or pass "
            "it: quantize_(model, config, optimizer=opt), or add them with "
            "opt.add_param_group({'params': [...]}); to keep them fixed on purpose, "
            "set requires_grad_(False) on them")
    _CHECKED[optimizer] = sig


@torch.no_grad()
def _keep_before(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _BEFORE.pop(optimizer, None)  # a step that raised left its own
    if not _SCALES:
        return
    todo = []
    for p in _params(optimizer):
        entry = _SCALES.get(id(p))
        if entry is not None and entry[0]() is p:
            todo.append((p, p.detach().clone(), entry[1]))
    if todo:
        _BEFORE[optimizer] = todo


@torch.no_grad()
def _scale_steps(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for p, before, factor in _BEFORE.pop(optimizer, ()):
        p.sub_(before).mul_(factor).add_(before)


@torch.no_grad()
def _project_ranges(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _RANGES:
        return
    done: set[int] = set()
    for p in _params(optimizer):
        entry = _RANGES.get(id(p))
        if entry is None or entry[0]() is not p:
            continue
        owner = entry[1]()
        if owner is not None and id(owner) not in done:
            done.add(id(owner))
            owner.after_optimizer_step()


register_optimizer_step_pre_hook(_check_companions)
register_optimizer_step_pre_hook(_keep_before)
register_optimizer_step_post_hook(_scale_steps)
register_optimizer_step_post_hook(_project_ranges)
