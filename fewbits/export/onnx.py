"""ONNX export of fewbits networks, and running them in ONNX Runtime.

The network is traced with :mod:`torch.fx` (fewbits layers and quantizers are kept as leaves) and
each node is written as ONNX operators by hand, so that every quantizer becomes the operators that
express it, not whatever a generic exporter makes of its autograd function:
===================  ===========================================================================
quantizer            ONNX form
===================  ===========================================================================
fixed point          weights: int8 (int16 for n <= 16) initializer -> ``DequantizeLinear``
                     (scale ``delta``, zero point 0); activations: ``Clip(+-(2^(n-1)-1) delta)``
                     -> ``QuantizeLinear`` -> ``DequantizeLinear``
min-max              weights and activations: ``QuantizeLinear`` / ``DequantizeLinear`` with the
                     scale and integer zero point of :meth:`fewbits.quantizers.MinMax.grid`
                     (uint8 when ``0 <= ql_min < ql_max <= 255``), preceded by ``Clip(lo, hi)``
                     when ``[ql_min, ql_max]`` is narrower than the integer type
binary (all three)   weights: the binarized float constants (``+-1``, ``+-alpha`` per channel)
binary tanh/sigmoid  ``Where(x > 0, 1, -1)`` / ``Cast(x > 0)``: exact
pow2 / INQ weights   float constants holding the quantized powers of two (exact values; ONNX has no
                     power-of-two integer type)
pow2 activations     an exact subgraph: ``floor(log2|x|)`` from ``Log``, corrected by comparisons
                     with exact powers of two from a table, rounded at ``2^-0.5``, clamped as the
                     spec says (see :func:`_pow2_act`)
===================  ===========================================================================

Numerics. Batch norm, convolutions and sums in ONNX Runtime may round differently from PyTorch in
the last bit. ``QuantizeLinear`` rounds half to even while fewbits rounds half away from zero, and
computes ``round(x / scale) + zp`` where fewbits computes ``round((x - lo) / scale)``; these agree
except at (near-)exact ties. Weight-only families therefore reproduce PyTorch's logits to float
rounding. Families with activation quantizers do too, except where a value lands within that last
bit of a level boundary (or on a tie) and one quantization level flips: a few logits move by up to
a few percent, predictions practically never (``tests/test_onnx.py`` states the bounds and what
was measured on real data).

``fuse=True`` writes the deployment form instead (:mod:`fewbits.export.onnx_qdq`): batch norm
folded into the convolutions (:mod:`fewbits.export.fold`) and the QDQ pattern ONNX Runtime runs
as ``QLinearConv``; faster, equal to PyTorch within a stated tolerance rather than to float
rounding. Grids wider than ``QuantizeLinear``'s types (fixed point above 16 bits, min-max level
ranges beyond int16) use :func:`fewbits.export.onnx_ops.round_half_away`, exact for every
float32 input.

    >>> import tempfile, os
    >>> from fewbits.models import create_model
    >>> m = create_model("mnist_fp_net_mlp", width=32).eval()
    >>> report = export_onnx(m, os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> report.nodes["QuantizeLinear"] > 0
    True
"""

from __future__ import annotations

import operator
import os
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from .._io import atomic_write
from ..layers import QuantAct, QuantConv2d, QuantLinear, quant_layers
from ..models import create_model, is_model, model_info
from ..quantizers import Codes, FixedPoint, MinMax, Quantizer, get
from ._guard import check_input_shape
from .container import decode_tensor, is_packed_file, read_model_file
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
from .packed import load_packed, model_of

__all__ = [
    "DEFAULT_OPSET",
    "OnnxReport",
    "compare_onnx",
    "export_onnx",
    "input_shape_of",
    "onnx_session",
    "resolve_source",
    "to_onnx",
]

DEFAULT_OPSET = 21  # int16 QuantizeLinear and per-axis DequantizeLinear

_LEAVES = (QuantAct, QuantConv2d, QuantLinear)
# modules whose output holds values of their input only: a uint8 grid stays one through them
_ON_GRID = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
_ON_GRID_FUNCTIONS = (torch.flatten, nn.functional.max_pool2d, torch.max_pool2d)


# --------------------------------------------------------------------------- sources

