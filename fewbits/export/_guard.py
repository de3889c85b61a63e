"""Every field of a ``.fewbits`` model header is hostile: checks made before anything is built.

A ``.fewbits`` file's SHA-256 only detects damage: anyone can edit a header and recompute it.
:mod:`fewbits.export.container` bounds the container-level fields (sizes, encodings, shapes,
bits, Huffman tables); this module checks the model-level ones (:func:`check_model_header`) and
builds the model within what the file can describe (:func:`build_bounded`), so that a hostile
file gets a :class:`~fewbits.export.container.FormatError` naming the file and the field, never
a traceback, a silently wrong network, minutes of work or gigabytes of memory.

    >>> try:
    ...     check_model_header({"model": {"name": 3}}, "x.fewbits")
    ... except FormatError as e:
    ...     print(e.problem)
    field model.name must be a model name (a str), got 3
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models import create_model
from .container import FormatError, decode_tensor

__all__ = ["KINDS", "OverBudget", "build_bounded", "check_codes", "check_input_shape",
           "check_model_header", "create_within", "decode", "model_budget"]

#: Tensor kinds of a model file: quantized ``codes``, their ``param`` (scale, offset...) and
#: raw ``state`` (batch norm, float biases, activation ranges).
KINDS = ("codes", "param", "state")
_ADVICE = "the file is corrupt or was not written by fewbits"


def _fail(source: str, problem: str) -> FormatError:
    return FormatError(source, problem, _ADVICE)


def _shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 8 and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def check_model_header(header: dict, source: str) -> None:
    """Check a model file's own header fields: ``model.name`` (a str: a registered model, or the
    class of a user's model, which :func:`fewbits.export.load_packed` then needs), ``model.kwargs``
    (an object with str keys), each tensor's ``kind`` and, for ``param`` tensors, ``param_of``
    (a ``codes`` tensor), ``param`` and ``param_shape`` (matching the stored count)."""
    model = header.get("model")
    if not isinstance(model, dict):
        raise _fail(source, f"field model must be an object, got {type(model).__name__}")
    name = model.get("name")
    if not isinstance(name, str) or not name or len(name) > 300:
        raise _fail(source, f"field model.name must be a model name (a str), got {name!r}"[:300])
    kwargs = model.get("kwargs")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier()
                                               for k in kwargs):
        raise _fail(source, f"field model.kwargs must be an object of options, got {kwargs!r}"
                    [:300])
    tensors = header.get("tensors")
    if not isinstance(tensors, list):
        raise _fail(source, "field tensors must be a list")
    kinds = {t["name"]: t.get("kind") for t in tensors}
    options = header.get("options", {})
    if not isinstance(options, dict):
        raise _fail(source, f"field options must be an object, got {type(options).__name__}")
    # batch-norm-folded binary_net files (fewbits.runtime.binary_file checks their tensors)
    allowed = KINDS + (("folded",) if options.get("fold_bn")
                       else ())
    for t in tensors:
        label = f"tensor {t['name']!r}"
        if t.get("kind") not in allowed:
            raise _fail(source, f"{label}: field kind must be one of {list(allowed)}, got "
                        f"{t.get('kind')!r}")
        if "encoding" not in t:
            raise _fail(source, f"{label}: field encoding is missing")
        if t["kind"] == "folded":
            continue
        if t["kind"] == "codes" and t["encoding"] not in ("packed", "huffman", "trits"):
            raise _fail(source, f"{label}: codes need a packed, huffman or trits encoding, got "
                        f"{t['encoding']!r}")
        if t["kind"] != "codes" and not t["encoding"].startswith("raw-"):
            raise _fail(source, f"{label}: a {t['kind']} tensor needs a raw-<dtype> encoding, "
                        f"got {t['encoding']!r}")
        if t["kind"] == "param":
            of, pname, pshape = t.get("param_of"), t.get("param"), t.get("param_shape")
            if kinds.get(of) != "codes" if isinstance(of, str) else True:
                raise _fail(source, f"{label}: field param_of must name a codes tensor, got "
                            f"{of!r}")
            if not isinstance(pname, str):
                raise _fail(source, f"{label}: field param must be a str, got {pname!r}")
            if not _shape(pshape) or math.prod(pshape) != math.prod(t["shape"]):
                raise _fail(source, f"{label}: field param_shape {pshape!r} does not hold its "
                            f"{math.prod(t['shape'])} stored values")
    pairs = [(t["param_of"], t["param"]) for t in tensors if t["kind"] == "param"]
    if len(set(pairs)) != len(pairs):
        raise _fail(source, "two param tensors give the same parameter of the same codes")


def decode(t: dict, blobs: dict[str, bytes], source: str) -> np.ndarray:
    """:func:`~fewbits.export.container.decode_tensor` with its errors as FormatError."""
    try:
        return decode_tensor(t, blobs[t["name"]])
    except ValueError as e:
        raise _fail(source, str(e)) from None


def model_budget(header: dict) -> tuple[int, int]:
    """``(tensors, elements)`` a model rebuilt from this file may hold: every weight, buffer
    and batch-norm statistic comes from a stored tensor, and each quantizer keeps at most a
    few tensors of its weight's size (INQ: mask and fixed values)."""
    tensors = header["tensors"]
    elements = sum(math.prod(t["shape"]) for t in tensors)
    return 4 * len(tensors) + 64, 4 * elements + (1 << 16)


