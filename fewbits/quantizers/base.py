"""The base every quantizer shares: :class:`Quantizer`, its :class:`Codes` and
:class:`IntGrid`, and the registry that :func:`get` resolves specs through (each family's
module registers its classes with :func:`register_quantizer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "AffineCodes",
    "Codes",
    "IntGrid",
    "Quantizer",
    "fill_missing_extra_state",
    "fitted_step",
    "float_checkpoint_load",
    "get",
    "list_quantizers",
    "register_quantizer",
]


_REGISTRY: dict[str, type[Quantizer]] = {}


@dataclass
class Codes:
    """A tensor as unsigned integer codes of ``bits`` bits plus the few floats to decode them."""

    codes: Tensor  # int64, values in [0, 2**bits)
    bits: int
    shape: tuple[int, ...]
    params: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class AffineCodes:
    """Codes in the field's affine form: ``value = (int_repr - zero_point) * scale``.

    What ``DequantizeLinear`` (ONNX), ``torch.dequantize`` and integer kernels consume. Only
    uniform grids have this form (:meth:`Quantizer.affine` returns ``None`` for the others):

    - ``int_repr``: int64, the tensor's shape, values in ``[qmin, qmax]``;
    - ``scale``: float32, shape ``()`` (per tensor) or ``(C,)`` (per output channel, ``axis=0``);
    - ``zero_point``: int64, the shape of ``scale``;
    - ``qmin``, ``qmax``: the grid's integer bounds (from the quantizer, not from the data).

        >>> from fewbits.quantizers import FixedPoint
        >>> q = FixedPoint(n=4, delta=0.5)
        >>> a = q.affine(q.encode(torch.tensor([-9.0, 0.2, 0.75])))
        >>> a.int_repr.tolist(), float(a.scale), int(a.zero_point), (a.qmin, a.qmax)
        ([-7, 0, 2], 0.5, 0, (-7, 7))
    """

    int_repr: Tensor
    scale: Tensor
    zero_point: Tensor
    axis: int | None
    qmin: int
    qmax: int


@dataclass(frozen=True)
class IntGrid:
    """The integer grid of a uniform quantizer: values ``(q - zero_point) * scale`` for integers
    ``q`` in ``[qmin, qmax]`` (docs/QUANTIZERS.md's levels, in the field's scale / zero-point form).

    Owned by the quantizer (:meth:`FixedPoint.int_grid`, :meth:`MinMax.int_grid`); ONNX export
    and the deployment paths read it from there instead of re-deriving bounds.

        >>> from fewbits.quantizers import FixedPoint
        >>> FixedPoint(n=8, delta=0.25).int_grid()
        IntGrid(scale=0.25, zero_point=0, qmin=-127, qmax=127)
    """

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def bits(self) -> int:
        """Bits of one code ``q - qmin``."""
        return max(1, math.ceil(math.log2(self.qmax - self.qmin + 1)))

    def fits(self, lo: int, hi: int) -> bool:
        """``[qmin, qmax]`` lies within the integer range ``[lo, hi]``."""
        return lo <= self.qmin and self.qmax <= hi


def fill_missing_extra_state(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                             *args: Any) -> None:
    """``load_state_dict`` pre-hook of quantizers whose grid is extra state (fixed point's
    ``delta``, pow2's ``m``): a state dict saved before the grid was state keeps the
    quantizer's own, as its configuration built it."""
    state_dict.setdefault(prefix + "_extra_state", module.get_extra_state())


def float_checkpoint_load(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                          args: tuple[Any, ...]) -> bool:
    """``module._load_from_state_dict`` for a quantizer whose state is learned or drawn (LSQ's
    step, TTQ's levels, a stochastic stream): a state dict with none of its keys (a float
    checkpoint loaded after ``quantize_``) loads without them reported missing, and the
    quantizer keeps its state (a layer then restarts a weight quantizer from the loaded
    weights with ``init_from_``). A state dict with some of its keys loads as usual (a missing
    one stays an error). Returns True when none was there."""
    mine = [prefix + k for k in (*dict(module.named_parameters(recurse=False)),
                                 *dict(module.named_buffers(recurse=False)))]
    absent = bool(mine) and not any(k in state_dict for k in mine)
    nn.Module._load_from_state_dict(module, state_dict, prefix, *args)
    if absent:
        missing = args[2]
        for k in mine:
            if k in missing:
                missing.remove(k)
    return absent


def fitted_step(x: Tensor, kmax: int) -> float | None:
    """The smallest power-of-two step ``2^e`` with ``kmax * 2^e >= max |x|`` (``e`` clamped to
    float32's normal exponents), or ``None`` when ``x`` is empty, all zero, not finite or on
    the meta device (no values): the grid a weight quantizer fits to its tensor (fixed point's
    ``delta`` with ``kmax`` its largest code, pow2's ``2^m`` with ``kmax = 1``)."""
    if not x.numel() or x.is_meta:
        return None
    amax = float(x.detach().abs().max())
    if not 0 < amax < math.inf:
        return None
    return 2.0 ** min(max(math.ceil(math.log2(amax / kmax)), -126), 127)


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator registering a quantizer under ``name`` for :func:`get`."""

    def deco(cls: type[Quantizer]) -> type[Quantizer]:
        if name in _REGISTRY:
            raise ValueError(f"quantizer {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def list_quantizers() -> list[str]:
    """Names accepted by :func:`get`, sorted."""
    return sorted(_REGISTRY)


def get(spec: str | dict[str, Any] | Quantizer | None) -> Quantizer | None:
    """Resolve a quantizer spec: a registered name, ``{"name": ..., **kwargs}``, an instance, or
    ``None`` (no quantization). Unknown names raise ``ValueError`` listing the known ones."""
    if spec is None or isinstance(spec, Quantizer):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(f"quantizer dict needs a 'name' key, got {spec!r}")
        kwargs = dict(spec)
        name = kwargs.pop("name")
    else:
        raise TypeError(
            f"quantizer spec must be a name, a dict, a Quantizer or None; got {type(spec).__name__}"
        )
    if name not in _REGISTRY:
        raise ValueError(f"unknown quantizer {name!r}; known: {', '.join(list_quantizers())}")
    return _REGISTRY[name](**kwargs)


class Quantizer(nn.Module):
    """Base class. Subclasses set ``bits`` and implement ``forward``, ``encode``, ``decode``.

    ``setup(param)`` is called by quantized layers with the parameter a weight/bias quantizer
    serves, so that per-channel state can be sized; ``constrain_(param)`` and
    ``after_optimizer_step()`` run after each optimizer step (see
    :func:`fewbits.layers.apply_weight_constraints`).
    """

    name: ClassVar[str] = ""
    bits: int
    #: True when ``forward`` needs the whole tensor seen at ``setup`` (weights), not activations.
    weight_only: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:
        """JSON-able spec that :func:`get` turns back into an equal quantizer."""
        return {"name": self.name, **self._kwargs()}

    def _kwargs(self) -> dict[str, Any]:
        return {}

    def setup(self, param: Tensor) -> None:
        """Size per-parameter state; default: nothing to do."""

    def constrain_(self, param: Tensor) -> None:
        """Project the latent parameter after an optimizer step; default: nothing to do."""

    def after_optimizer_step(self) -> None:
        """Update the quantizer's own state once after each optimizer step (MinMax keeps learned
        ranges valid, a step-counted INQ advances its schedule); default: nothing to do."""

    def count_optimizer_steps(self) -> None:
        """Advance schedules in :meth:`after_optimizer_step` instead of at each training
        forward (gradient accumulation); default: no schedule."""

    def init_from_(self, x: Tensor) -> None:
        """Start data-dependent state from ``x``, the tensor this quantizer will quantize (called
        after ``setup`` when a float layer is converted); default: nothing to do."""

    def infer(self, x: Tensor) -> Tensor:
        """The forward's values without autograd (inference paths call this, never a copy of
        the formula); subclasses with state that training updates skip the update here."""
        with torch.no_grad():
            return self(x)

    def encode(self, x: Tensor) -> Codes:
        raise NotImplementedError(f"{type(self).__name__} cannot encode")

    def decode(self, codes: Codes) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot decode")

    def affine(self, codes: Codes) -> AffineCodes | None:
        """``codes`` (from :meth:`encode`) as :class:`AffineCodes`, or ``None`` where the grid
        is not uniform (binary, power-of-two, INQ). Export reads scales and zero points here,
        never from ``codes.params``, whose keys are the quantizer's own business."""
        return None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items())
