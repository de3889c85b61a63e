"""The graph builder of the fused ONNX form and the ONNX forms of float modules and functions.

A quantizer's nodes are its family's own (:meth:`fewbits.quantizers.Quantizer.onnx_act`, written
over an op namespace; :class:`GraphOps` is that namespace on a :class:`Graph`), so this module
knows no family: a weight's integer form is its codes' affine form
(:meth:`~fewbits.quantizers.Quantizer.affine`), its description the family's ``weight_form``.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..ops.onnx_form import INT_TYPES, int_type
from ..quantizers import Codes, Quantizer

__all__ = [
    "ATEN_FIXES",
    "INT_TYPES",
    "Graph",
    "GraphOps",
    "act",
    "as_function",
    "avg_pool2d",
    "describe_constant",
    "float_module_op",
    "function_op",
    "int_type",
    "layer_op",
    "pair",
    "weight_input",
]


def pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def layer_op(g: Graph, name: str, m: nn.Module, ins: list[str]) -> str:
    """``Conv`` (numeric zero padding) or ``Gemm`` (``transB``) of layer ``m`` on ``ins``."""
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"{name}: only numeric zero padding can be exported "
                             f"(got padding={m.padding!r}, padding_mode={m.padding_mode!r})")
        ph, pw = pair(m.padding)
        return g.op("Conv", ins, name, kernel_shape=list(pair(m.kernel_size)),
                    strides=list(pair(m.stride)), pads=[ph, pw, ph, pw],
                    dilations=list(pair(m.dilation)), group=m.groups)
    return g.op("Gemm", ins, name, transB=1)

# --------------------------------------------------------------------------- graph builder

class Graph:
    """Collects ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.h, self.nh = helper, numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = Counter()

    def name(self, base: str) -> str:
        base = base.replace(".", "_") or "t"
        self._n[base] += 1
        return base if self._n[base] == 1 else f"{base}_{self._n[base]}"

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


def describe_constant(q: Quantizer | None, default: str) -> str:
    """The family's ``weight_form`` where it declares one, else ``default``."""
    return (q.weight_form if q is not None else "") or default


# --------------------------------------------------------------------------- activations

def act(g: Graph, x: str, q: Quantizer | None, base: str) -> tuple[str, str | None]:
    """``(output, description)`` of activation quantizer ``q`` on ``x``: the nodes its family
    writes (:meth:`~fewbits.quantizers.Quantizer.onnx_act`); errors name ``base``."""
    if q is None:
        return x, None
    try:
        return q.onnx_act(GraphOps(g, base), x)
    except ValueError as e:
        raise ValueError(f"{base}: {e}") from None


# --------------------------------------------------------------------------- float operations

def float_module_op(g: Graph, name: str, m: nn.Module, x: str) -> str:
    """The ONNX form of a float module (batch norm, ReLU, pooling, flatten, identity) applied
    to ``x``; ``ValueError`` naming any other module."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.running_mean is None:
            raise ValueError(f"{name}: batch norm without running statistics cannot be exported")
        c = m.num_features
        gamma = m.weight if m.affine else torch.ones(c)
        beta = m.bias if m.affine else torch.zeros(c)
        ins = [x, g.const(name + "_gamma", gamma), g.const(name + "_beta", beta),
               g.const(name + "_mean", m.running_mean), g.const(name + "_var", m.running_var)]
        return g.op("BatchNormalization", ins, name, epsilon=float(m.eps))
    if isinstance(m, nn.ReLU):
        return g.op("Relu", [x], name)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise ValueError(f"{name}: MaxPool2d(return_indices=True) has no ONNX form in "
                             "fewbits' exporter")
        return _max_pool(g, name, x, m.kernel_size, m.stride, m.padding, m.dilation,
                         m.ceil_mode)
    if isinstance(m, nn.AvgPool2d):
        ph, pw = pair(m.padding)
        stride = m.stride if m.stride is not None else m.kernel_size
        return g.op("AveragePool", [x], name, kernel_shape=list(pair(m.kernel_size)),
                    strides=list(pair(stride)), pads=[ph, pw, ph, pw],
                    ceil_mode=int(m.ceil_mode), count_include_pad=int(m.count_include_pad))
    if isinstance(m, nn.AdaptiveAvgPool2d) and pair(m.output_size) == (1, 1):
        return g.op("GlobalAveragePool", [x], name)
    if isinstance(m, nn.Flatten) and m.end_dim == -1:
        return g.op("Flatten", [x], name, axis=m.start_dim)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return x
    raise ValueError(f"{name}: module {type(m).__name__} has no ONNX form in fewbits' exporter")


def _max_pool(g: Graph, name: str, x: str, kernel: Any, stride: Any, padding: Any,
              dilation: Any, ceil_mode: bool) -> str:
    ph, pw = pair(padding)
    stride = stride if stride not in (None, ()) else kernel  # PyTorch: stride defaults to kernel
    return g.op("MaxPool", [x], name, kernel_shape=list(pair(kernel)),
                strides=list(pair(stride)), pads=[ph, pw, ph, pw],
                dilations=list(pair(dilation)), ceil_mode=int(ceil_mode))


_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                  "return_indices")


#: Tensor methods the exporter reads as the function of the same name (``x.flatten(1)``).
_METHODS = {"flatten": torch.flatten, "relu": torch.relu, "add": torch.add}


def as_function(node: Any) -> Any:
    """The function a ``call_function`` or ``call_method`` node of :mod:`torch.fx` computes
    (methods take their tensor as the first argument, as the function does)."""
    return _METHODS.get(node.target, node.target) if node.op == "call_method" else node.target


def function_op(g: Graph, node: Any, args: list[Any]) -> str:
    """The ONNX form of a function or tensor-method node of :mod:`torch.fx` on ``args`` (ONNX
    names); ``ValueError`` naming any other operation."""
    fn, kw = as_function(node), node.kwargs
    if fn in (nn.functional.max_pool2d, torch.max_pool2d):
        a = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
             "return_indices": False, **dict(zip(_MAX_POOL_ARGS, args, strict=False)), **kw}
        if not a["return_indices"]:
            return _max_pool(g, node.name, a["input"], a["kernel_size"], a["stride"],
                             a["padding"], a["dilation"], a["ceil_mode"])
    if fn in (operator.add, torch.add) and len(args) == 2 and not kw:
        return g.op("Add", args, node.name)
    if fn in (torch.flatten,):
        start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
        if end == -1:
            return g.op("Flatten", [args[0]], node.name, axis=int(start))
    if fn in (nn.functional.relu, torch.relu):
        return g.op("Relu", [args[0]], node.name)
    if fn is nn.functional.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else kw.get("output_size")
        if pair(size) == (1, 1):
            return g.op("GlobalAveragePool", [args[0]], node.name)
    raise ValueError(f"operation {getattr(fn, '__name__', fn)!r} (node {node.name}) has no ONNX "
                     "form in fewbits' exporter")


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
