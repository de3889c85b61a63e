"""Training as the seed's ``classification.py`` does it, plus reproducibility, exact resume and
data-parallel runs.

One iteration: draw this rank's batch, convert to float on the device (``/255``), augment
(rotation and flip, parameters drawn for the whole global batch from a seeded CPU generator and
sliced per rank), forward, cross-entropy, backward, optimizer step, then
:func:`fewbits.layers.apply_weight_constraints`. Validation over the whole test split runs
at every iteration ``i`` with ``i % val_interval == 0`` (before that iteration's step, as the
seed) and after the last step; the best validated parameters go to ``model_best.pt``, the last
ones to ``model_final.pt``, and ``checkpoint.pt`` holds everything needed to continue exactly.

    >>> cfg = TrainConfig(net="mnist_float_lenet", dataset="digits", max_iter=100,
    ...                   val_interval=50, monitor_path="/tmp/run")   # doctest: +SKIP
    >>> result = train(cfg)                                           # doctest: +SKIP
    >>> result.best_error                                             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint as ckpt
from .. import distributed as fdist
from .._version import __version__
from ..config import (
    CONTEXTS,
    LR_SCHEDULES,
    OPTIMIZERS,
    QUANT_KEYS,
    RESUME_KEYS,
    ConfigError,
    TrainConfig,
)
from ..layers import apply_weight_constraints, count_optimizer_steps
from ..models import create_model, list_models, model_info, register_factory
from ..monitor import Monitor, Progress, write_json
from ..quantizers import INQ
from ..runs import check_run_folder, existing_run_files

__all__ = [
    "CONTEXTS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "ConfigError",
    "LRSchedule",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "build_model",
    "check_input_shape",
    "check_model_input",
    "count_parameters",
    "evaluate",
    "evaluate_file",
    "inq_schedule",
    "load_split",
    "net_input_shape",
    "resolve_device",
    "train",
]



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


def inq_schedule(values: tuple[int | float, ...], steps: int) -> tuple[int, ...]:
    """The INQ iterations of a run of ``steps`` optimizer iterations (``max_iter``; the INQ
    counter counts optimizer steps, see :func:`fewbits.layers.count_optimizer_steps`):
    integers as given; fractions ``f`` at iteration ``min(steps - 1, floor(f * steps))``, so
    ``1.0`` fixes the last weights at the last iteration. Fractions that land on the same
    iteration raise :class:`ConfigError`.

        >>> inq_schedule((0.5, 0.75, 0.875, 0.9375, 1.0), 400)
        (200, 300, 350, 375, 399)
    """
    if not any(isinstance(v, float) for v in values):
        return tuple(int(v) for v in values)
    its = tuple(min(steps - 1, int(v * steps)) for v in values)
    if len(set(its)) != len(its) or list(its) != sorted(its):
        raise ConfigError(f"--inq-iterations {list(values)} of a {steps}-iteration run give "
                          f"iterations {list(its)}, not strictly increasing; use fewer steps or "
                          "a longer run")
    return its


def _check_inq(model: nn.Module, steps: int) -> None:
    """Refuse an INQ schedule that never starts within the run; warn when it does not end."""
    scheds = {m.inq_iterations for m in model.modules() if isinstance(m, INQ)}
    for its in sorted(scheds):
        if its[0] >= steps:
            raise ConfigError(
                f"INQ schedule {list(its)} starts after the run's {steps} iterations: no weight "
                "would ever be quantized. Give iterations inside the run, or fractions of it: "
                "--inq-iterations 0.5,0.75,0.875,0.9375,1.0")
        if its[-1] >= steps:
            warnings.warn(
                f"INQ schedule {list(its)} ends after the run's {steps} iterations: part of the "
                "weights stays float and the model cannot be exported as powers of two "
                "(--inq-iterations 0.5,0.75,0.875,0.9375,1.0 ends within the run)",
                stacklevel=2)


@dataclass
class TrainResult:
    """What :func:`train` returns. Errors are fractions in [0, 1]."""

    iterations: int
    best_error: float | None
    best_iteration: int | None
    final_error: float
    images_per_second: float
    monitor_path: Path
    model_save_path: Path
    model: nn.Module = field(repr=False)


@dataclass
class LRSchedule:
    """Learning rate of iteration ``i``: ``base_lr * factor(i)``; ``constant`` (seed) or
    ``cosine`` (``0.5 * (1 + cos(pi * i / max_iter))``). Stateless: the iteration is the state,
    so a resumed run with a longer ``max_iter`` follows the new schedule."""

    kind: str
    base_lr: float
    max_iter: int

    def lr(self, i: int) -> float:
        if self.kind == "cosine":
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(i, self.max_iter)
                                                        / self.max_iter))
        return self.base_lr

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- devices


def resolve_device(context: str, device_id: int = 0,
                   info: fdist.DistInfo | None = None) -> torch.device:
    """``cpu`` -> the CPU; ``cudnn``/``cuda`` -> GPU ``device_id`` (``LOCAL_RANK`` under
    torchrun). Raises :class:`ConfigError` when CUDA is not available."""
    if context not in CONTEXTS:
        raise ConfigError(f"-c/--context: {context!r} is not one of {', '.join(CONTEXTS)}")
    if context == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA GPU is visible")
        raise ConfigError(
            f"-c {context} needs an NVIDIA GPU, but CUDA is not available ({why}, torch "
            f"{torch.__version__}). Use `-c cpu` to run on the CPU."
        )
    index = info.local_rank if info is not None and info.distributed else device_id
    if index >= torch.cuda.device_count():
        raise ConfigError(f"-d/--device-id {index}: only {torch.cuda.device_count()} CUDA "
                          "device(s) visible")
    return torch.device("cuda", index)


# --------------------------------------------------------------------------- data and model


def net_input_shape(net: str) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` images a registered net was built for, as its registration declares
    (``None`` if it declares none). Channels adapt to the data (``in_channels``)."""
    return model_info(net).input_shape


