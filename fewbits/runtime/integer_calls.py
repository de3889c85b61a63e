"""The arguments of the torch calls :mod:`fewbits.runtime.integer_walk` reads off a
``torch.fx`` node, given by position or by keyword as users write them: a concatenation's
tensors and dimension, a spatial mean's ``keepdim``, a clamp's bounds (every clamping call
PyTorch has), the tensor given as ``input=``, and the flattening views users write
(``x.view(x.size(0), -1)``)."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = ["BATCH", "batch_size", "cat_args", "clamp_bounds", "flat_view", "input_first",
           "spatial_mean"]

#: clamping calls: (names of the bounds in order, their defaults; None: no bound)
_CLAMPS: dict[Any, tuple[tuple[str, ...], tuple[float | None, ...]]] = {
    torch.clamp: (("min", "max"), (None, None)), "clamp": (("min", "max"), (None, None)),
    torch.clip: (("min", "max"), (None, None)), "clip": (("min", "max"), (None, None)),
    torch.clamp_min: (("min",), (None,)), "clamp_min": (("min",), (None,)),
    torch.clamp_max: (("max",), (None,)), "clamp_max": (("max",), (None,)),
    nn.functional.hardtanh: (("min_val", "max_val", "inplace"), (-1.0, 1.0, False)),
    nn.functional.relu6: (("inplace",), (False,)),
}


def input_first(kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call given its tensor as ``input=`` (``torch.clamp(input=x,
    min=0)``): the tensor first by position, as every reader of the walk takes it."""
    return (kwargs["input"],), {k: v for k, v in kwargs.items() if k != "input"}


def spatial_mean(node: fx.Node) -> bool | None:
    """``keepdim`` of ``x.mean((2, 3))`` / ``torch.mean(x, (-2, -1), keepdim)`` (the global
    average pool), None for any other mean."""
    names = ("dim", "keepdim")
    kw = {**dict(zip(names, node.args[1:], strict=False)), **node.kwargs}
    dims = kw.get("dim")
    if set(kw) - set(names) or not isinstance(dims, (list, tuple)) or \
            sorted(d % 4 if isinstance(d, int) else -1 for d in dims) != [2, 3]:
        return None
    return bool(kw.get("keepdim", False))


def cat_args(node: fx.Node) -> tuple[Any, Any] | None:
    """``(tensors, dim)`` of a ``torch.cat`` / ``concat`` / ``concatenate`` call, given by
    position or keyword (``torch.cat(tensors=[a, b], dim=1)`` has no positional argument),
    None for any other node."""
    if getattr(node.target, "__name__", "") not in ("cat", "concat", "concatenate"):
        return None
    kw = {**dict(zip(("tensors", "dim"), node.args, strict=False)), **node.kwargs}
    if "axis" in kw:  # torch.concatenate's name for it
        kw["dim"] = kw.pop("axis")
    if not isinstance(kw.get("tensors"), (list, tuple)) or set(kw) - {"tensors", "dim"}:
        return None
    return kw["tensors"], kw.get("dim", 0)


def clamp_bounds(node: fx.Node, where: str) -> tuple[float, float] | None:
    """``(lo, hi)`` of a clamping call (``torch.clamp`` / ``clip`` / ``clamp_min`` /
    ``clamp_max`` and their methods, ``F.hardtanh``, ``F.relu6``), by position or keyword,
    ``-inf`` / ``inf`` where a side is unbounded; None for any other node. ``ValueError``
    naming ``where`` for a bound that is not a number (a tensor of bounds)."""
    spec = _CLAMPS.get(node.target)
    if spec is None:
        return None
    names, defaults = spec
    if len(node.args) - 1 > len(names) or set(node.kwargs) - set(names):
        return None
    kw = {**dict(zip(names, defaults, strict=True)),
          **dict(zip(names, node.args[1:], strict=False)), **node.kwargs}
    if node.target is nn.functional.relu6:
        return 0.0, 6.0
    lo = kw.get("min", kw.get("min_val"))
    hi = kw.get("max", kw.get("max_val"))
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
               for v in (lo, hi)):
        raise ValueError(f"{where}: clamp bounds must be numbers")
    return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))


class _Marker:
    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return self.what


#: the batch size (``x.size(0)``, ``x.shape[0]``), which only a flattening view reads
BATCH = _Marker("the batch size")
_SHAPE = _Marker("a map's shape")


def batch_size(node: fx.Node, env: dict) -> Any | None:
    """:data:`BATCH` for ``x.size(0)`` and ``x.shape[0]``, a marker for ``x.shape``, None for
    any other node."""
    t, a = node.target, node.args
    if node.kwargs or len(a) != 2:
        return None
    if node.op == "call_method" and t == "size" and a[1] == 0:
        return BATCH
    if t is getattr and a[1] == "shape":
        return _SHAPE
    if t is operator.getitem and isinstance(a[0], fx.Node) and env.get(a[0].name) is _SHAPE \
            and a[1] == 0:
        return BATCH
    return None


def flat_view(node: fx.Node, env: dict) -> fx.Node | None:
    """The tensor of ``x.view(n, -1)`` / ``x.reshape(n, -1)`` / ``torch.reshape(x, (n, -1))``
    with ``n`` the batch size (:func:`batch_size`): ``flatten(x, 1)``; None for any other
    node."""
    t, a = node.target, node.args
    if node.kwargs or len(a) < 2:
        return None
    if node.op == "call_method" and t in ("view", "reshape"):
        dims = a[1] if len(a) == 2 and isinstance(a[1], (tuple, list)) else a[1:]
    elif t is torch.reshape and len(a) == 2 and isinstance(a[1], (tuple, list)):
        dims = a[1]
    else:
        return None
    ok = len(dims) == 2 and isinstance(dims[0], fx.Node) and env.get(dims[0].name) is BATCH
    return a[0] if ok and dims[1] == -1 else None
