"""What a transformers model that :func:`fewbits.quantize_` converted records for
``save_pretrained`` (``fewbits.hf`` reads the record back in ``from_pretrained``).

Lives below :mod:`fewbits.convert` so that ``quantize_`` writes the record itself, without
importing transformers: a user who converts a ``PreTrainedModel`` with plain ``quantize_`` and
saves it gets a quantized model back, not the float one.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from .quantizers import Quantizer

__all__ = ["HF_QUANT_METHOD", "record_for_save_pretrained"]


#: The ``quant_method`` a converted transformers model records in its ``config.json``
#: (:func:`record_for_save_pretrained`; ``fewbits.hf`` registers it with transformers).
HF_QUANT_METHOD = "fewbits"


def record_for_save_pretrained(model: nn.Module, config: Any,
                               skip: str | Sequence[str] | None, embeddings: bool = False,
                               quantize_input: bool = False) -> None:
    """Make a transformers ``PreTrainedModel`` that :func:`quantize_` converted save as what
    it is: its quantizers' extra state goes into the weights file as tensors (safetensors holds
    nothing else; INQ's counter and stage, fixed point's ``delta``), and ``config.json`` gets
    ``quantization_config = {"quant_method": "fewbits", "config": ..., "skip": [...]}``, the
    record :class:`fewbits.hf.FewbitsConfig` reads. ``from_pretrained`` with ``fewbits.hf``
    imported converts the new model the same way before its weights load (logits bit for bit);
    without it, transformers warns that it skips the unknown ``"fewbits"`` quantization.
    Before, such a model came back float, its quantizer state dropped as unexpected keys.

    ``embeddings=True`` / ``quantize_input=True`` are recorded when set; a second
    ``quantize_`` with another conversion is appended to the record's ``"then"`` list (the
    first call's layers keep their quantizers, so the record replays the calls in order).

    Does nothing for other models, or where another library's ``quantization_config`` is set.
    A callable ``config`` cannot be written to ``config.json``: a ``UserWarning`` says so.

        >>> import torch
        >>> record_for_save_pretrained(torch.nn.Linear(2, 2), "binary_net", None)  # not HF: no-op
    """
    hf_config = getattr(model, "config", None)
    if not (hasattr(model, "save_pretrained") and hasattr(hf_config, "to_dict")):
        return
    for m in model.modules():  # see fixed_point / pow2 / inq get_extra_state
        if isinstance(m, Quantizer) and type(m).get_extra_state is not nn.Module.get_extra_state:
            m.tensor_extra_state = True
    old = getattr(hf_config, "quantization_config", None)
    method = old.get("quant_method") if isinstance(old, dict) else getattr(old, "quant_method",
                                                                             None)
    if old is not None and method != HF_QUANT_METHOD:
        return  # another library's record: not fewbits' to replace
    if callable(config):
        warnings.warn(f"{type(model).__name__}: a callable config cannot be written to "
                      "config.json, so save_pretrained / from_pretrained would bring this model "
                      "back float; give quantize_ a family name or a dict of specs by role",
                      UserWarning, stacklevel=3)
        return
    step = {"config": copy.deepcopy(config),
            "skip": [skip] if isinstance(skip, str) else list(skip or [])}
    step.update({k: True for k, v in (("embeddings", embeddings),
                                      ("quantize_input", quantize_input)) if v})
    if old is None:
        hf_config.quantization_config = {"quant_method": HF_QUANT_METHOD, **step}
        return
    record = old if isinstance(old, dict) else old.to_dict()  # fewbits.hf's FewbitsConfig
    then = list(record.get("then") or [])
    last = then[-1] if then else {k: v for k, v in record.items()
                                  if k not in ("quant_method", "then")}
    if last == step:  # the same call again converts nothing new
        return
    if isinstance(old, dict):
        old["then"] = [*then, step]
    else:
        old.then = [*then, step]
