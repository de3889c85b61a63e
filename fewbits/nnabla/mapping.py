"""Map the parameters of NNabla's CIFAR-10 quantization example onto fewbits' ResNet-23.

The example (sony/nnabla-examples ``compression/cifar10/quantization/models.py``) builds each
``cifar10_<family>_resnet23_prediction`` under parameter scopes ``conv1`` (the stem),
``conv2`` .. ``conv8`` (the residual units, each with ``conv1`` .. ``conv3`` inside) and the
final affine at the top. Inside each, the parametric function's own scope
(:data:`LAYER_SCOPES`) holds the weights, ``bn`` the batch norm and, in ``min_max``,
``min_max_quantize`` the activation range (the unit's residual quantizer sits in the unit
scope). :func:`load_parameters` checks every name, shape and value and writes them into a
fewbits model built with ``nnabla=True``:

* convolution weights as they are (both ``(out, in, kh, kw)``); affine weights transposed
  (NNabla stores ``(in, out)``); batch-norm ``beta``, ``gamma``, ``mean``, ``var``
  (``(1, C, 1, 1)``) into ``bias``, ``weight``, ``running_mean``, ``running_var``;
* min-max ranges ``qr_min`` / ``qr_max`` as they are (weights: under
  ``min_max_quantize_w/min_max_quantize``), their ``ql_min`` / ``ql_max`` checked against the
  model's levels; INQ's indicator ``I`` as the mask of fixed weights, whose values are the
  power-of-two levels of the stored ``W`` (NNabla re-quantizes them at every forward);
* the stored derived copies ``Wb`` (binary), ``alpha`` (binary weight), ``W_q`` / ``b_q``
  (fixed point, pow2, min-max) and INQ's fixed ``W`` entries are compared with what fewbits
  computes from ``W``: a disagreement means other numerics (another ``--bit-width`` or
  ``--delta``, or a file saved between an update and a forward) and is an error.

    >>> from fewbits.models import create_model
    >>> names = expected_parameters(create_model("cifar10_resnet23_prediction", nnabla=True))
    >>> names["conv1/conv/W"], names["affine/W"], len(names)
    ((64, 3, 3, 3), (64, 10), 112)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import functional as qf
from ..layers import QuantAct
from ..models import ResNet23
from ..models.nets import NNABLA_NO_FC_BIAS, NNablaBatchNorm2d
from ..quantizers import INQ
from .files import NNablaImportError, read_parameters

__all__ = ["LAYER_SCOPES", "NNABLA_INQ_BITS", "ImportReport", "expected_parameters",
           "file_iteration", "load_parameters"]

#: The parametric-function scope of each family's convolutions and final affine
#: (``@parametric_function_api`` in ``nnabla/parametric_functions.py``).
LAYER_SCOPES: dict[str, tuple[str, str]] = {
    "float": ("conv", "affine"),
    "binary_connect": ("bicon_conv", "bicon_affine"),
    "binary_net": ("bicon_conv", "bicon_affine"),
    "binary_weight": ("bwn_conv", "bwn_affine"),
    "fp_connect": ("fp_quantized_conv", "fp_quantized_affine"),
    "fp_net": ("fp_quantized_conv", "fp_quantized_affine"),
    "pow2_connect": ("pow2_quantized_conv", "pow2_quantized_affine"),
    "pow2_net": ("pow2_quantized_conv", "pow2_quantized_affine"),
    "inq": ("inq_conv", "inq_affine"),
    "min_max": ("min_max_quantized_conv", "min_max_quantized_affine"),
}
#: INQ's bit width in the example: ``models.py`` passes no ``num_bits`` to
#: ``PF.inq_convolution`` / ``PF.inq_affine``, whose default is 4, whatever ``--bit-width``.
NNABLA_INQ_BITS = 4
_DERIVED = {"binary_connect": ("Wb",), "binary_net": ("Wb",), "binary_weight": ("Wb", "alpha"),
            "fp_connect": ("W_q",), "fp_net": ("W_q",), "pow2_connect": ("W_q",),
            "pow2_net": ("W_q",), "inq": ("I",), "min_max": ("W_q",)}
_BN = {"beta": "bias", "gamma": "weight", "mean": "running_mean", "var": "running_var"}
_MM = ("ql_min", "ql_max", "qr_min", "qr_max")
_ALPHA_RTOL = 1e-4  # NNabla sums |W| in float32 and multiplies by float32(1 / n)


@dataclass
class ImportReport:
    """What :func:`load_parameters` did: the file, the family, how many parameters and values
    it took, which derived copies it checked, and notes on NNabla semantics it reproduced."""

    source: str
    family: str
    parameters: int
    values: int
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Slot:
    scope: str  # e.g. "conv3/conv2"; "" for the final affine
    layer: nn.Module
    affine: bool
    bn: nn.Module | None = None
    act: nn.Module | None = None  # min_max activation quantizer (QuantAct)
    act_scope: str = ""


def _slots(model: nn.Module) -> list[_Slot]:
    def parts(seq: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        bn = next((m for m in seq if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
        act = next((m for m in seq if isinstance(m, QuantAct)
                    and getattr(m.quantizer, "name", None) == "min_max"), None)
        return bn, act

    bn, act = parts(model.stem_post)
    out = [_Slot("conv1", model.stem, False, bn, act, "conv1")]
    for k, unit in enumerate(model.units):
        s = f"conv{k + 2}"
        for j, (conv, post) in enumerate(((unit.conv1, unit.post1), (unit.conv2, unit.post2),
                                          (unit.conv3, unit.post3)), 1):
            bn, act = parts(post)
            out.append(_Slot(f"{s}/conv{j}", conv, False, bn, act,
                             s if j == 3 else f"{s}/conv{j}"))
    out.append(_Slot("", model.fc, True))
    return out


def _check_model(model: nn.Module) -> str:
    if not isinstance(model, ResNet23):
        raise NNablaImportError(
            f"NNabla parameters load into a fewbits cifar10_*_resnet23_prediction network, got "
            f"{type(model).__name__}; build one with create_model(NET, nnabla=True)")
    fam = model.family
    if fam not in LAYER_SCOPES:
        raise NNablaImportError(f"the NNabla example has no {fam!r} network; its families: "
                                f"{', '.join(LAYER_SCOPES)}")
    plain = [n for n, m in model.named_modules()
             if isinstance(m, nn.BatchNorm2d) and not isinstance(m, NNablaBatchNorm2d)]
    if plain:
        raise NNablaImportError(
            f"the model computes batch norm in PyTorch's folded order ({plain[0]}), not "
            "NNabla's, which moves quantized activations; build it with "
            f"create_model({model.fewbits_spec['name']!r}, nnabla=True)"
            if hasattr(model, "fewbits_spec") else "build it with nnabla=True")
    return fam


def expected_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """NNabla's parameter names for ``model`` (a ``ResNet23`` built with ``nnabla=True``) and
    the shape each has in NNabla's layout, in NNabla's creation order. Raises
    :class:`NNablaImportError` for a model that is not one."""
    fam = _check_model(model)
    conv_scope, affine_scope = LAYER_SCOPES[fam]
    out: dict[str, tuple[int, ...]] = {}
    for slot in _slots(model):
        w = tuple(slot.layer.weight.shape)
        scope = f"{slot.scope}/{conv_scope}" if slot.scope else affine_scope
        shape = (w[1], w[0]) if slot.affine else w
        out[f"{scope}/W"] = shape
        for name in _DERIVED.get(fam, ()):
            out[f"{scope}/{name}"] = (w[0],) if name == "alpha" else shape
        if fam == "min_max":
            for name in _MM:
                out[f"{scope}/min_max_quantize_w/min_max_quantize/{name}"] = (1,) * len(shape)
        if slot.affine and slot.layer.bias is not None:
            out[f"{scope}/b"] = (w[0],)
            if fam in ("fp_connect", "fp_net", "pow2_connect", "pow2_net"):
                out[f"{scope}/b_q"] = (w[0],)
        if slot.bn is not None:
            c = slot.bn.num_features
            for name in _BN:
                out[f"{slot.scope}/bn/{name}"] = (1, c, 1, 1)
        if slot.act is not None:
            for name in _MM:
                out[f"{slot.act_scope}/min_max_quantize/{name}"] = (1, 1, 1, 1)
    return out


def _family_of_file(names: Any) -> set[str]:
    scopes = {n.split("/")[1] for n in names if n.startswith("conv1/") and n.count("/") >= 2}
    return {f for f, (conv, _) in LAYER_SCOPES.items() if conv in scopes}


def file_iteration(path: str | os.PathLike) -> int:
    """The iteration an NNabla parameter file was saved at, from the example's name
    ``params_N.h5`` (``classification.py``); 0 for any other name.

        >>> file_iteration("monitor.bc/params_012000.h5"), file_iteration("model.nnp")
        (12000, 0)
    """
    m = re.fullmatch(r"params_(\d{1,9})\.(h5|nnp|protobuf)", os.path.basename(str(path)))
    return int(m.group(1)) if m else 0


def load_parameters(path: str | os.PathLike | dict[str, np.ndarray], model: nn.Module, *,
                    iteration: int | None = None, check_derived: bool = True) -> ImportReport:
    """Load an NNabla parameter file (``.h5``, ``.nnp``, ``.protobuf``, or the dict of
    :func:`fewbits.nnabla.read_parameters`) into ``model``, a fewbits
    ``cifar10_<family>_resnet23_prediction`` built with ``nnabla=True`` and the options the
    NNabla run used (``bit_width``, ``delta``, ``upper_bound``, ``ql_min``, ``ql_max``).

    ``iteration`` (default: the ``N`` of a ``params_N.h5`` name, else 0) is where INQ's
    schedule stands: its counter, so that a resumed run fixes the next weights when NNabla's
    would. ``check_derived=False`` turns a disagreeing derived copy into a note.

    Raises :class:`NNablaImportError` naming the parameter for a missing or extra name, a
    shape that does not fit, a file of another family than the model's, a non-finite value,
    a negative batch-norm variance, an INQ indicator other than 0/1, min-max levels other
    than the model's, or a derived copy (``Wb``, ``alpha``, ``W_q``, ``b_q``, INQ's fixed
    weights) that differs from what fewbits computes from ``W``.

        >>> from fewbits.models import create_model
        >>> model = create_model("cifar10_binary_connect_resnet23_prediction", nnabla=True)
        >>> load_parameters("params_040000.h5", model)      # doctest: +SKIP
    """
    src = "<parameters>" if isinstance(path, dict) else str(path)
    params = dict(path) if isinstance(path, dict) else read_parameters(path)
    expected = expected_parameters(model)
    fam = model.family
    found = _family_of_file(params)
    if found and fam not in found:
        raise NNablaImportError(
            f"{src} holds a {' or '.join(sorted(found))} network (parameters under "
            f"conv1/{LAYER_SCOPES[sorted(found)[0]][0]}/) but the model is {fam} (conv1/"
            f"{LAYER_SCOPES[fam][0]}/); use --net cifar10_{sorted(found)[0]}_resnet23_prediction")
    missing = [n for n in expected if n not in params]
    extra = [n for n in params if n not in expected]
    if missing or extra:
        def show(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5
                                           else "")
        what = ([f"missing {show(missing)}"] if missing else []) + \
               ([f"not in the network: {show(extra)}"] if extra else [])
        raise NNablaImportError(f"{src}: the parameters do not match "
                                f"{model.fewbits_spec['name']}: " + "; ".join(what))
    for name, shape in expected.items():
        a = params[name]
        if tuple(a.shape) != shape:
            raise NNablaImportError(f"{src}: parameter {name!r} has shape {tuple(a.shape)}, the "
                                    f"network needs {shape}")
        if not np.isfinite(a).all():
            raise NNablaImportError(f"{src}: parameter {name!r} holds "
                                    f"{int((~np.isfinite(a)).sum())} NaN or infinite values")
    report = ImportReport(src, fam, len(params), int(sum(a.size for a in params.values())))
    it = file_iteration(src) if iteration is None else int(iteration)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for slot in _slots(model):
                _load_slot(slot, params, fam, src, report, check_derived, it)
    finally:
        model.train(was)
    _notes(model, fam, report)
    return report


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _differs(src: str, name: str, what: str, report: ImportReport, check: bool) -> None:
    msg = (f"{src}: stored {name!r} differs from {what} (other numerics: check --bit-width, "
           "--delta, --upper-bound, --ql-min/--ql-max against the NNabla run, or the file was "
           "saved between an update and a forward)")
    if check:
        raise NNablaImportError(msg)
    report.notes.append(msg)


def _load_slot(slot: _Slot, params: dict[str, np.ndarray], fam: str, src: str,
               report: ImportReport, check: bool, iteration: int) -> None:
    conv_scope, affine_scope = LAYER_SCOPES[fam]
    scope = f"{slot.scope}/{conv_scope}" if slot.scope else affine_scope
    layer = slot.layer
    w_nn = params[f"{scope}/W"]
    w = _t(w_nn.T if slot.affine else w_nn).to(layer.weight.device)
    layer.weight.copy_(w)
    if slot.affine and layer.bias is not None:
        layer.bias.copy_(_t(params[f"{scope}/b"]))
    wq = layer.weight_quantizer
    if fam == "min_max":
        _load_min_max(wq, params, f"{scope}/min_max_quantize_w/min_max_quantize", src)
    if fam == "inq":
        _load_inq(wq, params, scope, w, slot.affine, src, report, check, iteration)
    for name in _DERIVED.get(fam, ()):
        key = f"{scope}/{name}"
        stored = params[key]
        if name == "I":
            continue
        if name == "alpha":
            mine = qf.binary_weight_scale(w).cpu().numpy()
            if not np.allclose(stored, mine, rtol=_ALPHA_RTOL, atol=0.0):
                _differs(src, key, "the mean |W| per output channel fewbits computes", report,
                         check)
        else:
            q = qf.binary_connect(w) if name == "Wb" else wq(w)
            mine = (q.T if slot.affine else q).cpu().numpy()
            if not np.array_equal(stored, mine):
                n = int((stored != mine).sum())
                _differs(src, key, f"fewbits' quantization of W in {n} of {mine.size} values",
                         report, check)
        report.checked.append(key)
    if slot.affine and layer.bias is not None and layer.bias_quantizer is not None \
            and f"{scope}/b_q" in params:
        mine = layer.bias_quantizer(layer.bias).cpu().numpy()
        if not np.array_equal(params[f"{scope}/b_q"], mine):
            _differs(src, f"{scope}/b_q", "fewbits' quantization of b", report, check)
        report.checked.append(f"{scope}/b_q")
    if slot.bn is not None:
        var = params[f"{slot.scope}/bn/var"]
        if (var < 0).any():
            raise NNablaImportError(f"{src}: parameter '{slot.scope}/bn/var' has negative "
                                    "variances (NNabla's batch norm would output NaN)")
        for nn_name, attr in _BN.items():
            getattr(slot.bn, attr).copy_(_t(params[f"{slot.scope}/bn/{nn_name}"]).reshape(-1))
    if slot.act is not None:
        _load_min_max(slot.act.quantizer, params, f"{slot.act_scope}/min_max_quantize", src)


def _load_min_max(q: nn.Module, params: dict[str, np.ndarray], prefix: str, src: str) -> None:
    for name, want in (("ql_min", q.ql_min), ("ql_max", q.ql_max)):
        v = float(params[f"{prefix}/{name}"].reshape(-1)[0])
        if v != want:
            raise NNablaImportError(f"{src}: parameter '{prefix}/{name}' is {v:g} but the "
                                    f"model quantizes to {name} {want}; pass "
                                    f"--{name.replace('_', '-')} {v:g}")
    for name in ("qr_min", "qr_max"):
        getattr(q, name).copy_(_t(params[f"{prefix}/{name}"]).reshape(getattr(q, name).shape))


def _load_inq(q: INQ, params: dict[str, np.ndarray], scope: str, w: torch.Tensor,
              affine: bool, src: str, report: ImportReport, check: bool,
              iteration: int) -> None:
    ind = params[f"{scope}/I"]
    if not np.isin(ind, (0.0, 1.0)).all():
        raise NNablaImportError(f"{src}: parameter '{scope}/I' holds values other than 0 and 1 "
                                "(it is INQ's indicator of fixed weights)")
    mask = torch.from_numpy(np.array(ind.T if affine else ind) == 1.0).to(w.device)
    if q.num_bits != NNABLA_INQ_BITS:
        raise NNablaImportError(
            f"the model's INQ quantizes to {q.num_bits} bits, but NNabla's example always used "
            f"{NNABLA_INQ_BITS} (models.py passes no num_bits); build it with bit_width="
            f"{NNABLA_INQ_BITS}")
    levels = qf.inq_levels(w, q.num_bits)
    # NNabla overwrites fixed entries of W with their level at every forward: they must agree
    if not torch.equal(w[mask], levels[mask]):
        n = int((w[mask] != levels[mask]).sum())
        _differs(src, f"{scope}/W", f"its power-of-two level in {n} fixed (I = 1) entries",
                 report, check)
    q.mask = mask
    q.fixed = torch.where(mask, levels, torch.zeros_like(levels))
    q.set_extra_state({"counter": iteration,
                       "stage": sum(i < iteration for i in q.inq_iterations)})
    report.checked.append(f"{scope}/I")


def _notes(model: nn.Module, fam: str, report: ImportReport) -> None:
    report.notes.append("batch norm follows NNabla's test-mode order ((x - mean) * gamma / "
                        "sqrt(var + 1e-5) + beta, float32)")
    if fam == "inq":
        report.notes.append(f"INQ: {NNABLA_INQ_BITS} bits, as NNabla's example computed "
                            "whatever --bit-width it was given")
    if fam in ("fp_connect", "fp_net", "pow2_connect", "pow2_net", "min_max"):
        report.notes.append(
            "NNabla's example always trained with fine-grained straight-through estimators "
            "(its --ste-fine-grained parsed any value as true)" + (
                "; this model has ste_fine_grained=False, which changes further training only"
                if not model.cfg.ste_fine_grained else ""))
    if fam in NNABLA_NO_FC_BIAS:
        report.notes.append(f"{fam}: the final affine has no bias, as in NNabla's example")
