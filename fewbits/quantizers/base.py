"""The base every quantizer shares: :class:`Quantizer`, its :class:`Codes` and
:class:`IntGrid`, and the registry that :func:`get` resolves specs through (each family's
module registers its classes with :func:`register_quantizer`).

:class:`Quantizer` is also the *family protocol*: what export, batch-norm folding, ONNX and the
packed file need of a family, they ask its class (``uniform``, ``weight_form``,
:meth:`~Quantizer.onnx_translations`, :meth:`~Quantizer.int_grid`,
:meth:`~Quantizer.step_levels`, :meth:`~Quantizer.integer_weight`,
:meth:`~Quantizer.onnx_act`), never ``isinstance``. Each default is right for a family that
lacks the capability, so a new family is one subclass and one :func:`register_quantizer` call
(docs/ARCHITECTURE.md, "Adding a family").
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
    "exact_multiples",
    "family_translations",
    "fill_missing_extra_state",
    "fitted_step",
    "float_checkpoint_load",
    "get",
    "list_quantizers",
    "register_quantizer",
    "unregister_quantizer",
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


def exact_multiples(w: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(k, step)`` with ``w[o] == k[o] * step[o]`` exactly, ``step[o]`` the smallest nonzero
    magnitude of output channel ``o`` (1 for an all-zero channel), ``k`` int64 of ``w``'s shape;
    ``None`` where a channel is not such a multiple. The integer form of a weight whose family
    declares none (:meth:`Quantizer.integer_weight`'s default): power-of-two, INQ, binary."""
    w = w.detach().float()
    out = w.shape[0]
    flat = w.reshape(out, -1)
    mag = torch.where(flat == 0, torch.full_like(flat, float("inf")), flat.abs()).amin(1)
    mag = torch.where(torch.isinf(mag), torch.ones_like(mag), mag)
    k = torch.round(flat / mag[:, None])
    if not torch.equal(k * mag[:, None], flat):
        return None
    return k.reshape(w.shape).to(torch.int64), mag


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator registering a quantizer (a family) under ``name`` for :func:`get`: the
    one registry call a new family makes (``register_quantizer("toy")(Toy)`` works as well).
    Everything else export needs it declares on its class (see :class:`Quantizer`)."""

    def deco(cls: type[Quantizer]) -> type[Quantizer]:
        if name in _REGISTRY:
            raise ValueError(f"quantizer {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def unregister_quantizer(name: str) -> None:
    """Remove the family registered as ``name`` (a test's or a plugin's); ``KeyError`` listing
    the known names if there is none."""
    if name not in _REGISTRY:
        raise KeyError(f"no quantizer {name!r} is registered; known: "
                       f"{', '.join(list_quantizers())}")
    del _REGISTRY[name]


def family_translations() -> dict[Any, Callable[..., Any]]:
    """``{operator overload: ONNX Script function}`` of every registered family
    (:meth:`Quantizer.onnx_translations` of each class): the ``custom_translation_table`` that
    ONNX export passes to PyTorch's exporter. Imports ``onnxscript`` (through the families'
    translations): call it only to export."""
    table: dict[Any, Callable[..., Any]] = {}
    for cls in dict.fromkeys(_REGISTRY.values()):
        for target, fn in cls.onnx_translations().items():
            if table.get(target, fn) is not fn:
                raise ValueError(f"two families translate {target}: {cls.__name__} and another")
            table[target] = fn
    return table


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

    def init_(self, param: Tensor) -> None:
        """Initialise ``param`` in a freshly built layer, after PyTorch's initialisation
        (never in a layer converted from a float one, whose values are kept); default: keep
        PyTorch's."""

    def update_scale(self, param: Tensor) -> float:
        """Factor on every optimizer update of ``param``: ``p <- p_old + s * (p_new - p_old)``,
        applied after each ``optimizer.step()`` by :mod:`fewbits.quantizers.optim` (a
        per-layer learning-rate scale, whatever the optimizer); default 1."""
        return 1.0

    def after_optimizer_step(self) -> None:
        """Update the quantizer's own state once after each optimizer step (MinMax keeps learned
        ranges valid, a step-counted INQ advances its schedule); default: nothing to do."""

    def count_optimizer_steps(self) -> None:
        """Advance schedules in :meth:`after_optimizer_step` instead of at each training
        forward (gradient accumulation); default: no schedule."""

    #: An activation quantizer whose grid :func:`fewbits.calibrate` sets from the data it
    #: sees (:meth:`calibrate_start`, :meth:`calibrate_end`): min-max ranges, LSQ's step.
    calibrates: ClassVar[bool] = False

    def calibrate_start(self, x: Tensor) -> None:
        """Calibration's first batch ``x`` of the float activations this quantizer serves (LSQ
        starts its step from it, as its first training forward would); default: nothing."""

    def calibrate_end(self, lo: float, hi: float) -> tuple[float, float]:
        """Set the grid from ``[lo, hi]``, the range (holding 0) of every batch calibration saw,
        and return the range the grid now covers. Default: ``ValueError`` (the family does not
        calibrate, :attr:`calibrates` is False)."""
        raise ValueError(f"{type(self).__name__} has no grid that calibration sets")

    def schedule(self) -> tuple[int, ...]:
        """The iterations at which the quantizer changes its grid by itself (INQ fixes more
        weights), which a run must reach to end quantized; default: none."""
        return ()

    def sync_statistics(self, gather: Callable[[Tensor], tuple[Tensor, int]]) -> None:
        """Exchange batch statistics across processes with ``gather`` (a tensor -> every
        rank's, stacked, and this rank) in training forwards that run outside DDP's
        (:func:`fewbits.distributed.sync_quantizers`); default: nothing (no statistics)."""

    def place(self, name: str) -> None:
        """Told by :func:`fewbits.quantize_` the name of the tensor it serves (``"fc.weight"``),
        after :meth:`setup`: state that must differ between layers built from one spec (a
        random stream) can derive from it; default: nothing to do."""

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

    # ----------------------------------------------------------------- the family protocol
    # What export asks a family; each default fits a family without the capability.

    #: Its codes have the integer affine form (:meth:`affine` is not ``None``): ONNX export and
    #: the int8 paths read a weight's codes (fixed point, min-max).
    uniform: ClassVar[bool] = False
    #: How the fused ONNX export's report describes a weight of this family that it stores as
    #: float constants (empty: the layer's own description).
    weight_form: ClassVar[str] = ""

    @classmethod
    def onnx_translations(cls) -> dict[Any, Callable[..., Any]]:
        """``{operator overload: ONNX Script function}`` for the custom operators the family's
        forward calls (``torch.ops.<ns>.<op>.default``): the exact ONNX form PyTorch's exporter
        writes for each (:func:`family_translations` gathers them). Called only to export, so
        the method may import ``onnxscript``. Default: none (a forward made of standard PyTorch
        operators needs none: PyTorch translates them)."""
        return {}

    def engine_grid(self) -> tuple[float, float, float, float, int, int, int] | None:
        """The forward as an integer engine applies it, or ``None`` (the engine refuses the
        family): ``(clo, chi, sub, scale, kofs, klo, khi)`` such that the output code is
        ``k = clamp(round_half_away((clamp(x, clo, chi) - sub) / scale) + kofs, klo, khi)``
        in float32 and the output value is ``k * scale``. A family answers only where this
        is its forward bit for bit (``runtime.integer`` compiles from it). Default ``None``."""
        return None

    def int_grid(self) -> IntGrid | None:
        """The one per-tensor integer grid of the output, or ``None`` (not uniform); a uniform
        family with one grid per channel raises ``ValueError``. The fused QDQ export folds
        batch norm into a layer feeding a quantizer with a grid of at most 256 levels."""
        return None

    def step_levels(self) -> tuple[float, float] | None:
        """``(low, high)`` when the forward is ``high if x > 0 else low`` (binary
        activations): ONNX export folds batch norm before it into per-channel thresholds and
        leaves it unfused in the QDQ form. Default ``None``."""
        return None

    def integer_weight(self, w: Tensor, codes: Codes | None = None
                       ) -> tuple[Tensor, Tensor] | None:
        """``(k, scale)``: the quantized weight ``w`` (the values the forward gives) as int64
        integers ``k`` (``w``'s shape) times a float32 per-output-channel ``scale`` (``(C,)``),
        or ``None`` when it has no such exact form; ``codes`` are :meth:`encode`'s (from a
        ``.fewbits`` file) where known. Batch-norm folding keeps an int8 weight from it.
        Default: :func:`exact_multiples`."""
        return exact_multiples(w)

    def fold_scale(self, codes: Codes, alpha: Tensor) -> Codes | None:
        """The codes of ``alpha[o] * w[o]`` (``alpha``: float64, one factor per output channel)
        for a weight :meth:`encode` gave ``codes``, with the same integer levels (negated where
        ``alpha < 0``) and per-channel scales ``|alpha| * scale`` rounded once to float32: how
        a packed file folds the batch norm after the layer (``export_packed(bn="folded")``).
        Default ``None``: the family's codes cannot hold it (batch norm stays float)."""
        return None

    def onnx_act(self, op: Any, x: Any) -> tuple[Any, str]:
        """``(y, description)``: the forward on ``x`` as ONNX nodes written with ``op`` (an op
        namespace: ``op.Greater(x, c)``, ``op.Constant(value=...)``; see
        :mod:`fewbits.ops.onnx_form`), for the fused QDQ export of an activation. Default:
        ``ValueError`` (no fused form: the fused export keeps the plain, exact nodes of
        :meth:`onnx_translations` there and says so in its report's notes)."""
        raise ValueError(f"activation quantizer {type(self).__name__} has no fused ONNX form; "
                         "export without fuse")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items())
