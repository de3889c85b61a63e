"""ONNX export of fewbits networks (and of any model ``quantize_`` converted), and running them
in ONNX Runtime.

The plain form is PyTorch's own exporter, ``torch.onnx.export(model, args, dynamo=True,
custom_translation_table=onnx_translations())``: every standard operator is PyTorch's
translation, each fewbits operator the exact ONNX function its family declares (ties away
from zero, thresholds, grids bit for bit as PyTorch's). Quantized weights are float constants
holding their exact levels. Any model ``torch.export`` captures exports (images, token ids,
several or keyword inputs, outputs of any structure, flattened in order). The exporter's
``optimize`` pass (it folds batch norm across binary thresholds) is not run.

Graphs a runtime cannot silently change: ONNX Runtime's default optimisations fuse batch norm
into the convolution before it, which moves values across a binary activation's threshold. Each
``sign(batch_norm(x))`` (and ``sign(batch_norm(x) + s)`` with ``s`` a binary activation, the
residual sums of binary nets) is therefore written as per-channel threshold comparisons on ``x``
(:func:`fewbits.export.onnx_qdq.fold_binary_thresholds`): no batch norm is left to fuse, and on
binary networks ``x`` is a sum of +-1 products, an exact integer whatever the convolution
algorithm. Predictions are then the same at every ONNX Runtime optimisation level
(``tests/test_onnx_models.py``).

``fuse=True`` writes the deployment form: a pass over this export (:mod:`.onnx_fuse`) folds
batch norm into the convolutions (:mod:`.fold`), stores integer weights and writes ONNX
Runtime's QDQ (``QLinearConv``), equal to PyTorch within a stated tolerance, for every model the
plain form takes; ``OnnxReport.notes`` lists what it leaves plain (exact).

Every graph :func:`to_onnx` returns (either form) was run by ONNX Runtime at its default
optimisations on the example input and matched PyTorch within the planner's tolerance and
top-1 (:func:`fewbits.export.onnx_run.check_graph`), else it raises: no graph pass can be
silently wrong on that input. ``check=False`` skips it.

    >>> import tempfile, os
    >>> from fewbits.models import create_model
    >>> m = create_model("mnist_fp_net_mlp", width=32).eval()
    >>> report = export_onnx(m, os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> report.nodes["Round"] > 0
    True
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import translated_onnx_export
from .._io import atomic_write
from ..layers import QuantLayer, quant_layers
from ..models import create_model, is_model, model_info
from ..quantizers import Codes, Quantizer, get
from ..quantizers.base import family_translations
from ._guard import check_input_shape
from .container import decode_tensor, is_packed_file, read_model_file
from .onnx_fuse import fuse_graph
from .onnx_ops import ATEN_FIXES
from .onnx_qdq import fold_binary_thresholds, prune_unused
from .onnx_run import check_graph, onnx_feed, onnx_session, run_onnx
from .packed import load_packed, model_of

__all__ = [
    "DEFAULT_OPSET",
    "OnnxReport",
    "ResolvedSource",
    "cached_exporter_registry",
    "compare_onnx",
    "export_onnx",
    "input_shape_of",
    "modes_kept",
    "onnx_feed",
    "onnx_session",
    "onnx_translations",
    "resolve_source",
    "run_onnx",
    "to_onnx",
    "to_onnx_forms",
]

DEFAULT_OPSET = 21  # int16 QuantizeLinear and per-axis DequantizeLinear

# --------------------------------------------------------------------------- sources

def _file_codes(contents: tuple[dict, dict]) -> dict[str, tuple[Quantizer, Codes]]:
    """The stored codes of a ``.fewbits`` file (its ``(header, blobs)``) with the quantizer
    that made them."""
    header, blobs = contents
    model_spec = header["model"]
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


class ResolvedSource(NamedTuple):
    """A source resolved once: the model (eval mode) and its uniform weights' integer codes,
    which every later step (ONNX export, each planner backend) reads; none reopens a file.
    ``exports``: the ONNX graphs :func:`fewbits.runtime.compile_for_cpu` built from it (by
    form and input shape), reused by every later ``compile_for_cpu`` of this object, as the
    codes are; resolve the model again after changing it."""

    model: nn.Module
    codes: dict[str, tuple[Quantizer, Codes]]
    exports: dict[Any, Any]


def resolve_file(path: str | os.PathLike, contents: tuple[dict, dict]) -> ResolvedSource:
    """A ``.fewbits`` file resolved from its ``(header, blobs)`` (``read_model_file``'s)."""
    return ResolvedSource(load_packed(path, contents=contents), _file_codes(contents), {})


def resolve_source(source: nn.Module | str | os.PathLike | ResolvedSource) -> ResolvedSource:
    """``(model in eval mode, {"layer.weight": (quantizer, codes)})`` for a model, a ``.fewbits``
    file or a run folder / checkpoint; a :class:`ResolvedSource` is returned as it is. A file
    is read and checked once.

    Codes are given for the uniform families (``Quantizer.uniform``: fixed point, min-max),
    whose integer form the ONNX graph and the int8 path use; a live model's are computed with
    ``quantizer.encode``, a packed file's are read from it. A model rebuilt by
    :func:`~fewbits.export.load_packed` has no weight quantizers left, so pass the file itself
    to keep the integer form.
    """
    if isinstance(source, ResolvedSource):
        return source
    if is_packed_file(source):
        return resolve_file(source, read_model_file(source))

    model = model_of(source)
    codes: dict[str, tuple[Quantizer, Codes]] = {}
    with modes_kept(model), torch.no_grad():  # a training model stays in training mode
        model.eval()
        for lname, layer in quant_layers(model):
            for role in ("weight", "bias"):
                q, p = getattr(layer, f"{role}_quantizer"), getattr(layer, role)
                if q is not None and q.uniform and p is not None:
                    codes[f"{lname}.{role}"] = (q, q.encode(p.detach()))
    return ResolvedSource(model, codes, {})


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
    #: What the fused form left plain, and why (empty for the plain form).
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        forms = Counter(self.weights.values())
        acts = Counter(self.activations.values())
        lines = [f"{self.model} -> {self.path} (opset {self.opset}, {self.file_bytes:,} bytes)",
                 "weights:     " + "; ".join(f"{n} x {k}" for k, n in sorted(forms.items())),
                 "activations: " + ("; ".join(f"{n} x {k}" for k, n in sorted(acts.items()))
                                    or "float"),
                 "operators:   " + ", ".join(f"{k} {n}" for k, n in sorted(self.nodes.items()))]
        lines += [f"left plain:  {n}" for n in self.notes]
        return "\n".join(lines)


@contextlib.contextmanager
def cached_exporter_registry() -> Iterator[None]:
    """:func:`fewbits.ops.onnx.cached_exporter_registry`, imported when used: ``ops.onnx``
    needs ``onnx_ir`` (the ``onnx`` extra), and training imports this module without it."""
    from ..ops.onnx import cached_exporter_registry as cached

    with cached():
        yield


@contextlib.contextmanager
def modes_kept(source: Any) -> Iterator[None]:
    """Inside, a model (or a ResolvedSource's) may be put in eval mode; one given mid-training
    gets its modules' train/eval flags back (it trained on with frozen batch norm, silently)."""
    source = source.model if isinstance(source, ResolvedSource) else source
    modes = [(m, m.training) for m in source.modules()] if isinstance(source, nn.Module) else []
    try:
        yield
    finally:
        for m, mode in modes if any(mode for _, mode in modes) else []:
            m.train(mode)  # pre-order: a parent's call resets its children, set next


def onnx_translations() -> dict[Any, Any]:
    """``{operator overload: ONNX Script function}`` for the operators of every registered
    family (:func:`fewbits.quantizers.base.family_translations`, each family's
    :meth:`~fewbits.quantizers.Quantizer.onnx_translations`) and fewbits' fix of
    ``aten.avg_pool2d``: the ``custom_translation_table`` of
    ``torch.onnx.export(..., dynamo=True)``. Calling it also registers them with PyTorch's
    exporter where PyTorch allows (:func:`fewbits.ops.onnx.register_globally`), so that a later
    plain ``torch.onnx.export(model, args, dynamo=True)`` of a fewbits model works too.

        >>> import torch
        >>> from fewbits.models import create_model
        >>> m = create_model("mnist_fp_net_mlp", width=8).eval()
        >>> _ = onnx_translations()
        >>> program = torch.onnx.export(m, (torch.rand(2, 1, 28, 28),), dynamo=True,
        ...                             optimize=False, verbose=False)  # doctest: +SKIP
    """
    from ..ops.onnx import register_globally

    table = family_translations()
    register_globally(table)
    return {**ATEN_FIXES, **table}


def _frozen(model: nn.Module, report: OnnxReport) -> tuple[nn.Module, dict[str, Quantizer]]:
    """A copy of ``model`` whose quantized layers hold their quantized weight and bias as plain
    parameters (the exact values PyTorch computes; no weight operator left in the graph), and
    the quantizer of each such parameter by its name."""
    model = copy.deepcopy(model).eval()
    quantizers: dict[str, Quantizer] = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, QuantLayer):
                continue
            for role in ("weight", "bias"):
                # the layer's own attribute for the role (MHA: in_proj_weight / in_proj_bias)
                q, key = getattr(m, f"{role}_quantizer"), m.param_key(role)
                if q is None or m.param(role) is None:
                    continue
                v = getattr(m, f"quantized_{role}")().detach().clone()
                setattr(m, f"{role}_quantizer", None)
                setattr(m, key, nn.Parameter(v, requires_grad=False))
                report.weights[f"{name}.{key}"] = f"{type(q).__name__} levels as float constants"
                quantizers[f"{name}.{key}"] = q
    return model, quantizers


