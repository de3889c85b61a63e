"""Training as the seed's ``classification.py`` does it, plus reproducibility, exact resume and
data-parallel runs: :func:`train` with a :class:`TrainConfig`.

The package, one job per module, read top to bottom:

- :mod:`.model`: the net of a run and the checks on its input (image shape, batch norm at
  ``-b 1``, the INQ schedule), :func:`build_model`, :func:`load_split`;
- :mod:`.device`: ``-c/--context`` -> a device, and mixed precision (``-t half``);
- :mod:`.evaluate`: :func:`evaluate`, the one evaluation loop (validation in training and
  every ``fewbits eval``), its :class:`EvalResult`, and :func:`evaluate_file` (a run,
  checkpoint or model file);
- :mod:`.checkpointing`: ``checkpoint.pt`` / ``model_*.pt`` and resuming;
- :mod:`.signals`: SIGINT/SIGTERM -> checkpoint, then :class:`TrainingInterrupted`;
- :mod:`.run`: :func:`train`, the run state and the loop.

See :mod:`fewbits.train.run` for an example.
"""

from ..config import CONTEXTS, LR_SCHEDULES, OPTIMIZERS, ConfigError, TrainConfig
from .device import resolve_device
from .evaluate import EvalResult, evaluate, evaluate_file
from .model import (
    build_model,
    check_input_shape,
    check_model_input,
    count_parameters,
    inq_schedule,
    load_split,
    net_input_shape,
)
from .run import LRSchedule, TrainingDiverged, TrainResult, train
from .signals import TrainingInterrupted

__all__ = [
    "CONTEXTS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "ConfigError",
    "EvalResult",
    "LRSchedule",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "build_model",
    "check_input_shape",
    "check_model_input",
    "count_parameters",
    "evaluate",
    "evaluate_file",
    "inq_schedule",
    "load_split",
    "net_input_shape",
    "resolve_device",
    "train",
]