def _file_codes(path: str | os.PathLike, model_spec: dict) -> dict[str, tuple[Quantizer, Codes]]:
    """The stored codes of a ``.fewbits`` file with the quantizer that made them."""
    header, blobs = read_model_file(path)
    if "layers" in header:  # the quantizers that made the codes, as the file records them
        fresh = {n: SimpleNamespace(**{f"{r}_quantizer": get(c) for r, c in cfg.items()})
                 for n, cfg in header["layers"].items()}
    else:
        fresh = dict(quant_layers(create_model(model_spec["name"], **model_spec["kwargs"])))
    params: dict[str, dict[str, Tensor]] = {}
    for t in header["tensors"]:
        if t.get("kind") == "param":
            arr = decode_tensor(t, blobs[t["name"]]).reshape(t["param_shape"])
            params.setdefault(t["param_of"], {})[t["param"]] = torch.from_numpy(arr.copy())
    out: dict[str, tuple[Quantizer, Codes]] = {}
    for t in header["tensors"]:
        if t.get("kind") != "codes":
            continue
        lname, role = t["name"].rsplit(".", 1)
        q = getattr(fresh.get(lname), f"{role}_quantizer", None)
        if q is None:
            continue
        arr = decode_tensor(t, blobs[t["name"]]).astype(np.int64).reshape(-1)
        out[t["name"]] = (q, Codes(torch.from_numpy(arr), t["bits"], tuple(t["shape"]),
                                   params.get(t["name"], {})))
    return out


def resolve_source(source: nn.Module | str | os.PathLike
                   ) -> tuple[nn.Module, dict[str, tuple[Quantizer, Codes]]]:
    """``(model in eval mode, {"layer.weight": (quantizer, codes)})`` for a model, a ``.fewbits``
    file or a run folder / checkpoint.

    Codes are given for the uniform quantizers (fixed point, min-max), whose integer form the ONNX
    graph and the int8 path use; a live model's are computed with ``quantizer.encode``, a packed
    file's are read from it. A model rebuilt by :func:`~fewbits.export.load_packed` has no weight
    quantizers left, so pass the file itself to keep the integer form.
    """
    if is_packed_file(source):
        model = load_packed(source)
        return model, _file_codes(source, read_model_file(source)[0]["model"])

    model = model_of(source).eval()
    codes: dict[str, tuple[Quantizer, Codes]] = {}
    with torch.no_grad():
        for lname, layer in quant_layers(model):
            for role in ("weight", "bias"):
                q, p = getattr(layer, f"{role}_quantizer"), getattr(layer, role)
                if isinstance(q, (FixedPoint, MinMax)) and p is not None:
                    codes[f"{lname}.{role}"] = (q, q.encode(p.detach()))
    return model, codes


def _declared_shape(model: nn.Module) -> tuple[int, int, int] | None:
    spec = getattr(model, "fewbits_spec", None) or {}
    name, kw = spec.get("name", ""), spec.get("kwargs", {})
    return model_info(name).input_shape_for(kw) if is_model(name) else None


