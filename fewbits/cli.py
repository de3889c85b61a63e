"""The ``fewbits`` command: ``train``, ``eval``, ``list`` (and more registered later).

``fewbits train`` takes every flag of the seed's ``classification.py`` with the same meaning
(``classification.py`` at the repository root is ``fewbits train`` under another name), plus
data, optimisation and run-control options. Subcommands live in :data:`SUBCOMMANDS`
(name -> :class:`Subcommand`); another module adds one with :func:`register_subcommand`.

    $ fewbits train -c cpu --net mnist_binary_connect_lenet --dataset mnist --epochs 1
    $ fewbits eval tmp.monitor --dataset mnist
    $ fewbits list models
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SUBCOMMANDS",
    "Subcommand",
    "add_train_arguments",
    "build_parser",
    "config_from_args",
    "main",
    "register_subcommand",
    "str2bool",
]


@dataclass(frozen=True)
class Subcommand:
    """``add_arguments(parser)`` declares the flags; ``run(namespace) -> exit code`` does it."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str = ""


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                        run: Callable[[argparse.Namespace], int], help: str = "") -> None:
    """Add ``fewbits NAME``; registering a name twice raises ``ValueError``."""
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    SUBCOMMANDS[name] = Subcommand(add_arguments, run, help)


# --------------------------------------------------------------------------- value parsers


_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


def str2bool(text: str) -> bool:
    """``true/false`` (also ``1/0``, ``yes/no``, ``on/off``; any case) -> bool.

    The seed declared ``--ste-fine-grained`` with ``type=bool``, so ``False`` parsed as True;
    this parses it as meant.

        >>> str2bool("False"), str2bool("1")
        (False, True)
    """
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_POW = re.compile(r"^\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*\*\*\s*([-+]?[0-9.]+)\s*$")


def _float(text: str) -> float:
    """A float, or a power such as ``2**-4`` (how the seed writes ``--delta``'s default)."""
    m = _POW.match(text)
    try:
        return float(m.group(1)) ** float(m.group(2)) if m else float(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.0625 or 2**-4, got "
                                         f"{text!r}") from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated iterations such as 5000,6000,7000, got {text!r}"
        ) from None


def _model_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. width=64), got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


