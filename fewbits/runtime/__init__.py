"""Deployment runtimes: native engines that run exported fewbits networks.

* :mod:`fewbits.runtime.binary`: the BinaryNet engine (XNOR-popcount, one native call per batch).
"""

from .binary import BinaryEngine

__all__ = ["BinaryEngine"]