def _example(model: nn.Module, example_inputs: Any,
             input_shape: tuple[int, ...] | None) -> tuple[tuple, dict, bool]:
    """``(args, kwargs, images)``: ``images`` when the model takes one image batch."""
    if example_inputs is not None:
        if input_shape is not None:
            raise ValueError("give example_inputs or input_shape, not both")
        if isinstance(example_inputs, Tensor):
            return (example_inputs,), {}, example_inputs.is_floating_point()
        if isinstance(example_inputs, Mapping):
            return (), dict(example_inputs), False
        if isinstance(example_inputs, (tuple, list)):
            return tuple(example_inputs), {}, False
        raise TypeError("example_inputs must be a tensor, a tuple of arguments or a dict of "
                        f"keyword arguments, not {type(example_inputs).__name__}")
    declared = _declared_shape(model)
    shape = tuple(input_shape) if input_shape is not None else input_shape_of(model)
    if input_shape is not None and declared not in (None, shape):
        name = getattr(model, "fewbits_spec", {}).get("name", type(model).__name__)
        raise ValueError(f"model {name!r} takes {declared} images, not input_shape={shape}; "
                         "drop input_shape (on the command line: --input-shape)")
    if declared is None:
        check_input_shape(model, shape, getattr(model, "fewbits_spec", {}).get(
            "name", type(model).__name__))
    return (torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)),), {}, True


