"""Export a trained network in its real low-bit form, and rebuild it from that form.

Every quantized weight is stored as the integer codes its quantizer declares
(:meth:`fewbits.quantizers.Quantizer.encode`): 1 bit for the binary families (plus one float32
scale per output channel for binary weight), ``n`` bits for fixed point and pow2, ``num_bits``
for INQ (sign + exponent index), ``ql`` bits plus scale and offset for min-max. Codes are
bit-packed or, with ``entropy=True``, Huffman-coded when that is smaller (Deep Compression).
Everything else (batch norm, activation ranges, float biases) is stored raw, float32 by default
so that the rebuilt network computes the trained network's logits bit for bit; ``bn="float16"``
halves batch norm at the cost of that exactness (predictions are then checked, not promised).

    >>> import torch, tempfile, os
    >>> from fewbits.models import create_model
    >>> m = create_model("mnist_binary_connect_mlp", width=32).eval()
    >>> path = os.path.join(tempfile.mkdtemp(), "m.fewbits")
    >>> report = export_packed(m, path)
    >>> x = torch.rand(2, 1, 28, 28)
    >>> torch.equal(load_packed(path)(x), m(x))
    True
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import bad_batch_norm_stats
from .._text import printable
from ..checkpoint import load_model  # a run folder or a checkpoint file
from ..layers import quant_layers
from ..models import is_model
from ..quantizers import Codes, Quantizer
from ..runs import training_data
from ._guard import check_codes, check_model_header, decode
from .binding import (
    build_for_file,
    check_layer_configs,
    layer_configs,
    layer_options_of,
    model_header,
)
from .container import (
    MODEL_FORMAT,
    FormatError,
    encode_tensor,
    read_model_file,
    write_container,
)
from .fold import scale_folds

__all__ = ["ExportReport", "TensorEntry", "export_packed", "load_packed", "model_of",
           "packed_info"]

_BN_MODES = ("float32", "float16", "folded")


@dataclass
class TensorEntry:
    """One stored tensor in a report: its role, element count, storage and bits per element."""

    name: str
    role: str  # "weight" (quantized codes), "bias" (quantized codes) or "float"
    count: int
    bits: int  # declared code width (32/16 for raw floats)
    nbytes: int  # bytes in the file, side parameters (scales, offsets) included
    encoding: str

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / self.count if self.count else 0.0


@dataclass
class ExportReport:
    """Sizes of a ``.fewbits`` file: per tensor, totals, and the ratio to the fp32 state dict."""

    path: str
    model: str
    file_bytes: int
    fp32_bytes: int
    entries: list[TensorEntry] = field(default_factory=list)

    @property
    def quantized(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.role == "weight"]

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized-layer weight, side parameters included."""
        q = self.quantized
        n = sum(e.count for e in q)
        return 8.0 * sum(e.nbytes for e in q) / n if n else 0.0

    @property
    def ratio(self) -> float:
        """fp32 state-dict bytes / file bytes (how many times smaller the file is)."""
        return self.fp32_bytes / self.file_bytes if self.file_bytes else math.inf

    def table(self) -> str:
        """The report as a text table; names from the file are shown escaped
        (:func:`fewbits._text.printable`: a terminal escape in a name is not run)."""
        lines = [f"{printable(self.model)}  ({printable(self.path)})",
                 f"{'tensor':44s} {'role':6s} {'count':>8s} {'bits':>4s} {'bytes':>8s} "
                 f"{'bits/elem':>9s}  encoding"]
        for e in self.entries:
            lines.append(f"{printable(e.name):44s} {printable(e.role):6s} {e.count:8d} "
                         f"{e.bits:4d} {e.nbytes:8d} {e.bits_per_element:9.3f}  "
                         f"{printable(e.encoding)}")
        lines.append(
            f"file {self.file_bytes:,} bytes; fp32 state dict {self.fp32_bytes:,} bytes; "
            f"{self.ratio:.1f}x smaller; {self.bits_per_weight:.3f} bits per quantized weight"
        )
        return "\n".join(lines)


