"""Run folders: never replace an earlier run's results by accident, and say what is used.

A training run writes its series files, ``config.json``, ``training_curves.png`` and
``checkpoint.pt`` / ``model_best.pt`` / ``model_final.pt`` into ``-m`` (and ``-o``). Starting a
new run into a folder that already holds one would silently replace them, so
:func:`check_run_folder` refuses unless the run continues it (``--resume``) or the user asks to
replace it (``--overwrite``).

    >>> import tempfile
    >>> check_run_folder(tempfile.mkdtemp(), None, resume=False, overwrite=False)  # empty: fine
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import ConfigError, TrainConfig
from .data import DatasetNotFoundError

#: The largest synthetic dataset a file may ask for (a hostile header must not allocate at will).
MAX_SYNTHETIC = 1_000_000

__all__ = ["MAX_SYNTHETIC", "RUN_FILES", "check_run_folder", "data_dir_note",
           "existing_run_files", "recorded_eval_config", "training_data", "unfollowed_data_dir"]

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

