"""HuggingFace ``transformers`` integration (``pip install 'fewbits[hf]'``): a model quantized by
fewbits saves with ``save_pretrained`` and comes back from ``from_pretrained`` quantized, through
transformers' public quantizer registration (``register_quantization_config`` /
``register_quantizer``, method name ``"fewbits"``).

:func:`quantize_hf` converts a ``PreTrainedModel`` with :func:`fewbits.quantize_` and records
the conversion (family or role specs, ``skip``) as the model's ``quantization_config``;
``save_pretrained`` writes it to ``config.json`` with every quantizer's state (learned ranges,
INQ masks, fixed values and counters) in the weights file. ``from_pretrained`` reads the
config, converts the freshly built model the same way before its weights load (the
:class:`FewbitsHfQuantizer`), and loads the quantizer state with the weights: the logits are
those of the saved model, bit for bit.

    >>> from transformers import BertConfig, BertModel            # doctest: +SKIP
    >>> model = quantize_hf(BertModel(BertConfig(...)), "binary_connect")   # doctest: +SKIP
    >>> model.save_pretrained(path)                                 # doctest: +SKIP
    >>> BertModel.from_pretrained(path)   # quantized again          # doctest: +SKIP

Importing this module needs ``transformers`` (``ImportError`` naming the extra otherwise); the
rest of fewbits never imports it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

try:
    from transformers.quantizers import (
        HfQuantizer,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("fewbits.hf needs transformers: pip install 'fewbits[hf]'") from e

from .convert import quantize_
from .hf_record import HF_QUANT_METHOD

__all__ = ["METHOD", "FewbitsConfig", "FewbitsHfQuantizer", "quantize_hf"]

#: The ``quant_method`` name fewbits registers with transformers.
METHOD = HF_QUANT_METHOD


@register_quantization_config(METHOD)
class FewbitsConfig(QuantizationConfigMixin):
    """The conversion of a fewbits model, as ``config.json``'s ``quantization_config``.

    - ``config``: what :func:`fewbits.quantize_` took: a family name or a dict of quantizer
      specs by role (JSON-able: names and dicts, no quantizer instances or callables);
    - ``skip``: the layer names or patterns left in float;
    - ``embeddings``, ``quantize_input``: ``quantize_``'s options, when set;
    - ``then``: later ``quantize_`` calls on the same model (``{"config", "skip", ...}`` each),
      replayed in order after the first.
    """

    def __init__(self, config: str | dict[str, Any] | None = None,
                 skip: Sequence[str] | None = None, *, embeddings: bool = False,
                 quantize_input: bool = False, then: Sequence[dict[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        self.quant_method = METHOD
        if config is None:
            raise ValueError("FewbitsConfig: config (a family name or a dict of quantizer specs "
                             "by role) is required")
        if not isinstance(config, (str, dict)):
            raise TypeError("FewbitsConfig: config must be a family name or a dict of quantizer "
                            f"specs by role (JSON-able), got {type(config).__name__}")
        if not isinstance(embeddings, bool) or not isinstance(quantize_input, bool):
            raise TypeError("FewbitsConfig: embeddings and quantize_input must be true or false")
        self.config = copy.deepcopy(config)
        self.skip = list(skip or [])
        self.embeddings, self.quantize_input = embeddings, quantize_input
        self.then = [FewbitsConfig(**step).to_dict() for step in then or []]  # each validated
        for step in self.then:
            if step.pop("then", None):
                raise ValueError("FewbitsConfig: a step of then= holds its own then=")
            step.pop("quant_method")

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": METHOD, "config": copy.deepcopy(self.config),
               "skip": list(self.skip)}
        out.update({k: True for k in ("embeddings", "quantize_input") if getattr(self, k)})
        if self.then:
            out["then"] = copy.deepcopy(self.then)
        return out

    def steps(self) -> list[dict[str, Any]]:
        """The ``quantize_`` calls to replay, in order: ``[{"config", "skip", ...}]``."""
        first = {k: v for k, v in self.to_dict().items() if k not in ("quant_method", "then")}
        return [first, *copy.deepcopy(self.then)]


@register_quantizer(METHOD)
class FewbitsHfQuantizer(HfQuantizer):
    """Converts a model that ``from_pretrained`` builds (on the meta device) as its saved
    :class:`FewbitsConfig` says, before the weights and quantizer state load into it."""

    requires_calibration = False

    def __init__(self, quantization_config: FewbitsConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ValueError("fewbits: from_pretrained(quantization_config=FewbitsConfig(...)) "
                             "on a float checkpoint is not supported; load the float model and "
                             "call fewbits.hf.quantize_hf(model, ...)")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any
                                             ) -> nn.Module:
        cfg = self.quantization_config
        hf_config = getattr(model, "config", None)
        kept = getattr(hf_config, "quantization_config", None)
        for step in cfg.steps():  # each call records itself again: keep the loaded record
            quantize_(model, step["config"], skip=step["skip"] or None,
                      embeddings=step.get("embeddings", False),
                      quantize_input=step.get("quantize_input", False))
        if hf_config is not None:
            hf_config.quantization_config = kept
        _expect_tied_quantizers_missing(model)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any
                                            ) -> nn.Module:
        share_tied_quantizers(model)
        return model

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def quantize_hf(model: nn.Module, config: str | dict[str, Any], *,
                skip: str | Sequence[str] | None = None) -> nn.Module:
    """:func:`fewbits.quantize_` a transformers ``PreTrainedModel`` in place and record the
    conversion as ``model.config.quantization_config`` (a :class:`FewbitsConfig`), so that
    ``save_pretrained`` / ``from_pretrained`` round-trip it quantized; returns ``model``.

    ``config`` must be JSON-able (a family name or a dict of specs by role); a callable config
    cannot be written to ``config.json`` (``TypeError``). Raises ``TypeError`` for a model
    without a transformers ``config``.
    """
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise TypeError(f"quantize_hf needs a transformers PreTrainedModel, got "
                        f"{type(model).__name__}; use fewbits.quantize_ for other models")
    skip_list = [skip] if isinstance(skip, str) else list(skip or [])
    qcfg = FewbitsConfig(config, skip_list)
    quantize_(model, config, skip=skip_list or None)  # sets the quantizers' tensor_extra_state
    record = getattr(hf_config, "quantization_config", None)  # quantize_'s, with earlier calls
    if isinstance(record, dict) and record.get("quant_method") == METHOD:
        qcfg = FewbitsConfig(**{k: v for k, v in record.items() if k != "quant_method"})
    elif isinstance(record, FewbitsConfig):
        qcfg = record
    hf_config.quantization_config = qcfg
    model.hf_quantizer = FewbitsHfQuantizer(qcfg, pre_quantized=True)
    return model


def _tied_quantizer_pairs(model: nn.Module) -> list[tuple[str, str, nn.Module, str, nn.Module,
                                                           str]]:
    """``(target, source, target layer, role, source layer, source role)`` of each tied weight
    (``target`` / ``source``: parameter names) whose two layers both carry its quantizer."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    modules = dict(model.named_modules())
    out = []
    for target, source in tied.items():
        (tname, _, role), (sname, _, srole) = target.rpartition("."), source.rpartition(".")
        tmod, smod = modules.get(tname), modules.get(sname)
        if getattr(tmod, f"{role}_quantizer", None) is not None and \
                getattr(smod, f"{srole}_quantizer", None) is not None:
            out.append((target, source, tmod, role, smod, srole))
    return out


