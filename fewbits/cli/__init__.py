"""The ``fewbits`` command: ``train``, ``eval``, ``list``, ``export``, ``info`` (and more
registered later).

One module per command (``train_cmd``, ``eval_cmd``, ``list_cmd``, ``export_cmd``: flags and
``run``); :mod:`.base` holds the subcommand table and the one error convention
(``PROG: error: MESSAGE``, exit code 2 for a bad option, 1 for an unusable file or dataset).
``fewbits train`` takes every flag of the seed's ``classification.py`` with the same meaning
(``classification.py`` at the repository root is ``fewbits train`` under another name).
Another module adds a command with :func:`register_subcommand`.

    $ fewbits train -c cpu --net mnist_binary_connect_lenet --dataset mnist --epochs 1
    $ fewbits eval tmp.monitor --dataset mnist
    $ fewbits list models
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._io import silence_stdout
from .._version import __version__
from ..config import str2bool
from ..train import TrainingInterrupted
from . import eval_cmd, export_cmd, list_cmd, nnabla_cmd, train_cmd
from .base import SUBCOMMANDS, USER_ERRORS, Subcommand, register_subcommand, report_error
from .eval_cmd import evaluate_packed
from .train_cmd import add_train_arguments, config_from_args

__all__ = [
    "SUBCOMMANDS",
    "Subcommand",
    "add_train_arguments",
    "build_parser",
    "config_from_args",
    "evaluate_packed",
    "main",
    "register_subcommand",
    "str2bool",
]

register_subcommand("train", add_train_arguments, train_cmd.run_train, train_cmd.HELP,
                    train_cmd.TRAIN_ERRORS)
register_subcommand("eval", eval_cmd.add_eval_arguments, eval_cmd.run_eval, eval_cmd.HELP)
register_subcommand("list", list_cmd.add_list_arguments, list_cmd.run_list, list_cmd.HELP)
register_subcommand("export", export_cmd.add_export_arguments, export_cmd.run_export,
                    export_cmd.EXPORT_HELP, export_cmd.EXPORT_ERRORS)
register_subcommand("info", export_cmd.add_info_arguments, export_cmd.run_info,
                    export_cmd.INFO_HELP, export_cmd.EXPORT_ERRORS)
register_subcommand("import-nnabla", nnabla_cmd.add_import_arguments, nnabla_cmd.run_import,
                    nnabla_cmd.HELP, nnabla_cmd.ERRORS)


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
        sp.set_defaults(_command=cmd)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "fewbits") -> int:
    """Run ``fewbits COMMAND ...``; returns the exit code (the console script's entry point).

    Bad options and unusable data, checkpoints or files print ``prog: error: ...`` and return 2
    (options) or 1 (:func:`fewbits.cli.base.report_error`); an interrupted training run returns
    ``128 + signal`` after saving its checkpoint.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    # Another prog (classification.py) is `train` under another name: usage lines say so.
    parser = build_parser(prog, None if prog == "fewbits" else {"train": prog})
    ns = parser.parse_args(args)
    cmd: Subcommand = ns._command
    try:
        code = int(cmd.run(ns) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:  # `fewbits list | head`: the reader has all it wanted
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
    except USER_ERRORS + cmd.errors as e:
        return report_error(prog, e)
