"""Training: the package :mod:`fewbits.train` (see :mod:`fewbits.train.run`)."""

from .run import *  # noqa: F403
from .run import __all__ as __all__
