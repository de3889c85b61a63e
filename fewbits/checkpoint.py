"""Checkpoints and model files: atomic writes, tagged formats, clear errors.

Two kinds of files, both ``torch.save`` dictionaries read back with ``weights_only=True`` (no
arbitrary code runs when loading a file from elsewhere):

* a **model file** (``model_best.pt``, ``model_final.pt``): ``format = "fewbits.model"``, the
  model spec ``{"name", "kwargs"}`` (see :func:`fewbits.models.create_model`) and its state dict;
* a **checkpoint** (``checkpoint.pt``): ``format = "fewbits.checkpoint"``, everything a run needs
  to continue exactly (model, optimizer, scaler, schedule, iteration, best error, data iterator
  position, RNG states, monitor accumulators, resolved config).

Both carry ``format_version``, the writing ``fewbits_version`` and ``content_sha256``
(:func:`content_sha256`: tensor bytes and values, verified on every load, since a ``torch.save``
archive does not check its tensor bytes). Any problem while reading (missing, truncated,
corrupt or damaged file, a file that is not fewbits' or holds arbitrary Python objects, a newer
format, weights that do not fit the spec) raises :class:`CheckpointError` naming the file and
the problem.

    >>> model = load_model("runs/bc")            # doctest: +SKIP
    >>> model = load_model("runs/bc/model_final.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checks import bad_batch_norm_stats
from ._io import atomic_write
from ._version import __version__
from .config import ConfigError, TrainConfig
from .runs import interrupted_overwrite

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CHECKSUM_KEY",
    "FORMAT_VERSION",
    "MAX_ITERATION",
    "MODEL_FORMAT",
    "CheckpointError",
    "atomic_write_bytes",
    "build_model",
    "content_sha256",
    "cpu_state_dict",
    "load_checkpoint",
    "load_model",
    "model_file_payload",
    "read_file",
    "resolve_model_path",
    "save_file",
]

CHECKPOINT_FORMAT = "fewbits.checkpoint"
MODEL_FORMAT = "fewbits.model"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
#: Key of :func:`content_sha256` in every file :func:`save_file` writes.
CHECKSUM_KEY = "content_sha256"
#: What :func:`resolve_model_path` looks for in a run folder, in order.
_RUN_FILES = ("model_best.pt", "model_final.pt", CHECKPOINT_NAME)


class CheckpointError(RuntimeError):
    """A checkpoint or model file cannot be used; the message names the file and the problem."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating missing folders (see
    :func:`fewbits._io.atomic_write`): a reader or a crash sees the old file or the new one."""
    atomic_write(path, data, parents=True)


def content_sha256(payload: dict[str, Any]) -> str:
    """SHA-256 of a file's contents: every tensor's dtype, shape and bytes, and every other
    value's ``repr``, in order (the :data:`CHECKSUM_KEY` entry itself excluded).

    ``torch.save`` archives carry no checksum of the tensor bytes, so one flipped bit in a
    weight would load silently; :func:`save_file` writes this beside the tensors and
    :func:`read_file` refuses a file whose contents do not match it.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k, v in obj.items():
            h.update(repr(k).encode())
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(b"V" + repr(obj).encode())


