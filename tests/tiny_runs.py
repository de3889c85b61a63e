"""The tiny training run the friction and hostile-run tests share (one definition)."""

from __future__ import annotations

import os
from pathlib import Path

from fewbits.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def tiny(path: Path, net: str = "mnist_float_lenet", **kw) -> TrainConfig:
    """A 2-iteration run of a 16-wide net on 16 synthetic images into ``path``."""
    opts = dict(net=net, dataset="synthetic", synthetic_size=16, batch_size=8, max_iter=2,
                val_interval=2, monitor_path=str(path), progress=False, plot=False,
                model_args={"width": 16})
    opts.update(kw)
    return TrainConfig(**opts)