def input_shape_of(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` a registered model takes, as its registration declares."""
    shape = _declared_shape(model)
    if shape is not None:
        return shape
    name = (getattr(model, "fewbits_spec", None) or {}).get("name")
    raise ValueError(f"cannot tell the input shape of model {name or type(model).__name__!r}; "
                     "pass input_shape=(C, H, W) (on the command line: --input-shape C,H,W)")


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
           report: OnnxReport) -> str:
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
            report: OnnxReport) -> str:
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


# --------------------------------------------------------------------------- public API

@dataclass
class OnnxReport:
    """What :func:`export_onnx` wrote: operator counts and the form of every quantized tensor."""

    path: str
    model: str
    opset: int
    file_bytes: int = 0
    nodes: dict[str, int] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    activations: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        forms = Counter(self.weights.values())
        acts = Counter(self.activations.values())
        lines = [f"{self.model} -> {self.path} (opset {self.opset}, {self.file_bytes:,} bytes)",
                 "weights:     " + "; ".join(f"{n} x {k}" for k, n in sorted(forms.items())),
                 "activations: " + ("; ".join(f"{n} x {k}" for k, n in sorted(acts.items()))
                                    or "float"),
                 "operators:   " + ", ".join(f"{k} {n}" for k, n in sorted(self.nodes.items()))]
        return "\n".join(lines)


def to_onnx(source: nn.Module | str | os.PathLike, *, opset: int = DEFAULT_OPSET,
            input_shape: tuple[int, int, int] | None = None,
            fuse: bool | str = False, checked_sums: bool = False) -> tuple[Any, OnnxReport]:
    """Build the ``onnx.ModelProto`` of ``source`` (see the module doc) without writing it.

    The graph has one input ``images`` (float32, ``(N, C, H, W)``, ``N`` dynamic, values in
    ``[0, 1]``) and one output ``logits``. ``fuse=True`` folds batch norm and writes the QDQ
    pattern ONNX Runtime fuses into integer convolutions (:mod:`fewbits.export.onnx_qdq`):
    faster, equal to PyTorch within the tolerance stated there instead of float rounding;
    ``fuse="openvino"`` writes the bounds of each quantizer as float clamps before its
    ``QuantizeLinear``, the pattern OpenVINO fuses (same codes). ``checked_sums=True`` also
    writes ``relu(a + b)`` of two uint8 grids of one scale (fixed-point residual sums) as a
    uint8 sum, exact unless it saturates at code 255, and adds the output ``sum_peak`` (the
    largest such code): a caller must recompute a batch whose ``sum_peak`` is 255 with the
    unchecked graph (:func:`fewbits.runtime.ort.ort_runner` does).
    """
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the onnx extra is installed in dev
        raise ImportError("ONNX export needs the onnx package: pip install 'fewbits[onnx]'") \
            from e
    if not 1 <= opset <= onnx.defs.onnx_opset_version():  # the checker does not bound it
        raise ValueError(f"opset {opset} is not one this onnx package knows (1 to "
                         f"{onnx.defs.onnx_opset_version()}); the default is {DEFAULT_OPSET}")
    model, codes = resolve_source(source)
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(model)
    declared = _declared_shape(model)
    spec = getattr(model, "fewbits_spec", {"name": type(model).__name__})
    if input_shape is not None and declared not in (None, shape):
        raise ValueError(f"model {spec['name']!r} takes {declared} images, not input_shape="
                         f"{shape}; drop input_shape (on the command line: --input-shape)")
    report = OnnxReport("", spec["name"], opset)
    graph = _trace(model)
    modules = dict(model.named_modules())
    g = Graph()
    env: dict[str, str] = {}
    out_name = None
    chains = plan_chains(model.eval(), graph, codes) if fuse else {}
    folded = {n for c in chains.values() for n in c.nodes}
    u8: dict[str, Any] = {}  # ONNX tensors that are uint8 DequantizeLinear outputs: their grid
    peaks: list[str] = []  # uint8 maxima of the checked residual sums
    if checked_sums and not fuse:
        raise ValueError("checked_sums=True needs fuse=True")

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
    if declared is None:  # the model must run on the given shape, else the graph fails later
        check_input_shape(model, shape, spec["name"])
    g.nodes.append(g.h.make_node("Identity", [out_name], ["logits"], name="logits"))
    h = g.h
    outputs = [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", None])]
    if peaks:
        g.nodes.append(h.make_node("Max", peaks, [SUM_PEAK], name=SUM_PEAK))
        outputs.append(h.make_tensor_value_info(SUM_PEAK, onnx.TensorProto.UINT8, []))
    graph_proto = h.make_graph(
        g.nodes, spec["name"],
        [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", *shape])],
        outputs, g.inits)
    proto = h.make_model(graph_proto, opset_imports=[h.make_opsetid("", opset)],
                         producer_name="fewbits")
    proto.ir_version = min(proto.ir_version, 10)  # what current ONNX Runtime builds accept
    proto.doc_string = f"fewbits model {spec['name']}; input: images in [0, 1]"
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:  # an operator or type the opset does not have
        raise ValueError(f"the graph is not valid ONNX at opset {opset} ({str(e).splitlines()[0]}"
                         f"); export with opset {DEFAULT_OPSET}, the default") from None
    report.nodes = dict(Counter(n.op_type for n in proto.graph.node))
    return proto, report


def export_onnx(source: nn.Module | str | os.PathLike, path: str | os.PathLike, *,
                opset: int = DEFAULT_OPSET,
                input_shape: tuple[int, int, int] | None = None,
                fuse: bool | str = False) -> OnnxReport:
    """Write ``source`` (model, ``.fewbits`` file, run folder or checkpoint) as ONNX to ``path``.

    Atomic write; returns an :class:`OnnxReport`. See the module doc for each quantizer's form.
    """
    proto, report = to_onnx(source, opset=opset, input_shape=input_shape, fuse=fuse)
    data = proto.SerializeToString()
    path = os.fspath(path)
    atomic_write(path, data)
    report.path, report.file_bytes = path, len(data)
    return report


def onnx_session(model: Any, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for a path, bytes or ``ModelProto``."""
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    so = ort.SessionOptions()
    # Idle workers sleep instead of spinning: spinning threads steal the cores from whatever
    # runs next (PyTorch, in a benchmark that interleaves both).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def compare_onnx(source: nn.Module | str | os.PathLike, onnx_model: Any,
                 images: Tensor) -> dict[str, float]:
    """Run ``images`` (float ``[0, 1]``) through PyTorch and ONNX Runtime; return
    ``{"max_abs": max |logit difference|, "max_rel": max_abs / max |logit|,
    "top1_agreement": fraction of equal argmax}``."""
    model, _ = resolve_source(source)
    with torch.no_grad():
        ref = model(images).float()
    got = torch.from_numpy(onnx_session(onnx_model).run(
        None, {"images": images.float().numpy()})[0])
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    return {"max_abs": diff, "max_rel": diff / scale if scale else diff,
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean())}
