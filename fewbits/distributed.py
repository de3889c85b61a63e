"""Data-parallel training across processes started by ``torchrun`` (PyTorch DDP).

fewbits has no launcher of its own: ``torchrun --nproc_per_node N classification.py ...`` starts
N processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_from_env` reads them and joins the process group (``gloo`` on the
CPU, ``nccl`` on CUDA, each process on GPU ``LOCAL_RANK``). Without those variables (or with
``WORLD_SIZE=1``) everything here is a cheap no-op, so single-process code paths are the same.

    >>> info = init_from_env("cpu")    # no torchrun: rank 0 of 1
    >>> info.world_size, info.is_main
    (1, True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .quantizers import Quantizer
from .quantizers.min_max import gather_in_rank_order

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "cleanup",
    "init_from_env",
    "sync_quantizers",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size``, GPU ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the monitor files and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    ``device_type`` is ``"cpu"`` (backend ``gloo``) or ``"cuda"`` (``nccl``). Returns rank 0 of
    1 when ``WORLD_SIZE`` is unset or 1. Calling it again in an initialised process returns the
    existing group's info.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world <= 1:
        return DistInfo()
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run a single process")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set: start distributed runs "
                "with `torchrun --nproc_per_node N classification.py ...`"
            )
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, backend)


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Sum ``t`` over ranks in place (no-op for one process); returns ``t``."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (batch-norm statistics, quantizer state) to every rank, so that
    all ranks evaluate and save the same model."""
    if info.distributed:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def sync_quantizers(model: nn.Module, info: DistInfo) -> None:
    """Make the statistics of every batch/EMA min-max quantizer of ``model`` agree across ranks.

    Definition: N ranks equal one process that runs the ranks' micro-batches one after the other
    in rank order (micro-batch ``j * N + r`` of a step with ``--accum-steps``, as the trainer
    slices the global batch), which is what single-process gradient accumulation does. At each
    training forward every rank all-gathers the ``(min, max)`` of its batch (one small
    collective per quantizer, like ``SyncBatchNorm``) and applies all of them in rank order:
    rank ``r`` quantizes with the ranges after micro-batches ``0..r`` (its own batch's range in
    ``batch`` mode, the EMA through its batch in ``ema`` mode), and every rank ends the forward
    with the state after all N, so buffers never diverge and DDP's buffer broadcast changes
    nothing. An all-reduced min/max would give one range per step, but no single process can
    match it: its first micro-batch is quantized before it sees the second. Learned ranges are
    parameters (gradients all-reduced by DDP); INQ needs nothing, as its counter advances once per
    optimizer step on every rank (:func:`fewbits.layers.count_optimizer_steps`). Every rank must
    then run the same training forwards (eval forwards do not synchronise). A no-op for one
    process.

    Inside the forward of a ``DistributedDataParallel`` that spans several processes the same
    exchange happens without this call (over DDP's process group, :class:`MinMax`); call it for
    loops that run the model on several processes outside DDP's forward.
    """
    if not info.distributed:
        return
    for m in model.modules():
        if isinstance(m, Quantizer):  # each family says what it exchanges (MinMax: ranges)
            m.sync_statistics(partial(gather_in_rank_order, group=None))


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (safe to call twice)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
