"""The files of a run: ``checkpoint.pt`` (everything needed to continue exactly) and
``model_best.pt`` / ``model_final.pt`` (the model alone), and resuming from a checkpoint.

A checkpoint holds the model, optimizer, gradient scaler, learning-rate schedule, data iterator
position, the RNG states (global, augmentation, CUDA), the best error so far, the monitor
state and the config; :func:`restore_checkpoint` refuses one written by a run whose
:data:`fewbits.config.RESUME_KEYS`, process count or model options differ.
:func:`build_optimizer` builds a run's optimizer (``fewbits train``, ``fewbits import-nnabla``):
its parameter groups are part of what a checkpoint must match.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as fdist
from .._checks import bad_batch_norm_stats
from .._version import __version__
from ..config import RESUME_KEYS, TrainConfig
from ..models import is_model, model_info
from ..quantizers.optim import param_groups

__all__ = ["build_optimizer", "restore_checkpoint", "resume_path", "save_checkpoint",
           "save_model"]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The run's optimizer over ``model``'s parameters: ``Adam`` or ``SGD`` as
    ``cfg.optimizer`` says, with ``cfg``'s learning rate, weight decay and momentum. Under Adam
    the parameters with a learning-rate factor (LSQ's steps and offsets: 0.01) get a group of
    their own at ``lr * factor`` (:func:`fewbits.quantizers.optim.param_groups`; Adam would
    otherwise normalise away LSQ's gradient scale and move a step of ~0.01 by ~lr a step)."""
    params = param_groups(model.parameters(), cfg.learning_rate,
                          adaptive=cfg.optimizer == "adam")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def _optimizer_state(path: Path, saved: Any, opt: torch.optim.Optimizer,
                     model: nn.Module) -> Any:
    """``saved`` (a checkpoint's optimizer state) as ``opt`` loads it. A checkpoint written
    before LSQ's steps had a group of their own (before commit 2e58a3a) holds one
    group of every parameter in ``model.parameters()`` order: its per-parameter state is mapped
    onto ``opt``'s groups, with a warning (the steps then train at ``lr * 0.01``). Groups that
    differ otherwise raise :class:`~fewbits.checkpoint.CheckpointError` naming both layouts."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    theirs = [len(g["params"]) for g in groups] if isinstance(groups, list) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups) else None
    mine = [len(g["params"]) for g in opt.param_groups]
    if theirs == mine:
        return saved
    params = list(model.parameters())
    if theirs != [len(params)] or sum(mine) != len(params):
        raise ckpt.CheckpointError(
            f"{path}: cannot resume: the checkpoint's optimizer holds parameter groups of "
            f"{theirs} parameters, this run's {mine} (the groups of build_optimizer: LSQ's "
            "steps and offsets in their own under Adam); resume with the fewbits and options "
            "that wrote it, or start a new run without --resume")
    old_ids, state = groups[0]["params"], saved.get("state", {})
    index = {id(p): k for k, p in enumerate(params)}
    new_state, new_groups, n = {}, [], 0
    for g in opt.param_groups:
        ids = []
        for p in g["params"]:
            old = old_ids[index[id(p)]]
            if old in state:
                new_state[n] = state[old]
            ids.append(n)
            n += 1
        new_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    warnings.warn(f"{path}: the checkpoint predates LSQ's own parameter group (its optimizer "
                  f"holds one group); its state is mapped onto this run's {len(mine)} groups, "
                  "and from here LSQ's steps and offsets train at their learning-rate factor "
                  "(0.01 x lr under Adam)", UserWarning, stacklevel=3)
    return {"state": new_state, "param_groups": new_groups}


def resume_path(resume: str, save_path: Path) -> Path:
    """The checkpoint ``--resume`` names: ``auto`` -> ``save_path/checkpoint.pt`` (which must
    exist), a folder -> its ``checkpoint.pt``, a file -> itself."""
    if resume == "auto":
        p = save_path / ckpt.CHECKPOINT_NAME
        if not p.is_file():
            raise ckpt.CheckpointError(
                f"{p}: no checkpoint to resume from (--resume looks in -o/--model-save-path)"
                "; start without --resume, or pass --resume PATH")
        return p
    p = Path(resume)
    return p / ckpt.CHECKPOINT_NAME if p.is_dir() else p


def _registered_defaults(name: object) -> dict[str, Any]:
    """The registered default options of model ``name`` (JSON form); ``{}`` for a name the
    registry does not hold (a factory run)."""
    if not isinstance(name, str) or not is_model(name):
        return {}
    return _jsonable(model_info(name).defaults)


def restore_checkpoint(path: Path, cfg: TrainConfig, info: fdist.DistInfo, *,
                       model: nn.Module, opt: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler | None, batches: Any,
                       aug_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Load ``path`` into the given run objects and the global RNG; returns the checkpoint
    (``iteration``, ``best``, ``monitor`` are the caller's to use). Raises
    :class:`fewbits.checkpoint.CheckpointError` for a checkpoint of an incompatible run or one
    whose state does not fit."""
    state = ckpt.load_checkpoint(path, "cpu")
    saved = state["config"]
    problems = [f"{k}: checkpoint {saved.get(k)!r}, this run {getattr(cfg, k)!r}"
                for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
    if state.get("world_size", 1) != info.world_size:
        problems.append(f"processes: checkpoint {state.get('world_size')}, this run "
                        f"{info.world_size}")
    spec, mine = state["model_spec"], _jsonable(model.fewbits_spec)
    if spec["name"] == mine["name"]:
        # An option a later fewbits added to the spec (e.g. ResNet23's ``nnabla``) is absent from
        # an older checkpoint: that run was built with the option's registered default.
        defaults = _registered_defaults(spec["name"])
        saved_kwargs = {**{k: v for k, v in defaults.items() if k in mine["kwargs"]},
                        **spec["kwargs"]}
        diff = sorted(k for k in set(saved_kwargs) | set(mine["kwargs"])
                      if saved_kwargs.get(k) != mine["kwargs"].get(k))
        problems += [f"model option {k}: checkpoint {saved_kwargs.get(k)!r}, this run "
                     f"{mine['kwargs'].get(k)!r}" for k in diff]
    if problems:
        raise ckpt.CheckpointError(
            f"{path}: cannot resume, the checkpoint was written by an incompatible run ("
            + "; ".join(problems) + "). Use the checkpoint's options, or start a new run "
            "without --resume.")
    try:
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(_optimizer_state(path, state["optimizer"], opt, model))
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["data_iterator"])
        rng = state["rng"]
        aug_gen.set_state(rng["augment"])
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ckpt.CheckpointError(f"{path}: cannot restore the run state "
                                   f"({str(e).splitlines()[0]})") from e
    if bad := bad_batch_norm_stats(model):  # never saved by a run: a damaged file
        raise ckpt.CheckpointError(f"{path}: cannot resume: {bad} (the file is damaged; "
                                   "resume from another checkpoint of the run)")
    return state


