"""The value parsers of the command-line options that :mod:`fewbits.config` declares: the
``type=`` / ``action=`` of their ``argparse`` arguments. Each raises
``argparse.ArgumentTypeError`` (or ``ArgumentError``) with what it expected, so argparse
prints ``error: argument FLAG: ...`` and exits 2.

    >>> str2bool("False"), parse_float("2**-4"), parse_int_list("0.5,1.0")
    (False, 0.0625, (0.5, 1.0))
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

__all__ = ["KeyValueAction", "parse_float", "parse_int_list", "str2bool"]

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


def parse_float(text: str) -> float:
    """A float, or a power such as ``2**-4`` (how the seed writes ``--delta``'s default)."""
    m = _POW.match(text)
    try:
        return float(m.group(1)) ** float(m.group(2)) if m else float(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.0625 or 2**-4, got "
                                         f"{text!r}") from None


def parse_int_list(text: str) -> tuple[int | float, ...]:
    """Iterations (``5000,6000``), or fractions of the run when written with a decimal point
    (``0.5,0.75,1.0``)."""
    parts = [t for t in text.replace(" ", "").split(",") if t]
    try:
        if any("." in t for t in parts):
            return tuple(float(t) for t in parts)
        return tuple(int(t) for t in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated iterations such as 5000,6000,7000 or fractions of the "
            f"run such as 0.5,0.75,1.0, got {text!r}"
        ) from None


class KeyValueAction(argparse.Action):
    """``--model-arg KEY=VALUE`` (repeatable) -> a dict; VALUE is JSON when it parses."""

    def __call__(self, parser: Any, namespace: Any, text: Any, option: Any = None) -> None:
        key, sep, value = str(text).partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentError(self, f"expected KEY=VALUE (e.g. width=64), got "
                                         f"{text!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        items = dict(getattr(namespace, self.dest, None) or {})
        items[key.strip().replace("-", "_")] = parsed
        setattr(namespace, self.dest, items)
