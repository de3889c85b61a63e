"""Which model a ``.fewbits`` file holds, and fitting a file to a model instance.

A file records its model as ``{"name", "kwargs"}``: the registry name and options of a model
built by :func:`fewbits.models.create_model` (which :func:`~fewbits.export.load_packed` can
rebuild), or, for any other model, its class (``"package.module.Class"``: a name to show and
check, never imported). It also records each fewbits layer's quantizer configs (``"layers"``),
so that a file can be loaded into a user's model instance: plain layers of a kind fewbits
quantizes are converted with those configs (everywhere a shared module is used), fewbits layers
must have the same ones (up to the weight grid that ``quantize_`` fits, where the file's
wins), and every
mismatch is a :class:`~fewbits.export.FormatError` naming the layer or tensor.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from ..layer_kinds import disable_fast_paths, layer_kind, layer_options
from ..layers import QuantLayer, quant_layers
from ..models import is_model
from ..quantizers import get
from ._guard import build_bounded
from .container import FormatError

__all__ = ["ROLES", "build_for_file", "check_layer_configs", "layer_configs", "layer_configs_of",
           "layer_options_of", "model_header"]

ROLES = ("weight", "bias", "input", "output")
#: Quantizer options that fix a weight grid which quantize_ fits to each model's own weights:
#: a file's values win over those of the model it is loaded into.
_GRID = ("delta", "m")
_SIZES = ("in_channels", "out_channels", "in_features", "out_features")


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def layer_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer name: {role: quantizer config}}`` of every fewbits layer (roles without a
    quantizer left out), as JSON values."""
    return {lname: layer_configs_of(layer) for lname, layer in quant_layers(model)}


