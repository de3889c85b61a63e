"""Batches straight from in-memory uint8 tensors: shuffled, rank-sharded, exactly resumable.

:class:`BatchIterator` draws one seeded permutation per epoch (identical on every rank), cuts it
into global batches of ``batch_size * world_size`` and gives rank ``r`` rows
``[r * batch_size, (r + 1) * batch_size)`` of each. A batch is one ``index_select`` on the
dataset tensors: no per-image Python, no worker processes.

The permutation of epoch ``e`` comes from a fresh ``torch.Generator`` seeded with
``_epoch_seed(seed, e)``, so the state is just ``(epoch, position)``: ``state_dict()`` /
``load_state_dict()`` resume at exactly the next batch, even across epochs.

Example:
    >>> from fewbits.data import synthetic_dataset
    >>> ds = synthetic_dataset(10, (1, 2, 2), num_classes=2)
    >>> it = BatchIterator(ds, 4, seed=0)
    >>> x, y = next(it)
    >>> x.shape, y.shape, it.batches_per_epoch
    (torch.Size([4, 1, 2, 2]), torch.Size([4]), 2)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .base import ArrayDataset

__all__ = ["BatchIterator", "eval_batches", "to_float"]

_STATE_VERSION = 1
_MASK63 = (1 << 63) - 1


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct (seed, epoch) pairs give distinct generator seeds (for |seed|, epoch < 2**31).
    return (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0x2545F491) & _MASK63


class BatchIterator:
    """Infinite iterator of ``(images uint8 (B, C, H, W), labels int64 (B,))`` over epochs.

    Args:
        ds: the training split.
        batch_size: images per rank per step.
        shuffle: a new seeded permutation each epoch (``False``: dataset order).
        seed: permutation seed; must be the same on every rank.
        rank, world_size: this process's shard of each global batch.
        drop_last: drop the incomplete final global batch of each epoch (default). With
            ``False`` the final global batch is the remaining rows, cut by the same rule, so
            some ranks may get a short or even empty final batch; use :func:`eval_batches` for
            exact coverage instead.

    Attributes:
        epoch: current epoch (0-based). position: batches already consumed in it.
        batches_per_epoch: steps per epoch.
    """

    def __init__(
        self,
        ds: ArrayDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.ds = ds
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.num_examples = len(ds)
        self.global_batch = self.batch_size * self.world_size
        n, g = self.num_examples, self.global_batch
        self.batches_per_epoch = n // g if self.drop_last else -(-n // g)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"dataset {ds.name!r} has {n} images, fewer than one global batch "
                f"(batch_size {self.batch_size} x world_size {self.world_size} = {g}); use a "
                "smaller batch or drop_last=False"
            )
        self.epoch = 0
        self.position = 0
        self._perm: Tensor | None = None

    def _permutation(self) -> Tensor:
        if self._perm is None:
            if self.shuffle:
                gen = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
                self._perm = torch.randperm(self.num_examples, generator=gen)
            else:
                self._perm = torch.arange(self.num_examples)
        return self._perm

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._perm = None
        start = self.position * self.global_batch + self.rank * self.batch_size
        idx = self._permutation()[start : start + self.batch_size]
        self.position += 1
        return self.ds.images.index_select(0, idx), self.ds.labels.index_select(0, idx)

    def state_dict(self) -> dict[str, Any]:
        """Plain ints/bools (JSON-able): where the iterator is and what it was built with."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_examples": self.num_examples,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume at the batch after the one last drawn when ``d`` was saved.

        Raises ValueError if ``d`` came from an iterator with another seed, batch size, world
        size, dataset length, shuffle or drop_last (the batches would silently differ).
        """
        if d.get("version") != _STATE_VERSION:
            raise ValueError(
                f"BatchIterator state version {d.get('version')!r}, expected {_STATE_VERSION}"
            )
        mine = self.state_dict()
        diff = [
            f"{k}: saved {d.get(k)!r}, now {mine[k]!r}"
            for k in ("seed", "batch_size", "world_size", "num_examples", "shuffle", "drop_last")
            if d.get(k) != mine[k]
        ]
        if diff:
            raise ValueError(
                "cannot resume this BatchIterator from a state saved with other settings ("
                + "; ".join(diff)
                + "); build the iterator with the saved settings"
            )
        epoch, position = int(d["epoch"]), int(d["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"invalid BatchIterator state: epoch {epoch}, position {position} "
                f"(batches_per_epoch {self.batches_per_epoch})"
            )
        self.epoch, self.position, self._perm = epoch, position, None


def eval_batches(
    ds: ArrayDataset, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[Tensor, Tensor]]:
    """Deterministic batches of this rank's contiguous shard; all ranks together cover every
    image exactly once.

    Rank ``r`` gets rows ``[N*r // world_size, N*(r+1) // world_size)`` in order, in batches of
    ``batch_size`` (the last one shorter). Batches are views (no copy).

    Example:
        >>> from fewbits.data import synthetic_dataset
        >>> ds = synthetic_dataset(10, (1, 2, 2), num_classes=2)
        >>> [len(y) for _, y in eval_batches(ds, 4, rank=1, world_size=2)]
        [4, 1]
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    n, rank, world_size, batch_size = len(ds), int(rank), int(world_size), int(batch_size)
    return _slices(ds, n * rank // world_size, n * (rank + 1) // world_size, batch_size)


def _slices(ds: ArrayDataset, lo: int, hi: int, bs: int) -> Iterator[tuple[Tensor, Tensor]]:
    # A separate generator so that eval_batches validates its arguments when called.
    for s in range(lo, hi, bs):
        e = min(s + bs, hi)
        yield ds.images[s:e], ds.labels[s:e]


def to_float(x: Tensor, device: torch.device | str | None = None) -> Tensor:
    """``x.to(device, non_blocking=True).float() / 255``: uint8 images -> float in [0, 1].

    The division happens on ``device`` (after the 4x smaller uint8 transfer). ``device=None``
    keeps ``x``'s device. Pin ``x`` for a truly asynchronous host-to-GPU copy.

    Example:
        >>> to_float(torch.tensor([0, 51, 255], dtype=torch.uint8))
        tensor([0.0000, 0.2000, 1.0000])
    """
    if not isinstance(x, Tensor) or x.dtype != torch.uint8:
        raise TypeError(
            f"to_float expects a uint8 tensor (raw images), got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if device is not None:
        x = x.to(device, non_blocking=True)
    return x.float().div_(255)