class OverBudget(ValueError):
    """A model's options describe more tensors or values than its file holds."""


class _Budget:
    """Counts tensors registered while a model is built; stops the build past the budget."""

    local = threading.local()

    def __init__(self, tensors: int, elements: int) -> None:
        self.max_tensors, self.max_elements = tensors, elements
        self.tensors = self.elements = 0

    def add(self, _module: nn.Module, name: str, value: Any) -> None:
        if value is None or self.local.__dict__.get("active") is not self:
            return
        self.tensors += 1
        self.elements += value.numel()
        if self.tensors > self.max_tensors or self.elements > self.max_elements:
            raise OverBudget(f"{self.tensors} tensors / {self.elements} values so far; the "
                              f"file can describe at most {self.max_tensors} / "
                              f"{self.max_elements}")


def create_within(name: str, kwargs: dict, tensors: int, elements: int, *,
                  meta: bool = False) -> nn.Module:
    """``create_model(name, **kwargs)``, first built on the ``meta`` device (no memory): a
    build that registers more than ``tensors`` tensors or ``elements`` values stops there with
    ``OverBudget`` (a ValueError) instead of building layers for minutes or allocating
    gigabytes. Other construction errors propagate. ``meta=True`` returns that meta-device
    build (shapes only, as the binary engine needs) instead of building again."""

    budget = _Budget(tensors, elements)
    hooks = [nn.modules.module.register_module_parameter_registration_hook(budget.add),
             nn.modules.module.register_module_buffer_registration_hook(budget.add)]
    _Budget.local.active = budget
    try:
        with torch.device("meta"):
            shapes = create_model(name, **kwargs)
    finally:
        _Budget.local.active = None
        for h in hooks:
            h.remove()
    return shapes if meta else create_model(name, **kwargs)


def build_bounded(header: dict, source: str, *, meta: bool = False) -> nn.Module:
    """The model of a ``.fewbits`` header, within :func:`model_budget` (see
    :func:`create_within`; ``meta``: on the meta device): options such as ``depth=10**6`` or
    ``width=10**9`` are refused in milliseconds."""
    name, kwargs = header["model"]["name"], header["model"]["kwargs"]
    try:
        return create_within(name, kwargs, *model_budget(header), meta=meta)
    except OverBudget as e:
        raise _fail(source, f"field model.kwargs {kwargs!r}"[:300] + " describes a network "
                    f"larger than the file can hold ({e})") from None
    except (ValueError, TypeError, RecursionError, OverflowError, MemoryError,
            RuntimeError) as e:
        raise _fail(source, f"field model.kwargs: {name!r} cannot be built with "
                    f"{kwargs!r}"[:300] + f" ({type(e).__name__}: {e})"[:300]) from None


