"""The fused ONNX form's graph walker (``to_onnx(..., fuse=True)``): the network is traced with
:mod:`torch.fx` (fewbits layers and quantizers kept as leaves) and each node written as ONNX
operators (:mod:`fewbits.export.onnx_ops`), with the chains of :mod:`fewbits.export.onnx_qdq`
(batch norm folded, integer weights, the QDQ pattern ONNX Runtime runs as ``QLinearConv``).

The plain form does not use it: :func:`fewbits.export.onnx.to_onnx` runs PyTorch's exporter with
the exact translations each family declares
(:func:`fewbits.quantizers.base.family_translations`). This walker covers the networks of the
zoo and plain CNNs ``torch.fx`` can trace (one image input, one logits output); anything else raises
``ValueError`` naming the node.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..layers import QuantAct, QuantConv2d, QuantLinear
from .onnx_ops import (
    Graph,
    act,
    as_function,
    describe_constant,
    float_module_op,
    function_op,
    layer_op,
    weight_input,
)
from .onnx_qdq import SUM_PEAK, checked_sum, emit_chain, plan_chains, requantize

__all__ = ["fused_graph"]

_LEAVES = (QuantAct, QuantConv2d, QuantLinear)
# modules whose output holds values of their input only: a uint8 grid stays one through them
_ON_GRID = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_ON_GRID_FUNCTIONS = (torch.flatten, nn.functional.max_pool2d, torch.max_pool2d)


# --------------------------------------------------------------------------- tracing

class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as e:  # fx raises many kinds for data-dependent control flow
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx for export: {e}; "
                         "the forward must not branch on tensor values") from e


# --------------------------------------------------------------------------- nodes

def _layer(g: Graph, name: str, m: nn.Module, x: str, codes: dict,
           report: Any) -> str:
    is_q = isinstance(m, (QuantConv2d, QuantLinear))
    if is_q:
        x, how = act(g, x, m.input_quantizer, name + "_in")
        if how:
            report.activations[name + ".input"] = how
    w_q = getattr(m, "weight_quantizer", None)
    with torch.no_grad():
        w_val = m.quantized_weight() if is_q else m.weight
        b_val = (m.quantized_bias() if is_q else m.bias)
    coded = codes.get(f"{name}.weight")
    w, how = weight_input(g, name + "_weight", w_val, coded)
    report.weights[name + ".weight"] = describe_constant(coded[0] if coded else w_q, how)
    ins = [x, w]
    if b_val is not None:
        coded = codes.get(f"{name}.bias")
        b, how = weight_input(g, name + "_bias", b_val, coded)
        report.weights[name + ".bias"] = describe_constant(
            coded[0] if coded else getattr(m, "bias_quantizer", None), how)
        ins.append(b)
    y = layer_op(g, name, m, ins)
    if is_q:
        y, how = act(g, y, m.output_quantizer, name + "_out")
        if how:
            report.activations[name + ".output"] = how
    return y


def _module(g: Graph, name: str, m: nn.Module, x: str, codes: dict,
            report: Any) -> str:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return _layer(g, name, m, x, codes, report)
    if isinstance(m, QuantAct):
        y, how = act(g, x, m.quantizer, name)
        if how:
            report.activations[name] = how
        return y
    return float_module_op(g, name, m, x)


def _relu_of_sum(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The ReLU node that is the only user of the two-tensor sum ``node``, or None."""
    if node.target not in (operator.add, torch.add) or len(node.args) != 2 or node.kwargs:
        return None
    if len(node.users) != 1:
        return None
    u = next(iter(node.users))
    if u.op == "call_module" and isinstance(modules.get(str(u.target)), nn.ReLU):
        return u
    return u if u.op == "call_function" and u.target in (torch.relu, nn.functional.relu) \
        and len(u.args) == 1 and not u.kwargs else None