# --------------------------------------------------------------------------- train


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``fewbits train`` / ``classification.py``, in five groups."""
    from .data import DATASETS
    from .train import CONTEXTS, LR_SCHEDULES, OPTIMIZERS, TYPE_CONFIGS

    s = p.add_argument_group("seed flags (as the seed's classification.py)")
    s.add_argument("-c", "--context", choices=CONTEXTS, default="cpu",
                   help="cpu, or cudnn/cuda for an NVIDIA GPU (default: cpu)")
    s.add_argument("-d", "--device-id", type=int, default=0,
                   help="GPU index (under torchrun each process uses LOCAL_RANK)")
    s.add_argument("-t", "--type-config", choices=TYPE_CONFIGS, default="float",
                   help="half = mixed precision: fp16 autocast + GradScaler on CUDA, bf16 "
                   "autocast on the CPU (default: float)")
    s.add_argument("-b", "--batch-size", type=int, default=64,
                   help="images per process per step (default: 64)")
    s.add_argument("-l", "--learning-rate", type=_float, default=1e-3,
                   help="default: 1e-3")
    s.add_argument("-i", "--max-iter", type=int, default=None,
                   help="training iterations (default: 234375 = 300 CIFAR-10 epochs)")
    s.add_argument("-v", "--val-interval", type=int, default=1000,
                   help="validate when iteration %% v == 0, and at the end (default: 1000)")
    s.add_argument("-w", "--weight-decay", type=_float, default=0.0, help="default: 0")
    s.add_argument("-m", "--monitor-path", default="tmp.monitor",
                   help="folder for the series files, config.json and training_curves.png "
                   "(default: tmp.monitor)")
    s.add_argument("-o", "--model-save-path", default=None,
                   help="folder for checkpoint.pt, model_best.pt, model_final.pt (default: "
                   "the monitor path)")
    s.add_argument("-n", "--net", default="cifar10_resnet23_prediction",
                   help="a registered network, see `fewbits list models` (default: "
                   "cifar10_resnet23_prediction)")

    q = p.add_argument_group("quantization")
    q.add_argument("--bit-width", type=int, default=None,
                   help="bits of fixed-point/pow2/INQ quantizers (default: the family's: 8, "
                   "INQ 4)")
    q.add_argument("--delta", type=_float, default=None,
                   help="fixed-point step (default: 2**-4 as the seed; 2**-7 for the MNIST "
                        "nets, whose wide layers would otherwise round to 0)")
    q.add_argument("--upper-bound", type=int, default=1,
                   help="pow2: largest level 2**upper_bound (default: 1)")
    q.add_argument("--ql-min", type=int, default=0, help="min-max: lowest level (default: 0)")
    q.add_argument("--ql-max", type=int, default=255,
                   help="min-max: highest level (default: 255)")
    q.add_argument("--p-min-max", action="store_true",
                   help="min-max weights: ranges from each batch instead of learnt")
    q.add_argument("--a-min-max", action="store_true",
                   help="min-max activations: ranges from each batch instead of learnt")
    q.add_argument("--a-ema", action="store_true",
                   help="with --a-min-max: exponential moving average of the batch ranges")
    q.add_argument("--ste-fine-grained", type=str2bool, nargs="?", const=True, default=True,
                   metavar="{true,false}",
                   help="straight-through gradient only inside the quantizer's range "
                   "(default: true)")
    q.add_argument("--inq-iterations", type=_int_list, default=(5000, 6000, 7000, 8000, 9000),
                   metavar="I1,I2,...",
                   help="INQ: iterations at which more weights are fixed (default: "
                   "5000,6000,7000,8000,9000)")
    q.add_argument("--inq-selection", choices=("largest_abs", "random"), default="largest_abs",
                   help="INQ: which weights are fixed first (default: largest_abs)")
    q.add_argument("--clip-weights", action="store_true",
                   help="binary connect/net: clip latent weights to [-1, 1] after each step")
    q.add_argument("--model-arg", type=_model_arg, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="extra model option, e.g. width=64 for the MNIST nets (repeatable)")

    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default="cifar10",
                   help="default: cifar10 (downloaded to --data-dir when missing)")
    d.add_argument("--data-dir", default=None,
                   help="where the dataset lives (default: $FEWBITS_DATA or "
                   "~/.cache/fewbits/data); imagefolder: a folder or .tar.gz with "
                   "train/<class>/*.jpg and test/<class>/*.jpg")
    d.add_argument("--no-download", dest="download", action="store_false",
                   help="never download; fail with where to put the files instead")
    d.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random rotation (+-0.25 rad) and flip (default: on for cifar10 and "
                   "imagefolder, off otherwise)")
    d.add_argument("--synthetic-size", type=int, default=1000,
                   help="synthetic dataset: training images (test: a fifth) (default: 1000)")
    d.add_argument("--workers", type=int, default=None,
                   help="processes decoding image folders (default: the data package's)")
    d.add_argument("--val-batch-size", type=int, default=None,
                   help="validation batch (default: max(batch size, 256))")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=float, default=None,
                   help="train this many epochs instead of -i iterations")
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="default: adam (the seed's)")
    o.add_argument("--momentum", type=float, default=0.9, help="sgd momentum (default: 0.9)")
    o.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="default: constant (the seed's); cosine decays to 0 at the last "
                   "iteration")
    o.add_argument("--accum-steps", type=int, default=1,
                   help="micro-batches of -b images accumulated per optimizer step "
                   "(default: 1)")
    o.add_argument("--seed", type=int, default=0,
                   help="seed of weights, batch order and augmentation (default: 0)")

    r = p.add_argument_group("run control")
    r.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from MODEL_SAVE_PATH/checkpoint.pt, or from PATH (a "
                   "checkpoint or run folder)")
    r.add_argument("--overwrite", action="store_true",  # fewbits.runs.check_run_folder
                   help="start a new run in a folder that holds one, replacing its files "
                   "(default: refuse; --resume continues it instead)")
    r.add_argument("--checkpoint-interval", type=int, default=None,
                   help="iterations between checkpoints (default: the validation interval)")
    r.add_argument("--no-progress", dest="progress", action="store_false",
                   help="log lines instead of a progress bar")
    r.add_argument("--no-first-validation", dest="validate_first", action="store_false",
                   help="skip the validation at iteration 0 (the seed does it; it costs a "
                        "full test-set pass)")
    r.add_argument("--no-plot", dest="plot", action="store_false",
                   help="do not draw training_curves.png")
    r.add_argument("--channels-last", action="store_true", help="channels-last layout (GPU)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def config_from_args(ns: argparse.Namespace):
    """The :class:`fewbits.train.TrainConfig` of parsed ``train`` arguments."""
    from .train import ConfigError, TrainConfig

    if ns.max_iter is not None and ns.epochs is not None:
        raise ConfigError("give either -i/--max-iter or --epochs, not both")
    return TrainConfig(
        context=ns.context, device_id=ns.device_id, type_config=ns.type_config,
        batch_size=ns.batch_size, learning_rate=ns.learning_rate,
        max_iter=ns.max_iter if ns.max_iter is not None else 234375,
        val_interval=ns.val_interval, weight_decay=ns.weight_decay,
        monitor_path=ns.monitor_path, model_save_path=ns.model_save_path, net=ns.net,
        bit_width=ns.bit_width, delta=ns.delta, upper_bound=ns.upper_bound, ql_min=ns.ql_min,
        ql_max=ns.ql_max, p_min_max=ns.p_min_max, a_min_max=ns.a_min_max, a_ema=ns.a_ema,
        ste_fine_grained=ns.ste_fine_grained, inq_iterations=ns.inq_iterations,
        inq_selection=ns.inq_selection, clip_weights=ns.clip_weights,
        model_args=dict(ns.model_arg),
        dataset=ns.dataset, data_dir=ns.data_dir, download=ns.download, augment=ns.augment,
        synthetic_size=ns.synthetic_size, workers=ns.workers, val_batch_size=ns.val_batch_size,
        epochs=ns.epochs, optimizer=ns.optimizer, momentum=ns.momentum,
        lr_schedule=ns.lr_schedule, accum_steps=ns.accum_steps, seed=ns.seed,
        resume=ns.resume, overwrite=ns.overwrite,
        checkpoint_interval=ns.checkpoint_interval, progress=ns.progress,
        plot=ns.plot, validate_first=ns.validate_first, channels_last=ns.channels_last,
        compile=ns.compile, threads=ns.threads,
    )


def _run_train(ns: argparse.Namespace) -> int:
    from .train import train

    train(config_from_args(ns))
    return 0


# --------------------------------------------------------------------------- eval


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from .data import DATASETS
    from .train import CONTEXTS, TYPE_CONFIGS

    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT",
                   help="a run folder (model_best.pt, else model_final.pt, else checkpoint.pt) "
                   "or a checkpoint / model file")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: the dataset the model was trained on")
    p.add_argument("--data-dir", default=None, help="default: the training run's")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="never download the dataset")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="default: 256")
    p.add_argument("-c", "--context", choices=CONTEXTS, default="cpu", help="default: cpu")
    p.add_argument("-d", "--device-id", type=int, default=0)
    p.add_argument("-t", "--type-config", choices=TYPE_CONFIGS, default="float")
    p.add_argument("--fast", action="store_true",
                   help=".fewbits files: run the integer CPU path (int8 / XNOR) where one exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _eval_packed(ns: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a ``.fewbits`` file: the network is rebuilt from the packed form, on the
    dataset recorded in the file unless ``--dataset`` says otherwise."""
    from .export import read_container
    from .export.commands import evaluate_packed
    from .runs import recorded_eval_config
    from .train import check_model_input, load_split, net_input_shape

    header, _ = read_container(ns.path)
    model = header.get("model") if isinstance(header.get("model"), dict) else {}
    net = str(model.get("name", "?"))
    cfg = recorded_eval_config(ns.path, header.get("data"), ns.dataset, ns.data_dir, ns.download)
    ds = load_split(cfg, "test", net_input_shape(net))
    check_model_input(ns.path, net, model.get("kwargs"), tuple(ds.images.shape[1:]), cfg.dataset)
    r = evaluate_packed(ns.path, ds.images, ds.labels, ns.batch_size, fast=ns.fast)
    wrong = round(r["error"] * r["n"])
    return {"error": r["error"], "accuracy": r["top1"], "wrong": wrong, "total": r["n"],
            "images_per_second": r["images_per_s"], "dataset": cfg.dataset, "net": net,
            "file": str(ns.path), "fast_path": r["fast_path"]}