def check_codes(name: str, codes: Any, q: Any, param: torch.Tensor, source: str) -> None:
    """The stored codes of ``name`` must be what the model's quantizer ``q`` writes for
    ``param``: same ``bits``, same shape, the same side parameters with the same shapes (their
    dtypes are made the quantizer's). Anything else would decode to a silently wrong weight."""
    label = f"tensor {name!r}"
    try:
        ref = q.encode(param.detach())
        bits, shape = ref.bits, tuple(ref.shape)
    except ValueError:  # a quantizer that encodes only when trained (INQ): its declared bits
        ref, bits, shape = None, getattr(q, "bits", None), tuple(param.shape)
    if codes.bits != bits:
        raise _fail(source, f"{label}: field bits is {codes.bits}, the model's quantizer "
                    f"writes {bits}-bit codes")
    if tuple(codes.shape) != shape:
        raise _fail(source, f"{label}: field shape {list(codes.shape)} is not the layer's "
                    f"{list(shape)}")
    if ref is None:
        return
    if set(codes.params) != set(ref.params):
        raise _fail(source, f"{label}: its param tensors {sorted(codes.params)} are not the "
                    f"quantizer's {sorted(ref.params)}")
    for k, want in ref.params.items():
        got = codes.params[k]
        if tuple(got.shape) != tuple(want.shape):
            raise _fail(source, f"tensor {name + '#' + k!r}: field param_shape "
                        f"{list(got.shape)} is not the quantizer's {list(want.shape)}")
        codes.params[k] = got.to(want.dtype)
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise _fail(source, f"tensor {name + '#' + k!r} holds a value that is not finite")
    # a code the packing can hold but the quantizer never writes (a ternary 3, a signed
    # fixed-point 2**n - 1) decodes to a value off its grid: refuse it where the family says
    # its grid (the family protocol's affine form)
    aff = q.affine(codes)
    if aff is None:
        return
    k = aff.int_repr
    if k.numel() and (int(k.min()) < aff.qmin or int(k.max()) > aff.qmax):
        raise _fail(source, f"{label}: a code decodes to {int(k.min())}..{int(k.max())}, "
                    f"outside the quantizer's grid [{aff.qmin}, {aff.qmax}]")
    if bool((aff.scale < 0).any()):
        raise _fail(source, f"{label}: its scale is negative (a quantizer's scale is >= 0)")
    # the model runs the decoded values, the integer engine and the ONNX export the affine
    # form: a file whose params disagree (a min-max zero_point that is not its lo, a scale
    # edited alone) would give each path other logits; they differ by float rounding at most
    view = (-1,) + (1,) * (k.dim() - 1) if aff.axis is not None else ()
    s, z = aff.scale.double().reshape(view), aff.zero_point.double().reshape(view)
    dec = q.decode(codes).double().reshape(k.shape)
    gap = (dec - (k.double() - z) * s).abs()
    slack = 1e-5 * s * ((k.double() - z).abs() + z.abs() + 1)
    if k.numel() and not bool((gap <= slack).all()):
        raise _fail(source, f"{label}: its codes decode to other values than their scale and "
                    f"zero point say (up to {float(gap.max()):.3g} apart); its params disagree")


def check_input_shape(model: nn.Module, shape: tuple[int, ...], name: str) -> None:
    """Eval-mode forward (no state changes) of one blank ``shape`` image: ``ValueError`` naming
    the shape when a model that declares none cannot take it (its graph would fail)."""
    was = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()(torch.zeros(1, *shape))
    except RuntimeError as e:
        first = str(e).splitlines()[0][:200]
        raise ValueError(f"model {name!r} cannot take input_shape={shape} ({first}); give the "
                         "(C, H, W) of the images it was trained on (on the command line: "
                         "--input-shape C,H,W)") from None
    finally:
        model.train(was)
