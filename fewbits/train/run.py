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
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint as ckpt
from .. import distributed as fdist
from .._checks import NonFiniteError
from .._version import __version__
from ..batch_norm import recalibrate_bn
from ..config import ConfigError, TrainConfig
from ..data import BatchIterator, augment, random_augment_params, to_float
from ..layers import apply_weight_constraints, count_optimizer_steps
from ..models import model_info
from ..monitor import Monitor, Progress, write_json
from ..runs import (
    check_run_folder,
    discard_set_aside,
    existing_run_files,
    run_lock,
    set_aside_run,
)
from .checkpointing import (
    build_optimizer,
    restore_checkpoint,
    resume_path,
    save_checkpoint,
    save_model,
)
from .device import autocast, resolve_device
from .evaluate import evaluate
from .model import (
    bn_recalibration_batches,
    build_model,
    check_batch_norm,
    check_dead_start,
    check_input_shape,
    check_inq,
    check_net,
    check_quant_options,
    count_parameters,
    inq_schedule,
    load_split,
    net_input_shape,
    probe_forward,
    resolve_bn_recalibrate,
)
from .signals import StopSignals, TrainingInterrupted

__all__ = ["LRSchedule", "TrainResult", "TrainingDiverged", "train"]


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN/inf: the run stops (nothing diverged is saved)
    and says what to change. Attribute ``iteration``: the iterations done."""

    def __init__(self, iteration: int, what: str, lr: float) -> None:
        self.iteration = iteration
        super().__init__(
            f"training diverged at iteration {iteration}: {what}. Lower -l/--learning-rate "
            f"(now {lr:g}) and start again with --overwrite, or --resume with a lower one "
            "(checkpoints are only written while the run is finite)")


def _usable_threads(asked: int, report: bool) -> int:
    """``--threads``, at most the CPU cores this process may use (more threads than cores
    only make torch slower): the count to use, with a warning when it is lowered."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if asked <= cores:
        return asked
    if report:
        print(f"warning: --threads {asked} is more than the {cores} CPU cores this process "
              f"may use (extra threads only slow torch down); using {cores}", file=sys.stderr,
              flush=True)
    return cores


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
    check_net(cfg.net)
    # before the run folder exists: a refused option leaves nothing behind
    check_quant_options(cfg, model_info(cfg.net).defaults)
    device_type = "cpu" if cfg.context == "cpu" else "cuda"
    resolve_device(cfg.context, cfg.device_id)  # fails early, before any process group
    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = fdist.init_from_env(device_type)
    try:
        with contextlib.ExitStack() as held:
            if info.is_main:  # the one writer: a second run into these folders refuses
                held.enter_context(run_lock(cfg.monitor_path, cfg.save_path))
            check_run_folder(cfg.monitor_path, cfg.model_save_path, resume=bool(cfg.resume),
                             overwrite=cfg.overwrite)
            return _Run(cfg, info, on_step).run()
    finally:
        if not was_initialised:
            fdist.cleanup(info)


