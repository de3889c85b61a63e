"""Power-of-two quantization ``+-2^e`` and its ``[sign][nonzero][exponent]`` code layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import functional as qf
from .._checks import check_pow2_args, in_onnx_export
from .base import Codes, Quantizer, fill_missing_extra_state, fitted_step, register_quantizer

__all__ = [
    "Pow2",
]


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
        check_pow2_args("Pow2", sign, with_zero, n, m)
        self.sign, self.with_zero, self.n, self.m = bool(sign), bool(with_zero), int(n), int(m)
        self.ste_fine_grained = bool(ste_fine_grained)
        self.bits = self.n
        self.register_load_state_dict_pre_hook(fill_missing_extra_state)

    # m is state as well as configuration (quantize_ fits it to the weights; see FixedPoint)
    def get_extra_state(self) -> dict[str, int] | Tensor:
        if in_onnx_export() or getattr(self, "tensor_extra_state", False):  # see FixedPoint
            return torch.tensor(self.m)
        return {"m": self.m}

    def set_extra_state(self, state: dict[str, int] | Tensor) -> None:
        if isinstance(state, Tensor):  # an integer scalar: ONNX export, safetensors (fewbits.hf)
            if state.numel() != 1 or state.is_floating_point():
                raise ValueError(f"Pow2: a tensor extra state is m (1 integer), got shape "
                                 f"{tuple(state.shape)} {state.dtype}")
            state = {"m": int(state)}
        m = state["m"]
        check_pow2_args("Pow2", self.sign, self.with_zero, self.n, m)
        self.m = int(m)

    def fit_grid_(self, x: Tensor) -> None:
        """Set ``m`` to the smallest exponent with ``2^m >= max |x|`` (what ``quantize_`` does
        for a config without ``m``); all-zero or non-finite ``x`` keeps it."""
        top = fitted_step(x, 1)
        if top is not None:
            self.m = round(math.log2(top))

    def _kwargs(self) -> dict[str, Any]:
        return {"sign": self.sign, "with_zero": self.with_zero, "n": self.n, "m": self.m,
                "ste_fine_grained": self.ste_fine_grained}

    def forward(self, x: Tensor) -> Tensor:
        return qf.pow2_quantize(x, self.sign, self.with_zero, self.n, self.m,
                                self.ste_fine_grained)

    def exponent_range(self) -> tuple[int, int]:
        """``(e_min, e_max)``: the levels are ``+-2^e`` for ``e`` in ``[e_min, e_max]`` (and 0
        with ``with_zero``); ``e_max = m``."""
        return _pow2_layout(self.n, self.sign, self.with_zero, self.m)[1], self.m

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
