"""Deployment: run a fewbits network the fastest exact way this CPU allows.

* :func:`~fewbits.runtime.planner.compile_for_cpu`: picks the fastest backend within tolerance;
* :mod:`fewbits.runtime.binary`: the BinaryNet engine (XNOR-popcount, one native call per batch);
* :mod:`fewbits.runtime.integer`: the integer engine of fixed-point and min-max nets.
"""

from .binary import BinaryEngine
from .integer import IntegerEngine
from .planner import CANDIDATES, Deployed, compile_for_cpu

__all__ = ["CANDIDATES", "BinaryEngine", "Deployed", "IntegerEngine", "compile_for_cpu"]
