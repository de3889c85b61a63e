"""The arguments of the torch calls :mod:`fewbits.runtime.integer_walk` reads off a
``torch.fx`` node, given by position or by keyword as users write them: a concatenation's
tensors and dimension, a spatial mean's ``keepdim``, the tensor given as ``input=``."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

__all__ = ["cat_args", "input_first", "spatial_mean"]


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
