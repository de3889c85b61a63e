"""Training monitor: the seed's series files, a curves plot, and a progress bar or log lines.

Files in the monitor folder, one ``"<iteration> <value>"`` line per record (as NNabla's
``MonitorSeries`` / ``MonitorTimeElapsed`` that the seed uses):

* ``Training-loss.series.txt``, ``Training-error.series.txt``: mean over the last 10 iterations,
  written at iterations ``i`` with ``(i + 1) % 10 == 0``;
* ``Training-time.timer.txt``: every 100 iterations, the wall-clock seconds since the previous
  record (since the start of this process for the first one);
* ``Test-error.series.txt``: each validation (the iteration is the number of steps done);
* ``training_curves.png``: loss and error curves (:func:`plot_curves`).

Per-iteration values arrive as 0-d device tensors and are only read back to the host when a
10-iteration window is written, so a GPU is not synchronised every step.

    >>> mon = Monitor("/tmp/run")                      # doctest: +SKIP
    >>> mon.add_train(9, torch.tensor([2.3, 0.9]))     # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from ._io import append_text, ensure_folder
from .checkpoint import atomic_write_bytes

__all__ = [
    "CURVES_FILE",
    "LOSS_FILE",
    "SERIES_FILES",
    "TEST_ERROR_FILE",
    "TIMER_FILE",
    "TRAIN_ERROR_FILE",
    "Monitor",
    "Progress",
    "plot_curves",
    "read_series",
    "write_json",
]

LOSS_FILE = "Training-loss.series.txt"
TRAIN_ERROR_FILE = "Training-error.series.txt"
TIMER_FILE = "Training-time.timer.txt"
TEST_ERROR_FILE = "Test-error.series.txt"
CURVES_FILE = "training_curves.png"
SERIES_FILES = (LOSS_FILE, TRAIN_ERROR_FILE, TIMER_FILE, TEST_ERROR_FILE)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_series(path: str | os.PathLike) -> tuple[list[int], list[float]]:
    """``(iterations, values)`` of a series file; a missing file gives two empty lists."""
    its: list[int] = []
    vals: list[float] = []
    p = Path(path)
    if not p.is_file():
        return its, vals
    for line in p.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            its.append(int(parts[0]))
            vals.append(float(parts[1]))
    return its, vals


def _keep_before(path: Path, stop: int) -> None:
    """Drop the records of iterations >= ``stop`` (a resumed run writes them again)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines()
             if ln.split() and int(ln.split()[0]) < stop]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())


