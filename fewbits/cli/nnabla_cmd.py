"""``fewbits import-nnabla``: a network trained with NNabla's CIFAR-10 quantization example
(``params_N.h5`` of ``nn.save_parameters``, or an ``.nnp``) as a fewbits run folder, resumable
with ``fewbits train --resume``, or as a packed ``.fewbits`` file.

    $ fewbits import-nnabla monitor.fpnet/params_040000.h5 \\
        -n cifar10_fp_net_resnet23_prediction -o fpnet.fewbits
    $ fewbits import-nnabla monitor.bc/params_012000.h5 \\
        -n cifar10_binary_connect_resnet23_prediction -o runs/bc --data-dir data

The command takes ``fewbits train``'s flags (the quantization options the NNabla run used,
``--bit-width``, ``--delta``, ... and, for a run folder, the data and optimizer options the
continued run will use): the run folder's ``checkpoint.pt`` then resumes with the same command
line as ``fewbits train --resume ... --model-arg nnabla=true``.
"""

from __future__ import annotations

import argparse

import torch

from .. import config
from ..data import BatchIterator
from ..distributed import DistInfo
from ..export import export_packed
from ..models import model_info
from ..nnabla import (
    LAYER_SCOPES,
    NNABLA_INQ_BITS,
    NNablaImportError,
    file_iteration,
    load_parameters,
)
from ..runs import check_run_folder
from ..train import (
    LRSchedule,
    build_model,
    check_input_shape,
    inq_schedule,
    load_split,
    net_input_shape,
)
from ..train.checkpointing import build_optimizer, save_checkpoint

__all__ = ["ERRORS", "HELP", "add_import_arguments", "run_import"]

HELP = "import a network trained with NNabla's quantization example (.h5, .nnp)"
#: Besides USER_ERRORS: unusable parameter files (:class:`NNablaImportError`), a network the
#: packed format cannot hold (an INQ file whose schedule has not ended), a missing h5py.
ERRORS: tuple[type[BaseException], ...] = (NNablaImportError, ValueError, ImportError)
_AUG_SEED = 0x5EED  # the training loop's augmentation generator: seed + this


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    """``PARAMS`` and ``fewbits train``'s flags, plus ``--iteration`` and
    ``--no-check-derived``."""
    p.add_argument("params", metavar="PARAMS",
                   help="NNabla parameters: params_N.h5 (nn.save_parameters), MODEL.nnp, or "
                        "a .protobuf parameter file")
    p.add_argument("--iteration", type=int, default=None, metavar="N",
                   help="the NNabla run's iteration (default: N of params_N.h5, else 0): "
                        "where the run folder resumes and INQ's schedule stands")
    p.add_argument("--no-check-derived", action="store_true",
                   help="report stored W_q/b_q/Wb/alpha copies that differ from fewbits' "
                        "quantization of W as notes instead of errors")
    config.add_arguments(p)


def _config(ns: argparse.Namespace) -> config.TrainConfig:
    cfg = config.from_namespace(ns)
    if cfg.model_save_path is None:
        raise config.ConfigError("-o/--model-save-path: give a run folder (resumable with "
                                 "fewbits train --resume) or a FILE.fewbits")
    fam = None
    try:
        info = model_info(cfg.net)
        fam = info.family
    except ValueError:
        info = None
    if info is None or "nnabla" not in info.defaults or fam not in LAYER_SCOPES:
        nets = ", ".join(f"cifar10_{f}_resnet23_prediction" if f != "float"
                         else "cifar10_resnet23_prediction" for f in LAYER_SCOPES)
        raise config.ConfigError(f"-n/--net {cfg.net}: NNabla's example has the networks "
                                 f"{nets}")
    if cfg.model_args.get("nnabla", True) is not True:
        raise config.ConfigError("--model-arg nnabla: an imported network computes NNabla's "
                                 "arithmetic (nnabla=true)")
    if fam == "inq" and cfg.bit_width not in (None, NNABLA_INQ_BITS):
        raise config.ConfigError(
            f"--bit-width {cfg.bit_width}: NNabla's example quantized INQ to "
            f"{NNABLA_INQ_BITS} bits whatever --bit-width said (models.py passes no num_bits); "
            f"leave --bit-width out or give {NNABLA_INQ_BITS}")
    cfg.model_args = {**cfg.model_args, "nnabla": True}
    return cfg


