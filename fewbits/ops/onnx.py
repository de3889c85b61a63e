"""The plumbing of fewbits' operators in PyTorch's ONNX exporter (imported only to export: it
needs ``onnxscript``).

Each family holds the exact ONNX Script translation of its operators in its own module and
declares them (:meth:`fewbits.quantizers.Quantizer.onnx_translations`, e.g.
:func:`fewbits.quantizers.pow2.pow2_onnx`); :func:`fewbits.quantizers.base.family_translations`
gathers them into the ``custom_translation_table`` of
``torch.onnx.export(model, args, dynamo=True, ...)`` (what :func:`fewbits.export.onnx.to_onnx`
does), and :func:`register_globally` adds them to PyTorch's default registry for a plain export.

Exactness (float32), the rule every translation keeps: ONNX ``Round`` rounds ties to even;
fewbits rounds them away from zero, so :func:`fewbits.ops.onnx_form.round_half_away` builds
``r = Round(|v|)`` (exact) plus 1 where ``|v| - r == 0.5`` (exact), with the sign of ``v`` --
not ``Floor(|v| + 0.5)``, whose sum rounds (``0.49999997 -> 1``). Clamps, the fixed-point
multiply by an exact reciprocal, the min-max grid (the float32 operations of
:func:`fewbits._math.min_max_range`, in the same order) and every comparison are the ones PyTorch
makes, so each operator gives PyTorch's values bit for bit on every finite input. Powers of two
come from tables of exact constants or from ``Pow(2, k)`` with an integer ``k``. The
straight-through masks are not exported (inference graphs do not read them): the second output
of a masked operator is :func:`no_mask`. Weight operators are translated too, for a plain
``torch.onnx.export``; :func:`fewbits.export.onnx.to_onnx` stores quantized weights as constants.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from .onnx_form import const

__all__ = ["REGISTERED", "cached_exporter_registry", "float32_only", "no_mask",
           "register_globally"]

#: Whether :func:`register_globally` added the translations to PyTorch's exporter.
REGISTERED = False

_F32 = ir.DataType.FLOAT


def float32_only(x: Any, name: str) -> None:
    """Refuse a non-float32 input of operator ``fewbits::name`` (the translations are exact for
    float32 only), naming the fix."""
    dt = getattr(x, "dtype", None)
    if dt is not None and dt != _F32:
        raise ValueError(f"fewbits::{name}: ONNX export is exact for float32 only, got {dt}; "
                         "export model.float()")


def no_mask() -> Any:
    """The second output of a masked operator: an empty uint8 tensor (inference graphs do not
    read straight-through masks)."""
    return const(op, np.zeros(0, np.uint8), np.uint8)


def register_globally(table: dict[Any, Callable[..., Any]]) -> bool:
    """Add the translations ``table`` to PyTorch's default ONNX registry, so that a plain
    ``torch.onnx.export(model, args, dynamo=True)`` started afterwards uses them. PyTorch has no
    public hook for this; where its private registry is not what this expects, nothing is
    registered and ``False`` is returned (the fewbits operators then refuse that export and name
    :func:`fewbits.export.onnx.export_onnx`)."""
    global REGISTERED
    try:
        from torch.onnx._internal.exporter import _registration
        from torch.onnx._internal.exporter._torchlib import _torchlib_registry as reg
    except ImportError:
        return False
    registry = getattr(reg, "_registry", None)
    meta = getattr(_registration, "OnnxDecompMeta", None)
    if not isinstance(registry, list) or meta is None:
        return False
    known = {getattr(m, "fx_target", None) for m in registry}
    try:  # what torch.onnx.export(custom_translation_table=...) registers, made permanent
        for target, fn in table.items():
            if target not in known:
                registry.append(meta(onnx_function=fn, fx_target=target, signature=None,
                                     is_custom=True))
    except Exception:  # a changed private API: keep the refusal
        return False
    REGISTERED = True
    return True


_REGISTRIES: dict[int, Any] = {}


@contextlib.contextmanager
def cached_exporter_registry() -> Iterator[None]:
    """Within this block ``torch.onnx.export(dynamo=True)`` gets a copy of an operator registry
    built once per opset: PyTorch rebuilds it from onnxscript's sources on every call (~8 s,
    most of a small model's export). Where PyTorch's private registry is not what this
    expects, nothing changes. :func:`fewbits.export.onnx.to_onnx` uses it."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:  # pragma: no cover - another torch layout: the slow path
        yield
        return
    build = ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(build, classmethod):  # pragma: no cover
        yield
        return

    def cached(cls: Any, opset_version: int | None = None) -> Any:
        if opset_version not in _REGISTRIES:
            _REGISTRIES[opset_version] = build.__func__(cls) if opset_version is None else \
                build.__func__(cls, opset_version)
        reg = copy.copy(_REGISTRIES[opset_version])
        reg.functions = {k: list(v) for k, v in reg.functions.items()}
        return reg

    ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = build
