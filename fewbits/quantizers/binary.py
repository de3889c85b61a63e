"""1-bit quantizers: BinaryConnect and XNOR-Net BWN weights, BinaryNet's sign and binary
sigmoid activations. Codes are one bit, 1 for the positive level.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ops import binary as qf
from ..ops import stochastic as st
from ..ops._core import recomputing
from ..ops.onnx_form import const
from .base import Codes, Quantizer, float_checkpoint_load, register_quantizer

__all__ = [
    "BinaryConnect",
    "BinarySigmoid",
    "BinaryTanh",
    "BinaryWeight",
]


def _sign_codes(y: Tensor) -> Tensor:
    return (y > 0).to(torch.int64).reshape(-1)


def _from_sign_codes(c: Codes, pos: Tensor | float = 1.0) -> Tensor:
    s = c.codes.reshape(c.shape).bool()
    pos = torch.as_tensor(pos, dtype=torch.float32)
    return torch.where(s, pos, -pos)

# --------------------------------------------------------------------------- ONNX translations
# PyTorch's exporter writes these for the family's operators (onnx_translations below).

def binary_connect_onnx(w: Any, zero_to: float, stochastic: bool, check: int, fn: str) -> Any:
    """``Where(w > 0, 1, -1)``, ``zero_to`` at 0."""
    from onnxscript import opset18 as op  # only when exporting

    from ..ops.onnx import float32_only

    float32_only(w, "binary_connect")
    if stochastic:
        raise ValueError(f"{fn}: stochastic binarization draws random numbers; export a model "
                         "in eval mode with deterministic binarization")
    y = op.Where(op.Greater(w, const(op, 0.0)), const(op, 1.0), const(op, -1.0))
    return op.Where(op.Equal(w, const(op, 0.0)), const(op, zero_to), y)


def binary_weight_onnx(w: Any, check: int, fn: str) -> Any:
    """``alpha[o] * sign(w[o])`` with ``alpha[o] = mean |w[o]|`` accumulated in float64."""
    from onnxscript import opset18 as op  # only when exporting

    from ..ops.onnx import float32_only

    float32_only(w, "binary_weight")
    flat = op.Flatten(w, axis=1)
    a = op.ReduceMean(op.Abs(op.Cast(flat, to=11)),
                      const(op, [1], np.int64), keepdims=1)
    a = op.Cast(a, to=1)
    return op.Reshape(op.Where(op.GreaterOrEqual(flat, const(op, 0.0)), a, op.Neg(a)), op.Shape(w))


def binary_act_onnx(x: Any, low: float, grad_scale: float, want_mask: bool, check: int,
               fn: str) -> tuple[Any, Any]:
    """``Where(x > 0, 1, low)``: a comparison, exact."""
    from onnxscript import opset18 as op  # only when exporting

    from ..ops.onnx import float32_only, no_mask

    float32_only(x, "binary_act")
    return op.Where(op.Greater(x, const(op, 0.0)), const(op, 1.0), const(op, low)), no_mask()


def _binary_translations() -> dict[Any, Any]:
    return {torch.ops.fewbits.binary_connect.default: binary_connect_onnx,
            torch.ops.fewbits.binary_weight.default: binary_weight_onnx,
            torch.ops.fewbits.binary_act.default: binary_act_onnx}


@register_quantizer("binary_connect")
class BinaryConnect(Quantizer):
    """BinaryConnect weights: ``sign(w)`` (``sign(0) = +1``), identity gradient. 1 bit.

    ``stochastic=True`` draws ``+1`` with probability ``clamp((w + 1) / 2, 0, 1)`` in training
    (deterministic ``sign`` at evaluation), the variant that gave the paper's best results
    (:func:`fewbits.ops.stochastic.stochastic_sign`). The uniform noise comes from the
    quantizer's own CPU generator (the same stream on every device), seeded with ``seed`` or,
    when ``seed`` is None, with a number drawn from PyTorch's global generator when the
    quantizer is built (so ``torch.manual_seed`` before building the model fixes every layer's
    stream, each layer its own). The generator's state is the buffer ``rng_state``: a state
    dict, and so a checkpoint, carries it, and a resumed run draws what the uninterrupted run
    would have drawn. A forward that activation checkpointing recomputes draws the same noise
    again. Courbariaux et al., NeurIPS 2015.

    The paper's training of the latent weights, each off by default (the seed's): in its units
    (the authors' code with ``H = 1``), ``+1`` with probability ``hard_sigmoid(w)`` is a fair
    coin for PyTorch's initial weights (``|w| < 0.04`` in the MNIST MLP), so the stochastic
    variant needs them all to train:

    - ``clip_weights=True``: latent weights clipped to ``[-1, 1]`` after each update.
    - ``uniform_init=True``: a freshly built layer's latent weights start uniform in
      ``[-1, 1]`` (:meth:`init_`; a converted layer keeps its weights).
    - ``glorot_lr_scale=True``: every optimizer update of the weight is multiplied by
      ``1 / H``, ``H = sqrt(1.5 / (fan_in + fan_out))`` (Glorot's bound over 2; the authors'
      ``W_LR_scale = "Glorot"``; ``fan_in = in * k``, ``fan_out = out * k`` with ``k`` the
      kernel's size), through :func:`fewbits.quantizers.optim.scale_updates`, so with any
      optimizer. Needs a weight with an output-channel axis (``ValueError`` otherwise).

        >>> q = BinaryConnect(stochastic=True, seed=0)
        >>> a = q(torch.zeros(8)); b = q(torch.zeros(8))  # two draws of the stream
        >>> r = BinaryConnect(stochastic=True, seed=0)
        >>> torch.equal(r(torch.zeros(8)), a) and not torch.equal(a, b)
        True
    """

    bits = 1
    weight_only = True
    weight_form = "binarized float constant"

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        return _binary_translations()

    def __init__(self, stochastic: bool = False, clip_weights: bool = False,
                 seed: int | None = None, uniform_init: bool = False,
                 glorot_lr_scale: bool = False) -> None:
        super().__init__()
        self.stochastic, self.clip_weights = bool(stochastic), bool(clip_weights)
        self.uniform_init, self.glorot_lr_scale = bool(uniform_init), bool(glorot_lr_scale)
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed
                                 or not 0 <= int(seed) < 2**63):
            raise ValueError(f"BinaryConnect: seed must be an integer in [0, 2**63), got {seed!r}")
        self.seed = None if seed is None else int(seed)
        if self.stochastic:
            s = self.seed if self.seed is not None else int(
                torch.randint(0, 2**62, (), device="cpu"))
            self._base = s  # the stream's seed: place() derives each layer's from it
            gen = torch.Generator(device="cpu").manual_seed(s)
            self.register_buffer("rng_state", gen.get_state())
            self._gen = gen
            self._before: Tensor | None = None  # the state before the last draw (recomputation)

    def _kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stochastic": self.stochastic, "clip_weights": self.clip_weights}
        if self.seed is not None:
            out["seed"] = self.seed
        # only when set: a spec without them is the seed's, key for key
        out.update({k: True for k in ("uniform_init", "glorot_lr_scale") if getattr(self, k)})
        return out

    def setup(self, param: Tensor) -> None:
        if self.glorot_lr_scale and param.dim() < 2:
            raise ValueError(f"binary_connect: glorot_lr_scale needs a weight with an "
                             f"output-channel axis, got shape {tuple(param.shape)}; give "
                             "biases a quantizer without it (or None)")

    def init_(self, param: Tensor) -> None:
        if self.uniform_init:
            param.uniform_(-1.0, 1.0)

    def update_scale(self, param: Tensor) -> float:
        if not self.glorot_lr_scale:
            return 1.0
        k = param[0, 0].numel()  # the kernel's size (1 for a linear layer)
        return 1.0 / math.sqrt(1.5 / (param[0].numel() + param.shape[0] * k))

    def place(self, name: str) -> None:
        """A stochastic stream of its own for the tensor ``name``: seeded with SHA-256 of the
        seed and the name, so that layers converted from one seeded spec (or copies of one
        instance) draw independent noise, and the same seed and model draw the same."""
        if self.stochastic:
            digest = hashlib.sha256(f"{self._base}/{name}".encode()).digest()
            self._base = int.from_bytes(digest[:8], "little") >> 1
            self._gen.manual_seed(self._base)
            self.rng_state.copy_(self._gen.get_state())
            self._before = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any
                              ) -> None:
        # a float checkpoint has no stream: this quantizer keeps its own
        float_checkpoint_load(self, state_dict, prefix, args)
        self._before = None

    def noise(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """The next uniform draw of this quantizer's stream (float32, CPU), advancing the state
        in ``rng_state``; during an activation-checkpointing recomputation, the last draw
        again."""
        state = self.rng_state.detach().cpu()
        if recomputing() and self._before is not None:
            self._gen.set_state(self._before)
            return torch.rand(tuple(shape), generator=self._gen)
        try:
            self._gen.set_state(state)
        except (RuntimeError, TypeError) as e:  # a state dict from elsewhere: name the buffer
            raise ValueError(
                f"BinaryConnect: rng_state is not a CPU generator state ({state.dtype}, "
                f"{state.numel()} elements): load a state dict saved by a stochastic "
                "BinaryConnect, or build the quantizer afresh") from e
        u = torch.rand(tuple(shape), generator=self._gen)
        self._before = state.clone()
        self.rng_state.copy_(self._gen.get_state())
        return u

    def forward(self, w: Tensor) -> Tensor:
        if self.stochastic and self.training:
            return st.stochastic_sign(w, self.noise(w.shape))
        return qf.binary_connect(w, 1.0, False)

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

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        return _binary_translations()

    def step_levels(self) -> tuple[float, float]:
        return -1.0, 1.0

    def onnx_act(self, op: Any, x: Any) -> tuple[Any, str]:
        gt = op.Greater(x, const(op, 0.0))
        return op.Where(gt, const(op, 1.0), const(op, -1.0)), "Where(x > 0, 1, -1)"

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

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        return _binary_translations()

    def step_levels(self) -> tuple[float, float]:
        return 0.0, 1.0

    def onnx_act(self, op: Any, x: Any) -> tuple[Any, str]:
        return op.Cast(op.Greater(x, const(op, 0.0)), to=1), "Cast(x > 0)"

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
    weight_form = "binarized float constant"

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        return _binary_translations()

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
