"""Batch-norm-folded ``.fewbits`` files of binary_net networks, and the engine built from one.

``export_packed(model, path, fold_bn=True)`` (``fewbits export --fold-bn``) stores, instead of
each batch norm's four float32 vectors, its folded form (:mod:`fewbits.runtime.binary_fold`):
* ``<bn>.threshold``: the integer thresholds, in the smallest signed integer type that holds
  ``[-n, n + 1]`` (``n`` the layer's fan-in: int8 for the 1x1 convolutions of ResNet-23, int16
  for its 3x3), ``[2, C]`` for a residual unit's last batch norm; float32 for the stem;
* ``<bn>.flip``: 1 bit per channel (negative batch-norm scale);
* ``<bn>.nonfinite``: 2 bits per stem channel (the decisions at ``-inf`` and ``+inf``).

The binary weights stay 1-bit codes and the head's bias float32, as in every packed file. For
the seed's ResNet-23 this makes the file about 26x smaller than the fp32 state dict (13.8x with
batch norm stored). Such a file runs on the binary engine (:func:`load_engine`); PyTorch's
``load_packed`` refuses it (there is no batch norm left to rebuild).

Every tensor read is checked against the shape, encoding and value range the network's plan
expects before it is decoded.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..export._guard import build_bounded, check_model_header
from ..export._limits import few
from ..export.container import FormatError, decode_tensor, encode_tensor, read_model_file
from ..quantizers import Codes
from .binary import BinaryEngine, Step, binary_plan, fold_binary_net
from .binary_fold import smallest_int_dtype

__all__ = ["folded_tensors", "load_engine"]


def _bn_keys(model: nn.Module, plan: list[Step]) -> set[str]:
    return {f"{s.bn}.{k}" for s in plan if s.bn
            for k in model.get_submodule(s.bn).state_dict()}


def _int_encoding(s: Step) -> str:
    lo, hi = s.range
    return f"raw-{smallest_int_dtype(lo, hi + 1).name}"


def _only_thresholds(plan: list[Step]) -> None:
    if any(s.float_out or s.op in ("poolf", "headm") for s in plan):
        raise ValueError("this network keeps float maps (a float residual stream or pooling "
                         "of batch-norm outputs), which a folded file does not store; export "
                         "it without fold_bn and run BinaryEngine.from_model(load_packed(path))")


def folded_tensors(model: nn.Module) -> tuple[list[tuple[dict, bytes]], set[str]]:
    """``(tensors, replaced)``: the folded batch-norm tensors of a binary_net ``model`` as
    ``(header fields, blob)`` pairs (``kind="folded"``), and the state-dict keys they replace.
    Raises ``ValueError`` for a model the binary engine cannot run."""
    plan = binary_plan(model)
    _only_thresholds(plan)
    data = fold_binary_net(model, plan)
    out: list[tuple[dict, bytes]] = []
    for s in plan:
        if s.bn is None:
            continue
        t = data[f"{s.bn}.threshold"]
        f, b = encode_tensor(t, "raw-float32" if s.op == "stem" else _int_encoding(s))
        out.append(({"name": f"{s.bn}.threshold", "kind": "folded", **f}, b))
        bits = [("flip", data[f"{s.bn}.flip"])]
        if s.op == "stem":
            bits.append(("nonfinite", data[f"{s.bn}.nonfinite"]))
        for name, arr in bits:
            f, b = encode_tensor(arr.astype(np.uint8), "packed", bits=1)
            out.append(({"name": f"{s.bn}.{name}", "kind": "folded", **f}, b))
    return out, _bn_keys(model, plan)


def _entry(path: str, by_name: dict, name: str, kind: str, shape: list[int],
           encodings: tuple[str, ...]) -> dict:
    t = by_name.get(name)
    if t is None or t.get("kind") != kind:
        raise FormatError(path, f"it lacks the {kind} tensor {name!r} the network needs")
    if t.get("shape") != shape or t.get("encoding") not in encodings \
            or (t["encoding"] == "packed" and t.get("bits") != 1):
        raise FormatError(path, f"tensor {name!r} has shape {t.get('shape')} and encoding "
                          f"{t.get('encoding')!r}; expected {shape} as {' or '.join(encodings)}")
    return t


def _read(path: str, blobs: dict, by_name: dict, name: str, kind: str, shape: list[int],
          encodings: tuple[str, ...]) -> np.ndarray:
    t = _entry(path, by_name, name, kind, shape, encodings)
    return decode_tensor(t, blobs[name]).reshape(shape)


def load_engine(path: str | os.PathLike, *, isa: str | None = None) -> BinaryEngine:
    """Build a :class:`~fewbits.runtime.binary.BinaryEngine` from a batch-norm-folded
    ``.fewbits`` file. Raises ``FormatError`` (a ``ValueError``) naming the problem."""

    path = os.fspath(path)
    header, blobs = read_model_file(path)
    check_model_header(header, path)
    if not header.get("options", {}).get("fold_bn"):
        raise FormatError(path, "its batch norm is not folded", "export it with fold_bn=True "
                          "(`fewbits export --fold-bn`), or use "
                          "BinaryEngine.from_model(load_packed(path))")
    # On the meta device (only shapes are needed) and within what the file can hold, as
    # load_packed builds: depth=10**6 or width=-1 are refused before any layer is built.
    model = build_bounded(header, path, meta=True)
    try:
        plan = binary_plan(model)
        _only_thresholds(plan)
    except (ValueError, TypeError, KeyError) as e:
        raise FormatError(path, f"its model cannot run on the binary engine: {e}") from e
    by_name = {t["name"]: t for t in header["tensors"] if isinstance(t, dict) and "name" in t}
    data: dict[str, np.ndarray] = {}
    for s in plan:
        layer = model.get_submodule(s.weight)
        wshape = list(layer.weight.shape)
        t = _entry(path, by_name, f"{s.weight}.weight", "codes", wshape, ("packed", "huffman"))
        if t.get("bits") != 1 or layer.weight_quantizer is None:
            raise FormatError(path, f"{s.weight}.weight is not a 1-bit binary weight")
        codes = decode_tensor(t, blobs[t["name"]]).astype(np.int64).reshape(-1)
        w = layer.weight_quantizer.decode(Codes(torch.from_numpy(codes), 1, tuple(wshape)))
        data[f"{s.weight}.weight"] = w.to(torch.int8).numpy()
        if s.op == "head":
            data[f"{s.weight}.bias"] = _read(path, blobs, by_name, f"{s.weight}.bias", "state",
                                             [s.cout], ("raw-float32",))
            continue
        stem = s.op == "stem"
        rows = [2] if s.residual else []
        tname = f"{s.bn}.threshold"
        t = _read(path, blobs, by_name, tname, "folded", [*rows, s.cout],
                  ("raw-float32",) if stem else (_int_encoding(s),))
        lo, hi = s.range
        if (np.isnan(t).any() if stem else ((t < lo) | (t > hi + 1)).any()):
            raise FormatError(path, f"{tname} holds values outside "
                              f"{'the floats' if stem else f'[{lo}, {hi + 1}]'}")
        data[tname] = t
        data[f"{s.bn}.flip"] = _read(path, blobs, by_name, f"{s.bn}.flip", "folded", [s.cout],
                                     ("packed",)).astype(bool)
        if stem:
            data[f"{s.bn}.nonfinite"] = _read(path, blobs, by_name, f"{s.bn}.nonfinite",
                                              "folded", [2, s.cout], ("packed",)).astype(bool)
    unused = sorted(set(by_name) - set(data))
    if unused:  # the options describe a smaller network than the file's (depth edited)
        raise FormatError(path, f"it holds {len(unused)} tensors that the network of its "
                          f"model.kwargs does not use ({few(unused)}): its options do not "
                          "match its weights", "the file is corrupt or was edited")
    return BinaryEngine(plan, data, BinaryEngine.input_shape(plan), isa)