class Monitor:
    """The seed's series files in ``path`` (nothing is written when ``enabled`` is False, e.g.
    on ranks other than 0).

    Args:
        path: the monitor folder (created).
        enabled: write files (rank 0) or only keep nothing (other ranks).
        interval: iterations averaged per training record (seed: 10).
        time_interval: iterations per timer record (seed: 100).
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True, interval: int = 10,
                 time_interval: int = 100) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.interval = int(interval)
        self.time_interval = int(time_interval)
        self._pending: list[Tensor] = []   # (loss, error) per iteration, still on the device
        self._loss: list[float] = []
        self._err: list[float] = []
        self._lap = time.perf_counter()
        if enabled:
            ensure_folder(self.path)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, start_iter: int = 0, state: dict[str, Any] | None = None) -> None:
        """Begin a run: a fresh run (``start_iter`` 0) empties the series files; a resumed run
        keeps the records before ``start_iter`` and restores the partial 10-iteration window."""
        self._pending.clear()
        self._loss = list(state.get("loss", [])) if state else []
        self._err = list(state.get("error", [])) if state else []
        self._lap = time.perf_counter()
        if not self.enabled:
            return
        for name in SERIES_FILES:
            p = self.path / name
            if start_iter == 0:
                atomic_write_bytes(p, b"")
            else:
                _keep_before(p, start_iter)

    def state_dict(self) -> dict[str, Any]:
        """The partial window (floats), for checkpoints; reads pending values back."""
        self._materialize()
        return {"loss": list(self._loss), "error": list(self._err)}

    # -- records ---------------------------------------------------------------------------
    def _materialize(self) -> None:
        if self._pending:
            rows = torch.stack(self._pending).tolist()
            self._pending.clear()
            for loss, err in rows:
                self._loss.append(float(loss))
                self._err.append(float(err))

    def _append(self, name: str, index: int, value: float) -> None:
        if self.enabled:
            append_text(self.path / name, f"{index} {value!r}\n")

    def add_train(self, index: int, stats: Tensor) -> tuple[float, float] | None:
        """Add iteration ``index``'s ``stats = [loss, error]`` (a 2-element tensor).

        At the end of a window returns the window's ``(mean loss, mean error)`` (and writes
        them), else ``None``.
        """
        if not self.enabled:
            return None
        self._pending.append(stats.detach().reshape(2))
        if (index + 1) % self.time_interval == 0:
            now = time.perf_counter()
            self._append(TIMER_FILE, index, now - self._lap)
            self._lap = now
        if (index + 1) % self.interval != 0:
            return None
        self._materialize()
        loss = math.fsum(self._loss) / len(self._loss)
        err = math.fsum(self._err) / len(self._err)
        self._loss, self._err = [], []
        self._append(LOSS_FILE, index, loss)
        self._append(TRAIN_ERROR_FILE, index, err)
        return loss, err

    def finish(self, index: int) -> None:
        """End of training at iteration ``index``: write the timer's partial window (so a run
        shorter than ``time_interval`` iterations still records its time)."""
        if self.enabled and (index + 1) % self.time_interval != 0:
            self._append(TIMER_FILE, index, time.perf_counter() - self._lap)
            self._lap = time.perf_counter()

    def add_test(self, index: int, error: float) -> None:
        """Record a validation error at ``index`` (= iterations done)."""
        self._append(TEST_ERROR_FILE, index, float(error))

    def plot(self) -> None:
        """Refresh ``training_curves.png`` from the series files."""
        if self.enabled:
            plot_curves(self.path)


def plot_curves(monitor_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Plot training loss (left) and training / test error (right) against the iteration from
    the series files of ``monitor_path``; writes ``out`` (default
    ``monitor_path/training_curves.png``) atomically and returns its path.

    Uses matplotlib's Agg canvas directly, so no display and no global backend change.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mp = Path(monitor_path)
    out = Path(out) if out is not None else mp / CURVES_FILE
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_err = fig.subplots(1, 2)
    its, vals = read_series(mp / LOSS_FILE)
    ax_loss.plot(its, vals, label="training loss", color="C0")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss (mean over 10 iterations)")
    ax_loss.set_title("Training loss")
    for name, label, style in ((TRAIN_ERROR_FILE, "training error", "-"),
                               (TEST_ERROR_FILE, "test error", "o-")):
        its, vals = read_series(mp / name)
        ax_err.plot(its, [100 * v for v in vals], style, label=label, markersize=3)
    ax_err.set_xlabel("iteration")
    ax_err.set_ylabel("error (%)")
    ax_err.set_title("Error")
    for ax in (ax_loss, ax_err):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out, buf.getvalue())
    return out


class Progress:
    """A tqdm bar on stderr (loss, error, images/s), or, with ``bar=False`` or when stderr is
    not a terminal, one log line every ``log_every`` iterations, at least every
    ``log_seconds`` seconds, and at the last iteration (so piped output shows progress, even in
    short runs). Silent when not ``enabled``. Time passed to :meth:`exclude` (validation) does
    not count towards images/s.
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True,
                 bar: bool = True, log_every: int = 100, log_seconds: float = 30.0,
                 stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.total, self.log_every = int(total), max(1, int(log_every))
        self.log_seconds = float(log_seconds)
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self._bar = None
        if enabled and bar and isatty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=initial, file=self.stream, unit="it",
                             dynamic_ncols=True, smoothing=0.05)
        self._t = self._logged = time.perf_counter()
        self._images = 0
        self._window: tuple[float, float] | None = None

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (spent validating, say) out of the images/s of this window."""
        self._t += seconds

    def step(self, index: int, images: int, window: tuple[float, float] | None) -> None:
        """Iteration ``index`` done with ``images`` images; ``window`` = the monitor's fresh
        ``(loss, error)`` means, if any."""
        if not self.enabled:
            return
        self._images += images
        if self._bar is not None:
            self._bar.update(1)
        if window is not None:
            self._window = window
        now = time.perf_counter()
        rate = self._images / max(now - self._t, 1e-9)
        if self._bar is not None:
            if window is not None:
                loss, err = window
                self._bar.set_postfix(loss=f"{loss:.4f}", err=f"{100 * err:.1f}%",
                                      img_s=f"{rate:.0f}", refresh=False)
                self._t, self._images = now, 0
            return
        due = ((index + 1) % self.log_every == 0 or index + 1 == self.total
               or now - self._logged >= self.log_seconds)
        if due and self._window is not None:
            loss, err = self._window
            self.write(f"iter {index + 1}/{self.total}  loss {loss:.4f}  "
                       f"error {100 * err:.2f}%  {rate:.0f} images/s")
            self._t, self._images, self._logged = now, 0, now

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

