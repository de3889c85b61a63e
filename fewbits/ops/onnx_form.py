"""The building blocks a quantizer family's ONNX form is written with, over an *op namespace*.

A family writes its ONNX form once, as a function of ``op`` (an object whose attributes are ONNX
operators: ``op.Abs(x)``, ``op.Cast(t, to=1)``, ``op.Constant(value=...)``) and the input value.
PyTorch's exporter passes ONNX Script's ``opset18`` (:mod:`fewbits.ops.onnx`, the plain export);
the fused QDQ writer passes an adapter of its own graph (:class:`fewbits.export.onnx_ops.GraphOps`).
So the same nodes, with the same constants, reach both graphs: one place for each formula.

This module imports only NumPy (``onnx_ir``, for constants, when a constant is made), so a family's
module can import it at any time.

    >>> int_type(0, 255), int_type(-127, 127), int_type(0, 70000)
    ('uint8', 'int8', None)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["INT_TYPES", "const", "int_type", "qdq", "qdq_type", "round_half_away"]

#: ONNX quantized integer type -> (ONNX data type, NumPy dtype, min, max).
INT_TYPES = {
    "uint8": (2, np.uint8, 0, 255), "int8": (3, np.int8, -128, 127),
    "uint16": (4, np.uint16, 0, 65535), "int16": (5, np.int16, -32768, 32767),
}


def int_type(lo: int, hi: int) -> str | None:
    """Smallest ONNX quantized integer type holding ``[lo, hi]``, or ``None``."""
    for name in ("uint8", "int8", "uint16", "int16"):
        _, _, tmin, tmax = INT_TYPES[name]
        if tmin <= lo and hi <= tmax:
            return name
    return None


def const(op: Any, value: Any, dtype: Any = np.float32) -> Any:
    """An exact constant node: ``np.asarray(value, dtype)`` (a scalar stays 0-d)."""
    import onnx_ir as ir

    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


def round_half_away(op: Any, v: Any) -> Any:
    """ONNX form of :func:`fewbits._math.round_half_away`, exact for every float32 ``v``:
    ``r = Round(|v|)`` (half to even, exact) plus 1 where ``|v| - r == 0.5`` (exact: ``r`` is
    within 0.5 of ``|v|``), with the sign of ``v``. Not ``Floor(|v| + 0.5)``: that sum rounds,
    so ``0.49999997 -> 1`` and odd integers above ``2^23`` move by one."""
    a = op.Abs(v)
    r = op.Round(a)
    r = op.Add(r, op.Cast(op.Equal(op.Sub(a, r), const(op, 0.5)), to=1))
    return op.Where(op.Less(v, const(op, 0.0)), op.Neg(r), r)


def qdq_type(kind: str) -> str:
    """The integer type :func:`qdq` writes a grid of type ``kind`` as (int8 -> uint8)."""
    return "uint8" if kind == "int8" else kind


def qdq(op: Any, x: Any, scale: float, zero_point: int, kind: str) -> Any:
    """``DequantizeLinear(QuantizeLinear(x))`` on the per-tensor grid ``(scale, zero_point)``
    of integer type ``kind`` (scalar scale and zero point: what ONNX Runtime fuses). An int8 grid
    is written as uint8 with the zero point moved up by 128 (the same codes shifted, the same
    values and saturation): ONNX Runtime's default optimisations (QDQ propagation through a
    ``Reshape``) make a graph it refuses to load out of int8 activations (``output_dtype INT8
    does not match y_zero_point type UINT8``). The type written: :func:`qdq_type`."""
    if kind == "int8":
        kind, zero_point = "uint8", zero_point + 128
    s = const(op, np.float32(scale))
    z = const(op, np.array(zero_point), INT_TYPES[kind][1])
    return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)