def save_file(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """``torch.save(payload)`` to ``path`` atomically (see :func:`atomic_write_bytes`), with
    :func:`content_sha256` under :data:`CHECKSUM_KEY`."""
    payload = {**payload, CHECKSUM_KEY: content_sha256(payload)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_file(path: str | os.PathLike, map_location: Any = "cpu",
              expect: tuple[str, ...] = (CHECKPOINT_FORMAT, MODEL_FORMAT)) -> dict[str, Any]:
    """Load a fewbits file and check its format tag and version.

    Raises :class:`CheckpointError` for a missing, unreadable, truncated or foreign file, a
    format not in ``expect``, or a format version newer than this fewbits reads.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "Unsupported class" not in str(e):
            raise CheckpointError(f"{path}: cannot read it as a PyTorch file "
                                  f"({_unpickler_detail(e)}); it is truncated or corrupt, or "
                                  "not written by fewbits") from None
        raise CheckpointError(
            f"{path}: not a fewbits file: it holds Python objects other than tensors and plain "
            f"values ({_unpickler_detail(e)}), and fewbits does not load such files, for "
            "safety (unpickling them could run any code)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            AttributeError, ImportError, IndexError, KeyError) as e:
        first = _reason(e)
        raise CheckpointError(
            f"{path}: cannot read it as a PyTorch file ({first}); it is truncated or corrupt, "
            "or not written by fewbits. Use another checkpoint or start a new run."
        ) from e
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(
            f"{path}: not a fewbits file (no 'format' tag; got {type(payload).__name__}). "
            "fewbits reads the checkpoint.pt / model_*.pt files that `fewbits train` writes."
        )
    fmt = payload["format"]
    if fmt not in expect:
        raise CheckpointError(f"{path}: format {_shown(fmt)}, expected one of {list(expect)}")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {_shown(version)} is not supported by this fewbits (reads "
            f"<= {FORMAT_VERSION}, file written by fewbits "
            f"{_shown(payload.get('fewbits_version'))}); "
            "upgrade fewbits"
        )
    for key in ("model_spec", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path}: incomplete {fmt} file, missing {key!r}")
    spec = payload["model_spec"]
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
            and isinstance(spec.get("kwargs"), dict)):
        raise CheckpointError(f"{path}: invalid model spec ({_shown(spec)})")
    recorded = payload.get(CHECKSUM_KEY)  # absent in files written before fewbits 0.1.1
    if recorded is not None and recorded != content_sha256(payload):
        raise CheckpointError(
            f"{path}: the file is damaged: its contents do not match the SHA-256 written with "
            "them (a flipped or overwritten byte). Use another checkpoint (model_best.pt, "
            "model_final.pt) or start a new run."
        )
    problem = _field_problem(payload, fmt)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem} (the file is corrupt or was edited); use "
                              "another checkpoint or start a new run")
    return payload


def _unpickler_detail(e: BaseException) -> str:
    """What PyTorch's weights-only unpickler refused, without its advice to load unsafely."""
    text = str(e)
    if "WeightsUnpickler error:" not in text:
        return text.splitlines()[0] if text.strip() else type(e).__name__
    detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    return " ".join(detail.split(". Please")[0].split()) or type(e).__name__


def _reason(e: BaseException) -> str:
    """The informative line of a ``torch.load`` error (its first line is often boilerplate)."""
    text = str(e).strip()
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


#: The largest iteration count a file may claim (a run of 2**62 steps does not exist).
MAX_ITERATION = 2 ** 62
#: Entries of a checkpoint's monitor window (the seed averages 10 iterations).
_MAX_WINDOW = 100_000


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= MAX_ITERATION


def _is_error(v: Any) -> bool:
    return isinstance(v, float | int) and not isinstance(v, bool) and 0 <= v <= 1


def _field_problem(payload: dict[str, Any], fmt: str) -> str | None:
    """What is wrong with a field a fewbits reader uses (type or range), else None."""
    cfg = payload.get("config")
    if cfg is not None and not (isinstance(cfg, dict) and all(isinstance(k, str) for k in cfg)):
        return f"'config' is {_shown(cfg)}, not a dict of option names"
    if cfg is not None:  # each option as its flag would check it (eval and --resume use them)
        known = {f.name for f in fields(TrainConfig)}
        try:
            TrainConfig(**{k: v for k, v in cfg.items() if k in known})
        except (ConfigError, TypeError, ValueError) as e:
            return f"'config' holds an invalid option ({str(e).splitlines()[0][:200]})"
    if "iteration" in payload and not _is_int(payload["iteration"]):
        return f"'iteration' is {_shown(payload['iteration'])}, not an integer in 0..2**62"
    if payload.get("test_error") is not None and not _is_error(payload["test_error"]):
        return f"'test_error' is {_shown(payload['test_error'])}, not an error in [0, 1]"
    if fmt != CHECKPOINT_FORMAT:
        return None
    checks: tuple[tuple[str, Any, str], ...] = (
        ("world_size", lambda v: _is_int(v, 1), "a process count >= 1"),
        ("bn_recalibrated", lambda v: isinstance(v, bool), "true or false"),
        ("optimizer", lambda v: isinstance(v, dict), "a dict"),
        ("data_iterator", lambda v: isinstance(v, dict), "a dict"),
        ("schedule", lambda v: v is None or isinstance(v, dict), "a dict"),
        ("scaler", lambda v: v is None or isinstance(v, dict), "a dict or None"),
        ("rng", lambda v: isinstance(v, dict) and all(
            isinstance(v.get(k), torch.Tensor) and v[k].dtype == torch.uint8
            for k in ("torch", "augment")) and (v.get("cuda") is None or isinstance(
                v["cuda"], torch.Tensor)), "a dict of uint8 generator states"),
        ("best", lambda v: v is None or (isinstance(v, dict) and (
            v.get("error") is None or _is_error(v["error"])) and (
            v.get("iteration") is None or _is_int(v["iteration"]))),
         "{'error': an error in [0, 1] or None, 'iteration': an integer >= 0 or None}"),
        ("monitor", lambda v: v is None or (isinstance(v, dict) and all(
            isinstance(v.get(k, []), list) and len(v.get(k, [])) <= _MAX_WINDOW
            and all(isinstance(x, float | int) and not isinstance(x, bool) for x in v.get(k, []))
            for k in ("loss", "error"))), "{'loss': [numbers], 'error': [numbers]}"),
    )
    for key, ok, what in checks:
        if key in payload and not ok(payload[key]):
            return f"{key!r} is {_shown(payload[key])}, not {what}"
    return None


def _shown(v: Any) -> str:
    """A field's value for a message: type and a bounded, escaped repr."""
    text = ascii(v) if not isinstance(v, torch.Tensor) else f"tensor{tuple(v.shape)}"
    text = text[:80] + ("..." if len(text) > 80 else "")
    plain = v is None or (isinstance(v, int | float | str) and not isinstance(v, bool))
    return text if plain else f"a {type(v).__name__} {text}"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a training checkpoint (``checkpoint.pt``); see :func:`read_file` (which also checks
    the type and range of every field a reader uses: ``iteration`` an integer >= 0, ``config``
    a dict, ...)."""
    payload = read_file(path, map_location, expect=(CHECKPOINT_FORMAT,))
    missing = [k for k in ("iteration", "optimizer", "rng", "data_iterator", "config")
               if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}")
    return payload


def model_file_payload(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """The dictionary of a model file: format tag, spec, state dict (CPU) and ``extra``."""
    spec = getattr(model, "fewbits_spec", None)
    if spec is None:
        raise ValueError("the model has no fewbits_spec; build it with fewbits.create_model")
    return {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "fewbits_version": __version__,
        "model_spec": spec,
        "state_dict": cpu_state_dict(model),
        **extra,
    }


def cpu_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` with tensors cloned to the CPU (safe to keep while training)."""
    return {k: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v)
            for k, v in model.state_dict().items()}


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A file as is; a run folder -> its ``model_best.pt``, else ``model_final.pt``, else
    ``checkpoint.pt`` (a ``UserWarning`` when it takes ``model_best.pt`` of an unfinished run
    whose ``checkpoint.pt`` is newer). Raises :class:`CheckpointError` when none exists, or when an
    ``--overwrite`` left the folder without a checkpoint of its new run
    (:func:`fewbits.runs.interrupted_overwrite`)."""
    path = Path(path)
    if path.is_dir():
        aside = interrupted_overwrite(path, CHECKPOINT_NAME)
        if aside is not None:
            raise CheckpointError(
                f"{path}: an --overwrite of this run has not written its first checkpoint "
                "(interrupted, or still starting), so its model files are barely trained; the "
                f"earlier run is in {aside}. Move its files back (mv {aside}/* {path}/) to use "
                "it, or name a file of the new run")
        for name in _RUN_FILES:
            if (path / name).is_file():
                _warn_if_unfinished(path, name)
                return path / name
        raise CheckpointError(f"{path}: run folder without any of {list(_RUN_FILES)}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return path


def _warn_if_unfinished(folder: Path, chosen: str) -> None:
    # An interrupted run has no model_final.pt, and its model_best.pt is the best model at the
    # last validation, which may be iteration 0: taken without a word, a user evaluating or
    # exporting the folder got an untrained net while checkpoint.pt held hours of training.
    ckpt = folder / CHECKPOINT_NAME
    if chosen != "model_best.pt" or (folder / "model_final.pt").is_file() or not ckpt.is_file():
        return
    if ckpt.stat().st_mtime > (folder / chosen).stat().st_mtime:
        warnings.warn(f"{folder}: the run has not finished (no model_final.pt); using "
                      f"model_best.pt, the best model at its last validation, while "
                      f"{CHECKPOINT_NAME} is newer (trained further, not validated): name "
                      f"{ckpt} to use that one", UserWarning, stacklevel=3)


def build_model(payload: dict[str, Any], source: str | os.PathLike) -> nn.Module:
    """``create_model(spec["name"], **spec["kwargs"])`` + the state dict, with clear errors."""
    from .export._guard import create_within

    spec = payload["model_spec"]
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: its state_dict is a {type(state).__name__}, not a dict")
    # The options come from the file: build within what its weights could fill (x4 for
    # quantizer buffers), so depth=10**6 or width=10**9 fail fast instead of allocating.
    tensors = [t for t in state.values() if isinstance(t, torch.Tensor)]
    budget = (4 * len(state) + 64, 4 * sum(t.numel() for t in tensors) + (1 << 16))
    try:
        model = create_within(spec["name"], spec["kwargs"], *budget)
    except (ValueError, TypeError, RecursionError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"{source}: cannot rebuild model {spec['name']!r}: {e}") from e
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{source}: the weights do not fit model {spec['name']!r} with its saved options "
            f"({str(e).splitlines()[0]})"
        ) from e
    bad = bad_batch_norm_stats(model)
    if bad:
        raise CheckpointError(f"{source}: {bad}; a trained network never has this: the file "
                              "is corrupt or was edited (use another checkpoint of the run)")
    return model


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a trained model from a checkpoint, a model file or a run folder.

    The model is re-created with ``create_model(spec["name"], **spec["kwargs"])`` and gets the
    saved state dict (quantizer state included); it is returned in eval mode on
    ``map_location``.

        >>> model = load_model("runs/bc")  # doctest: +SKIP
    """
    src = resolve_model_path(path)
    payload = read_file(src, map_location)
    model = build_model(payload, src)
    # Which file was used, and the run's config (its dataset goes into exports).
    model.fewbits_source = {"path": str(src), "config": payload.get("config")}
    if map_location is not None and not callable(map_location):
        model = model.to(map_location)
    return model.eval()
