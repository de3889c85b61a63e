"""Fused CPU kernels for training: one pass per activation quantizer instead of ~10.

Eager PyTorch runs a fixed-point or min-max quantizer as a chain of elementwise ops (clamp,
mask, scale, abs, round, tie fix, copysign, scale back, NaN check), each a full pass over the
activation; in a ResNet this made quantization-aware training 1.6-1.9x as slow as float. The C
kernels in ``_train_kernels.c`` do the forward (values, STE mask, non-finite check) in one
pass and the backward (masked gradient and, for min-max, both range-gradient sums) in another,
with the very float32 operations of :mod:`fewbits._math` in the same order, so the values and
the input gradients are bit-identical to the PyTorch path (tests compare the two on every
edge case). Range-gradient sums are accumulated in float64 (order differs from ``Tensor.sum``,
so the last bit of ``d qr_min``/``d qr_max`` may differ; both are within the spec's tolerance).
BinaryConnect's deterministic sign and the scalar grid of a per-tensor min-max range (what was
~15 tensor operations per call) take the same route; their results are bit-identical too.

Used automatically, as the CPU backend of the operators of :mod:`fewbits.ops`, for float32
CPU tensors with a dense layout (contiguous or channels-last), in eager mode and inside
compiled, exported and traced graphs alike (the operator is opaque to them); everything else
takes the PyTorch path. ``FEWBITS_FUSED=0`` turns
the kernels off (e.g. to compare), as does a machine without a C compiler.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._cbuild import CLibrary
from ._math import is_compiling

__all__ = [
    "available",
    "binary_act",
    "error",
    "fixed_point",
    "keep",
    "min_max",
    "min_max_grad",
    "min_max_grid",
    "pow2",
    "usable",
]

_I64, _I32, _PTR, _F32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float
_LIB = CLibrary(
    Path(__file__).with_name("_train_kernels.c"), "train-kernels",
    ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"],
    {"fb_fixed_point": ([_PTR, _PTR, _PTR, _I64, _F32, _F32, _F32, _F32, _I64], _I64),
     "fb_min_max": ([_PTR, _PTR, _PTR, _I64, _F32, _F32, _F32, _I64], _I64),
     "fb_min_max_grid": ([_F32, _F32, _F32, _F32, _F32, _PTR], None),
     "fb_pow2": ([_PTR, _PTR, _PTR, _I64, _I32, _I32, _I32, _I32, _I32, _I64, _I64], _I64),
     "fb_binary_act": ([_PTR, _PTR, _PTR, _I64, _F32, _F32, _I64], _I64),
     "fb_keep": ([_PTR, _PTR, _PTR, _I64, _I64, _F32, _PTR, _I64], None)},
    # OpenMP: the chunks run on the OpenMP threads PyTorch's CPU ops use (libgomp is loaded
    # once per process), not on new pthreads competing with those threads for the cores.
    optional=("-fopenmp",),
)


def _lib() -> Any:
    return _LIB.get()


def error() -> str | None:
    """Why the kernels could not be built, or None."""
    return _LIB.error


def available() -> bool:
    """True when the kernels are enabled (``FEWBITS_FUSED`` is not ``0``) and compiled."""
    return os.environ.get("FEWBITS_FUSED", "1") != "0" and _lib() is not None


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(
        memory_format=torch.channels_last))


def usable(x: Tensor) -> bool:
    """Whether ``x`` can take the fused path: float32, CPU, dense, a real tensor (the operators
    run their implementation on real tensors only; this guards direct calls while tracing)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0
            and not is_compiling() and _dense(x) and available())


def _nt() -> int:
    return torch.get_num_threads()


def fixed_point(x: Tensor, lo: float, hi: float, inv: float, delta: float,
                want_mask: bool) -> tuple[Tensor, Tensor | None, bool]:
    """``(y, mask or None, all finite)`` of the fixed-point quantizer (see ``_math``):
    ``c = clamp(x, lo, hi)``, ``v = c * inv`` (``inv`` != 0) or ``c / delta``,
    ``y = round_half_away(v) * delta``, ``mask = (c == x)`` as uint8."""
    y = torch.empty_like(x)
    m = torch.empty_like(x, dtype=torch.uint8) if want_mask else None
    bad = _lib().fb_fixed_point(x.data_ptr(), y.data_ptr(), 0 if m is None else m.data_ptr(),
                                x.numel(), lo, hi, inv, delta, _nt())
    return y, m, bad == 0


