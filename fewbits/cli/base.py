"""What every ``fewbits`` command shares: the subcommand table and the one way errors end a
command.

Errors: a command never prints its own error. It raises; :func:`fewbits.cli.main` catches
:data:`USER_ERRORS` (plus the command's :attr:`Subcommand.errors`) and :func:`report_error`
prints ``PROG: error: MESSAGE`` (the form argparse uses for a bad flag) and picks the exit code:
2 for a bad option or option value (:class:`~fewbits.config.ConfigError`, as argparse), 1 for
a file or dataset that cannot be used. Anything else is a bug and keeps its traceback.

    >>> import io, contextlib
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     code = report_error("fewbits", ConfigError("-b/--batch-size must be >= 1"))
    >>> code, err.getvalue()
    (2, 'fewbits: error: -b/--batch-size must be >= 1\\n')
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .._io import WriteError
from .._text import printable
from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import ChecksumError, CorruptDataError, DatasetNotFoundError
from ..export import FormatError
from ..models import register_factory

__all__ = [
    "SUBCOMMANDS",
    "USER_ERRORS",
    "Subcommand",
    "register_subcommand",
    "report_error",
    "use_model_factory",
]

#: The errors every command reports as one line instead of a traceback: bad options, and
#: files, checkpoints or datasets that cannot be used (each message names the thing and the fix).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, CheckpointError, DatasetNotFoundError, CorruptDataError, ChecksumError,
    FormatError, WriteError)


@dataclass(frozen=True)
class Subcommand:
    """``add_arguments(parser)`` declares the flags; ``run(namespace) -> exit code`` does it.

    ``errors``: exception types besides :data:`USER_ERRORS` that this command's library calls
    raise for bad input (``fewbits export`` reports any ``ValueError`` of the exporters).
    """

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str = ""
    errors: tuple[type[BaseException], ...] = ()


#: name -> :class:`Subcommand`, in the order ``fewbits --help`` lists them.
SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                        run: Callable[[argparse.Namespace], int], help: str = "",
                        errors: tuple[type[BaseException], ...] = ()) -> None:
    """Add ``fewbits NAME``; registering a name twice raises ``ValueError``."""
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    SUBCOMMANDS[name] = Subcommand(add_arguments, run, help, errors)


def report_error(prog: str, error: BaseException) -> int:
    """Print ``PROG: error: MESSAGE`` to stderr; return 2 for a
    :class:`~fewbits.config.ConfigError` (a bad option, as argparse), else 1."""
    # Messages quote names from files: their control characters are shown, not run.
    print(f"{prog}: error: {printable(error, keep_newlines=True)}", file=sys.stderr,
          flush=True)
    return 2 if isinstance(error, ConfigError) else 1


def use_model_factory(spec: str | None) -> None:
    """``--model PACKAGE.MODULE:FACTORY`` of ``eval`` and ``export``: import and register the
    factory (nothing when ``spec`` is None); raises :class:`~fewbits.config.ConfigError`
    naming what could not be imported."""
    if spec:
        try:
            register_factory(spec)
        except ValueError as e:
            raise ConfigError(f"--model: {e}") from None