def run_import(ns: argparse.Namespace) -> int:
    """Import ``ns.params`` into ``-o``: a ``.fewbits`` file, or a run folder holding
    ``checkpoint.pt``; prints what it did, the NNabla semantics it reproduced and, for a run
    folder, the command that continues training."""
    cfg = _config(ns)
    out = str(cfg.model_save_path)
    if out.endswith(".fewbits"):
        model = build_model(cfg, (3, 32, 32), 10)
        report = load_parameters(ns.params, model, iteration=ns.iteration,
                                 check_derived=not ns.no_check_derived)
        _print_notes(report.notes)
        size = export_packed(model, out).file_bytes
        print(f"imported {report.parameters} NNabla parameters ({report.values} values, "
              f"{len(report.checked)} derived copies checked) of {cfg.net}; wrote {out} "
              f"({size} bytes)", flush=True)
        return 0
    return _run_folder(cfg, ns)


def _run_folder(cfg: config.TrainConfig, ns: argparse.Namespace) -> int:
    """``checkpoint.pt`` of a run at the NNabla file's iteration, built as ``fewbits train``
    builds its run (data, model, optimizer, schedule, data order, augmentation generator)."""
    cfg.monitor_path = cfg.model_save_path if "monitor_path" not in vars(ns) else \
        cfg.monitor_path
    check_run_folder(cfg.monitor_path, cfg.model_save_path, resume=False,
                     overwrite=cfg.overwrite)
    # the parameter file first: a bad file is reported as such, before any data is read or
    # downloaded (the seed's networks take CIFAR-10's 3x32x32 images and 10 classes)
    model = build_model(cfg, (3, 32, 32), 10)
    report = load_parameters(ns.params, model, iteration=ns.iteration,
                             check_derived=not ns.no_check_derived)
    _print_notes(report.notes)
    train_ds = load_split(cfg, "train", net_input_shape(cfg.net))
    shape = tuple(train_ds.images.shape[1:])
    check_input_shape(cfg.net, shape, cfg.dataset)
    if len(train_ds.classes) != 10:
        raise config.ConfigError(f"--dataset {cfg.dataset} has {len(train_ds.classes)} classes; "
                                 f"{cfg.net}'s NNabla parameters classify 10 (CIFAR-10)")
    batches = BatchIterator(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed)
    if cfg.epochs is not None:  # as the training run resolves its options
        cfg.max_iter = max(1, round(cfg.epochs * batches.batches_per_epoch / cfg.accum_steps))
    it = file_iteration(ns.params) if ns.iteration is None else int(ns.iteration)
    if it > cfg.max_iter:
        raise config.ConfigError(f"{ns.params} is at iteration {it}, beyond -i/--max-iter "
                                 f"{cfg.max_iter}; raise -i")
    cfg.inq_iterations = inq_schedule(cfg.inq_iterations, cfg.max_iter)
    cfg.checkpoint_interval = cfg.checkpoint_interval or cfg.val_interval
    cfg.val_batch_size = cfg.val_batch_size or max(cfg.batch_size, 256)
    cfg.augment = cfg.uses_augment
    cfg.model_save_path = str(cfg.save_path)
    opt = build_optimizer(cfg, model)  # fewbits train's groups, or --resume would not load
    path = cfg.save_path / "checkpoint.pt"
    save_checkpoint(path, cfg, DistInfo(), iteration=it, model=model, opt=opt, scaler=None,
                    schedule=LRSchedule(cfg.lr_schedule, cfg.learning_rate,
                                        cfg.max_iter).state_dict(),
                    best={"error": None, "iteration": None}, batches=batches,
                    aug_gen=torch.Generator().manual_seed(cfg.seed + _AUG_SEED),
                    device=torch.device("cpu"), monitor={})
    print(f"imported {report.parameters} NNabla parameters of {cfg.net} at iteration {it}; "
          f"wrote {path}. Evaluate: fewbits eval {cfg.save_path}. Continue training: fewbits "
          f"train --resume -n {cfg.net} -m {cfg.monitor_path} -o {cfg.save_path} --model-arg "
          "nnabla=true, with this "
          "command's other options", flush=True)
    return 0


def _print_notes(notes: list[str]) -> None:
    for n in notes:
        print(f"note: {n}", flush=True)