def layer_options_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer name: options}`` of every fewbits layer (:func:`fewbits.layers.layer_options`),
    as JSON values: a file loaded into an instance whose layers differ (stride, padding mode...)
    would compute something else with the same weights, so the load compares them."""
    return {lname: _json(layer_options(layer)) for lname, layer in quant_layers(model)}


def model_header(model: nn.Module) -> dict[str, Any]:
    """The ``"model"`` record of a file: ``model.fewbits_spec`` (registry models), else the
    class path with no options."""
    spec = getattr(model, "fewbits_spec", None)
    if spec is not None:
        try:
            return {"name": str(spec["name"]), "kwargs": _json(spec["kwargs"])}
        except (TypeError, ValueError) as e:
            raise ValueError(f"model {spec.get('name')!r}: its options {spec.get('kwargs')!r} "
                             f"cannot be stored in a file ({e}); use JSON values") from e
    cls = type(model)
    return {"name": f"{cls.__module__}.{cls.__qualname__}", "kwargs": {}}


def _fail(path: str | os.PathLike, what: str) -> FormatError:
    return FormatError(str(path), what, "build the model the file was exported from")


def build_for_file(path: str | os.PathLike, header: dict[str, Any],
                   model: nn.Module | None) -> nn.Module:
    """The model to load ``header``'s tensors into: ``model`` made to fit the file's layers, or,
    without ``model``, the registry model the file names, rebuilt from its options."""

    spec = header["model"]
    if model is None:
        name = spec.get("name")
        if not isinstance(name, str) or not is_model(name):
            raise FormatError(
                str(path), f"it holds model {name!r}, which is not registered in this process",
                "pass the model to load it into: load_packed(path, model=MyNet()), or on "
                "the command line (fewbits eval, export) --model package.module:factory")
        model = build_bounded(header, str(path))  # options bounded by what the file holds
    layers = header.get("layers")
    if layers is None:  # files written before layer configs were recorded
        return model
    check_layer_configs(path, header)  # a mapping of role -> config that builds a quantizer
    for lname, configs in sorted(layers.items()):  # a parent (attention) before its out_proj
        try:
            m = model.get_submodule(lname)
        except AttributeError:
            raise _fail(path, f"it has quantized layer {lname!r}, which the model lacks") from None
        kind = layer_kind(m)
        if kind is not None and not isinstance(m, QuantLayer):
            if not lname:
                raise _fail(path, "the model itself is a plain layer that the file holds "
                            "quantized; pass QuantConv2d/QuantLinear.from_float(model, ...)")
            try:
                new = kind.quant_type.from_float(
                    m, **{f"{r}_quantizer": get(dict(c)) for r, c in configs.items()},
                    init_ranges=False)
            except (TypeError, ValueError) as e:
                raise FormatError(str(path), f"layer {lname!r}: {e}") from e
            for _, parent in model.named_modules(remove_duplicate=False):
                for attr, child in list(parent._modules.items()):
                    if child is m:  # every place a shared module is used
                        setattr(parent, attr, new)
            continue
        if not isinstance(m, QuantLayer):
            raise _fail(path, f"layer {lname!r} is a {type(m).__name__} in the model, not a "
                        "layer kind fewbits quantizes")
        mine = layer_configs_of(m)
        if _without_grid(mine) != _without_grid(configs):
            raise _fail(path, f"layer {lname!r} is quantized differently: file {configs}, "
                        f"model {mine}")
        for role in ("weight", "bias"):  # the file's grid: its codes were made on it
            if role in configs and mine.get(role) != configs[role]:
                q = get(dict(configs[role]))
                q.setup(m.quant_param(role))
                setattr(m, f"{role}_quantizer", q)
    extra = sorted(set(dict(quant_layers(model))) - set(layers))
    if extra:
        raise _fail(path, f"model layers {extra[:5]} are quantized but the file's are not")
    _check_options(path, header.get("layer_options"), dict(quant_layers(model)))
    disable_fast_paths(model)
    return model


def _without_grid(configs: dict[str, Any]) -> dict[str, Any]:
    return {r: {k: v for k, v in c.items() if r not in ("weight", "bias") or k not in _GRID}
            if isinstance(c, dict) else c for r, c in configs.items()}


def _check_options(path: str | os.PathLike, recorded: Any, layers: dict[str, nn.Module]) -> None:
    """Each layer's recorded options (files since ``layer_options`` was added) must be the
    model's: same weights with another stride or padding would be a silently different net."""
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise FormatError(str(path), "its 'layer_options' record is not a mapping")
    for lname, want in recorded.items():
        if isinstance(want, dict):  # sizes: the tensors' shapes are compared, naming the tensor
            want = {k: v for k, v in want.items() if k not in _SIZES}
        layer = layers.get(lname)
        if layer is None:
            raise _fail(path, f"it has options for layer {lname!r}, which the model lacks")
        have = {k: v for k, v in _json(layer_options(layer)).items() if k not in _SIZES}
        if have != want:
            diff = sorted(k for k in set(have) | set(want if isinstance(want, dict) else {})
                          if not isinstance(want, dict) or have.get(k) != want.get(k))
            raise _fail(path, f"layer {lname!r} differs from the exported one in {diff}: file "
                        f"{want}, model {have}")


def check_layer_configs(path: str | os.PathLike, header: dict[str, Any]) -> None:
    """Every quantizer config of the file's ``"layers"`` record must build a quantizer (what
    ``fewbits info`` reports as bits would otherwise describe nothing real)."""
    layers = header.get("layers")
    if layers is None:
        return
    if not isinstance(layers, dict):
        raise FormatError(str(path), "its 'layers' record is not a mapping")
    for lname, configs in layers.items():
        if not isinstance(configs, dict) or set(configs) - set(ROLES):
            raise FormatError(str(path), f"layer {lname!r} has invalid quantizer configs")
        for role, c in configs.items():
            try:
                get(dict(c) if isinstance(c, dict) else c)
            except (TypeError, ValueError, OverflowError) as e:
                raise FormatError(str(path), f"layer {lname!r}: its {role} quantizer config "
                                  f"{c!r}"[:300] + f" is invalid ({e})"[:300]) from None


def layer_configs_of(layer: nn.Module) -> dict[str, Any]:
    """The quantizer configs of one fewbits layer, as :func:`layer_configs` records them."""
    return _json({r: q.config() for r in ROLES
                  if (q := getattr(layer, f"{r}_quantizer")) is not None})