def _dynamic_batch(args: tuple, kwargs: dict) -> Any:
    """The batch axis of every tensor input marked dynamic (``Dim.AUTO``: PyTorch keeps it
    static where the model fixes it)."""
    auto = torch.export.Dim.AUTO

    def spec(v: Any) -> Any:
        return {0: auto} if isinstance(v, Tensor) and v.dim() >= 1 else None

    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def _counting(table: dict[Any, Any], report: OnnxReport) -> dict[Any, Any]:
    """The translations, each noting in ``report.activations`` that it was written."""

    def wrap(target: Any, fn: Any) -> Any:
        if target in ATEN_FIXES:
            return fn

        def translate(*a: Any, **kw: Any) -> Any:
            name = str(target.__name__).split(".")[0]  # "pow2" of fewbits::pow2.default
            n = sum(k.startswith(name + " ") for k in report.activations) + 1
            report.activations[f"{name} {n}"] = "exact ONNX subgraph"
            return fn(*a, **kw)
        return translate

    return {t: wrap(t, f) for t, f in table.items()}


def _plain(model: nn.Module, args: tuple, kwargs: dict, images: bool, opset: int,
           report: OnnxReport, one_output: bool) -> Any:
    import warnings

    table = _counting(onnx_translations(), report)
    names = {"input_names": ["images"]} if images and len(args) == 1 else {}
    if one_output:
        names["output_names"] = ["logits"]
    with translated_onnx_export(), cached_exporter_registry(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, args, kwargs=kwargs or None, dynamo=True, custom_translation_table=table,
                optimize=False, opset_version=opset, verbose=False,
                dynamic_shapes=_dynamic_batch(args, kwargs), **names)
        except Exception as e:  # the exporter's reasons are many kinds; keep its message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"PyTorch's ONNX exporter cannot export {type(model).__name__}: "
                             f"{first}") from e
    proto = program.model_proto
    fold_binary_thresholds(proto)
    prune_unused(proto)
    return proto


