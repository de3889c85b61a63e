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
from pathlib import Path

from .config import ConfigError, TrainConfig

#: The largest synthetic dataset a file may ask for (a hostile header must not allocate at will).
MAX_SYNTHETIC = 1_000_000

__all__ = ["MAX_SYNTHETIC", "RUN_FILES", "check_run_folder", "existing_run_files",
           "recorded_eval_config", "training_data"]

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
    else the one ``recorded`` in the file (:func:`training_data`), with its folder and size
    unless they are overridden. An export that records nothing needs ``dataset``."""
    rec = recorded if isinstance(recorded, dict) else {}
    name = dataset or rec.get("dataset")
    if not isinstance(name, str):
        raise ConfigError(f"{source} does not record the dataset it was trained on (exported "
                          "by an older fewbits); give --dataset")
    same = name == rec.get("dataset")
    if data_dir is None and same and isinstance(rec.get("data_dir"), str):
        data_dir = rec["data_dir"]
    size = rec.get("synthetic_size") if same else None
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                             or not 2 <= size <= MAX_SYNTHETIC):
        raise ConfigError(f"{source}: its recorded data.synthetic_size {size!r}"[:300] + " is "
                          f"not an image count in 2..{MAX_SYNTHETIC} (the file is corrupt or "
                          "was edited); give --dataset")
    return TrainConfig(dataset=name, data_dir=data_dir, download=download,
                       synthetic_size=size if isinstance(size, int) else 1000)
