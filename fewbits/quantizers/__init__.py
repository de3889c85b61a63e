"""Quantizer modules (being split into one module per family, issue 15)."""

from .min_max import *  # noqa: F403
from .min_max import __all__  # noqa: F401
