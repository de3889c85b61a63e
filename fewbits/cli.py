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
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import config
from ._version import __version__
from .config import CONTEXTS, TYPE_CONFIGS, ConfigError, str2bool
from .data import DATASETS

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


# --------------------------------------------------------------------------- train


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``fewbits train`` / ``classification.py``: one per field of
    :class:`fewbits.config.TrainConfig`, in its help group."""
    config.add_arguments(p)


def config_from_args(ns: argparse.Namespace) -> config.TrainConfig:
    """The :class:`fewbits.config.TrainConfig` of parsed ``train`` arguments."""
    return config.from_namespace(ns)


def _run_train(ns: argparse.Namespace) -> int:
    from .train import train

    train(config_from_args(ns))
    return 0


# --------------------------------------------------------------------------- eval


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
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
                   help=".fewbits files: run on the fastest exact CPU backend (ONNX Runtime on the "
                        "fused int8 export, OpenVINO, PyTorch; see fewbits.runtime)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY", default=None,
                   help="a model outside the registry: the factory a run was trained with, "
                   "or, for a .fewbits file, a function building the model (float or "
                   "quantized) to load the file into")


def _eval_packed(ns: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a ``.fewbits`` file: the network is rebuilt from the packed form (into the
    ``--model`` factory's model when given), on the dataset recorded in the file unless
    ``--dataset`` says otherwise (a file that records none needs ``--dataset``: no guess)."""
    from .data import load_dataset
    from .export import read_container
    from .export.commands import evaluate_packed
    from .models import is_model
    from .runs import recorded_eval_config
    from .train import check_model_input, load_split, net_input_shape

    header, _ = read_container(ns.path)
    model = header.get("model") if isinstance(header.get("model"), dict) else {}
    net = str(model.get("name", "?"))
    zoo = is_model(net)
    cfg = recorded_eval_config(ns.path, header.get("data"), ns.dataset, ns.data_dir,
                               ns.download)
    if zoo:
        ds = load_split(cfg, "test", net_input_shape(net))
        check_model_input(ns.path, net, model.get("kwargs"), tuple(ds.images.shape[1:]),
                          cfg.dataset)
    else:  # the user's own architecture: no declared input shape to check against
        ds = load_dataset(cfg.dataset, "test", cfg.data_dir, download=cfg.download)
    try:
        r = evaluate_packed(ns.path, ds.images, ds.labels, ns.batch_size, fast=ns.fast,
                            model=ns.model)
    except RuntimeError as e:  # a user's model that cannot take these images (no declared shape)
        if zoo:
            raise
        raise ConfigError(f"{ns.path}: {net} cannot run on {cfg.dataset!r}'s images "
                          f"{tuple(ds.images.shape[1:])}: {str(e)[:300]}; evaluate it on data "
                          "like its training data (--dataset, --data-dir)") from None
    wrong = round(r["error"] * r["n"])
    return {"error": r["error"], "accuracy": r["top1"], "wrong": wrong, "total": r["n"],
            "images_per_second": r["images_per_s"], "dataset": cfg.dataset, "net": net,
            "file": str(ns.path), "fast_path": r["fast_path"]}


def _run_eval(ns: argparse.Namespace) -> int:
    from .models import register_factory
    from .train import evaluate_file

    if ns.model:
        try:
            register_factory(ns.model)
        except ValueError as e:
            raise ConfigError(f"--model: {e}") from None

    if ns.batch_size < 1:
        raise ConfigError(f"-b/--batch-size must be an integer >= 1, got {ns.batch_size}")
    if str(ns.path).endswith(".fewbits"):
        given = [flag for flag, v, default in (("-c/--context", ns.context, "cpu"),
                                               ("-d/--device-id", ns.device_id, 0),
                                               ("-t/--type-config", ns.type_config, "float"))
                 if v != default]
        if given:  # never silently ignored
            raise ConfigError(f"{', '.join(given)}: a .fewbits file is evaluated on the CPU in "
                              "float32 (its packed form's own arithmetic); drop the option, or "
                              "evaluate the run folder or checkpoint instead")
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



def _model_rows(pattern: str | None) -> list[tuple[str, str, str, str]]:
    from .models import FAMILIES, QuantConfig, list_models, model_info

    rows = []
    for name in list_models(pattern):
        fam = model_info(name).family
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
        print("datasets:")
        for name in DATASETS:
            print(f"  {name:<12} {DATASETS[name].help}")
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

    return (ConfigError, CheckpointError, DatasetNotFoundError, CorruptDataError, ChecksumError,
            FormatError, WriteError)


def main(argv: Sequence[str] | None = None, prog: str = "fewbits") -> int:
    """Run ``fewbits COMMAND ...``; returns the exit code (the console script's entry point).

    Bad options and unusable data/checkpoints print ``prog: error: ...`` and return 2 (options)
    or 1; an interrupted training run returns ``128 + signal`` after saving its checkpoint.
    """
    from .train import TrainingInterrupted

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
