"""Quantizer modules: the state of each family (INQ masks, min-max ranges) and its bit width.

A :class:`Quantizer` is an ``nn.Module`` mapping a tensor to its quantized value with a
straight-through gradient (see :mod:`fewbits.functional`). Every quantizer declares ``bits``,
the width of one stored code, and can :meth:`~Quantizer.encode` a tensor into integer codes that
:meth:`~Quantizer.decode` turns back into exactly the values ``forward`` produces; size reports
and the packed export derive from these.

Specs resolve through :func:`get` (as larq's ``quantizers.get``): a registered name, a dict
``{"name": ..., **kwargs}``, an instance, or ``None``.

    >>> import torch
    >>> q = get({"name": "fixed_point", "n": 4, "delta": 0.25})
    >>> q.bits, q(torch.tensor([0.3, 5.0]))
    (4, tensor([0.2500, 1.7500]))

One module per job: :mod:`~fewbits.quantizers.base` (``Quantizer``, ``Codes``,
``AffineCodes``, ``IntGrid``, the registry, and the family protocol: what export asks a
family), then one per family: ``binary``, ``fixed_point``, ``pow2``, ``inq``, ``min_max``,
``ternary`` (and BitNet's ``absmax`` activations), ``lsq``.
Importing this package registers every family.
"""

from __future__ import annotations

from .base import (
    AffineCodes,
    Codes,
    IntGrid,
    Quantizer,
    get,
    list_quantizers,
    register_quantizer,
    unregister_quantizer,
)
from .binary import BinaryConnect, BinarySigmoid, BinaryTanh, BinaryWeight
from .fixed_point import FixedPoint
from .inq import INQ, INQ_ITERATIONS, INQ_SELECTIONS
from .lsq import LSQ
from .min_max import MinMax
from .pow2 import Pow2
from .ternary import TERNARY_MODES, AbsMax, Ternary

__all__ = [
    "INQ",
    "INQ_ITERATIONS",
    "INQ_SELECTIONS",
    "LSQ",
    "TERNARY_MODES",
    "AbsMax",
    "AffineCodes",
    "BinaryConnect",
    "BinarySigmoid",
    "BinaryTanh",
    "BinaryWeight",
    "Codes",
    "FixedPoint",
    "IntGrid",
    "MinMax",
    "Pow2",
    "Quantizer",
    "Ternary",
    "get",
    "list_quantizers",
    "register_quantizer",
    "unregister_quantizer",
]
