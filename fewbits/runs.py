"""Run folders: never replace an earlier run's results by accident, and say what is used.

A training run writes its series files, ``config.json``, ``training_curves.png`` and
``checkpoint.pt`` / ``model_best.pt`` / ``model_final.pt`` into ``-m`` (and ``-o``). Starting a
new run into a folder that already holds one would silently replace them, so
:func:`check_run_folder` refuses unless the run continues it (``--resume``) or the user asks to
replace it (``--overwrite``).

While a run writes, :func:`run_lock` holds an exclusive ``flock`` on ``FOLDER/.fewbits-run.lock``
(:data:`LOCK_NAME`): a second run into the same folder refuses, naming the first one's pid. The
kernel drops the lock when its process ends, however it ends, so the lock of a killed run is
simply taken over (on a system without ``fcntl`` nothing is locked).

``--overwrite`` never deletes first: :func:`set_aside_run` moves the earlier run's files into
``FOLDER/.fewbits-replaced`` (:data:`REPLACED_NAME`), and :func:`discard_set_aside` removes
them once the new run has written its first checkpoint. A run killed in between leaves the
earlier run whole in that folder, and :func:`interrupted_overwrite` keeps ``fewbits eval``
from taking the barely trained new files for the run.

    >>> import tempfile
    >>> check_run_folder(tempfile.mkdtemp(), None, resume=False, overwrite=False)  # empty: fine
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._io import ensure_folder, fsync_dir
from .config import ConfigError, TrainConfig
from .data import DatasetNotFoundError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

#: The largest synthetic dataset a file may ask for (a hostile header must not allocate at will).
MAX_SYNTHETIC = 1_000_000

__all__ = ["LOCK_NAME", "MAX_SYNTHETIC", "REPLACED_NAME", "RUN_FILES", "check_run_folder",
           "data_dir_note", "discard_set_aside", "existing_run_files", "interrupted_overwrite",
           "recorded_eval_config", "run_lock", "set_aside_run", "training_data",
           "unfollowed_data_dir"]

#: The lock file a running ``fewbits train`` holds in each of its folders.
LOCK_NAME = ".fewbits-run.lock"
#: Where ``--overwrite`` keeps the earlier run until the new one has a checkpoint.
REPLACED_NAME = ".fewbits-replaced"
#: Files of a run that mark nothing by themselves but belong to it (moved aside with it).
_OTHER_RUN_FILES = ("training_curves.png",)
#: How much of a lock file is read back to name its holder.
_HOLDER_BYTES = 200

#: Files whose presence marks a folder as holding a fewbits run.
RUN_FILES = ("Training-loss.series.txt", "Training-error.series.txt", "Test-error.series.txt",
             "Training-time.timer.txt", "config.json", "checkpoint.pt", "model_best.pt",
             "model_final.pt")


def existing_run_files(*folders: str | os.PathLike | None) -> list[Path]:
    """The :data:`RUN_FILES` present in ``folders`` (``None`` entries are skipped)."""
    seen: list[Path] = []
    for folder in dict.fromkeys(Path(f) for f in folders if f is not None):
        seen += [folder / n for n in RUN_FILES if (folder / n).exists()]
    return seen


def check_run_folder(monitor_path: str | os.PathLike, model_save_path: str | os.PathLike | None,
                     *, resume: bool, overwrite: bool) -> None:
    """Raise :class:`fewbits.train.ConfigError` when a new run would replace an earlier run's
    files, naming them and the three ways forward."""
    for folder, flag in ((monitor_path, "-m/--monitor-path"), (model_save_path,
                                                               "-o/--model-save-path")):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"{flag} {folder} is a file, not a folder; give a folder for the "
                              "run's files")
    if resume or overwrite:
        return
    found = existing_run_files(monitor_path, model_save_path)
    if found:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise ConfigError(
            f"{found[0].parent} already holds a training run ({names}); a new run would replace "
            "its results. Add --resume to continue it, --overwrite to replace it, or give "
            "another -m/--monitor-path (and -o)"
        )


def training_data(model: object) -> dict | None:
    """``{"dataset", "data_dir", "synthetic_size"}`` of the run a model loaded by
    :func:`fewbits.checkpoint.load_model` was trained in (None if unknown): exports record it
    so that ``fewbits eval model.fewbits`` tests on the same data."""
    source = getattr(model, "fewbits_source", None)
    config = source.get("config") if isinstance(source, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("dataset"), str):
        return None
    return {k: config.get(k) for k in ("dataset", "data_dir", "synthetic_size")}


def recorded_eval_config(source: object, recorded: object, dataset: str | None,
                         data_dir: str | None, download: bool):
    """The :class:`fewbits.train.TrainConfig` to evaluate an export on: ``dataset`` if given,
    else the one ``recorded`` in the file (:func:`training_data`), with its size unless it is
    overridden. The data folder is ``data_dir`` or the default one, never the one the file
    records (:func:`unfollowed_data_dir`). An export that records nothing needs ``dataset``."""
    rec = recorded if isinstance(recorded, dict) else {}
    name = dataset or rec.get("dataset")
    if not isinstance(name, str):
        raise ConfigError(f"{source} does not record the dataset it was trained on (exported "
                          "by an older fewbits); give --dataset")
    same = name == rec.get("dataset")
    size = rec.get("synthetic_size") if same else None
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                             or not 2 <= size <= MAX_SYNTHETIC):
        raise ConfigError(f"{source}: its recorded data.synthetic_size {size!r}"[:300] + " is "
                          f"not an image count in 2..{MAX_SYNTHETIC} (the file is corrupt or "
                          "was edited); give --dataset")
    return TrainConfig(dataset=name, data_dir=data_dir, download=download,
                       synthetic_size=size if isinstance(size, int) else 1000)


def unfollowed_data_dir(source: object, recorded: object, dataset: str,
                        data_dir: str | None) -> str:
    """The sentence to add to a "dataset not found" error when ``source`` (a ``.fewbits`` file
    or a checkpoint, whose training config is ``recorded``) names a data folder that fewbits
    did not use: a file never chooses where fewbits reads or writes data (it could point at a
    planted dataset, or make fewbits create folders and download there); only ``--data-dir``
    does. ``""`` when the file records none for ``dataset`` or ``data_dir`` was given."""
    rec = recorded if isinstance(recorded, dict) else {}
    folder = rec.get("data_dir")
    if data_dir is not None or rec.get("dataset") != dataset or not isinstance(folder, str) \
            or not folder:
        return ""
    return (f"{source} records that it was trained on data in {folder[:300]!r}, which is not "
            "read unless you say so (a file never chooses where fewbits reads data): pass "
            "--data-dir with that folder to use it")


@contextmanager
def data_dir_note(note: str) -> Iterator[None]:
    """Add ``note`` (:func:`unfollowed_data_dir`) to a "dataset not found" or bad-option error
    raised inside the block."""
    try:
        yield
    except (DatasetNotFoundError, ConfigError) as e:
        if not note:
            raise
        raise type(e)(f"{e}; {note}") from None


# --------------------------------------------------------------------------- run lock


def _holder(fd: int) -> str:
    """What the lock file says about its holder (bounded, control characters escaped)."""
    try:
        text = os.pread(fd, _HOLDER_BYTES, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return ascii(text)[1:-1] if text else "pid unknown"


def _acquire(folder: Path) -> tuple[Path, int] | None:
    path = folder / LOCK_NAME
    for _ in range(20):  # the holder may unlink the file between our open and flock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise ConfigError(f"{folder}: cannot create the run lock {path} ({e.strerror}); "
                              "give a folder you can write (-m/--monitor-path, -o)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(
                f"{folder} is in use by another fewbits run ({holder}); two runs in one folder "
                "would mix their files. Wait for it to end (or stop it), or give another "
                "-m/--monitor-path (and -o)") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except OSError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()[:64]}, started "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
            return path, fd
        os.close(fd)
    raise ConfigError(f"{folder}: could not take the run lock {path}; try again")


@contextlib.contextmanager
def run_lock(*folders: str | os.PathLike | None) -> Iterator[None]:
    """Hold the run lock of each folder (created if missing; ``None`` and paths that are not
    folders are skipped, for :func:`check_run_folder` to explain) while inside.

    Raises :class:`fewbits.train.ConfigError` naming the holder (``pid N on HOST``) when
    another process holds one. The lock file is removed on exit; a killed process's lock is
    released by the kernel and taken over by the next run.
    """
    held: list[tuple[Path, int]] = []
    try:
        # One lock per folder, however it is spelt (a second flock of ours would refuse).
        for folder in dict.fromkeys(Path(f).resolve() for f in folders if f is not None):
            if fcntl is None or (folder.exists() and not folder.is_dir()):
                continue
            ensure_folder(folder)
            got = _acquire(folder)
            if got is not None:
                held.append(got)
        yield
    finally:
        for path, fd in reversed(held):
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: a waiter then sees a new file
            os.close(fd)


# --------------------------------------------------------------------------- --overwrite


def set_aside_run(*folders: str | os.PathLike | None) -> list[Path]:
    """``--overwrite``: move each folder's run files into ``FOLDER/.fewbits-replaced``;
    returns the folders that now hold one.

    A folder that already holds one (an earlier ``--overwrite`` was interrupted) keeps it when
    the files beside it never got a checkpoint (they are that interrupted run's: deleted);
    otherwise the old set-aside was due for removal and the current run takes its place.
    """
    out: list[Path] = []
    for folder in dict.fromkeys(Path(f) for f in folders if f is not None):
        aside = folder / REPLACED_NAME
        if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
            raise ConfigError(f"{aside} is not a folder fewbits made (a link or a file); "
                              "--overwrite moves the old run there: remove it and run again")
        files = [folder / n for n in RUN_FILES + _OTHER_RUN_FILES if (folder / n).is_file()]
        if aside.is_dir() and not (folder / "checkpoint.pt").is_file():
            for f in files:
                f.unlink()
            out.append(folder)
            continue
        if not files:
            continue
        if aside.exists():
            shutil.rmtree(aside)
        aside.mkdir()
        for f in files:
            os.replace(f, aside / f.name)
        fsync_dir(aside)
        fsync_dir(folder)
        out.append(folder)
    return out


def discard_set_aside(*folders: str | os.PathLike | None) -> None:
    """Remove what :func:`set_aside_run` kept (the new run has its first checkpoint)."""
    for folder in dict.fromkeys(Path(f) for f in folders if f is not None):
        shutil.rmtree(folder / REPLACED_NAME, ignore_errors=True)


def interrupted_overwrite(folder: str | os.PathLike, checkpoint_name: str) -> Path | None:
    """The earlier run's folder when ``folder`` holds a run set aside by an ``--overwrite``
    whose new run has no checkpoint yet (interrupted, or still starting: its model files are
    barely trained, not the run's); else None."""
    aside = Path(folder) / REPLACED_NAME
    if aside.is_dir() and not (Path(folder) / checkpoint_name).is_file():
        return aside
    return None
