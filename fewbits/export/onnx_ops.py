"""The node builder of the fused ONNX pass (:mod:`fewbits.export.onnx_fuse`) and fewbits' fix of
one PyTorch translation (``aten.avg_pool2d``'s ``divisor_override``).

A quantizer's nodes are its family's own (:meth:`fewbits.quantizers.Quantizer.onnx_act`, written
over an op namespace; :class:`GraphOps` is that namespace on a :class:`Graph`), so this module
knows no family: a weight's integer form is its codes' affine form
(:meth:`~fewbits.quantizers.Quantizer.affine`), its description the family's ``weight_form``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ops.onnx_form import INT_TYPES, int_type
from ..quantizers import Codes, Quantizer

__all__ = [
    "ATEN_FIXES",
    "INT_TYPES",
    "Graph",
    "GraphOps",
    "avg_pool2d",
    "codes_reproduce",
    "describe_constant",
    "int_type",
    "matmul_inputs",
    "pair",
    "weight_input",
]


def pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------- graph builder

class Graph:
    """Collects ONNX nodes and initializers with unique names (none of ``taken``)."""

    def __init__(self, taken: set[str] | None = None) -> None:
        from onnx import helper, numpy_helper

        self.h, self.nh = helper, numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = Counter()
        self._taken = set(taken or ())  # names of the graph the new nodes join

    def name(self, base: str) -> str:
        base = base.replace(".", "_") or "t"
        while True:
            self._n[base] += 1
            name = base if self._n[base] == 1 else f"{base}_{self._n[base]}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        arr = np.asarray(value.detach().cpu().numpy() if isinstance(value, Tensor) else value)
        name = self.name(base)
        # ascontiguousarray makes 0-d arrays 1-d: keep scalars scalar (ONNX Runtime fuses QDQ
        # pairs only with scalar scales and zero points)
        data = np.ascontiguousarray(arr.astype(dtype)).reshape(arr.shape)
        self.inits.append(self.nh.from_array(data, name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


class GraphOps:
    """The op namespace of :mod:`fewbits.ops.onnx_form` on a :class:`Graph`: ``ops.Abs(x)``
    adds an ``Abs`` node (named after ``base``) and returns its output name,
    ``ops.Constant(value=t)`` an initializer. What a family's
    :meth:`~fewbits.quantizers.Quantizer.onnx_act` writes the fused graph with."""

    def __init__(self, g: Graph, base: str) -> None:
        self._g, self._base = g, base

    def Constant(self, value: Any) -> str:
        arr = np.asarray(value.numpy())
        return self._g.const(self._base + "_c", arr, arr.dtype)

    def __getattr__(self, op_type: str) -> Any:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)

        def node(*inputs: str, **attrs: Any) -> str:
            return self._g.op(op_type, list(inputs), f"{self._base}_{op_type.lower()}", **attrs)
        return node


# --------------------------------------------------------------------------- weights

def weight_input(g: Graph, key: str, value: Tensor,
                  coded: tuple[Quantizer, Codes] | None) -> tuple[str, str]:
    """The ONNX input for a quantized layer's weight/bias and a description of its form."""
    if coded is not None:
        q, c = coded
        a = q.affine(c)  # uniform grids only: scale, zero point and integer bounds
        kind = int_type(a.qmin, a.qmax) if a is not None else None
        if a is not None and kind is not None:
            int_dtype = INT_TYPES[kind][1]
            ints = g.const(key + "_q", a.int_repr.numpy(), int_dtype)
            s = g.const(key + "_scale", a.scale.float().numpy())
            z = g.const(key + "_zp", a.zero_point.numpy(), int_dtype)
            attrs = {"axis": a.axis} if a.axis is not None else {}
            return (g.op("DequantizeLinear", [ints, s, z], key, **attrs),
                    f"{kind} DequantizeLinear" + (" per channel" if a.axis is not None else ""))
    return g.const(key, value.detach().float()), "float constant"


