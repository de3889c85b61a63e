"""Quantizer modules: the state of each family (INQ masks, min-max ranges) and its bit width.

A :class:`Quantizer` is an ``nn.Module`` mapping a tensor to its quantized value with a
straight-through gradient (see :mod:`fewbits.functional`). Every quantizer declares ``bits``,
the width of one stored code, and can :meth:`~Quantizer.encode` a tensor into integer codes that
:meth:`~Quantizer.decode` turns back into exactly the values ``forward`` produces; size reports
and the packed export derive from these.

Specs resolve through :func:`get` (as larq's ``quantizers.get``): a registered name, a dict
``{"name": ..., **kwargs}``, an instance, or ``None``.

    >>> q = get({"name": "fixed_point", "n": 4, "delta": 0.25})
    >>> q.bits, q(torch.tensor([0.3, 5.0]))
    (4, tensor([0.2500, 1.7500]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import _math, ops
from . import functional as qf

__all__ = [
    "INQ",
    "BinaryConnect",
    "BinarySigmoid",
    "BinaryTanh",
    "BinaryWeight",
    "Codes",
    "FixedPoint",
    "MinMax",
    "Pow2",
    "Quantizer",
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
    serves, so that per-channel state can be sized; ``constrain_(param)`` runs after each
    optimizer step (see :func:`fewbits.layers.apply_weight_constraints`).
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

    def encode(self, x: Tensor) -> Codes:
        raise NotImplementedError(f"{type(self).__name__} cannot encode")

    def decode(self, codes: Codes) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot decode")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items())


def _sign_codes(y: Tensor) -> Tensor:
    return (y > 0).to(torch.int64).reshape(-1)


def _from_sign_codes(c: Codes, pos: Tensor | float = 1.0) -> Tensor:
    s = c.codes.reshape(c.shape).bool()
    pos = torch.as_tensor(pos, dtype=torch.float32)
    return torch.where(s, pos, -pos)


@register_quantizer("binary_connect")
class BinaryConnect(Quantizer):
    """BinaryConnect weights: ``sign(w)`` (``sign(0) = +1``), identity gradient. 1 bit.

    ``stochastic=True`` draws ``+1`` with probability ``clamp((w + 1) / 2, 0, 1)`` in training
    (deterministic at evaluation); ``clip_weights=True`` clips latent weights to ``[-1, 1]`` after
    each update, as the paper (the seed never clips). Courbariaux et al., NeurIPS 2015.
    """

    bits = 1
    weight_only = True

    def __init__(self, stochastic: bool = False, clip_weights: bool = False) -> None:
        super().__init__()
        self.stochastic, self.clip_weights = bool(stochastic), bool(clip_weights)

    def _kwargs(self) -> dict[str, Any]:
        return {"stochastic": self.stochastic, "clip_weights": self.clip_weights}

    def forward(self, w: Tensor) -> Tensor:
        return qf.binary_connect(w, 1.0, self.stochastic and self.training)

    def constrain_(self, param: Tensor) -> None:
        if self.clip_weights:
            with torch.no_grad():
                param.clamp_(-1.0, 1.0)

    def encode(self, x: Tensor) -> Codes:
        return Codes(_sign_codes(torch.where(x >= 0, 1.0, -1.0)), 1, tuple(x.shape))

    def decode(self, codes: Codes) -> Tensor:
        return _from_sign_codes(codes)


@register_quantizer("binary_tanh")
class BinaryTanh(Quantizer):
    """BinaryNet activation ``+1 if x > 0 else -1``; gradient ``dy * [|x| < 1]``. 1 bit."""

    bits = 1

    def forward(self, x: Tensor) -> Tensor:
        return qf.binary_tanh(x)

    def encode(self, x: Tensor) -> Codes:
        return Codes(_sign_codes(x), 1, tuple(x.shape))

    def decode(self, codes: Codes) -> Tensor:
        return _from_sign_codes(codes)


@register_quantizer("binary_sigmoid")
class BinarySigmoid(Quantizer):
    """Binary sigmoid ``1 if x > 0 else 0``; gradient ``0.5 * dy * [|x| < 1]``. 1 bit."""

    bits = 1

    def forward(self, x: Tensor) -> Tensor:
        return qf.binary_sigmoid(x)

    def encode(self, x: Tensor) -> Codes:
        return Codes(_sign_codes(x), 1, tuple(x.shape))

    def decode(self, codes: Codes) -> Tensor:
        return codes.codes.reshape(codes.shape).to(torch.float32)


@register_quantizer("binary_weight")
class BinaryWeight(Quantizer):
    """XNOR-Net BWN: ``mean|w[o]| * sign(w[o])`` per output channel, identity gradient.

    1 bit per weight plus one float32 scale per output channel. Rastegari et al., ECCV 2016.
    """

    bits = 1
    weight_only = True

    def setup(self, param: Tensor) -> None:
        if param.dim() < 2:
            raise ValueError(
                f"binary_weight needs a weight with an output-channel axis, got shape "
                f"{tuple(param.shape)}; use 'binary_connect' (or None) for biases"
            )

    def forward(self, w: Tensor) -> Tensor:
        return qf.binary_weight(w)

    def encode(self, x: Tensor) -> Codes:
        alpha = qf.binary_weight_scale(x)
        return Codes(_sign_codes(torch.where(x >= 0, 1.0, -1.0)), 1, tuple(x.shape),
                     {"scale": alpha.float()})

    def decode(self, codes: Codes) -> Tensor:
        alpha = codes.params["scale"].reshape((-1,) + (1,) * (len(codes.shape) - 1))
        return _from_sign_codes(codes, 1.0) * alpha


@register_quantizer("fixed_point")
class FixedPoint(Quantizer):
    """Uniform fixed point: ``n`` bits, step ``delta``, signed or not (see
    :func:`fewbits.functional.fixed_point_quantize`). Codes are ``k + offset`` for
    ``y = k * delta``."""

    def __init__(self, sign: bool = True, n: int = 8, delta: float = 2**-4,
                 ste_fine_grained: bool = True) -> None:
        super().__init__()
        qf._bits("FixedPoint", "n", n, low=2 if sign else 1)
        qf._positive("FixedPoint", "delta", delta)
        self.sign, self.n, self.delta = bool(sign), int(n), float(delta)
        self.ste_fine_grained = bool(ste_fine_grained)
        self.bits = self.n

    def _kwargs(self) -> dict[str, Any]:
        return {"sign": self.sign, "n": self.n, "delta": self.delta,
                "ste_fine_grained": self.ste_fine_grained}

    @property
    def _offset(self) -> int:
        return 2 ** (self.n - 1) - 1 if self.sign else 0

    def forward(self, x: Tensor) -> Tensor:
        return qf.fixed_point_quantize(x, self.sign, self.n, self.delta, self.ste_fine_grained)

    def encode(self, x: Tensor) -> Codes:
        with torch.no_grad():
            y = self.forward(x.detach().float())
            k = _math.round_half_away(y / torch.tensor(self.delta))
        codes = k.to(torch.int64).reshape(-1) + self._offset
        return Codes(codes, self.bits, tuple(x.shape))

    def decode(self, codes: Codes) -> Tensor:
        k = (codes.codes - self._offset).to(torch.float32).reshape(codes.shape)
        return k * torch.tensor(self.delta, dtype=torch.float32)


def _pow2_layout(n: int, sign: bool, with_zero: bool, m: int) -> tuple[int, int]:
    """(exponent bits nb, smallest exponent kmin) of a pow2 code."""
    nb = n - int(sign) - int(with_zero)
    return nb, m - (2**nb - 1)


@register_quantizer("pow2")
class Pow2(Quantizer):
    """Power-of-two quantization (see :func:`fewbits.functional.pow2_quantize`). ``n`` bits:
    ``[sign][nonzero][exponent index (n - sign - with_zero bits)]``, most significant first."""

    def __init__(self, sign: bool = True, with_zero: bool = True, n: int = 8, m: int = 1,
                 ste_fine_grained: bool = True) -> None:
        super().__init__()
        qf._pow2_check("Pow2", sign, with_zero, n, m)
        self.sign, self.with_zero, self.n, self.m = bool(sign), bool(with_zero), int(n), int(m)
        self.ste_fine_grained = bool(ste_fine_grained)
        self.bits = self.n

    def _kwargs(self) -> dict[str, Any]:
        return {"sign": self.sign, "with_zero": self.with_zero, "n": self.n, "m": self.m,
                "ste_fine_grained": self.ste_fine_grained}

    def forward(self, x: Tensor) -> Tensor:
        return qf.pow2_quantize(x, self.sign, self.with_zero, self.n, self.m,
                                self.ste_fine_grained)

    def encode(self, x: Tensor) -> Codes:
        nb, kmin = _pow2_layout(self.n, self.sign, self.with_zero, self.m)
        with torch.no_grad():
            y = self.forward(x.detach().float()).reshape(-1)
        a = y.abs()
        _, e = torch.frexp(a)
        idx = torch.clamp(e.to(torch.int64) - 1 - kmin, 0, 2**nb - 1)
        nonzero = a > 0
        codes = torch.where(nonzero, idx, torch.zeros_like(idx))
        if self.with_zero:
            codes = codes | (nonzero.to(torch.int64) << nb)
        if self.sign:
            codes = codes | ((y < 0).to(torch.int64) << (self.n - 1))
        return Codes(codes, self.bits, tuple(x.shape))

    def decode(self, codes: Codes) -> Tensor:
        nb, kmin = _pow2_layout(self.n, self.sign, self.with_zero, self.m)
        c = codes.codes
        mag = torch.ldexp(torch.ones(c.shape), (c & (2**nb - 1)) + kmin).float()
        if self.with_zero:
            mag = torch.where(((c >> nb) & 1).bool(), mag, torch.zeros_like(mag))
        if self.sign:
            mag = torch.where(((c >> (self.n - 1)) & 1).bool(), -mag, mag)
        return mag.reshape(codes.shape)


_INQ_SELECTIONS = ("largest_abs", "random")


@register_quantizer("inq")
class INQ(Quantizer):
    """Incremental Network Quantization (Zhou et al., ICLR 2017) of one weight tensor.

    State: ``mask`` (bool, True = fixed), ``fixed`` (the power-of-two values of fixed weights) and
    a counter of training forwards. When the counter equals an entry of ``inq_iterations``, half of
    the still-learnable weights are fixed (``largest_abs``: those of largest ``|w|``; ``random``:
    each with probability 0.5), and all of them at the last entry. Fixed weights are quantized
    with :func:`fewbits.functional.inq_quantize` at that moment and never change again: the
    forward reads them from ``fixed``, so no optimizer (momentum, weight decay) can move them, and
    their gradient is zero. Evaluation forwards do not advance the counter. ``bits`` codes:
    ``0`` = zero, else ``[sign][exponent index]``.

        >>> q = INQ(num_bits=4, inq_iterations=(0, 1)); w = torch.tensor([[0.9, -0.3, 0.2, 0.01]])
        >>> q.setup(w); _ = q(w); q.mask.tolist()           # first training forward: fix half
        [[True, True, False, False]]
    """

    weight_only = True

    def __init__(self, num_bits: int = 4, inq_iterations: Sequence[int] = (5000, 6000, 7000,
                 8000, 9000), selection: str = "largest_abs", seed: int = 0) -> None:
        super().__init__()
        qf._bits("INQ", "num_bits", num_bits, low=2)
        its = [int(i) for i in inq_iterations]
        if not its or any(i < 0 for i in its) or sorted(set(its)) != its:
            raise ValueError(
                f"INQ: inq_iterations must be a non-empty, strictly increasing list of "
                f"iterations >= 0, got {list(inq_iterations)!r}"
            )
        if selection not in _INQ_SELECTIONS:
            raise ValueError(f"INQ: unknown selection {selection!r}; known: {_INQ_SELECTIONS}")
        self.num_bits, self.bits = int(num_bits), int(num_bits)
        self.inq_iterations, self.selection, self.seed = tuple(its), selection, int(seed)
        self.counter = 0
        self.register_buffer("mask", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("fixed", torch.zeros(0))

    def _kwargs(self) -> dict[str, Any]:
        return {"num_bits": self.num_bits, "inq_iterations": list(self.inq_iterations),
                "selection": self.selection, "seed": self.seed}

    def setup(self, param: Tensor) -> None:
        self.mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        self.fixed = torch.zeros_like(param.detach())

    # The counter is a Python int kept in the state dict as extra state: reading a device
    # buffer every forward would sync the GPU.
    def get_extra_state(self) -> dict[str, int] | Tensor:
        if qf._in_onnx_export():  # PyTorch's TorchScript exporter takes tensors only
            return torch.tensor(self.counter)
        return {"counter": self.counter}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.counter = int(state["counter"])

    @property
    def fixed_fraction(self) -> float:
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0

    def _fix_more(self, w: Tensor) -> None:
        learnable = ~self.mask
        if self.counter == self.inq_iterations[-1]:
            new = learnable
        elif self.selection == "largest_abs":
            k = int(learnable.sum()) // 2
            score = torch.where(learnable, w.abs(), torch.full_like(w, -1.0)).reshape(-1)
            order = torch.sort(score, descending=True, stable=True).indices[:k]
            new = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
            new[order] = True
            new = new.reshape(w.shape)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.counter)
            draw = torch.rand(w.shape, generator=g).to(w.device) < 0.5
            new = learnable & draw
        current = torch.where(self.mask, self.fixed, w)
        q = _math.inq_levels(current, self.num_bits)
        self.fixed = torch.where(new, q, self.fixed)
        self.mask = self.mask | new

    def forward(self, w: Tensor) -> Tensor:
        if self.mask.shape != w.shape:
            raise RuntimeError(
                f"INQ state has shape {tuple(self.mask.shape)} but the weight has "
                f"{tuple(w.shape)}; attach INQ through a fewbits layer (it calls setup)"
            )
        qf._finite(w, "INQ", "w")
        if self.training:
            if self.counter in self.inq_iterations:
                with torch.no_grad():
                    self._fix_more(w.detach())
            self.counter += 1
        return torch.where(self.mask, self.fixed, w)

    def encode(self, x: Tensor) -> Codes:
        if not bool(self.mask.all()):
            raise ValueError(
                f"INQ: {100 * (1 - self.fixed_fraction):.1f}% of the weights are still learnable "
                f"(counter {self.counter}, schedule {list(self.inq_iterations)}); train past the "
                "last INQ iteration before encoding to power-of-two codes"
            )
        y = self.fixed.detach().float().reshape(-1)
        nz = y != 0
        _, e = torch.frexp(y.abs())
        k = e.to(torch.int64) - 1
        kmin = int(k[nz].min()) if bool(nz.any()) else 0
        span = int(k[nz].max()) - kmin + 1 if bool(nz.any()) else 0
        bits = max(self.bits, 1 + max(1, math.ceil(math.log2(span + 1))))
        idx = torch.where(nz, k - kmin + 1, torch.zeros_like(k))
        codes = idx | ((y < 0).to(torch.int64) << (bits - 1))
        return Codes(codes, bits, tuple(x.shape), {"kmin": torch.tensor(kmin)})

    def decode(self, codes: Codes) -> Tensor:
        c, b = codes.codes, codes.bits
        idx = c & (2 ** (b - 1) - 1)
        mag = torch.ldexp(torch.ones(c.shape), idx - 1 + int(codes.params["kmin"])).float()
        mag = torch.where(idx == 0, torch.zeros_like(mag), mag)
        return torch.where(((c >> (b - 1)) & 1).bool(), -mag, mag).reshape(codes.shape)


_MINMAX_MODES = ("learnable", "batch", "ema")


@register_quantizer("min_max")
class MinMax(Quantizer):
    """Min-max quantization to integers ``[ql_min, ql_max]`` (Jacob et al., CVPR 2018).

    ``mode``: ``"learnable"`` (seed default: ``qr_min``/``qr_max`` are parameters trained by the
    spec's gradients), ``"batch"`` (``x_min_max``: ranges set from each training batch) or
    ``"ema"`` (``x_min_max`` + ``ema``: ``r = decay * r + (1 - decay) * batch``). At evaluation
    the stored ranges are used unchanged, as the seed. ``per_channel`` (weights, beyond the seed)
    keeps one range per output channel. ``bits = ceil(log2(ql_max - ql_min + 1))``.
    """

    def __init__(self, ql_min: int = 0, ql_max: int = 255, init_min: float = -6.0,
                 init_max: float = 6.0, mode: str = "learnable", decay: float = 0.999,
                 eps: float = 0.01, per_channel: bool = False,
                 ste_fine_grained: bool = True) -> None:
        super().__init__()
        if mode not in _MINMAX_MODES:
            raise ValueError(f"MinMax: unknown mode {mode!r}; known: {_MINMAX_MODES}")
        if not ql_min < ql_max:
            raise ValueError(f"MinMax: need ql_min < ql_max, got {ql_min} >= {ql_max}")
        if not init_min <= init_max:
            raise ValueError(f"MinMax: need init_min <= init_max, got {init_min}, {init_max}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MinMax: decay must be in [0, 1), got {decay}")
        qf._positive("MinMax", "eps", eps)
        self.ql_min, self.ql_max = int(ql_min), int(ql_max)
        self.init_min, self.init_max = float(init_min), float(init_max)
        self.mode, self.decay, self.eps = mode, float(decay), float(eps)
        self.per_channel, self.ste_fine_grained = bool(per_channel), bool(ste_fine_grained)
        self.bits = max(1, math.ceil(math.log2(self.ql_max - self.ql_min + 1)))
        qf._bits("MinMax", "bits (from ql_min, ql_max)", self.bits)
        self._make_ranges(())

    def _kwargs(self) -> dict[str, Any]:
        return {"ql_min": self.ql_min, "ql_max": self.ql_max, "init_min": self.init_min,
                "init_max": self.init_max, "mode": self.mode, "decay": self.decay,
                "eps": self.eps, "per_channel": self.per_channel,
                "ste_fine_grained": self.ste_fine_grained}

    def _make_ranges(self, shape: tuple[int, ...], device: Any = None) -> None:
        lo = torch.full(shape, self.init_min, device=device)
        hi = torch.full(shape, self.init_max, device=device)
        for name, v in (("qr_min", lo), ("qr_max", hi)):
            if hasattr(self, name):
                delattr(self, name)
            if self.mode == "learnable":
                self.register_parameter(name, nn.Parameter(v))
            else:
                self.register_buffer(name, v)

    def setup(self, param: Tensor) -> None:
        if self.per_channel:
            if param.dim() < 1:
                raise ValueError("MinMax(per_channel=True) needs a tensor with a channel axis")
            self._make_ranges((param.shape[0],), param.device)

    def _observe(self, x: Tensor) -> None:
        with torch.no_grad():
            if self.per_channel:
                bmin, bmax = torch.aminmax(x.detach().flatten(1), dim=1)
            else:
                bmin, bmax = torch.aminmax(x.detach())
            # a NaN or inf in x shows in its min or max: checked before the ranges take them
            # (inside a captured graph as a device-side assertion on the two sums, no sync)
            stats = torch.stack([bmin.sum(), bmax.sum()])
            if ops.capturing():
                qf._finite(stats, "MinMax", "x")
            elif not bool(torch.isfinite(stats).all()):
                qf._finite(x, "MinMax", "x")
            if self.mode == "ema":
                self.qr_min.mul_(self.decay).add_((1 - self.decay) * bmin)
                self.qr_max.mul_(self.decay).add_((1 - self.decay) * bmax)
            else:
                self.qr_min.copy_(bmin)
                self.qr_max.copy_(bmax)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.mode != "learnable":
            qf._float_tensor(x, "MinMax", "x")
            self._observe(x)
        return qf.min_max_quantize(x, self.qr_min, self.qr_max, self.ql_min, self.ql_max,
                                   self.eps, self.ste_fine_grained)

    def grid(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(scale, zero_point, lo, hi)`` broadcastable to ``like`` (as the forward uses)."""
        rmin = qf._range_view(self.qr_min.detach(), like, "MinMax", "qr_min")
        rmax = qf._range_view(self.qr_max.detach(), like, "MinMax", "qr_max")
        return _math.min_max_range(rmin.float(), rmax.float(), float(self.ql_min),
                                   float(self.ql_max), self.eps)

    def encode(self, x: Tensor) -> Codes:
        x = x.detach().float()
        scale, zp, lo, hi = self.grid(x)
        c = torch.minimum(torch.maximum(x, lo), hi)
        q = _math.round_half_away((c - lo) / scale).to(torch.int64)
        params = {"scale": scale.reshape(-1).clone(), "lo": lo.reshape(-1).clone(),
                  "zero_point": zp.reshape(-1).to(torch.int64)}
        return Codes(q.reshape(-1), self.bits, tuple(x.shape), params)

    def decode(self, codes: Codes) -> Tensor:
        nd = len(codes.shape)
        view = (-1,) + (1,) * (nd - 1) if codes.params["scale"].numel() > 1 else ()
        scale = codes.params["scale"].reshape(view)
        lo = codes.params["lo"].reshape(view)
        q = codes.codes.reshape(codes.shape).to(torch.float32)
        return q * scale + lo
