"""Evaluation: the one loop that measures a model's test error (:func:`evaluate`), its result
(:class:`EvalResult`), and the evaluation of a saved run, checkpoint or model file
(:func:`evaluate_file`).

The same loop serves validation during training, ``fewbits eval RUN_OR_CHECKPOINT`` and
``fewbits eval model.fewbits`` (:func:`fewbits.cli.evaluate_packed`): any callable mapping
float images in ``[0, 1]`` ``(N, C, H, W)`` to logits ``(N, classes)`` - an ``nn.Module``, a
model rebuilt from a packed file, or a :func:`~fewbits.runtime.compile_for_cpu` deployment.

    >>> from fewbits.data import load_dataset
    >>> ds = load_dataset("synthetic", "test", None, n=8, shape=(1, 4, 4), num_classes=2, seed=0)
    >>> r = evaluate(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), ds, batch_size=4)
    >>> r.total, 0 <= r.wrong <= r.total, r.error == r.wrong / r.total
    (8, True, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from .. import checkpoint as ckpt
from .. import distributed as fdist
from ..config import ConfigError, TrainConfig
from ..data import ArrayDataset, eval_batches, to_float
from ..runs import data_dir_note, unfollowed_data_dir
from .device import autocast, resolve_device
from .model import check_model_input, load_split, net_input_shape

__all__ = ["EvalResult", "evaluate", "evaluate_file"]


@dataclass(frozen=True)
class EvalResult:
    """The top-1 test error of one evaluation, and what was evaluated.

    Attributes:
        wrong: images whose arg-max logit is not their label (all ranks together).
        total: images evaluated (>= 1; all ranks together).
        seconds: wall time of the evaluation loop.
        dataset: the dataset's name; net: the model's name; file: the model file read (None
            when there is none, as during training).
        fast_path: the backend that ran the model (``fewbits eval --fast``: a
            :data:`fewbits.runtime.CANDIDATES` name), or None for the PyTorch model itself.

    ``error = wrong / total``, ``accuracy = 1 - error``, ``images_per_second = total /
    seconds``. Raises ``ValueError`` unless ``0 <= wrong <= total``, ``total >= 1`` and
    ``seconds >= 0``.

        >>> r = EvalResult(wrong=3, total=12, seconds=0.5)
        >>> r.error, r.accuracy, r.images_per_second
        (0.25, 0.75, 24.0)
    """

    wrong: int
    total: int
    seconds: float
    dataset: str | None = None
    net: str | None = None
    file: str | None = None
    fast_path: str | None = None

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError(f"no images were evaluated ({self.dataset or 'the dataset'} has "
                             "none in this split): an error rate needs at least one")
        if not 0 <= self.wrong <= self.total or not self.seconds >= 0:
            raise ValueError(f"EvalResult needs 0 <= wrong <= total and seconds >= 0, got "
                             f"wrong={self.wrong}, total={self.total}, seconds={self.seconds}")

    @property
    def error(self) -> float:
        """Top-1 error, a fraction: ``wrong / total``."""
        return self.wrong / self.total

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy, a fraction: ``1 - wrong / total``."""
        return 1 - self.wrong / self.total

    @property
    def images_per_second(self) -> float:
        """Throughput of the loop (data transfer and model together)."""
        return self.total / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        """What ``fewbits eval --json`` prints: ``error``, ``accuracy``, ``wrong``, ``total``,
        ``images_per_second``, ``seconds``, ``dataset``, ``net``, ``file``, ``fast_path``."""
        return {"error": self.error, "accuracy": self.accuracy, "wrong": self.wrong,
                "total": self.total, "images_per_second": self.images_per_second,
                "seconds": self.seconds, "dataset": self.dataset, "net": self.net,
                "file": self.file, "fast_path": self.fast_path}


