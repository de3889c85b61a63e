"""Argument and value checks shared by :mod:`fewbits.functional` and the quantizer modules:
types, bit widths, positive steps, the NaN/inf check outside the operators (and the primitives
the operators' checks share: ``CHECK_*``, :func:`capturing`, :func:`all_finite`), and the
refusal of PyTorch's ONNX exporters. It imports nothing of :mod:`fewbits.ops`, whose family
modules import it. The switch for the NaN/inf checks, :func:`finite_checks`, is
re-exported by :mod:`fewbits.functional`, where users find it.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

try:  # where the dynamo-based ONNX exporter keeps its "exporting" flag (see in_onnx_export)
    from torch.onnx._internal.exporter import _flags as _onnx_flags
except ImportError:  # another torch version: torch.onnx.is_in_onnx_export() alone
    _onnx_flags = None

__all__ = [
    "CHECK_ASYNC",
    "CHECK_OFF",
    "CHECK_RAISE",
    "NonFiniteError",
    "all_finite",
    "bad_batch_norm_stats",
    "batch_norms_with_stats",
    "capturing",
    "check_bits",
    "check_finite",
    "check_float_tensor",
    "check_mode",
    "check_positive",
    "check_pow2_args",
    "checks_enabled",
    "finite_checks",
    "graph_guard",
    "in_onnx_export",
    "nonfinite_error",
    "torchscript_onnx_export",
    "translated_onnx_export",
]

#: The ``check`` argument of the operators (:mod:`fewbits.ops`): no NaN/inf check, raise
#: ``ValueError``, or a device-side assertion inside captured graphs.
CHECK_OFF, CHECK_RAISE, CHECK_ASYNC = 0, 1, 2


class NonFiniteError(ValueError):
    """A quantizer got NaN/inf input (training tells a diverged run by this type)."""


def nonfinite_error(x: Tensor, fn: str, arg: str) -> ValueError:
    """The error every quantizer raises for NaN/inf input (a :class:`NonFiniteError`)."""
    bad = "NaN" if bool(torch.isnan(x).any()) else "inf"
    return NonFiniteError(
        f"{fn}: {arg} contains {bad}; quantizers need finite input. The usual cause is a "
        "diverging run: lower the learning rate, or check the data for NaN/inf."
    )


def all_finite(x: Tensor) -> bool:
    """``torch.isfinite(x).all()`` at the cost of one sum: a NaN or inf element makes the sum
    NaN or inf, so a finite sum proves every element finite; only a non-finite sum (a NaN/inf, or
    finite values whose sum overflows) pays for the exact elementwise check."""
    if math.isfinite(float(x.detach().sum())):
        return True
    return bool(torch.isfinite(x).all())


def capturing() -> bool:
    """True while torch.compile, torch.export or torch.jit.trace captures a graph."""
    return bool(torch._C._get_tracing_state() is not None or torch.compiler.is_compiling()
                or _is_exporting())


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)



_CHECK_FINITE = True


@contextlib.contextmanager
def finite_checks(enabled: bool) -> Iterator[None]:
    """Turn the NaN/inf checks of every quantizer on or off inside a ``with`` block.

    Where the check runs: inside each quantizer's operator (:mod:`fewbits.ops`), so it holds in
    eager mode, ``torch.compile`` graphs, ``torch.export`` programs and ``torch.jit`` traces
    alike (the mode is fixed when a graph is captured). On CPU it costs nothing extra with the
    fused kernels (they count NaN/inf in the same pass), else one sum; no host sync. On CUDA,
    eager calls read one flag back (a host sync per quantizer call) to raise ``ValueError``;
    captured graphs use a device-side assertion instead (no sync; a failing step ends in a CUDA
    error). ONNX files carry no check. Turn the checks off for maximum speed once a model is
    known to train stably.
    """
    global _CHECK_FINITE
    old, _CHECK_FINITE = _CHECK_FINITE, bool(enabled)
    try:
        yield
    finally:
        _CHECK_FINITE = old


def checks_enabled() -> bool:
    """Whether the NaN/inf checks are on (:func:`finite_checks`)."""
    return _CHECK_FINITE


def check_mode(x: Tensor) -> int:
    """The ``check`` argument of the operators for ``x`` (see :func:`finite_checks`)."""
    if not _CHECK_FINITE:
        return CHECK_OFF
    return CHECK_ASYNC if capturing() else CHECK_RAISE


_ONNX_HINT = (
    "{fn}: this torch.onnx.export cannot express the fewbits operator {op} exactly ({why}). "
    "Export with fewbits.export.onnx.export_onnx(model, path, example_inputs) (CLI: `fewbits "
    "export RUN --onnx model.onnx`), or call fewbits.export.onnx.onnx_translations() once "
    "before torch.onnx.export(model, args, dynamo=True) (it registers fewbits' exact ONNX "
    "translations with PyTorch's exporter; or pass them as custom_translation_table=); "
    "torch.export.export and torch.jit.trace keep the operator."
)


def in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, also where dynamo folds that call to False (the
    dynamo-based exporter's capture): its flag read as a module attribute."""
    return bool(torch.onnx.is_in_onnx_export()
                or getattr(_onnx_flags, "_is_onnx_exporting", False))