def to_onnx(source: nn.Module | str | os.PathLike, example_inputs: Any = None, *,
            opset: int = DEFAULT_OPSET, input_shape: tuple[int, ...] | None = None,
            fuse: bool | str = False, checked_sums: bool = False,
            check: bool = True) -> tuple[Any, OnnxReport]:
    """Build the ``onnx.ModelProto`` of ``source`` (model, ``.fewbits`` file, run folder or
    checkpoint; see the module doc) without writing it.

    ``example_inputs``: what the model is called with -- a tensor, a tuple of positional
    arguments or a dict of keyword arguments (token ids stay integer); by default one batch of
    images of ``input_shape`` (or the registered model's shape). A model taking one image
    tensor gets the input ``images`` (float32, ``N`` dynamic) and, returning one tensor, the
    output ``logits``; others keep their argument names, outputs flattened in order.

    ``fuse=True``: the fused QDQ deployment form (:mod:`fewbits.export.onnx_fuse`, a pass over
    the plain export; any inputs), equal to PyTorch within the tolerance stated there;
    ``fuse="openvino"`` writes the bounds of each quantizer as float clamps before its
    ``QuantizeLinear``, the pattern OpenVINO fuses (same codes). ``checked_sums=True`` (with
    ``fuse``) also writes ``relu(a + b)`` of two uint8 grids of one scale as a uint8 sum, exact
    unless it saturates at code 255, and adds the output ``sum_peak``: a caller must recompute
    a batch whose ``sum_peak`` is 255 with the unchecked graph
    (:class:`fewbits.runtime.ort.CheckedRunner`). Raises ``ValueError`` naming what fails.

    ``check=True`` (the default): the graph is run by ONNX Runtime at its default
    optimisations on the example input and must give PyTorch's outputs within the stated
    tolerance, else ``ValueError`` (:func:`fewbits.export.onnx_run.check_graph`; one session and
    one run; noted in ``OnnxReport.notes`` and skipped where ``onnxruntime`` is not installed).
    ``check=False`` writes the graph unchecked. The graph is the eval-mode forward; a model
    passed in train mode is given back in train mode.
    """
    return to_onnx_forms(source, [(fuse, checked_sums)], example_inputs, opset=opset,
                         input_shape=input_shape, check=check)[0]