def save_checkpoint(path: Path, cfg: TrainConfig, info: fdist.DistInfo, *, iteration: int,
                    model: nn.Module, opt: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, schedule: dict[str, Any],
                    best: dict[str, Any], batches: Any, aug_gen: torch.Generator,
                    device: torch.device, monitor: dict[str, Any],
                    bn_recalibrated: bool = False) -> None:
    """Write ``checkpoint.pt`` atomically (rank 0 only: the caller checks ``info.is_main``);
    ``bn_recalibrated``: batch norm was re-estimated (``--bn-recalibrate``), not to be redone."""
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    ckpt.save_file(path, {
        "format": ckpt.CHECKPOINT_FORMAT,
        "format_version": ckpt.FORMAT_VERSION,
        "fewbits_version": __version__,
        "torch_version": str(torch.__version__),
        "model_spec": _jsonable(model.fewbits_spec),
        "state_dict": ckpt.cpu_state_dict(model),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "schedule": schedule,
        "iteration": iteration,
        "best": best,
        "data_iterator": batches.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "augment": aug_gen.get_state(),
                "cuda": cuda_rng},
        "monitor": monitor,
        "config": cfg.to_dict(),
        "world_size": info.world_size,
        "bn_recalibrated": bool(bn_recalibrated),
    })


def save_model(path: Path, model: nn.Module, cfg: TrainConfig, iteration: int,
               error: float) -> None:
    """Write a model file (``model_best.pt`` / ``model_final.pt``) atomically."""
    payload = ckpt.model_file_payload(model, iteration=iteration, test_error=error,
                                      config=cfg.to_dict())
    payload["model_spec"] = _jsonable(payload["model_spec"])
    ckpt.save_file(path, payload)


def _jsonable(obj: Any) -> Any:
    """Tuples to lists (recursively), so that specs compare equal after a save/load."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