def fused_graph(model: nn.Module, codes: dict, report: Any, shape: tuple[int, ...], opset: int,
                fuse: bool | str, checked_sums: bool, name: str) -> Any:
    """The fused ``onnx.ModelProto`` of ``model`` (input ``images``, output ``logits``); fills
    ``report`` (an :class:`fewbits.export.onnx.OnnxReport`)."""
    import onnx

    graph = _trace(model)
    modules = dict(model.named_modules())
    g = Graph()
    env: dict[str, str] = {}
    out_name = None
    chains = plan_chains(model.eval(), graph, codes) if fuse else {}
    folded = {n for c in chains.values() for n in c.nodes}
    u8: dict[str, Any] = {}  # ONNX tensors that are uint8 DequantizeLinear outputs: their grid
    peaks: list[str] = []  # uint8 maxima of the checked residual sums

    def arg(a: Any) -> Any:
        return env[a.name] if isinstance(a, fx.Node) else a

    was_training = model.training
    model.eval()
    try:
        for node in graph.nodes:
            if node.op == "placeholder":
                if env:
                    raise ValueError("only single-input models can be exported")
                env[node.name] = "images"
            elif node.name in folded:
                continue  # written with its layer
            elif node.name in chains:
                c = chains[node.name]
                x = arg(node.args[0])
                y, grid, how = emit_chain(g, c, modules[node.target], x, u8.get(x),
                                          clamp_codes=fuse != "openvino")
                report.weights[c.layer + ".weight"] = how
                env[node.name] = env[c.last] = y
                if grid is not None:
                    u8[y] = grid
            elif node.op == "call_module":
                if node.kwargs or len(node.args) != 1:
                    raise ValueError(f"{node.target}: modules must take one tensor")
                x = arg(node.args[0])
                y = env[node.name] = _module(g, str(node.target), modules[node.target], x,
                                             codes, report)
                if x in u8 and isinstance(modules[node.target], _ON_GRID):
                    env[node.name] = requantize(g, y, u8[x], y) if y != x else y
                    u8[env[node.name]] = u8[x]
            elif node.op == "call_function" and checked_sums and \
                    _relu_of_sum(node, modules) is not None and \
                    all(arg(a) in u8 for a in node.args) and \
                    u8[arg(node.args[0])][0] == u8[arg(node.args[1])][0]:
                relu = _relu_of_sum(node, modules)
                y, grid, peak = checked_sum(g, [arg(a) for a in node.args],
                                            u8[arg(node.args[0])][0], node.name)
                env[node.name] = env[relu.name] = y
                u8[y] = grid
                folded.add(relu.name)
                peaks.append(peak)
            elif node.op in ("call_function", "call_method"):
                x = arg(node.args[0]) if node.args else None
                env[node.name] = function_op(g, node, [arg(a) for a in node.args])
                if x in u8 and as_function(node) in _ON_GRID_FUNCTIONS:
                    env[node.name] = requantize(g, env[node.name], u8[x], env[node.name])
                    u8[env[node.name]] = u8[x]
            elif node.op == "output":
                out_name = arg(node.args[0])
            else:
                raise ValueError(f"node {node.name} ({node.op} {node.target}) has no ONNX form")
    finally:
        model.train(was_training)
    if not isinstance(out_name, str):
        raise ValueError("the model must return one tensor (the logits)")
    g.nodes.append(g.h.make_node("Identity", [out_name], ["logits"], name="logits"))
    h = g.h
    outputs = [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", None])]
    if peaks:
        g.nodes.append(h.make_node("Max", peaks, [SUM_PEAK], name=SUM_PEAK))
        outputs.append(h.make_tensor_value_info(SUM_PEAK, onnx.TensorProto.UINT8, []))
    graph_proto = h.make_graph(
        g.nodes, name,
        [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", *shape])],
        outputs, g.inits)
    proto = h.make_model(graph_proto, opset_imports=[h.make_opsetid("", opset)],
                         producer_name="fewbits")
    proto.ir_version = min(proto.ir_version, 10)  # what current ONNX Runtime builds accept
    proto.doc_string = f"fewbits model {name}; input: images in [0, 1]"
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:  # an operator or type the opset does not have
        raise ValueError(f"the graph is not valid ONNX at opset {opset} ({str(e).splitlines()[0]}"
                         "); export with the default opset") from None
    report.nodes = dict(Counter(n.op_type for n in proto.graph.node))
    return proto