@torch.no_grad()
def evaluate(model: Callable[[Tensor], Tensor], ds: ArrayDataset,
             device: torch.device | str = "cpu", batch_size: int = 256, *,
             info: fdist.DistInfo | None = None, type_config: str = "float",
             channels_last: bool = False) -> EvalResult:
    """Count the wrong top-1 predictions of ``model`` over every image of ``ds``.

    Each rank takes its shard (:func:`~fewbits.data.eval_batches`); the counts are summed over
    ranks. Images are scaled by 1/255 on ``device`` as in training; ``type_config="half"`` runs
    under autocast; ``channels_last`` feeds that memory format. An ``nn.Module`` is put in eval
    mode and restored afterwards; the global RNG is left as it was, so validating does not
    change a training run. Returns an :class:`EvalResult` naming ``ds``'s dataset. Raises
    ``ValueError`` for ``batch_size < 1`` or a split without images.
    """
    info = info or fdist.DistInfo()
    device = torch.device(device)
    module = model if isinstance(model, nn.Module) else None
    was = module.training if module is not None else False
    if module is not None:
        module.eval()
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    devices = [device] if device.type == "cuda" else []
    start = time.perf_counter()
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
        if module is not None:
            module.train(was)
    fdist.all_reduce_sum(counts, info)
    wrong, total = (int(v) for v in counts.tolist())  # waits for the device
    return EvalResult(wrong, total, time.perf_counter() - start, dataset=ds.name)


def evaluate_file(path: str, *, dataset: str | None = None, data_dir: str | None = None,
                  batch_size: int = 256, context: str = "cpu", device_id: int = 0,
                  download: bool = True, type_config: str = "float",
                  model: str | None = None) -> EvalResult:
    """Evaluate a run folder / checkpoint / model file on a test split (``fewbits eval``).

    ``model``: the net the caller expects (``fewbits eval --model``); a file that records
    another one is refused rather than evaluated as what it is.

    ``dataset`` defaults to the one the run was trained on; ``data_dir`` to the default data
    folder, never the folder the file records (it is named in the error when the data is
    not found there). Returns the
    :class:`EvalResult` of :func:`evaluate`, with the dataset, the net and the file read.
    Raises :class:`ConfigError` for a batch size below 1 or a model that does not fit the
    dataset, :class:`~fewbits.checkpoint.CheckpointError` for an unreadable file.
    """
    if batch_size < 1:
        raise ConfigError(f"-b/--batch-size must be an integer >= 1, got {batch_size}")
    device = resolve_device(context, device_id)
    src = ckpt.resolve_model_path(path)
    payload = ckpt.read_file(src, "cpu")
    net = payload["model_spec"]["name"]
    if model is not None and model != net:
        raise ConfigError(f"--model {model}: {src} was trained as {net}, which it is "
                          "rebuilt as; drop --model (it names the factory of a run trained "
                          "with --net package.module:factory)")
    net_model = ckpt.build_model(payload, src).to(device)
    saved = payload.get("config") or {}
    known = {f.name for f in fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in known}) if saved else None
    name = dataset or (base.dataset if base else "cifar10")
    # the data folder is the user's (--data-dir) or the default, never the one the file records
    cfg = replace(base or TrainConfig(), resume=None, download=download, dataset=name,
                  data_dir=data_dir)
    with data_dir_note(unfollowed_data_dir(src, saved, name, data_dir)):
        ds = load_split(cfg, "test", net_input_shape(net))
    check_model_input(src, net, payload["model_spec"]["kwargs"], tuple(ds.images.shape[1:]),
                      cfg.dataset)
    num_classes = payload["model_spec"]["kwargs"].get("num_classes")
    if num_classes is not None and num_classes < len(ds.classes):
        raise ConfigError(f"{src} predicts {num_classes} classes but {cfg.dataset!r} has "
                          f"{len(ds.classes)}")
    r = evaluate(net_model, ds, device, batch_size, type_config=type_config)
    return replace(r, dataset=cfg.dataset, net=net, file=str(src))
