"""1-bit quantizers: BinaryConnect and XNOR-Net BWN weights, BinaryNet's sign and binary
sigmoid activations. Codes are one bit, 1 for the positive level.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as qf
from ..ops.onnx_form import const
from .base import Codes, Quantizer, register_quantizer

__all__ = [
    "BinaryConnect",
    "BinarySigmoid",
    "BinaryTanh",
    "BinaryWeight",
]


def _sign_codes(y: Tensor) -> Tensor:
    return (y > 0).to(torch.int64).reshape(-1)


def _binary_translations() -> dict[Any, Any]:
    from ..ops import onnx as ox  # onnxscript: only when exporting

    return {torch.ops.fewbits.binary_connect.default: ox.binary_connect,
            torch.ops.fewbits.binary_weight.default: ox.binary_weight,
            torch.ops.fewbits.binary_act.default: ox.binary_act}


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
    weight_form = "binarized float constant"

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        return _binary_translations()

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