def _check_net(net: str) -> None:
    """Unknown ``-n/--net`` -> :class:`ConfigError`; ``package.module:factory`` is imported and
    registered (the user asked for it on the command line)."""
    try:
        if ":" in net:
            register_factory(net)
        model_info(net)
    except ValueError as e:
        raise ConfigError(f"-n/--net: {e}") from None


def load_split(cfg: TrainConfig, split: str, shape: tuple[int, int, int] | None = None):
    """Load one split of ``cfg.dataset`` (synthetic data gets ``shape``, default 3x32x32)."""
    from ..data import load_dataset

    kw: dict[str, Any] = {}
    if cfg.dataset == "synthetic":
        n = cfg.synthetic_size if split == "train" else max(2, cfg.synthetic_size // 5)
        kw = {"n": n, "shape": shape or (3, 32, 32), "num_classes": 10, "seed": 0}
    elif cfg.dataset == "imagefolder" and cfg.workers is not None:
        kw = {"workers": cfg.workers}
    try:
        return load_dataset(cfg.dataset, split, cfg.data_dir, download=cfg.download, **kw)
    except (ValueError, TypeError) as e:
        from ..data import ChecksumError, CorruptDataError

        if isinstance(e, ChecksumError | CorruptDataError):
            raise
        raise ConfigError(f"--dataset {cfg.dataset}: {e}") from e


def check_input_shape(net: str, image_shape: tuple[int, ...], dataset: str) -> None:
    """Raise :class:`ConfigError` when ``dataset``'s images (C, H, W) do not fit ``net``,
    naming the nets that do."""
    want = net_input_shape(net)
    if want is None:
        return
    h, w = int(image_shape[-2]), int(image_shape[-1])
    if (h, w) == want[1:]:
        return
    shapes: dict[tuple[int, int], list[str]] = {}
    for name in list_models():
        shape = model_info(name).input_shape
        if shape is not None:
            shapes.setdefault(shape[1:], []).append(name)
    fits = shapes.get((h, w), [])
    hint = (f"nets that fit {h}x{w} images: {', '.join(fits[:4])}"
            + (f" ... ({len(fits)} in all)" if len(fits) > 4 else "") + " (see `fewbits list`)"
            if fits else f"no registered net takes {h}x{w} images; resize the data to "
            + " or ".join(f"{a}x{b} (e.g. {n[0]})" for (a, b), n in shapes.items()))
    raise ConfigError(
        f"dataset {dataset!r} has {tuple(image_shape)} images but {net} expects "
        f"{want[1]}x{want[2]} images ({want[0]} channel{'s' if want[0] > 1 else ''}); {hint}"
    )


def check_model_input(source: Any, net: str, kwargs: Any, image_shape: tuple[int, ...],
                      dataset: str) -> None:
    """Raise :class:`ConfigError` when a trained model (options ``kwargs``) cannot take
    ``dataset``'s images: wrong size (:func:`check_input_shape`), channels or features."""
    check_input_shape(net, image_shape, dataset)
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    c, n = int(image_shape[0]), math.prod(int(s) for s in image_shape)
    for key, have, what in (("in_channels", c, "-channel"), ("in_features", n, "-value")):
        want = kwargs.get(key)
        if isinstance(want, int) and want != have:
            raise ConfigError(
                f"{source}: {net} was trained on {want}{what} images but {dataset!r} has "
                f"{have}{what} images {tuple(image_shape)}; evaluate it on data like its "
                "training data (--dataset, --data-dir)")


def build_model(cfg: TrainConfig, image_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``create_model(cfg.net, ...)`` with the quantization options of ``cfg``, the classes and
    input channels (or features, for MLPs) of the data, and ``cfg.model_args``. Seeds the
    global RNG with ``cfg.seed`` first, so the initial weights are reproducible."""
    _check_net(cfg.net)
    defaults = model_info(cfg.net).defaults
    c, h, w = (int(s) for s in image_shape[-3:])
    kwargs: dict[str, Any] = {k: getattr(cfg, k) for k in QUANT_KEYS
                              if k in defaults and getattr(cfg, k) is not None}
    if "inq_iterations" in kwargs:
        kwargs["inq_iterations"] = list(inq_schedule(cfg.inq_iterations, cfg.max_iter))
    derived = {"num_classes": num_classes, "in_channels": c, "in_features": c * h * w}
    kwargs.update({k: v for k, v in derived.items() if k in defaults})
    unknown = sorted(set(cfg.model_args) - set(defaults))
    if unknown:
        raise ConfigError(f"--model-arg {unknown}: {cfg.net} has no such option; its options "
                          f"are {sorted(set(defaults) - set(QUANT_KEYS))}")
    kwargs.update(cfg.model_args)
    torch.manual_seed(cfg.seed)
    try:
        model = create_model(cfg.net, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {cfg.net}: {e}") from e
    return model


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _probe_forward(model: nn.Module, image_shape: tuple[int, ...], net: str,
                   dataset: str, batch: int = 2) -> None:
    # For nets without a known input shape: one eval forward on two blank images.
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.zeros(batch, *image_shape))
    except RuntimeError as e:
        raise ConfigError(f"{net} cannot take the {tuple(image_shape)} images of {dataset!r}: "
                          f"{str(e).splitlines()[0]}") from e
    finally:
        model.train(was)


def _check_batch_norm(model: nn.Module, image_shape: tuple[int, ...], net: str,
                      dataset: str, batch_size: int) -> None:
    """Refuse ``-b 1`` for nets whose batch norm would see one value per channel in training
    (``BatchNorm1d`` after a linear layer, or a 1x1 feature map), where PyTorch fails mid-run.
    Batch norm's training statistics need two values per channel; the shapes come from one
    eval forward of a blank image (no state changes)."""
    if batch_size > 1:
        return
    single: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args: single.append(names[mod]) if math.prod(args[0].shape[2:]) == 1
        else None) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        _probe_forward(model, image_shape, net, dataset, batch=1)
    finally:
        for h in hooks:
            h.remove()
    if single:
        raise ConfigError(
            f"-b/--batch-size 1: {net} normalises {', '.join(single[:3])} with batch norm over "
            "one value per channel, whose training statistics need at least 2 images per batch "
            "(per process under torchrun); use -b 2 or more")


# --------------------------------------------------------------------------- evaluation


def _amp(device: torch.device, type_config: str):
    if type_config != "half":
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
                with _amp(device, type_config):
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


# --------------------------------------------------------------------------- training


def train(config: TrainConfig, *, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``config.net`` as described in the module docstring; see :class:`TrainConfig`.

    Under ``torchrun`` each process trains its shard (DDP); rank 0 writes the monitor folder and
    the checkpoints. ``on_step(i)`` is called after each iteration with the number of iterations
    done (for tests and tools). Raises :class:`ConfigError` for bad options,
    :class:`fewbits.checkpoint.CheckpointError` for an unusable ``--resume`` file, and
    :class:`TrainingInterrupted` after saving a checkpoint on SIGINT/SIGTERM.
    """
    cfg = copy.deepcopy(config)
    _check_net(cfg.net)
    check_run_folder(cfg.monitor_path, cfg.model_save_path, resume=bool(cfg.resume),
                     overwrite=cfg.overwrite)
    device_type = "cpu" if cfg.context == "cpu" else "cuda"
    resolve_device(cfg.context, cfg.device_id)  # fails early, before any process group
    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = fdist.init_from_env(device_type)
    try:
        return _Run(cfg, info, on_step).run()
    finally:
        if not was_initialised:
            fdist.cleanup(info)


class _Run:
    """One training run; state lives here so that checkpoints can collect it."""

    def __init__(self, cfg: TrainConfig, info: fdist.DistInfo,
                 on_step: Callable[[int], None] | None) -> None:
        self.cfg, self.info, self.on_step = cfg, info, on_step
        self.device = resolve_device(cfg.context, cfg.device_id, info)
        self._signal: int | None = None
        self._old_handlers: dict[int, Any] = {}

    # -- setup -----------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg, info = self.cfg, self.info
        shape = net_input_shape(cfg.net)
        # Rank 0 first: it may download or build a decode cache that the others then reuse.
        if info.is_main:
            self.train_ds = load_split(cfg, "train", shape)
            self.test_ds = load_split(cfg, "test", shape)
        fdist.barrier(info)
        if not info.is_main:
            self.train_ds = load_split(cfg, "train", shape)
            self.test_ds = load_split(cfg, "test", shape)
        self.image_shape = tuple(self.train_ds.images.shape[1:])
        check_input_shape(cfg.net, self.image_shape, cfg.dataset)
        if len(self.train_ds.classes) < 2:  # would train to a trivial 0 % error
            raise ConfigError(f"--dataset {cfg.dataset}: {len(self.train_ds.classes)} class "
                              f"({list(self.train_ds.classes)}); classification needs at least "
                              "two classes (one folder per class)")

    def _setup(self) -> None:
        from ..data import BatchIterator

        cfg, info, dev = self.cfg, self.info, self.device
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if dev.type == "cuda" and cfg.context == "cudnn":
            torch.backends.cudnn.benchmark = True
        self._load_data()
        self.batches = BatchIterator(self.train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                     rank=info.rank, world_size=info.world_size)
        if cfg.epochs is not None:
            steps = cfg.epochs * self.batches.batches_per_epoch / cfg.accum_steps
            cfg.max_iter = max(1, round(steps))
        cfg.inq_iterations = inq_schedule(cfg.inq_iterations, cfg.max_iter)
        model = build_model(cfg, self.image_shape, len(self.train_ds.classes))
        if net_input_shape(cfg.net) is None:
            _probe_forward(model, self.image_shape, cfg.net, cfg.dataset)
        _check_batch_norm(model, self.image_shape, cfg.net, cfg.dataset, cfg.batch_size)
        _check_inq(model, cfg.max_iter)
        self.model = model.to(dev)
        count_optimizer_steps(self.model)  # INQ's schedule is in optimizer steps (--accum-steps)
        if cfg.channels_last:  # CPU convolutions take it too: applied, never ignored
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.checkpoint_interval is None:
            cfg.checkpoint_interval = cfg.val_interval
        if cfg.val_batch_size is None:
            cfg.val_batch_size = max(cfg.batch_size, 256)
        cfg.augment = cfg.uses_augment
        cfg.model_save_path = str(cfg.save_path)
        params = list(self.model.parameters())
        if cfg.optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay)
        self.schedule = LRSchedule(cfg.lr_schedule, cfg.learning_rate, cfg.max_iter)
        use_scaler = cfg.type_config == "half" and dev.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 0x5EED)
        self.start_iter = 0
        self.best_error: float | None = None
        self.best_iter: int | None = None
        monitor_state = None
        self.resumed_from: str | None = None
        if cfg.resume:
            monitor_state = self._restore(cfg.resume)
        elif info.is_main and existing_run_files(cfg.monitor_path, cfg.save_path):
            print(f"note: --overwrite: the earlier run's files in {cfg.monitor_path} (and "
                  f"{cfg.save_path}) are replaced", flush=True)
        self.net: nn.Module = self.model
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if info.distributed:
            ids = [dev.index] if dev.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            fdist.sync_quantizers(self.model, info)
            self.net = self.ddp
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.monitor = Monitor(cfg.monitor_path, enabled=info.is_main)
        self.monitor.start(self.start_iter, monitor_state)
        self.progress = Progress(cfg.max_iter, self.start_iter, enabled=info.is_main,
                                 bar=cfg.progress)
        if info.is_main:
            write_json(Path(cfg.monitor_path) / "config.json", self._config_record())

    def _config_record(self) -> dict[str, Any]:
        ds = self.train_ds
        return {
            **self.cfg.to_dict(),
            "model": {"fewbits_spec": self.model.fewbits_spec,
                      "num_parameters": count_parameters(self.model)},
            "data": {"name": ds.name, "classes": list(ds.classes),
                     "image_shape": list(self.image_shape), "train_images": len(ds),
                     "test_images": len(self.test_ds),
                     "batches_per_epoch": self.batches.batches_per_epoch},
            "world_size": self.info.world_size,
            "global_batch_size": self.cfg.batch_size * self.info.world_size
            * self.cfg.accum_steps,
            "device": str(self.device),
            "resumed_from": self.resumed_from,
            "versions": {"fewbits": __version__, "torch": str(torch.__version__)},
        }

    # -- checkpoints -----------------------------------------------------------------------
    def _resume_path(self, resume: str) -> Path:
        if resume == "auto":
            p = self.cfg.save_path / ckpt.CHECKPOINT_NAME
            if not p.is_file():
                raise ckpt.CheckpointError(
                    f"{p}: no checkpoint to resume from (--resume looks in -o/--model-save-path)"
                    "; start without --resume, or pass --resume PATH")
            return p
        p = Path(resume)
        return p / ckpt.CHECKPOINT_NAME if p.is_dir() else p

    def _restore(self, resume: str) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        path = self._resume_path(resume)
        state = ckpt.load_checkpoint(path, "cpu")
        saved = state["config"]
        problems = [f"{k}: checkpoint {saved.get(k)!r}, this run {getattr(cfg, k)!r}"
                    for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
        if state.get("world_size", 1) != info.world_size:
            problems.append(f"processes: checkpoint {state.get('world_size')}, this run "
                            f"{info.world_size}")
        spec, mine = state["model_spec"], _jsonable(self.model.fewbits_spec)
        if spec["name"] == mine["name"]:
            diff = sorted(k for k in set(spec["kwargs"]) | set(mine["kwargs"])
                          if spec["kwargs"].get(k) != mine["kwargs"].get(k))
            problems += [f"model option {k}: checkpoint {spec['kwargs'].get(k)!r}, this run "
                         f"{mine['kwargs'].get(k)!r}" for k in diff]
        if problems:
            raise ckpt.CheckpointError(
                f"{path}: cannot resume, the checkpoint was written by an incompatible run ("
                + "; ".join(problems) + "). Use the checkpoint's options, or start a new run "
                "without --resume.")
        try:
            self.model.load_state_dict(state["state_dict"])
            self.opt.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.batches.load_state_dict(state["data_iterator"])
            rng = state["rng"]
            self.aug_gen.set_state(rng["augment"])
            torch.set_rng_state(rng["torch"])
            if self.device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ckpt.CheckpointError(f"{path}: cannot restore the run state "
                                       f"({str(e).splitlines()[0]})") from e
        self.start_iter = int(state["iteration"])
        if self.start_iter > cfg.max_iter:
            raise ConfigError(f"{path} is at iteration {self.start_iter}, beyond -i/--max-iter "
                              f"{cfg.max_iter}; raise -i to train further")
        best = state.get("best") or {}
        self.best_error, self.best_iter = best.get("error"), best.get("iteration")
        self.resumed_from = str(path)
        if info.is_main:
            print(f"resuming from {path} at iteration {self.start_iter}", flush=True)
        return state.get("monitor") or {}

    def _save_checkpoint(self, iteration: int) -> Path:
        path = self.cfg.save_path / ckpt.CHECKPOINT_NAME
        monitor_state = self.monitor.state_dict()
        if self.info.is_main:
            cuda_rng = (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                        else None)
            ckpt.save_file(path, {
                "format": ckpt.CHECKPOINT_FORMAT,
                "format_version": ckpt.FORMAT_VERSION,
                "fewbits_version": __version__,
                "torch_version": str(torch.__version__),
                "model_spec": _jsonable(self.model.fewbits_spec),
                "state_dict": ckpt.cpu_state_dict(self.model),
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "schedule": self.schedule.state_dict(),
                "iteration": iteration,
                "best": {"error": self.best_error, "iteration": self.best_iter},
                "data_iterator": self.batches.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "augment": self.aug_gen.get_state(),
                        "cuda": cuda_rng},
                "monitor": monitor_state,
                "config": self.cfg.to_dict(),
                "world_size": self.info.world_size,
            })
        return path

    def _save_model(self, name: str, iteration: int, error: float) -> None:
        if self.info.is_main:
            payload = ckpt.model_file_payload(self.model, iteration=iteration, test_error=error,
                                              config=self.cfg.to_dict())
            payload["model_spec"] = _jsonable(payload["model_spec"])
            ckpt.save_file(self.cfg.save_path / name, payload)

    # -- signals ---------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None:  # second signal: stop right now
            raise KeyboardInterrupt
        self._signal = signum

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[s] = signal.signal(s, self._on_signal)

    def _restore_signals(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers.clear()

    def _stop_requested(self, done: int) -> bool:
        if not self.info.distributed:
            return self._signal is not None
        # Ranks must agree on where to stop; ask every 10 iterations (one small all-reduce).
        if done % self.monitor.interval and done % self.cfg.checkpoint_interval:
            return False
        flag = torch.tensor([0 if self._signal is None else 1], device=self.device)
        return bool(fdist.all_reduce_sum(flag, self.info).item())

    # -- the loop --------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        from ..data import augment, random_augment_params, to_float

        cfg, info, dev = self.cfg, self.info, self.device
        b, k = cfg.batch_size, cfg.accum_steps
        if cfg.augment:
            # One draw for the whole step (all ranks, all micro-batches): a rank's slice is
            # the same as in a single process running the same global batch.
            angles, flips = random_augment_params(b * info.world_size * k, self.aug_gen)
        for j in range(k):
            xu8, y = next(self.batches)
            x = to_float(xu8, dev)
            if cfg.augment:
                s = (j * info.world_size + info.rank) * b
                x = augment(x, angles[s:s + b], flips[s:s + b])
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(dev, non_blocking=True)

    def _step(self, i: int) -> Tensor:
        cfg, dev = self.cfg, self.device
        k = cfg.accum_steps
        lr = self.schedule.lr(i)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.net.train()
        loss_sum = torch.zeros((), device=dev)
        wrong = torch.zeros((), device=dev)
        for j, (x, y) in enumerate(self._micro_batches()):
            sync = (self.ddp.no_sync() if self.ddp is not None and j < k - 1
                    else contextlib.nullcontext())
            with sync:
                with _amp(dev, cfg.type_config):
                    out = self.net(x)
                loss = F.cross_entropy(out.float(), y)
                scaled = loss / k if k > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach()
            wrong += (out.detach().argmax(1) != y).sum()
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        apply_weight_constraints(self.model)
        stats = torch.stack([loss_sum / k, wrong / (cfg.batch_size * k)])
        if self.info.distributed:
            fdist.all_reduce_sum(stats, self.info)
            stats = stats / self.info.world_size
        return stats

    def _validate(self, done: int) -> float:
        cfg = self.cfg
        fdist.broadcast_buffers(self.model, self.info)
        wrong, total = evaluate(self.model, self.test_ds, self.device, cfg.val_batch_size,
                                info=self.info, type_config=cfg.type_config,
                                channels_last=cfg.channels_last)
        err = wrong / total
        self.monitor.add_test(done, err)
        if self.best_error is None or err < self.best_error:
            self.best_error, self.best_iter = err, done
            self._save_model("model_best.pt", done, err)
        self.progress.write(f"iter {done}: test error {100 * err:.2f}% ({wrong}/{total}); best "
                            f"{100 * self.best_error:.2f}% at iteration {self.best_iter}")
        if cfg.plot:
            self.monitor.plot()
        return err

    def run(self) -> TrainResult:
        self._setup()
        cfg, info = self.cfg, self.info
        images_per_step = cfg.batch_size * info.world_size * cfg.accum_steps
        train_time, t_images = 0.0, 0
        self._install_signals()
        try:
            i = self.start_iter
            while i < cfg.max_iter:
                if i % cfg.val_interval == 0 and (i > 0 or cfg.validate_first):
                    t_val = time.perf_counter()
                    self._validate(i)
                    self.progress.exclude(time.perf_counter() - t_val)  # images/s: training only
                t0 = time.perf_counter()
                stats = self._step(i)
                window = self.monitor.add_train(i, stats)
                train_time += time.perf_counter() - t0
                t_images += images_per_step
                self.progress.step(i, images_per_step, window)
                i += 1
                if self.on_step is not None:
                    self.on_step(i)
                stop = self._stop_requested(i)
                if stop or i % cfg.checkpoint_interval == 0:
                    path = self._save_checkpoint(i)
                if stop:
                    raise TrainingInterrupted(self._signal or signal.SIGTERM, i, path,
                                              info.rank)
            self.monitor.finish(cfg.max_iter - 1)  # the timer's last, partial window
            final = self._validate(cfg.max_iter)
            self._save_model("model_final.pt", cfg.max_iter, final)
            self._save_checkpoint(cfg.max_iter)
        finally:
            self._restore_signals()
            self.progress.close()
        rate = t_images / train_time if train_time > 0 else 0.0
        if info.is_main:
            print(f"done: {cfg.net} on {cfg.dataset}, {cfg.max_iter} iterations; test error "
                  f"{100 * final:.2f}% (best {100 * self.best_error:.2f}% at iteration "
                  f"{self.best_iter}); training {rate:.0f} images/s; files in "
                  f"{cfg.monitor_path}" + (f" and {cfg.save_path}"
                                           if cfg.save_path != Path(cfg.monitor_path) else ""),
                  flush=True)
        return TrainResult(cfg.max_iter, self.best_error, self.best_iter, final, rate,
                           Path(cfg.monitor_path), cfg.save_path, self.model)


def _jsonable(obj: Any) -> Any:
    """Tuples to lists (recursively), so that specs compare equal after a save/load."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