#: Operators that only move values: a weight read through them is still that weight.
_MOVING = ("Transpose", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze")


def codes_reproduce(coded: tuple[Quantizer, Codes], value: Tensor) -> bool:
    """Whether ``DequantizeLinear`` of the codes' affine form (``(int_repr - zero_point) *
    scale``, float32) gives ``value``, the weight PyTorch computes (to 1e-3 of a step): a family
    whose codes follow another layout than its forward (a channel axis other than 0) must not
    put other weights in the graph. True where there is no affine form (a float constant)."""
    a = coded[0].affine(coded[1])
    if a is None:
        return True
    s, z = a.scale.float(), a.zero_point
    if a.axis is not None:
        view = [1] * a.int_repr.dim()
        view[a.axis] = -1
        if a.int_repr.dim() == 0 or s.numel() != a.int_repr.shape[a.axis]:
            return False
        s, z = s.reshape(view), z.reshape(view)
    deq = (a.int_repr - z).float() * s
    # float rounding of the grid (a few ulps) passes; a misplaced scale moves whole steps
    return deq.shape == value.shape and bool(((deq - value).abs() <= 1e-3 * s.abs()).all())


def matmul_inputs(nodes: list[Any]) -> set[str]:
    """The tensors that reach a ``MatMul`` through ``Transpose`` / ``Reshape`` / ... only (a
    linear layer's weight on a 3-d input)."""
    readers: dict[str, list[Any]] = {}
    for n in nodes:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    found: set[str] = set()
    for t in list(readers):
        todo, seen = [t], {t}
        while todo:
            for n in readers.get(todo.pop(), []):
                if n.op_type == "MatMul":
                    found.add(t)
                elif n.op_type in _MOVING:
                    todo += [o for o in n.output[:1] if o not in seen]
                    seen.update(n.output[:1])
    return found


def describe_constant(q: Quantizer | None, default: str) -> str:
    """The family's ``weight_form`` where it declares one, else ``default``."""
    return (q.weight_form if q is not None else "") or default


# --------------------------------------------------------------------------- PyTorch exporter fixes

def avg_pool2d(x: Any, kernel_size: Any, stride: Any = (), padding: Any = (0, 0),
               ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Any:
    """ONNX translation of ``aten.avg_pool2d`` for PyTorch's exporter, whose own translation
    drops ``divisor_override`` (a silently wrong plain average). With it: the window sums as a
    depthwise convolution with a kernel of ones (zero padding), divided by the divisor -- equal
    to PyTorch to float rounding (the sum's order). Without it: PyTorch's translation."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.nn import aten_avg_pool2d

    if divisor_override is None:
        return aten_avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    if ceil_mode:
        raise ValueError("avg_pool2d(divisor_override=..., ceil_mode=True) has no exact ONNX form "
                         "in fewbits' exporter; use ceil_mode=False")
    kh, kw = pair(kernel_size)
    sh, sw = pair(stride) if stride else (kh, kw)
    ph, pw = pair(padding)
    shape = getattr(x, "shape", None)
    channels = shape[1] if shape is not None and len(shape) == 4 else None
    if not isinstance(channels, int):
        raise ValueError("avg_pool2d(divisor_override=...) needs a static channel count to export")
    import onnx_ir as ir

    ones = op.Constant(value=ir.tensor(np.ones((channels, 1, kh, kw), np.float32)))
    s = op.Conv(x, ones, group=channels, kernel_shape=[kh, kw], strides=[sh, sw],
                pads=[ph, pw, ph, pw])
    return op.Div(s, op.Constant(value=ir.tensor(np.float32(divisor_override))))


#: PyTorch operator -> fewbits' translation, where PyTorch's own is wrong.
ATEN_FIXES: dict[Any, Any] = {torch.ops.aten.avg_pool2d.default: avg_pool2d}
