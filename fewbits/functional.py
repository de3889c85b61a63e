"""Straight-through quantizer functions: the nine families' forward and backward.

Each public function validates its arguments and calls the family's custom operator
(:mod:`fewbits.ops`, ``torch.ops.fewbits.*``), whose forward is the formula of
``docs/QUANTIZERS.md`` (see :mod:`fewbits._math`; float16/bfloat16 decided in float32),
refuses non-finite input (see :func:`finite_checks`), and whose backward is the
straight-through estimator (STE) of the spec.
Backward passes keep only a ``uint8`` mask per element, never a float copy of the input. Under
``torch.onnx.export`` they raise, naming fewbits' own exporter.

Each function lives with its family's operator (``fewbits.ops.binary``,
``fewbits.ops.fixed_point_op``, ``fewbits.ops.pow2_op``, ``fewbits.ops.inq_op``,
``fewbits.ops.min_max_op``); this module gathers them where users look.

Example:
    >>> import torch
    >>> from fewbits.functional import fixed_point_quantize
    >>> fixed_point_quantize(torch.tensor([0.125, -0.375, 9.0]), n=4, delta=0.25)
    tensor([ 0.2500, -0.5000,  1.7500])
"""

from __future__ import annotations

from ._checks import finite_checks
from .ops.binary import (
    binary_connect,
    binary_sigmoid,
    binary_tanh,
    binary_weight,
    binary_weight_scale,
)
from .ops.fixed_point_op import fixed_point_quantize
from .ops.inq_op import inq_levels, inq_quantize
from .ops.min_max_op import min_max_grid, min_max_quantize
from .ops.pow2_op import pow2_quantize

__all__ = [
    "binary_connect",
    "binary_sigmoid",
    "binary_tanh",
    "binary_weight",
    "binary_weight_scale",
    "finite_checks",
    "fixed_point_quantize",
    "inq_levels",
    "inq_quantize",
    "min_max_grid",
    "min_max_quantize",
    "pow2_quantize",
]