def model_of(source: nn.Module | str | os.PathLike) -> nn.Module:
    """``source`` itself when it is a model (the module ``torch.compile`` wraps, same
    parameters: the engines trace it), else the model of a run folder or checkpoint
    (:func:`fewbits.checkpoint.load_model`, which names the file on any problem)."""
    if isinstance(source, nn.Module):
        inner = getattr(source, "_orig_mod", None)  # torch.compile's OptimizedModule
        return inner if isinstance(inner, nn.Module) else source

    return load_model(source)


def _fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's float tensors in fp32, a tied or shared tensor counted once."""
    seen: dict[int, int] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and "_quantizer." not in k:
            seen[id(t)] = 4 * t.numel()
    return sum(seen.values())


def _tied(model: nn.Module) -> dict[str, str]:
    """``{alias: first key}`` of the state-dict keys that name a tensor an earlier key names
    (tied parameters, a module or quantizer used at several places)."""
    first: dict[int, str] = {}
    out = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            if id(t) in first:
                out[k] = first[id(t)]
            else:
                first[id(t)] = k
    return out


def _quantized_keys(model: nn.Module, tied: dict[str, str]) -> dict[str, tuple[str, Any, str]]:
    """``{state key: (layer name, layer, role)}`` of the tensors stored as codes: quantized
    weights and biases whose every reader quantizes them with one quantizer object. A tensor
    that some module also reads in float (a float embedding tied to a quantized head) is
    stored in float once, and the quantizer is kept. Two quantizers on one tensor raise."""
    readers: dict[int, list[tuple[str, Any]]] = {}  # tensor -> (key, quantizer or None)
    first: dict[int, tuple[str, Any, str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            q, role = None, None
            if hasattr(m, "quant_param"):  # a fewbits layer
                role = next((r for r in ("weight", "bias") if m.param_key(r) == pname), None)
                q = getattr(m, f"{role}_quantizer") if role else None
            key = _join(mname, pname)
            readers.setdefault(id(p), []).append((key, q))
            if q is not None and id(p) not in first:
                first[id(p)] = (mname, m, role)
    out = {}
    for pid, (lname, layer, role) in first.items():
        qs = {id(q): (k, q) for k, q in readers[pid] if q is not None}
        if len(qs) > 1:
            named = "; ".join(f"{k}: {q.config()}" for k, q in qs.values())
            raise ValueError(f"one tensor is quantized by {len(qs)} different quantizers "
                             f"({named}); a tensor can be stored in one way only: tie the "
                             "quantizers (quantize_ does) or untie the tensors")
        if all(q is not None for _, q in readers[pid]):  # no float reader
            key = _join(lname, layer.param_key(role))
            out[tied.get(key, key)] = (lname, layer, role)
    return out


def _stored_bits(fields: dict) -> int:
    """Bits per element of a stored tensor: its code width, or its raw dtype's width."""
    if fields.get("bits"):
        return int(fields["bits"])
    return 8 * np.dtype(fields["encoding"][4:]).itemsize


def _codes_entries(name: str, codes: Codes, entropy: bool) -> list[tuple[dict, bytes]]:
    arr = codes.codes.detach().cpu().numpy().astype(np.uint64 if codes.bits > 32 else np.uint32)
    arr = arr.reshape(codes.shape)
    fields, blob = encode_tensor(arr, "packed", bits=codes.bits)
    if codes.bits == 2 and arr.size and int(arr.max()) <= 2:  # ternary: 1.6 bits, not 2
        fields, blob = encode_tensor(arr, "trits", bits=2)
    if entropy and codes.bits <= 16 and arr.size:
        hf, hb = encode_tensor(arr, "huffman", bits=codes.bits)
        if len(hb) < len(blob):
            fields, blob = hf, hb
    out = [({"name": name, "kind": "codes", **fields}, blob)]
    for pname, p in codes.params.items():
        p = p.detach().cpu()
        enc = "raw-float32" if p.is_floating_point() else "raw-int64"
        f, b = encode_tensor(p.numpy().reshape(-1), enc)
        out.append(({"name": f"{name}#{pname}", "kind": "param", "param_of": name,
                     "param": pname, "param_shape": list(p.shape), **f}, b))
    return out


def export_packed(source: nn.Module | str | os.PathLike, path: str | os.PathLike, *,
                  entropy: bool = False, bn: str = "float32",
                  fold_bn: bool = False) -> ExportReport:
    """Write ``source`` (any model holding fewbits layers, a run folder or a checkpoint) to
    ``path`` in packed form. The file records the model's registry name and options (models
    outside the registry: their class, and :func:`load_packed` then needs ``model=``) and each
    fewbits layer's quantizer configs.

    ``entropy=True`` Huffman-codes each tensor's codes where that is smaller than fixed width.
    ``bn="float16"`` stores batch-norm statistics and affine parameters in float16.
    ``bn="folded"`` folds each batch norm into the quantized layer before it where the family
    can hold it (:func:`fewbits.export.fold.scale_folds`: ternary per-channel scales, trits
    negated for a negative ``gamma``) and keeps only its bias ``c = beta - alpha * mean``;
    :func:`load_packed` rebuilds that batch norm as ``x + c`` (weight 1, mean 0, variance 1,
    ``eps`` 0). The outputs match the unfolded network to float32 rounding
    (:data:`fewbits.export.fold.FOLD_RTOL`); a model with nothing to fold raises.
    ``fold_bn=True`` (binary_net only) stores each batch norm folded into exact per-channel
    thresholds instead (:mod:`fewbits.runtime.binary_file`; run the file with
    ``fewbits.runtime.binary_file.load_engine``). The file is written atomically. Returns an
    :class:`ExportReport`.
    """
    if bn not in _BN_MODES:
        raise ValueError(f"bn must be one of {_BN_MODES}, got {bn!r}")
    model = model_of(source)
    if bad := bad_batch_norm_stats(model):  # the file would be refused when read
        raise ValueError(f"{bad}: its outputs are NaN; export a trained model")
    spec = model_header(model)
    was_training = model.training
    model.eval()
    tensors: list[tuple[dict, bytes]] = []
    entries: list[TensorEntry] = []
    handled: set[str] = set()
    if fold_bn:
        from ..runtime.binary_file import folded_tensors

        folded, replaced = folded_tensors(model)  # ValueError unless the engine can run it
        handled |= replaced
        tensors += folded
        entries += [TensorEntry(f["name"], "folded", math.prod(f["shape"]), _stored_bits(f),
                                len(b), f["encoding"]) for f, b in folded]
    bn_names = {n for n, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    folds = scale_folds(model) if bn == "folded" else {}
    if bn == "folded" and not folds:
        raise ValueError("bn='folded': no batch norm of this model follows a quantized layer "
                         "whose family can fold it (ternary per-channel twn/absmean); use "
                         "bn='float32' or 'float16'")
    for f in folds.values():  # the batch norm keeps only its bias c
        handled.update(f"{f.bn}.{k}" for k in ("weight", "running_mean", "running_var"))
        fb, bb = encode_tensor(f.bias.numpy(), "raw-float32")
        tensors.append(({"name": f"{f.bn}.bias", "kind": "state", **fb}, bb))
        entries.append(TensorEntry(f"{f.bn}.bias", "float", f.bias.numel(), 32, len(bb),
                                   "raw-float32"))
        handled.add(f"{f.bn}.bias")
    try:
        with torch.no_grad():
            tied = _tied(model)
            for key, (lname, layer, role) in _quantized_keys(model, tied).items():
                q = getattr(layer, f"{role}_quantizer")
                codes = folds[key].codes if key in folds else \
                    q.encode(layer.quant_param(role).detach())
                items = _codes_entries(key, codes, entropy)
                tensors += items
                nbytes = sum(len(b) for _, b in items)
                entries.append(TensorEntry(key, role, layer.param(role).numel(),
                                           items[0][0]["bits"], nbytes, items[0][0]["encoding"]))
                handled.add(key)
                handled.update(_join(lname, f"{role}_quantizer.{k}") for k in q.state_dict())
            handled.update(tied)
            for key, t in model.state_dict().items():
                if key in handled or key.endswith("num_batches_tracked") or \
                        key.endswith("_extra_state"):
                    continue
                owner = key.rsplit(".", 1)[0]
                if not t.is_floating_point():
                    enc = "raw-bool" if t.dtype == torch.bool else "raw-int64"
                elif owner in bn_names and bn == "float16":
                    enc = "raw-float16"
                else:
                    enc = "raw-float32"
                f, b = encode_tensor(t.detach().cpu().numpy(), enc)
                tensors.append(({"name": key, "kind": "state", **f}, b))
                entries.append(TensorEntry(key, "float", t.numel(), 8 * np.dtype(enc[4:]).itemsize
                                           if enc != "raw-bool" else 8, len(b), enc))
    finally:
        model.train(was_training)
    header = {
        "format": MODEL_FORMAT,
        "model": spec,
        "layers": layer_configs(model),
        "layer_options": layer_options_of(model),
        **({"tied": tied} if tied else {}),
        "options": {"entropy": entropy, "bn": bn, **({"fold_bn": True, "fp32_bytes":
                                                      _fp32_bytes(model)} if fold_bn else {}),
                    **({"folded_bn": sorted(f.bn for f in folds.values()),
                        "fp32_bytes": _fp32_bytes(model)} if folds else {})},
        "tensors": [f for f, _ in tensors],
    }
    data = training_data(model)  # for `fewbits eval model.fewbits` without --dataset
    if data is not None:
        header["data"] = data
    write_container(path, header, {f["name"]: b for f, b in tensors}, compress_header=True)
    size = os.path.getsize(path)
    return ExportReport(str(path), spec["name"], size, _fp32_bytes(model), entries)


def load_packed(path: str | os.PathLike, model: nn.Module | None = None,
                map_location: str | torch.device = "cpu", *,
                contents: tuple[dict, dict] | None = None) -> nn.Module:
    """Rebuild the network stored in a ``.fewbits`` file (evaluation mode).

    ``contents``: the file's ``(header, blobs)`` as :func:`read_model_file` returned them, for
    a caller that has read (and checked) the file once already; ``path`` then only names it.

    Without ``model`` the file's registry model is built from its recorded options. With
    ``model`` (any instance of the exported architecture, float or already quantized) the file
    is loaded into it, in place: its plain ``nn.Conv2d`` / ``nn.Linear`` layers that the file
    holds quantized are converted with the file's quantizer configs, and a layer, name or shape
    that does not match raises :class:`FormatError` naming it.

    Quantized weights are decoded from their codes and the layers' weight/bias quantizers are
    dropped: the stored values already are the quantized weights, so the forward is the trained
    network's forward. Activation quantizers, batch norm and the rest are restored as stored.
    """
    header, blobs = read_model_file(path) if contents is None else contents
    src = str(path)
    check_model_header(header, src)
    if header.get("options", {}).get("fold_bn"):
        raise FormatError(src, "its batch norm is folded into binary-engine thresholds",
                          "run it with fewbits.runtime.binary_file.load_engine(path)")
    model = build_for_file(path, header, model).eval()
    by_name = {t["name"]: t for t in header["tensors"]}
    params: dict[str, dict[str, torch.Tensor]] = {}
    for t in header["tensors"]:
        if t.get("kind") == "param":
            arr = decode(t, blobs, src).reshape(t["param_shape"])
            params.setdefault(t["param_of"], {})[t["param"]] = torch.from_numpy(arr.copy())
    tied = _retie(src, header, model)
    state: dict[str, torch.Tensor] = {}
    layers = dict(quant_layers(model))
    by_key = {_join(lname, layer.param_key(role)): (layer, role)
              for lname, layer in layers.items() for role in ("weight", "bias")}
    refs = model.state_dict()
    for key, (layer, role) in by_key.items():  # a quantized weight must come from codes
        if getattr(layer, f"{role}_quantizer", None) is not None and \
                layer.param(role) is not None and \
                by_name.get(key, {}).get("kind") not in (None, "codes"):
            raise FormatError(src, f"tensor {key!r}: field kind is "
                              f"{by_name[key]['kind']!r}, but a quantized layer's {role} "
                              "must be stored as codes", "the file is corrupt or was edited")
    for t in header["tensors"]:
        kind, name = t.get("kind"), t["name"]
        if kind == "codes":
            layer, role = by_key.get(name, (None, "weight"))
            q: Quantizer | None = getattr(layer, f"{role}_quantizer", None) if layer else None
            if q is None:
                raise FormatError(src, f"tensor {name!r} has codes but the model has no "
                                  "quantizer there (file and model code disagree)")
            view = layer.quant_param(role)
            _same_shape(path, name, t["shape"], view.shape)
            codes = Codes(torch.from_numpy(decode(t, blobs, src).astype(np.int64).reshape(-1)),
                          t["bits"], tuple(t["shape"]), params.get(name, {}))
            check_codes(name, codes, q, view, src)
            state[name] = layer.from_quant_view(role, q.decode(codes)).to(view.dtype)
        elif kind == "state":
            arr = decode(t, blobs, src)
            ref = refs.get(name)
            if ref is None or name in tied:
                raise FormatError(src, f"tensor {name!r} is not part of the model"
                                  + (" (it is tied to another)" if ref is not None else ""))
            _same_shape(path, name, arr.shape, ref.shape)
            state[name] = torch.from_numpy(np.ascontiguousarray(arr)).to(ref.dtype)
    # Freeze: the stored weights are already quantized; quantizer state is not needed. A
    # layer whose weight is tied to codes stored under another name is frozen too.
    for key, (layer, role) in by_key.items():
        if by_name.get(tied.get(key, key), {}).get("kind") == "codes":
            setattr(layer, f"{role}_quantizer", None)
    _unfold_bn(src, header, model, state)
    # extra state (a fixed-point grid) travels in the layer configs of the header
    expected = {k for k in model.state_dict() if k not in tied and
                not k.endswith(("num_batches_tracked", "_extra_state"))}
    missing = sorted(expected - set(state))
    if missing:
        raise FormatError(str(path), f"it lacks tensors the model needs: {missing[:5]}"
                          + (" ..." if len(missing) > 5 else ""))
    model.load_state_dict(state, strict=False)
    if bad := bad_batch_norm_stats(model):
        raise FormatError(src, bad, "the file is corrupt or was edited")
    if is_model(header["model"]["name"]):
        model.fewbits_spec = {"name": header["model"]["name"],
                              "kwargs": header["model"]["kwargs"]}
    return model.to(map_location)


def _unfold_bn(src: str, header: dict[str, Any], model: nn.Module,
               state: dict[str, torch.Tensor]) -> None:
    """Each batch norm the file folded (``options.folded_bn``) as ``x + bias``: weight 1,
    mean 0, variance 1 and ``eps`` 0, so evaluation computes ``x * 1 + bias`` exactly."""
    names = header.get("options", {}).get("folded_bn", [])
    mods = dict(model.named_modules())
    if not isinstance(names, list) or len(names) > len(mods):
        raise FormatError(src, "its 'folded_bn' record is not a list of the model's modules")
    for name in names:
        bn = mods.get(name) if isinstance(name, str) else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine or \
                bn.running_mean is None:
            raise FormatError(src, f"it folds {name!r}, which is not an affine batch norm with "
                              "running statistics in the model", "build the model the file "
                              "was exported from")
        c = bn.num_features
        state[f"{name}.weight"] = torch.ones(c, dtype=bn.weight.dtype)
        state[f"{name}.running_mean"] = torch.zeros(c, dtype=bn.running_mean.dtype)
        state[f"{name}.running_var"] = torch.ones(c, dtype=bn.running_var.dtype)
        bn.eps = 0.0


def _retie(src: str, header: dict[str, Any], model: nn.Module) -> dict[str, str]:
    """Make each tensor the file records as tied (``{alias: key}``) one tensor in ``model``
    (setting the alias's parameter or buffer to the key's), as in the exported model; returns
    the record. A record naming a tensor the model lacks, or of another shape, raises."""
    tied = header.get("tied", {})
    sd = model.state_dict(keep_vars=True)
    if not isinstance(tied, dict) or len(tied) > len(sd):
        raise FormatError(src, "its 'tied' record is not a mapping of the model's tensors")
    for alias, key in tied.items():
        a, k = sd.get(alias), sd.get(key) if isinstance(key, str) else None
        if not isinstance(a, torch.Tensor) or not isinstance(k, torch.Tensor) or alias == key \
                or isinstance(a, nn.Parameter) != isinstance(k, nn.Parameter):
            raise FormatError(src, f"it ties {alias!r} to {key!r}, which the model does not "
                              "both hold", "build the model the file was exported from")
        _same_shape(src, alias, a.shape, k.shape)
        if a is not k:
            owner, _, leaf = alias.rpartition(".")
            setattr(model.get_submodule(owner), leaf, k)
    return tied


def _join(lname: str, key: str) -> str:
    """State-dict key of ``key`` in layer ``lname`` (``""``: the model itself is the layer)."""
    return f"{lname}.{key}" if lname else key


def _same_shape(path: str | os.PathLike, name: str, stored: Any, want: Any) -> None:
    if tuple(stored) != tuple(want):
        raise FormatError(str(path), f"tensor {name!r} has shape {tuple(stored)} in the file but "
                          f"{tuple(want)} in the model", "build the model the file was "
                          "exported from")


def packed_info(path: str | os.PathLike) -> ExportReport:
    """Read a ``.fewbits`` file's header and sizes (no model is built)."""
    header, blobs = read_model_file(path)
    check_model_header(header, str(path))
    check_layer_configs(path, header)
    entries: list[TensorEntry] = []
    sizes: dict[str, int] = {}
    for t in header["tensors"]:
        key = t.get("param_of", t["name"])
        sizes[key] = sizes.get(key, 0) + len(blobs[t["name"]])
    fp32 = 0
    for t in header["tensors"]:
        if t.get("kind") == "param":
            continue
        count = math.prod(t["shape"])
        if t.get("kind") == "codes":
            role = t["name"].rpartition(".")[2]
            entries.append(TensorEntry(t["name"], role, count, t["bits"], sizes[t["name"]],
                                       t["encoding"]))
            fp32 += 4 * count
        elif t.get("kind") == "folded":  # binary_net thresholds (fold_bn): not in fp32_bytes
            entries.append(TensorEntry(t["name"], "folded", count, _stored_bits(t),
                                       sizes[t["name"]], t["encoding"]))
        else:
            enc = t["encoding"]
            bits = 8 if enc == "raw-bool" else 8 * np.dtype(enc[4:]).itemsize
            entries.append(TensorEntry(t["name"], "float", count, bits, sizes[t["name"]], enc))
            fp32 += 4 * count if enc.startswith("raw-float") else 0
    stored = header.get("options", {}).get("fp32_bytes")  # folded files: BN is gone
    if isinstance(stored, int) and not isinstance(stored, bool) and 0 <= stored < 2**62:
        fp32 = stored
    return ExportReport(str(path), header["model"]["name"], os.path.getsize(path), fp32, entries)
