"""``fewbits train`` (and ``classification.py``): every flag of the seed's ``classification.py``
with the same meaning, plus data, optimisation and run-control options, all generated from
:class:`fewbits.config.TrainConfig`.

    $ fewbits train -c cpu --net mnist_binary_connect_lenet --dataset mnist --epochs 1
"""

from __future__ import annotations

import argparse

from .. import config
from .. import train as training

__all__ = ["HELP", "TRAIN_ERRORS", "add_train_arguments", "config_from_args", "run_train"]

HELP = "train a network (the seed's classification.py flags and more)"
#: Besides :data:`fewbits.cli.base.USER_ERRORS`: a diverged run ends with one line (exit 1).
TRAIN_ERRORS: tuple[type[BaseException], ...] = (training.TrainingDiverged,)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``fewbits train`` / ``classification.py``: one per field of
    :class:`fewbits.config.TrainConfig`, in its help group."""
    config.add_arguments(p)


def config_from_args(ns: argparse.Namespace) -> config.TrainConfig:
    """The :class:`fewbits.config.TrainConfig` of parsed ``train`` arguments."""
    return config.from_namespace(ns)


def run_train(ns: argparse.Namespace) -> int:
    """Train; 0 when done (an interruption raises :class:`fewbits.train.TrainingInterrupted`)."""
    training.train(config_from_args(ns))  # looked up on the package: tests may replace it
    return 0