def _run_eval(ns: argparse.Namespace) -> int:
    from .train import ConfigError, evaluate_file

    if ns.batch_size < 1:
        raise ConfigError(f"-b/--batch-size must be an integer >= 1, got {ns.batch_size}")
    if str(ns.path).endswith(".fewbits"):
        r = _eval_packed(ns)
    else:
        r = evaluate_file(ns.path, dataset=ns.dataset, data_dir=ns.data_dir,
                          batch_size=ns.batch_size, context=ns.context,
                          device_id=ns.device_id, download=ns.download,
                          type_config=ns.type_config)
    if ns.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['net']} ({r['file']}) on {r['dataset']} test, {r['total']} images: "
              f"error {100 * r['error']:.2f}% (accuracy {100 * r['accuracy']:.2f}%), "
              f"{r['images_per_second']:.0f} images/s")
    return 0


# --------------------------------------------------------------------------- list

_DATASET_HELP = {
    "cifar10": "CIFAR-10, 3x32x32, 10 classes (python tarball; downloaded when missing)",
    "mnist": "MNIST, 1x28x28, 10 classes (IDX files; downloaded when missing)",
    "imagefolder": "train|test/<class>/*.jpg folder or .tar.gz (--data-dir)",
    "digits": "scikit-learn's 8x8 digits resized to 1x28x28, bundled (no download)",
    "synthetic": "generated, learnable, sized for the net (tests, smoke runs)",
}
_NAME = re.compile(r"^(cifar10|mnist)_(?:(.+)_)?(resnet23_prediction|lenet|mlp)$")


