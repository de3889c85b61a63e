"""SIGINT/SIGTERM during training: finish the iteration, save a checkpoint, stop.

The first signal only sets a flag that the loop reads after each iteration (every process of a
data-parallel run must stop at the same iteration, so they agree on it with one all-reduce);
a second signal stops at once with :class:`KeyboardInterrupt`.

    >>> import torch
    >>> from fewbits.distributed import DistInfo
    >>> with StopSignals() as stop:    # the loop asks after each iteration
    ...     stop.requested(1, DistInfo(), torch.device("cpu"), intervals=(10,))
    False
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import torch

from .. import distributed as fdist

__all__ = ["StopSignals", "TrainingInterrupted"]


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint.

    Attributes: ``signum``, ``iteration``, ``checkpoint`` (path), ``rank`` (of the process).
    """

    def __init__(self, signum: int, iteration: int, checkpoint: Path, rank: int = 0) -> None:
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        self.rank = rank
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(
            f"interrupted by {name} after iteration {iteration}; checkpoint saved to "
            f"{checkpoint}. Resume with the same command plus `--resume` (or "
            f"`--resume {checkpoint}`)."
        )


class StopSignals:
    """Context manager: while inside, SIGINT/SIGTERM set :attr:`signum` instead of stopping
    the process; the previous handlers come back on exit. Outside the main thread Python
    cannot install handlers, and nothing changes."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old_handlers: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: stop right now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers.clear()

    def requested(self, done: int, info: fdist.DistInfo, device: torch.device,
                  intervals: tuple[int, ...]) -> bool:
        """Whether to stop after iteration ``done``. Under torchrun the ranks must agree on
        where to stop: they ask only at multiples of one of ``intervals`` (one small
        all-reduce), and stop when any rank got a signal."""
        if not info.distributed:
            return self.signum is not None
        if all(done % k for k in intervals):
            return False
        flag = torch.tensor([0 if self.signum is None else 1], device=device)
        return bool(fdist.all_reduce_sum(flag, info).item())
