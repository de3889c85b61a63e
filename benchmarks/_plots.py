"""The plots of a ``benchmarks/accuracy.py`` section: test error and training loss of every
run, and the latent against the quantized weights of one layer per family."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["plot_section"]


def plot_section(section: dict[str, Any], img_dir: Path) -> list[str]:
    """Draw ``<section>_curves.png`` and ``<section>_weights.png`` into ``img_dir``; returns
    their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = section["section"]
    img_dir.mkdir(parents=True, exist_ok=True)
    records = [r for r in section["records"] if r["seed"] == section["seeds"][0]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in records:
        style = "--" if r["options"] else "-"
        if r["test_curve"]:
            it, v = zip(*r["test_curve"], strict=True)
            ax1.plot(it, [100 * x for x in v], style, label=r["label"], marker=".")
        if r["loss_curve"]:
            it, v = zip(*r["loss_curve"], strict=True)
            k = max(1, len(v) // 60)  # smooth: mean over windows
            sm = [sum(v[i:i + k]) / len(v[i:i + k]) for i in range(0, len(v), k)]
            ax2.plot(it[::k], sm, style, label=r["label"])
    ax1.set(xlabel="iteration", ylabel="test error %", title=f"{name}: test error")
    ax2.set(xlabel="iteration", ylabel="training loss", title=f"{name}: training loss",
            yscale="log")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    curves = img_dir / f"{name}_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    snaps = [r for r in records if r.get("weights")]
    cols = 3
    rows_n = math.ceil(len(snaps) / cols) or 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(13, 3 * rows_n), squeeze=False)
    for ax, r in zip(axes.flat, snaps, strict=False):
        w = r["weights"]
        ax.hist(w["latent"], bins=80, alpha=0.55, label="latent (float)", density=True)
        ax.hist(w["quantized"], bins=80, alpha=0.55, label="quantized", density=True)
        ax.set_title(f"{r['label']}: {w['layer']}", fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(snaps):]:
        ax.axis("off")
    fig.tight_layout()
    hist = img_dir / f"{name}_weights.png"
    fig.savefig(hist, dpi=100)
    plt.close(fig)
    return [curves.name, hist.name]