def _model_rows(pattern: str | None) -> list[tuple[str, str, str, str]]:
    from .models import FAMILIES, QuantConfig, list_models

    rows = []
    for name in list_models(pattern):
        m = _NAME.match(name)
        fam = (m.group(2) or "float") if m else None
        if fam in FAMILIES:
            f = FAMILIES[fam]
            wb, ab = f.bits(QuantConfig())
            rows.append((name, fam, str(wb), str(ab)))
        else:
            rows.append((name, "-", "?", "?"))
    return rows


def _add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", choices=("all", "models", "datasets", "quantizers"),
                   default="all")
    p.add_argument("--pattern", default=None, help="shell wildcard for model names, e.g. "
                   "'mnist_*'")


def _run_list(ns: argparse.Namespace) -> int:
    from .quantizers import list_quantizers

    if ns.what in ("all", "models"):
        rows = _model_rows(ns.pattern)
        w = max([len(r[0]) for r in rows] + [5])
        print("models (weight / activation bits at the default options; 32 = float):")
        print(f"  {'name':<{w}}  {'family':<15} {'w bits':>6} {'a bits':>6}")
        for name, fam, wb, ab in rows:
            print(f"  {name:<{w}}  {fam:<15} {wb:>6} {ab:>6}")
    if ns.what in ("all", "datasets"):
        from .data import DATASETS

        print("datasets:")
        for name in DATASETS:
            print(f"  {name:<12} {_DATASET_HELP.get(name, '')}")
    if ns.what in ("all", "quantizers"):
        print("quantizers:")
        for name in list_quantizers():
            print(f"  {name}")
    return 0


register_subcommand("train", add_train_arguments, _run_train,
                    "train a network (the seed's classification.py flags and more)")
register_subcommand("eval", _add_eval_arguments, _run_eval,
                    "test error of a trained run or checkpoint")
register_subcommand("list", _add_list_arguments, _run_list,
                    "registered models, datasets and quantizers")


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    from .export.commands import add_export_arguments

    add_export_arguments(p)


def _run_export(ns: argparse.Namespace) -> int:
    from .export.commands import run_export

    return run_export(ns)


def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    from .export.commands import add_info_arguments

    add_info_arguments(p)


def _run_info(ns: argparse.Namespace) -> int:
    from .export.commands import run_info

    return run_info(ns)


register_subcommand("export", _add_export_arguments, _run_export,
                    "write a trained run in its packed low-bit form (and ONNX)")
register_subcommand("info", _add_info_arguments, _run_info,
                    "bits per weight, size and ratio to fp32 of a .fewbits file")


# --------------------------------------------------------------------------- main


def build_parser(prog: str = "fewbits",
                 sub_progs: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser with one sub-parser per entry of :data:`SUBCOMMANDS`; ``sub_progs`` renames a
    sub-command in its usage line (``classification.py`` for ``train``)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=prog, description="Train, evaluate and list low-bit neural networks.")
    parser.add_argument("--version", action="version", version=f"fewbits {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in SUBCOMMANDS.items():
        extra = {"prog": sub_progs[name]} if sub_progs and name in sub_progs else {}
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help, **extra)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from ._io import WriteError
    from .checkpoint import CheckpointError
    from .data import ChecksumError, CorruptDataError, DatasetNotFoundError
    from .export import FormatError
    from .train import ConfigError

    return (ConfigError, CheckpointError, DatasetNotFoundError, CorruptDataError, ChecksumError,
            FormatError, WriteError)


def main(argv: Sequence[str] | None = None, prog: str = "fewbits") -> int:
    """Run ``fewbits COMMAND ...``; returns the exit code (the console script's entry point).

    Bad options and unusable data/checkpoints print ``prog: error: ...`` and return 2 (options)
    or 1; an interrupted training run returns ``128 + signal`` after saving its checkpoint.
    """
    from .train import ConfigError, TrainingInterrupted

    args = list(sys.argv[1:] if argv is None else argv)
    # Another prog (classification.py) is `train` under another name: usage lines say so.
    parser = build_parser(prog, None if prog == "fewbits" else {"train": prog})
    ns = parser.parse_args(args)
    try:
        code = int(ns._run(ns) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:  # `fewbits list | head`: the reader has all it wanted
        from ._io import silence_stdout

        silence_stdout()  # 128 + SIGPIPE, as a shell reports it:
        return 141
    except TrainingInterrupted as e:
        if e.rank == 0:  # one message per job, not one per process
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return 128 + int(e.signum)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, nothing saved
        print(f"{prog}: interrupted (no checkpoint written by this interruption)",
              file=sys.stderr, flush=True)
        return 130
    except _known_errors() as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
