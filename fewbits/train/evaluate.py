"""Evaluation: the test error of a model, during training (:func:`evaluate`) and of a saved
run, checkpoint or model file (:func:`evaluate_file`).

    >>> from fewbits.data import load_dataset
    >>> ds = load_dataset("synthetic", "test", None, n=8, shape=(1, 4, 4), num_classes=2, seed=0)
    >>> wrong, total = evaluate(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), ds,
    ...                         torch.device("cpu"), batch_size=4)
    >>> total, 0 <= wrong <= total
    (8, True)
"""

from __future__ import annotations

import time
from dataclasses import fields, replace
from typing import Any

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as fdist
from ..config import ConfigError, TrainConfig
from .device import autocast, resolve_device
from .model import check_model_input, load_split, net_input_shape

__all__ = ["evaluate", "evaluate_file"]


@torch.no_grad()
def evaluate(model: nn.Module, ds: Any, device: torch.device, batch_size: int = 256, *,
             info: fdist.DistInfo | None = None, type_config: str = "float",
             channels_last: bool = False) -> tuple[int, int]:
    """``(wrong, total)`` over every image of ``ds`` (each rank takes its shard; the counts
    are summed over ranks). The model is put in eval mode and restored afterwards; the
    global RNG is left as it was, so validating does not change a training run."""
    from ..data import eval_batches, to_float

    info = info or fdist.DistInfo()
    was = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for xu8, y in eval_batches(ds, batch_size, info.rank, info.world_size):
                x = to_float(xu8, device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, type_config):
                    out = model(x)
                y = y.to(device, non_blocking=True)
                counts[0] += (out.argmax(1) != y).sum()
                counts[1] += y.numel()
    finally:
        model.train(was)
    fdist.all_reduce_sum(counts, info)
    wrong, total = (int(v) for v in counts.tolist())
    return wrong, total


def evaluate_file(path: str, *, dataset: str | None = None, data_dir: str | None = None,
                  batch_size: int = 256, context: str = "cpu", device_id: int = 0,
                  download: bool = True, type_config: str = "float") -> dict[str, Any]:
    """Evaluate a run folder / checkpoint / model file on a test split.

    ``dataset`` and ``data_dir`` default to those the run was trained on. Returns
    ``{"error", "accuracy", "wrong", "total", "images_per_second", "dataset", "net", "file"}``.
    """
    if batch_size < 1:
        raise ConfigError(f"-b/--batch-size must be an integer >= 1, got {batch_size}")
    device = resolve_device(context, device_id)
    src = ckpt.resolve_model_path(path)
    payload = ckpt.read_file(src, "cpu")
    model = ckpt.build_model(payload, src).to(device)
    saved = payload.get("config") or {}
    known = {f.name for f in fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in known}) if saved else None
    name = dataset or (base.dataset if base else "cifar10")
    if data_dir is None and base is not None and base.dataset == name:
        data_dir = base.data_dir
    cfg = replace(base or TrainConfig(), resume=None, download=download, dataset=name,
                  data_dir=data_dir)
    net = payload["model_spec"]["name"]
    ds = load_split(cfg, "test", net_input_shape(net))
    check_model_input(src, net, payload["model_spec"]["kwargs"], tuple(ds.images.shape[1:]),
                      cfg.dataset)
    num_classes = payload["model_spec"]["kwargs"].get("num_classes")
    if num_classes is not None and num_classes < len(ds.classes):
        raise ConfigError(f"{src} predicts {num_classes} classes but {cfg.dataset!r} has "
                          f"{len(ds.classes)}")
    t = time.perf_counter()
    wrong, total = evaluate(model, ds, device, batch_size, type_config=type_config)
    dt = time.perf_counter() - t
    return {"error": wrong / total, "accuracy": 1 - wrong / total, "wrong": wrong,
            "total": total, "images_per_second": total / max(dt, 1e-9),
            "dataset": cfg.dataset, "net": net, "file": str(src)}
