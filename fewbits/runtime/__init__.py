"""Deployment: run a fewbits network the fastest exact way this CPU allows
(:func:`~fewbits.runtime.planner.compile_for_cpu`)."""

from .planner import CANDIDATES, Deployed, compile_for_cpu

__all__ = ["CANDIDATES", "Deployed", "compile_for_cpu"]
