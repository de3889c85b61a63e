"""One registry of model constructors, as timm's ``_registry``.

    >>> "cifar10_resnet23_prediction" in list_models("cifar10_*")
    True
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["create_model", "is_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register a constructor under ``name`` (default: the function's ``__name__``).

    Usable as ``@register_model``, ``@register_model(name="x")`` or
    ``register_model(fn, name=...)``.
    """

    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is already registered")
        _MODELS[key] = f
        return f

    return deco(fn) if fn is not None else deco


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is a shell wildcard such as ``"mnist_*_lenet"``."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. The model carries ``fewbits_spec = {"name", "kwargs"}`` so that
    ``create_model(spec["name"], **spec["kwargs"])`` re-creates it (checkpoints, exports).

    Raises ``ValueError`` listing the registered names when ``name`` is unknown.
    """
    if name not in _MODELS:
        close = [n for n in _MODELS if name.lower() in n] or list_models()
        raise ValueError(
            f"unknown model {name!r}. Registered models ({len(_MODELS)}): " + ", ".join(close)
            + ("" if close == list_models() else f" (and {len(_MODELS) - len(close)} more; "
               "`fewbits list` shows all)")
        )
    return _MODELS[name](**kwargs)