def torchscript_onnx_export() -> bool:
    """Whether PyTorch's TorchScript-based ONNX exporter (``dynamo=False``) is running."""
    return in_onnx_export() and not getattr(_onnx_flags, "_is_onnx_exporting", False)


_TRANSLATED = [False]  # inside fewbits' own dynamo export (translations passed explicitly)


@contextlib.contextmanager
def translated_onnx_export() -> Iterator[None]:
    """Within this block the dynamo ONNX exporter gets fewbits' translations explicitly
    (:func:`fewbits.export.onnx.to_onnx`): :func:`graph_guard` lets it trace the operators."""
    old, _TRANSLATED[0] = _TRANSLATED[0], True
    try:
        yield
    finally:
        _TRANSLATED[0] = old


def graph_guard(fn: str, op: str) -> None:
    """Refuse torch.onnx.export where it would write a wrong file, naming the fix: always for the
    TorchScript exporter; for the dynamo exporter unless fewbits' exact translations
    (:mod:`fewbits.ops.onnx`) were registered with it before the export began (PyTorch builds
    its registry first) or are passed by fewbits' own exporter."""
    if not in_onnx_export():
        return
    full = f"torch.ops.fewbits.{op}"
    if not getattr(_onnx_flags, "_is_onnx_exporting", False):  # the TorchScript exporter
        raise RuntimeError(_ONNX_HINT.format(fn=fn, op=full, why="the TorchScript exporter "
                                             "(dynamo=False) has no translation for it"))
    if _TRANSLATED[0]:
        return
    translations = sys.modules.get("fewbits.ops.onnx")  # imported only for export
    if not getattr(translations, "REGISTERED", False):
        raise RuntimeError(_ONNX_HINT.format(fn=fn, op=full, why="its ONNX translation is not "
                                             "registered with PyTorch's exporter"))


def check_float_tensor(x: Tensor, fn: str, arg: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {arg} must be a floating-point tensor, got {x.dtype}")


def check_finite(x: Tensor, fn: str, arg: str) -> None:
    """Type checks, then (when checks are on) the NaN/inf check, for code outside the operators
    (quantizer state): raises ``ValueError`` in eager mode; inside a captured graph a
    ``torch._assert_async`` (no host sync; ``RuntimeError`` when it fails), none in ONNX."""
    check_float_tensor(x, fn, arg)
    if not _CHECK_FINITE or in_onnx_export() or x.is_meta:  # meta: shapes only, no values
        return
    if capturing():
        torch._assert_async(torch.isfinite(x).all(),
                            f"{fn}: {arg} contains NaN or inf; quantizers need finite input")
        return
    if not all_finite(x):
        raise nonfinite_error(x, fn, arg)


def check_bits(fn: str, name: str, value: int, low: int = 1) -> None:
    if isinstance(value, bool) or int(value) != value or not low <= value <= 32:
        raise ValueError(f"{fn}: {name} must be an integer in [{low}, 32], got {value!r}")


def check_positive(fn: str, name: str, value: float) -> None:
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")


def check_pow2_args(fn: str, sign: bool, with_zero: bool, n: int, m: int) -> None:
    # n = sign + with_zero leaves no exponent bits: one magnitude 2**m (binary / ternary).
    low = max(1, int(bool(sign)) + int(bool(with_zero)))
    check_bits(fn, "n", n, low=low)
    if isinstance(m, bool) or int(m) != m or not -126 <= m <= 127:
        raise ValueError(f"{fn}: m (log2 of the largest level) must be an integer in "
                         f"[-126, 127] so that 2**m is a float32, got {m!r}")


def batch_norms_with_stats(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of ``model``'s norms whose running mean and variance hold values
    (tracked statistics; a lazy norm not run yet has none)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase)
            and all(isinstance(t, Tensor) and not is_lazy(t) and t.is_floating_point()
                    for t in (m.running_mean, m.running_var))]


def bad_batch_norm_stats(model: nn.Module) -> str | None:
    """What is wrong with the running statistics of ``model``'s batch norms, or None: a
    running mean or variance that is not finite, or a negative variance. A trained network
    never has them (training stops before saving a diverged state), so a loaded file that has
    them is corrupt or edited; said at load, not as a "diverging run" at the first forward.

        >>> bad_batch_norm_stats(nn.BatchNorm2d(4)) is None
        True
    """
    for name, m in batch_norms_with_stats(model):
        for key in ("running_mean", "running_var"):
            t = getattr(m, key)
            what = "NaN" if bool(torch.isnan(t).any()) else "inf" if \
                not bool(torch.isfinite(t).all()) else "a negative value" if \
                key == "running_var" and bool((t < 0).any()) else None
            if what:
                return f"batch norm {name!r}: its {key} holds {what}"
    return None