def to_onnx_forms(source: nn.Module | str | os.PathLike, forms: list[tuple[bool | str, bool]],
                  example_inputs: Any = None, *, opset: int = DEFAULT_OPSET,
                  input_shape: tuple[int, ...] | None = None,
                  check: bool = False) -> list[tuple[Any, OnnxReport]]:
    """:func:`to_onnx` of ``source`` for each ``(fuse, checked_sums)`` of ``forms``, in order,
    from one export by PyTorch (each fused form is a pass over a copy of it): what the planner
    uses to build the ``ort``, ``checked`` and ``openvino`` graphs of one model (its probe
    checks each, so ``check`` is off by default here; ``check=True``: as :func:`to_onnx`)."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the onnx extra is installed in dev
        raise ImportError("ONNX export needs the onnx package: pip install 'fewbits[onnx]'") \
            from e
    if not 1 <= opset <= onnx.defs.onnx_opset_version():  # the checker does not bound it
        raise ValueError(f"opset {opset} is not one this onnx package knows (1 to "
                         f"{onnx.defs.onnx_opset_version()}); the default is {DEFAULT_OPSET}")
    if any(checked and not fuse for fuse, checked in forms):
        raise ValueError("checked_sums=True needs fuse=True")
    if isinstance(source, nn.Module):  # torch.compile's wrapper: the module it compiles
        source = model_of(source)
    with modes_kept(source):
        return _forms(source, forms, example_inputs, opset, input_shape, check)


def _forms(source: Any, forms: list[tuple[bool | str, bool]], example_inputs: Any, opset: int,
           input_shape: tuple[int, ...] | None, check: bool) -> list[tuple[Any, OnnxReport]]:
    import onnx

    model, codes, _ = resolve_source(source)
    spec = getattr(model, "fewbits_spec", None) or {"name": type(model).__name__}
    plain_report = OnnxReport("", spec["name"], opset)
    args, kwargs, images = _example(model.eval(), example_inputs, input_shape)  # modes_kept
    if opset < 18:
        raise ValueError(f"opset {opset}: PyTorch's exporter writes opset 18 or later; export "
                         f"with opset {DEFAULT_OPSET}, the default")
    frozen, quantizers = _frozen(model, plain_report)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    plain = _plain(frozen, args, kwargs, images, opset, plain_report, isinstance(ref, Tensor))
    out = []
    for fuse, checked_sums in forms:
        proto, report = onnx.ModelProto(), copy.deepcopy(plain_report)
        proto.CopyFrom(plain)
        if fuse:
            fuse_graph(proto, model, frozen, codes, quantizers, report,
                       clamp_codes=fuse != "openvino", checked_sums=checked_sums)
            prune_unused(proto)
        proto.ir_version = min(proto.ir_version, 10)  # what current ONNX Runtime builds accept
        proto.doc_string = f"fewbits model {spec['name']}" + ("; input: images in [0, 1]"
                                                              if images else "")
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as e:
            raise ValueError(f"the graph is not valid ONNX at opset {opset} "
                             f"({str(e).splitlines()[0]}); export with opset {DEFAULT_OPSET}, "
                             "the default") from None
        report.nodes = dict(Counter(n.op_type for n in proto.graph.node))
        if check:
            form = ("fused" if fuse is True else f"fused {fuse!r}") if fuse else "plain"
            note = check_graph(proto, model, args, kwargs, ref, form)
            report.notes += [note] if note else []
        out.append((proto, report))
    return out


def export_onnx(source: nn.Module | str | os.PathLike, path: str | os.PathLike,
                example_inputs: Any = None, *, opset: int = DEFAULT_OPSET,
                input_shape: tuple[int, ...] | None = None,
                fuse: bool | str = False, check: bool = True) -> OnnxReport:
    """Write ``source`` (model, ``.fewbits`` file, run folder or checkpoint) as ONNX to ``path``
    (:func:`to_onnx` with the same arguments, ``check`` included: a graph ONNX Runtime does
    not run to PyTorch's outputs is refused before anything is written). Atomic write; returns
    an :class:`OnnxReport`."""
    proto, report = to_onnx(source, example_inputs, opset=opset, input_shape=input_shape,
                            fuse=fuse, check=check)
    data = proto.SerializeToString()
    path = os.fspath(path)
    atomic_write(path, data)
    report.path, report.file_bytes = path, len(data)
    return report


def compare_onnx(source: nn.Module | str | os.PathLike, onnx_model: Any,
                 images: Any) -> dict[str, float]:
    """Run ``images`` (or any example inputs, as :func:`to_onnx` takes them) through PyTorch
    and ONNX Runtime; return ``{"max_abs": max |difference| over every output leaf, "max_rel":
    max_abs / max |PyTorch output|, "top1_agreement": fraction of equal argmax of the first
    output's last axis}``."""
    with modes_kept(source):
        model = resolve_source(source).model.eval()
        return _compare(model, onnx_model, images)


def _compare(model: nn.Module, onnx_model: Any, images: Any) -> dict[str, float]:
    if isinstance(images, Tensor) and images.is_floating_point():
        images = images.float()
    args, kwargs = ((images,), {}) if isinstance(images, Tensor) else \
        (((), dict(images)) if isinstance(images, Mapping) else (tuple(images), {}))
    with torch.no_grad():
        ref = [v.float() for v in torch.utils._pytree.tree_leaves(model(*args, **kwargs))
               if isinstance(v, Tensor)]
    got = [g.float() for g in run_onnx(onnx_session(onnx_model), images)]
    if len(got) != len(ref):
        raise ValueError(f"the graph has {len(got)} outputs, the model {len(ref)}")
    diff = max((float((g - r).abs().max()) if r.numel() else 0.0 for g, r in zip(got, ref,
                                                                               strict=True)),
               default=0.0)
    scale = max((float(r.abs().max()) for r in ref if r.numel()), default=1.0)
    top = float((got[0].argmax(-1) == ref[0].argmax(-1)).float().mean()) if ref[0].dim() else 1.0
    return {"max_abs": diff, "max_rel": diff / scale if scale else diff, "top1_agreement": top}