def _expect_tied_quantizers_missing(model: nn.Module) -> None:
    """Tell ``from_pretrained`` that a tied layer's quantizer state is not in the checkpoint
    by design (``save_pretrained`` stored the shared quantizer once, under the tie's source;
    :func:`share_tied_quantizers` gives it back after loading): its load report listed those
    keys as ``MISSING`` ("newly initialized") although the loaded model is right."""
    ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    for target, *_ in _tied_quantizer_pairs(model):
        ignore.add(rf"^{re.escape(target)}_quantizer\.")
    model._keys_to_ignore_on_load_missing = ignore


def share_tied_quantizers(model: nn.Module) -> None:
    """Give the layers of each tied weight one quantizer again, as ``quantize_`` did.

    ``from_pretrained`` converts the model before ``tie_weights``, so each tied layer gets its
    own quantizer, while ``save_pretrained`` stored the shared one once, under the tie's source
    (the input embedding): the target's quantizer would keep its fresh state (min-max ranges,
    LSQ step, INQ masks) and its outputs would be silently wrong. The source's is the loaded one.
    """
    for target, source, tmod, role, smod, srole in _tied_quantizer_pairs(model):
        tq, sq = getattr(tmod, f"{role}_quantizer"), getattr(smod, f"{srole}_quantizer")
        if tq is sq:
            continue
        if getattr(tmod, role) is not getattr(smod, srole) or tq.config() != sq.config():
            raise ValueError(f"fewbits: {target} is tied to {source} but their quantizers differ "
                             f"({tq.config()} vs {sq.config()}); cannot restore the saved one")
        setattr(tmod, f"{role}_quantizer", sq)

