"""The INQ family's operator and straight-through function (docs/QUANTIZERS.md, ``inq``):
``torch.ops.fewbits.inq(w, num_bits, ...)``, the power-of-two levels of a whole tensor
(:func:`fewbits._math.inq_levels`; float16 and bfloat16 in float32, rounded back once), with
the identity gradient (INQ's mask of fixed weights lives in :class:`fewbits.quantizers.INQ`).
The module is ``inq_op`` because ``fewbits.ops.inq`` names the operator.

    >>> import torch
    >>> inq_quantize(torch.tensor([0.9, -0.3, 0.01]), num_bits=4)
    tensor([ 1.0000, -0.2500,  0.0000])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _math
from .._checks import check_bits, check_float_tensor, check_mode, graph_guard
from ._core import call_identity, capturing, check_values, identity_op, like, widen

__all__ = ["inq_levels", "inq_op", "inq_quantize"]


def _inq(w: Tensor, num_bits: int, check: int, fn: str) -> Tensor:
    """INQ power-of-two levels of the whole tensor (see :func:`_math.inq_levels`)."""
    check_values(w, fn, "w", check)
    return like(_math.inq_levels(widen(w), num_bits), w)


inq_op = identity_op("fewbits::inq", _inq)


def inq_quantize(w: Tensor, num_bits: int = 4) -> Tensor:
    """Incremental Network Quantization levels (Zhou et al., ICLR 2017) of a whole tensor.

    Forward: with ``s = max|w|`` (1 if 0), ``n1 = floor(log2 s) + (frac(log2 s) >= log2 1.5)``,
    ``n2 = n1 + 1 - 2**(num_bits - 2)``: ``0`` where ``|w| < 2**(n2 - 1)``, else
    ``sign(w) * 2**clamp(floor(log2|w|) + (frac(log2|w|) >= log2 1.5), n2, n1)`` (float16 and
    bfloat16 in float32, rounded back once).
    Backward: identity (INQ itself stops gradients of fixed weights with its mask; see
    :class:`fewbits.quantizers.INQ`).

    >>> inq_quantize(torch.tensor([0.9, -0.3, 0.01]), num_bits=4)
    tensor([ 1.0000, -0.2500,  0.0000])
    """
    fn = "inq_quantize"
    check_float_tensor(w, fn, "w")
    check_bits(fn, "num_bits", num_bits, low=2)
    graph_guard(fn, "inq")
    if not capturing():  # eager only: the check reads max|w| on the host
        _inq_dtype_check(w, fn)
    return call_identity(inq_op, w, int(num_bits), check_mode(w), fn)


def inq_levels(w: Tensor, num_bits: int, fn: str = "inq_quantize") -> Tensor:
    """:func:`fewbits._math.inq_levels`, refusing a tensor whose largest level ``2**n1`` is
    beyond its dtype (see :func:`_inq_dtype_check`; half precision decided in float32, as the
    operator does; the check is eager only, as in :func:`inq_quantize`)."""
    if not capturing():  # it reads max|w| on the host
        _inq_dtype_check(w, fn)
    return _math.inq_levels(widen(w), num_bits).to(w.dtype)


def _inq_dtype_check(w: Tensor, fn: str) -> None:
    """Refuse weights whose largest INQ level would be inf in their dtype: ``max|w| >= 1.5 *
    2**emax`` (``emax`` the dtype's largest exponent, 127 for float32) rounds to
    ``2**(emax + 1)``, an inf from finite weights."""
    emax = math.frexp(torch.finfo(w.dtype).max)[1] - 1
    s = float(w.detach().abs().max()) if w.numel() else 0.0
    if math.isfinite(s) and s >= 1.5 * 2.0**emax:  # NaN/inf: the operator's check names them
        raise ValueError(
            f"{fn}: max|w| = {s:.6g} rounds to the level 2**{emax + 1}, beyond {w.dtype}: "
            "weights this large mean a diverged run (lower the learning rate), or quantize "
            "in a wider dtype")
