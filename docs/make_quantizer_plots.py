"""Draw each registered quantizer's forward and straight-through gradient (docs/QUANTIZERS.md).

The curves come from the library itself: every quantizer of ``fewbits.quantizers`` is built
from the registry, run forward on a line of inputs and differentiated with autograd, so the
pictures show what the code computes. A quantizer registered without an entry in
:data:`ILLUSTRATIONS` is an error: add its illustration settings here and its section to
docs/QUANTIZERS.md.

    PYTHONPATH=. python docs/make_quantizer_plots.py            # -> docs/img/quantizers/*.png
    PYTHONPATH=. python docs/make_quantizer_plots.py --out /tmp/q --points 64 --dpi 40
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from fewbits.quantizers import get, list_quantizers

__all__ = ["ILLUSTRATIONS", "curves", "main", "plot"]

OUT = Path(__file__).resolve().parent / "img" / "quantizers"

#: name -> (quantizer spec with few levels so the steps show, input range, title).
ILLUSTRATIONS: dict[str, tuple[dict[str, Any], tuple[float, float], str]] = {
    "binary_connect": ({"name": "binary_connect"}, (-2.0, 2.0), "binary_connect: sign(w)"),
    "binary_tanh": ({"name": "binary_tanh"}, (-2.0, 2.0), "binary_tanh"),
    "binary_sigmoid": ({"name": "binary_sigmoid"}, (-2.0, 2.0), "binary_sigmoid"),
    "binary_weight": ({"name": "binary_weight"}, (-2.0, 2.0),
                      "binary_weight: mean|w| * sign(w)"),
    "fixed_point": ({"name": "fixed_point", "n": 3, "delta": 0.25}, (-1.5, 1.5),
                    "fixed_point n=3, delta=0.25"),
    "pow2": ({"name": "pow2", "n": 4, "m": 1, "with_zero": True}, (-3.0, 3.0),
             "pow2 n=4, m=1, with zero"),
    "inq": ({"name": "inq", "num_bits": 3, "inq_iterations": [0]}, (-2.0, 2.0),
            "inq num_bits=3, all weights fixed"),
    "min_max": ({"name": "min_max", "ql_min": 0, "ql_max": 7, "init_min": -1.0,
                 "init_max": 1.0}, (-1.5, 1.5), "min_max ql 0..7, range [-1, 1]"),
    "ternary": ({"name": "ternary", "mode": "twn"}, (-2.0, 2.0),
                "ternary (TWN): delta = 0.7 mean|w|"),
    "absmax": ({"name": "absmax", "bits": 3}, (-2.0, 2.0), "absmax bits=3 (per token)"),
    "lsq": ({"name": "lsq", "bits": 3, "init_step": 0.25}, (-1.5, 1.5),
            "lsq bits=3, signed, step 0.25"),
}


def curves(name: str, points: int = 801) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, dy/dx)`` of the registered quantizer ``name`` on its illustration range.

    Weight quantizers see the whole line as one tensor of shape ``(1, points)`` (one output
    channel), after ``setup``, in training mode (one training forward: INQ fixes its weights).
    """
    if name not in ILLUSTRATIONS:
        raise KeyError(f"no illustration for quantizer {name!r}: add it to ILLUSTRATIONS in "
                       f"{Path(__file__).name} and a section to docs/QUANTIZERS.md")
    spec, (lo, hi), _ = ILLUSTRATIONS[name]
    q = get(spec)
    x = torch.linspace(lo, hi, points).reshape(1, points).requires_grad_(True)
    q.setup(x.detach())
    q.train()
    torch.manual_seed(0)
    y = q(x)
    y.sum().backward()
    return x.detach().flatten(), y.detach().flatten(), x.grad.flatten()


def plot(name: str, out: Path, points: int = 801, dpi: int = 80) -> Path:
    """Write ``out/<name>.png``: forward (left) and straight-through gradient (right)."""
    x, y, g = curves(name, points)
    fig, (a, b) = plt.subplots(1, 2, figsize=(6.4, 2.4), sharex=True)
    a.plot(x, y, color="tab:blue", lw=1.5)
    a.plot(x, x, color="0.75", lw=0.8, ls="--")
    a.set_title("forward", fontsize=9)
    b.plot(x, g, color="tab:orange", lw=1.5)
    b.set_ylim(min(-0.1, float(g.min()) - 0.1), max(1.1, float(g.max()) + 0.1))
    b.set_title("straight-through gradient dy/dx", fontsize=9)
    for ax in (a, b):
        ax.grid(True, lw=0.3)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("x", fontsize=8)
    fig.suptitle(ILLUSTRATIONS[name][2], fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT}")
    p.add_argument("--points", type=int, default=801, help="samples per curve (default: 801)")
    p.add_argument("--dpi", type=int, default=80, help="default: 80")
    ns = p.parse_args(argv)
    return [plot(name, ns.out, ns.points, ns.dpi) for name in list_quantizers()]


if __name__ == "__main__":
    for written in main():
        print(written)
