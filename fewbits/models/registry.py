"""One registry of model constructors and their metadata, as timm's ``_registry``.

Each model is registered with what it is (:class:`ModelInfo`): the ``(C, H, W)`` images it was
built for, its dataset, its quantization family and its default options. Nothing else in
fewbits derives these from a model's name.

    >>> "cifar10_resnet23_prediction" in list_models("cifar10_*")
    True
    >>> model_info("mnist_fp_net_lenet").input_shape
    (1, 28, 28)
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["ModelInfo", "create_model", "is_model", "list_models", "model_info",
           "register_factory", "register_model"]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows of a model: its constructor and its declared metadata.

    ``input_shape``: the ``(C, H, W)`` images it was built for (``None``: not declared; an
    ``in_channels`` option overrides ``C``); ``dataset``: the dataset it was made for;
    ``family``: its quantization family (:data:`fewbits.models.FAMILIES`); ``defaults``: the
    keyword arguments of a default build.
    """

    name: str
    fn: Callable[..., nn.Module] = field(repr=False)
    input_shape: tuple[int, int, int] | None = None
    dataset: str | None = None
    family: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)

    def input_shape_for(self, kwargs: dict[str, Any]) -> tuple[int, int, int] | None:
        """``input_shape`` with ``C`` from ``kwargs["in_channels"]`` when given, or from
        ``kwargs["in_features"]`` (an MLP: ``C = in_features / (H * W)``; ``None`` when that is
        not a whole number, so callers ask for the shape instead of guessing)."""
        if self.input_shape is None:
            return None
        c, h, w = self.input_shape
        features = kwargs.get("in_features")
        if "in_channels" not in kwargs and isinstance(features, int):
            if features % (h * w):
                return None
            c = features // (h * w)
        return (int(kwargs.get("in_channels", c)), h, w)


_MODELS: dict[str, ModelInfo] = {}


def _signature_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   input_shape: tuple[int, int, int] | None = None, dataset: str | None = None,
                   family: str | None = None, defaults: dict[str, Any] | None = None):
    """Register a constructor under ``name`` (default: the function's ``__name__``) with its
    metadata (see :class:`ModelInfo`; ``defaults`` default to the signature's defaults).

    Usable as ``@register_model``, ``@register_model(name="x", input_shape=(3, 32, 32))`` or
    ``register_model(fn, name=...)``. A name registered twice raises ``ValueError``.
    """

    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is already registered")
        shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        if shape is not None and len(shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
        _MODELS[key] = ModelInfo(key, f, shape, dataset, family,  # type: ignore[arg-type]
                                 dict(defaults) if defaults is not None
                                 else _signature_defaults(f))
        return f

    return deco(fn) if fn is not None else deco


def register_factory(path: str) -> str:
    """Import ``"package.module:factory"`` and register it under that name (once; the same
    function again is a no-op); returns the name, for :func:`create_model`.

    This is how command-line users bring their own architectures (``fewbits train --net
    pkg.mod:factory``): the import runs code, so fewbits does it only when asked like this,
    never for a name read from a file. A factory registered with :func:`register_model` keeps
    its metadata. Raises ``ValueError`` naming what could not be imported.
    """
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"expected package.module:factory, got {path!r}")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import module {module!r} of {path!r}: {e} (is it on "
                         "PYTHONPATH?)") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable (a factory returning an nn.Module)")
    if path in _MODELS:
        if _MODELS[path].fn is not obj:
            raise ValueError(f"model {path!r} is already registered with another function")
        return path
    known = next((i for i in _MODELS.values() if i.fn is obj), None)
    if known is not None:
        register_model(obj, name=path, input_shape=known.input_shape, dataset=known.dataset,
                       family=known.family, defaults=known.defaults)
    else:
        register_model(obj, name=path)
    return path


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is a shell wildcard such as ``"mnist_*_lenet"``."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def is_model(name: str) -> bool:
    return name in _MODELS


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered model; unknown names raise ``ValueError`` listing
    the registered ones (those containing ``name`` first)."""
    if name not in _MODELS:
        close = [n for n in _MODELS if name.lower() in n] or list_models()
        raise ValueError(
            f"unknown model {name!r}. Registered models ({len(_MODELS)}): " + ", ".join(close)
            + ("" if close == list_models() else f" (and {len(_MODELS) - len(close)} more; "
               "`fewbits list` shows all)")
            + ("; a package.module:factory name needs `--net`/`--model` (or "
               "register_factory) in this process" if ":" in name else "")
        )
    return _MODELS[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. The model carries ``fewbits_spec = {"name", "kwargs"}`` so that
    ``create_model(spec["name"], **spec["kwargs"])`` re-creates it (checkpoints, exports): the
    constructor's own spec when it sets one (the zoo records every option), else ``name`` and
    the keyword arguments given.

    Raises ``ValueError`` listing the registered names when ``name`` is unknown.
    """
    model = model_info(name).fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r}: the constructor returned {type(model).__name__}, not "
                        "an nn.Module")
    if getattr(model, "fewbits_spec", None) is None:
        model.fewbits_spec = {"name": name, "kwargs": dict(kwargs)}
    return model
