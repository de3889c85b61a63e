"""The device of a run (``-c/--context``, ``-d/--device-id``) and its mixed precision."""

from __future__ import annotations

import contextlib

import torch

from .. import distributed as fdist
from ..config import CONTEXTS, ConfigError

__all__ = ["autocast", "resolve_device"]


def resolve_device(context: str, device_id: int = 0,
                   info: fdist.DistInfo | None = None) -> torch.device:
    """``cpu`` -> the CPU; ``cudnn``/``cuda`` -> GPU ``device_id`` (``LOCAL_RANK`` under
    torchrun). Raises :class:`ConfigError` when CUDA is not available."""
    if context not in CONTEXTS:
        raise ConfigError(f"-c/--context: {context!r} is not one of {', '.join(CONTEXTS)}")
    if context == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA GPU is visible")
        raise ConfigError(
            f"-c {context} needs an NVIDIA GPU, but CUDA is not available ({why}, torch "
            f"{torch.__version__}). Use `-c cpu` to run on the CPU."
        )
    index = info.local_rank if info is not None and info.distributed else device_id
    if index >= torch.cuda.device_count():
        raise ConfigError(f"-d/--device-id {index}: only {torch.cuda.device_count()} CUDA "
                          "device(s) visible")
    return torch.device("cuda", index)



def autocast(device: torch.device, type_config: str):
    """``-t half``: autocast to float16 on CUDA, bfloat16 on the CPU; otherwise no change."""
    if type_config != "half":
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)

