"""``fewbits list [models|datasets|quantizers] [--pattern GLOB]``: what is registered.

    $ fewbits list models --pattern 'mnist_*'
"""

from __future__ import annotations

import argparse

from ..data import DATASETS
from ..models import FAMILIES, QuantConfig, list_models, model_info
from ..quantizers import list_quantizers

__all__ = ["HELP", "add_list_arguments", "run_list"]

HELP = "registered models, datasets and quantizers"


def _model_rows(pattern: str | None) -> list[tuple[str, str, str, str]]:
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


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    """``what`` (default: all) and ``--pattern``."""
    p.add_argument("what", nargs="?", choices=("all", "models", "datasets", "quantizers"),
                   default="all")
    p.add_argument("--pattern", default=None, help="shell wildcard for model names, e.g. "
                   "'mnist_*'")


def run_list(ns: argparse.Namespace) -> int:
    """Print the tables asked for; 0."""
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