def min_max(x: Tensor, lo: float, hi: float, scale: float,
            want_code: bool) -> tuple[Tensor, Tensor | None, bool]:
    """``(y, code or None, all finite)``: ``y = round_half_away((clamp(x, lo, hi) - lo) /
    scale) * scale + lo``; ``code`` = 1 where ``x < lo``, 2 where ``x > hi``, else 0 (uint8)."""
    y = torch.empty_like(x)
    m = torch.empty_like(x, dtype=torch.uint8) if want_code else None
    bad = _lib().fb_min_max(x.data_ptr(), y.data_ptr(), 0 if m is None else m.data_ptr(),
                            x.numel(), lo, hi, scale, _nt())
    return y, m, bad == 0


def min_max_grid(rmin: float, rmax: float, ql_min: int, ql_max: int,
                 eps: float) -> tuple[float, float, float]:
    """``(scale, lo, hi)`` of :func:`fewbits._math.min_max_range` for one float32 range, as
    Python floats (the float32 values): the same float32 operations in the same order, each
    argument rounded to float32 first as the tensors there are."""
    out = (ctypes.c_float * 3)()
    _lib().fb_min_max_grid(rmin, rmax, float(ql_min), float(ql_max), eps, out)
    return out[0], out[1], out[2]


def pow2(x: Tensor, bits: tuple[int, int, int, int, int], sign: bool, with_zero: bool,
         want_mask: bool) -> tuple[Tensor, Tensor | None, bool]:
    """``(y, in_range mask or None, all finite)`` of the power-of-two quantizer's float32 bit
    path; ``bits = (limit, thr, round, pmin, pmax)`` from :func:`fewbits._math.pow2_bit_args`."""
    y = torch.empty_like(x)
    m = torch.empty_like(x, dtype=torch.uint8) if want_mask else None
    bad = _lib().fb_pow2(x.data_ptr(), y.data_ptr(), 0 if m is None else m.data_ptr(),
                         x.numel(), *bits, int(sign) | (int(with_zero) << 1), _nt())
    return y, m, bad == 0


def binary_act(x: Tensor, low: float, want_mask: bool,
               zero: float | None = None) -> tuple[Tensor, Tensor | None, bool]:
    """``(y, mask or None, all finite)``: ``y = 1 if x > 0 else low`` (``zero`` where ``x == 0``
    when given: BinaryConnect's ``sign(0)``), ``mask = |x| < 1``."""
    y = torch.empty_like(x)
    m = torch.empty_like(x, dtype=torch.uint8) if want_mask else None
    bad = _lib().fb_binary_act(x.data_ptr(), y.data_ptr(), 0 if m is None else m.data_ptr(),
                               x.numel(), low, low if zero is None else zero, _nt())
    return y, m, bad == 0


def _same_layout(g: Tensor, m: Tensor) -> bool:
    return (g.dtype == torch.float32 and g.shape == m.shape and g.stride() == m.stride()
            and g.device.type == "cpu" and _dense(g) and available())


def keep(g: Tensor, m: Tensor, value: int = 1, scale: float = 1.0) -> Tensor | None:
    """``where(m == value, g * scale, +0.0)`` (``scale`` 1: ``g`` itself), or None when ``g``
    and ``m`` differ in layout (the caller then uses PyTorch)."""
    if not _same_layout(g, m):
        return None
    dx = torch.empty_like(g)
    _lib().fb_keep(g.data_ptr(), m.data_ptr(), dx.data_ptr(), g.numel(), value, scale, 0,
                   _nt())
    return dx


def min_max_grad(g: Tensor, code: Tensor, want_dx: bool,
                 want_sums: bool) -> tuple[Tensor | None, float, float] | None:
    """``(dx or None, sum of g where code == 1, sum where code == 2)`` in one pass (``dx`` keeps
    ``g`` where code == 0); None when the layouts differ."""
    if not _same_layout(g, code):
        return None
    dx = torch.empty_like(g) if want_dx else None
    sums = (ctypes.c_double * 2)()
    _lib().fb_keep(g.data_ptr(), code.data_ptr(), 0 if dx is None else dx.data_ptr(),
                   g.numel(), 0, 1.0, ctypes.addressof(sums) if want_sums else 0, _nt())
    return dx, sums[0], sums[1]