class _Run:
    """One training run: the data, model, optimizer and loop state, all built in
    ``__init__`` (in the order the seed does it, so that seeded runs repeat exactly), then
    :meth:`run` trains."""

    def __init__(self, cfg: TrainConfig, info: fdist.DistInfo,
                 on_step: Callable[[int], None] | None) -> None:
        self.cfg, self.info, self.on_step = cfg, info, on_step
        self.device = dev = resolve_device(cfg.context, cfg.device_id, info)
        if cfg.threads is not None:
            cfg.threads = _usable_threads(cfg.threads, info.is_main)  # config.json: as run
            torch.set_num_threads(cfg.threads)
        if dev.type == "cuda" and cfg.context == "cudnn":
            torch.backends.cudnn.benchmark = True
        self.train_ds, self.test_ds = self._load_data()
        self.image_shape: tuple[int, ...] = tuple(self.train_ds.images.shape[1:])
        self._check_data()
        n = len(self.train_ds)
        if cfg.batch_size * info.world_size > n:
            raise ConfigError(f"-b/--batch-size {cfg.batch_size}"
                              + (f" x {info.world_size} processes" if info.distributed else "")
                              + f" is more than the {n} training images of --dataset "
                              f"{cfg.dataset}; give -b {n // info.world_size} or less")
        self.batches = BatchIterator(self.train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                     rank=info.rank, world_size=info.world_size)
        self._resolve_options()
        self.model = self._build_model()
        cfg.bn_recalibrate = resolve_bn_recalibrate(cfg, self.model, n)  # config.json: as run
        self.bn_done = False  # once per run: the final checkpoint records it
        # LSQ's steps in a group of their own at a fraction of lr under Adam (quantizers.optim)
        self.opt: torch.optim.Optimizer = build_optimizer(cfg, self.model)
        self.schedule = LRSchedule(cfg.lr_schedule, cfg.learning_rate, cfg.max_iter)
        use_scaler = cfg.type_config == "half" and dev.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 0x5EED)
        self.start_iter = 0
        self.best_error: float | None = None
        self.best_iter: int | None = None
        self.resumed_from: str | None = None
        self.set_aside: list[Path] = []
        monitor_state, had_run = None, False
        if cfg.resume:
            monitor_state = self._restore(cfg.resume)
        elif info.is_main:  # --overwrite (or an empty folder: nothing to do)
            had_run = bool(existing_run_files(cfg.monitor_path, cfg.save_path))
            # Kept until this run's first checkpoint: a kill before it loses nothing.
            self.set_aside = set_aside_run(cfg.monitor_path, cfg.save_path)
        if had_run:
            print(f"note: --overwrite: the earlier run's files in {cfg.monitor_path} (and "
                  f"{cfg.save_path}) are replaced; kept in .fewbits-replaced there until this "
                  "run writes its first checkpoint", flush=True)
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
        self.stop = StopSignals()
        if info.is_main:
            write_json(Path(cfg.monitor_path) / "config.json", self._config_record())

    # -- setup -----------------------------------------------------------------------------
    def _load_data(self) -> tuple[Any, Any]:
        cfg, info = self.cfg, self.info
        shape = net_input_shape(cfg.net)
        # Rank 0 first: it may download or build a decode cache that the others then reuse.
        if info.is_main:
            splits = load_split(cfg, "train", shape), load_split(cfg, "test", shape)
        fdist.barrier(info)
        if not info.is_main:
            splits = load_split(cfg, "train", shape), load_split(cfg, "test", shape)
        return splits

    def _check_data(self) -> None:
        cfg = self.cfg
        check_input_shape(cfg.net, self.image_shape, cfg.dataset)
        if len(self.train_ds.classes) < 2:  # would train to a trivial 0 % error
            raise ConfigError(f"--dataset {cfg.dataset}: {len(self.train_ds.classes)} class "
                              f"({list(self.train_ds.classes)}); classification needs at least "
                              "two classes (one folder per class)")

    def _resolve_options(self) -> None:
        """The options left to the run: ``--epochs`` -> ``max_iter`` and INQ fractions ->
        iterations (they depend on the data), and the defaults that follow other options.
        Written back to ``cfg`` so config.json and checkpoints record them."""
        cfg = self.cfg
        if cfg.epochs is not None:
            steps = cfg.epochs * self.batches.batches_per_epoch / cfg.accum_steps
            cfg.max_iter = max(1, round(steps))
        cfg.inq_iterations = inq_schedule(cfg.inq_iterations, cfg.max_iter)
        if cfg.checkpoint_interval is None:
            cfg.checkpoint_interval = cfg.val_interval
        if cfg.val_batch_size is None:
            cfg.val_batch_size = max(cfg.batch_size, 256)
        cfg.augment = cfg.uses_augment
        cfg.model_save_path = str(cfg.save_path)

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        model = build_model(cfg, self.image_shape, len(self.train_ds.classes))
        if net_input_shape(cfg.net) is None:
            probe_forward(model, self.image_shape, cfg.net, cfg.dataset)
        check_batch_norm(model, self.image_shape, cfg.net, cfg.dataset, cfg.batch_size)
        check_inq(model, cfg.max_iter)
        model = model.to(self.device)
        count_optimizer_steps(model)  # INQ's schedule is in optimizer steps (--accum-steps)
        if cfg.channels_last:  # CPU convolutions take it too: applied, never ignored
            model = model.to(memory_format=torch.channels_last)
        return model

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
    def _restore(self, resume: str) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        path = resume_path(resume, cfg.save_path)
        state = restore_checkpoint(path, cfg, info, model=self.model, opt=self.opt,
                                   scaler=self.scaler, batches=self.batches,
                                   aug_gen=self.aug_gen, device=self.device)
        self.start_iter = int(state["iteration"])
        if self.start_iter > cfg.max_iter:
            raise ConfigError(f"{path} is at iteration {self.start_iter}, beyond -i/--max-iter "
                              f"{cfg.max_iter}; raise -i to train further")
        best = state.get("best") or {}
        self.best_error, self.best_iter = best.get("error"), best.get("iteration")
        self.bn_done = bool(state.get("bn_recalibrated", False))
        self.resumed_from = str(path)
        if info.is_main:
            print(f"resuming from {path} at iteration {self.start_iter}", flush=True)
        return state.get("monitor") or {}

    def _check_finite(self, iteration: int) -> None:
        """Raise :class:`TrainingDiverged` when a parameter or buffer is NaN/inf (before
        anything is saved: a diverged state is worth nothing)."""
        bad = next((n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
                    if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise TrainingDiverged(iteration, f"{bad} holds NaN/inf", self.cfg.learning_rate)

    def _save_checkpoint(self, iteration: int) -> Path:
        self._check_finite(iteration)
        path = self.cfg.save_path / ckpt.CHECKPOINT_NAME
        monitor_state = self.monitor.state_dict()
        if self.info.is_main:
            save_checkpoint(path, self.cfg, self.info, iteration=iteration, model=self.model,
                            opt=self.opt, scaler=self.scaler,
                            schedule=self.schedule.state_dict(),
                            best={"error": self.best_error, "iteration": self.best_iter},
                            batches=self.batches, aug_gen=self.aug_gen, device=self.device,
                            monitor=monitor_state, bn_recalibrated=self.bn_done)
            if self.set_aside:  # this run can now be resumed: the replaced one goes
                discard_set_aside(*self.set_aside)
                self.set_aside = []
        return path

    def _save_model(self, name: str, iteration: int, error: float) -> None:
        self._check_finite(iteration)
        if self.info.is_main:
            save_model(self.cfg.save_path / name, self.model, self.cfg, iteration, error)

    # -- the loop --------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
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
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.net.train()
        loss_sum = torch.zeros((), device=dev)
        wrong = torch.zeros((), device=dev)
        for j, (x, y) in enumerate(self._micro_batches()):
            sync = (self.ddp.no_sync() if self.ddp is not None and j < k - 1
                    else contextlib.nullcontext())
            first = i == 0 and j == 0
            with sync, (check_dead_start(self.model, cfg.net) if first
                        else contextlib.nullcontext([])) as seen:
                with autocast(dev, cfg.type_config):
                    out = self.net(x)
                seen.append(out)
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
        r = evaluate(self.model, self.test_ds, self.device, cfg.val_batch_size,
                     info=self.info, type_config=cfg.type_config, channels_last=cfg.channels_last)
        err = r.error
        self.monitor.add_test(done, err)
        if self.best_error is None or err < self.best_error:
            self.best_error, self.best_iter = err, done
            self._save_model("model_best.pt", done, err)
        self.progress.write(f"iter {done}: test error {100 * err:.2f}% ({r.wrong}/{r.total}); "
                            f"best {100 * self.best_error:.2f}% at iteration {self.best_iter}")
        if cfg.plot:
            self.monitor.plot()
        return err

    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        images_per_step = cfg.batch_size * info.world_size * cfg.accum_steps
        # Under torchrun the ranks agree on a stop at these multiples only (one all-reduce).
        stop_checks = (self.monitor.interval, cfg.checkpoint_interval)
        train_time, t_images, i = 0.0, 0, self.start_iter
        try:
            with self.stop:
                i = self.start_iter
                while i < cfg.max_iter:
                    if i % cfg.val_interval == 0 and (i > 0 or cfg.validate_first):
                        t_val = time.perf_counter()
                        self._validate(i)
                        self.progress.exclude(time.perf_counter() - t_val)  # images/s: training
                    t0 = time.perf_counter()
                    stats = self._step(i)
                    window = self.monitor.add_train(i, stats)
                    if window is not None and not math.isfinite(window[0]):
                        raise TrainingDiverged(i + 1, f"the training loss is {window[0]}",
                                               cfg.learning_rate)
                    train_time += time.perf_counter() - t0
                    t_images += images_per_step
                    self.progress.step(i, images_per_step, window)
                    i += 1
                    if self.on_step is not None:
                        self.on_step(i)
                    stop = self.stop.requested(i, info, self.device, stop_checks)
                    if stop or i % cfg.checkpoint_interval == 0:
                        path = self._save_checkpoint(i)
                    if stop:
                        raise TrainingInterrupted(self.stop.signum or signal.SIGTERM, i, path,
                                                  info.rank)
                self.monitor.finish(cfg.max_iter - 1)  # the timer's last, partial window
                if cfg.bn_recalibrate and not self.bn_done:
                    recalibrate_bn(self.model, bn_recalibration_batches(
                        self.train_ds.images, cfg.bn_recalibrate, cfg.batch_size, cfg.seed,
                        self.device), cfg.bn_recalibrate)
                    self.bn_done = True
                    self.progress.write(f"batch norm re-estimated over {cfg.bn_recalibrate} "
                                        "training images, the quantizers in inference form")
                final = self._validate(cfg.max_iter)
                self._save_model("model_final.pt", cfg.max_iter, final)
                self._save_checkpoint(cfg.max_iter)
        except NonFiniteError as e:  # a quantizer met the NaN/inf of a diverged step
            raise TrainingDiverged(i, str(e).split(";")[0], cfg.learning_rate) from None
        finally:
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

