"""Power-of-two quantization ``+-2^e``: its ``[sign][nonzero][exponent]`` code layout and its
exact ONNX form (:func:`pow2_levels`, the one place both ONNX exporters take it from).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _math
from .._checks import check_pow2_args, in_onnx_export
from ..ops import pow2_op as qf
from ..ops.onnx_form import const
from .base import Codes, Quantizer, fill_missing_extra_state, fitted_step, register_quantizer

__all__ = [
    "Pow2",
    "pow2_levels",
    "pow2_onnx",
]


def _pow2_layout(n: int, sign: bool, with_zero: bool, m: int) -> tuple[int, int]:
    """(exponent bits nb, smallest exponent kmin) of a pow2 code."""
    nb = n - int(sign) - int(with_zero)
    return nb, m - (2**nb - 1)


def pow2_levels(op: Any, x: Any, sign: bool, with_zero: bool, n: int, m: int,
                fn: str = "pow2") -> Any:
    """The exact ONNX form of power-of-two quantization (docs/QUANTIZERS.md ``pow2``), written
    with the op namespace ``op`` (:mod:`fewbits.ops.onnx_form`): both the plain export's
    translation of ``fewbits::pow2`` (:func:`pow2_onnx`) and the fused export's activation
    (:meth:`Pow2.onnx_act`) are this function.

    ``p = 2^floor(log2 a)`` is looked up in a table of exact powers of two at
    ``floor(Log(a) / ln 2)`` (the float ``Log`` may be one off next to a power of two), then
    halved where ``p > a`` and doubled where ``2p <= a``, which makes it exact;
    ``round(log2 a)`` picks ``2p`` where ``a >= 2p * 2^-0.5`` (the float32 threshold
    :data:`fewbits._math.SQRT_HALF_UP`, PyTorch's comparison); then the clamp to
    ``[p_min, p_max]``, the zero rule and the sign of the spec. Raises ``ValueError`` (naming
    ``fn``) where a level or the zero threshold would leave float32's normal range."""
    nb = n - int(sign) - int(with_zero)
    e_min, e_max = m - (2**nb - 1), m
    # the table reaches 2^(e_min - 2) (exact, subnormal below 2^-126); a level below 2^-126,
    # or the zero threshold p_min * 2^-0.5 below it, would not be exact
    if e_min < -126 or (with_zero and e_min == -126) or e_max + 2 > 127:
        raise ValueError(f"{fn}: pow2 exponents [{e_min}, {e_max}] leave the float32 normal "
                         "range; ONNX export needs n <= 8 (with zero: n <= 8 and m > -62)")
    lo_e = e_min - 2
    table = np.array([math.ldexp(1.0, e) for e in range(lo_e, e_max + 2)], np.float32)
    p_min, p_max = np.float32(math.ldexp(1.0, e_min)), np.float32(math.ldexp(1.0, e_max))
    thr = np.float32(p_min * np.float32(2.0**-0.5))
    a = op.Abs(x)
    k = op.Floor(op.Mul(op.Log(a), const(op, 1.0 / math.log(2.0))))
    k = op.Clip(k, const(op, lo_e), const(op, e_max + 1))
    idx = op.Cast(op.Sub(k, const(op, lo_e)), to=7)  # INT64
    p = op.Gather(const(op, table), idx)
    p = op.Where(op.Greater(p, a), op.Mul(p, const(op, 0.5)), p)
    p2 = op.Mul(p, const(op, 2.0))
    p = op.Where(op.LessOrEqual(p2, a), p2, p)
    p2 = op.Mul(p, const(op, 2.0))
    r = op.Where(op.GreaterOrEqual(a, op.Mul(p2, const(op, _math.SQRT_HALF_UP))), p2, p)
    r = op.Min(r, const(op, p_max))
    pm, zero = const(op, p_min), const(op, 0.0)
    if with_zero:
        low = op.Where(op.Less(a, const(op, thr)), zero, pm)
        r = op.Where(op.Less(r, pm), low, r)
    else:
        r = op.Max(r, pm)
    neg = op.Less(x, zero)
    return op.Where(neg, op.Neg(r), r) if sign else \
        op.Where(neg, zero if with_zero else pm, r)


def pow2_onnx(x: Any, sign: bool, with_zero: bool, n: int, m: int, want_mask: bool, check: int,
              fn: str) -> tuple[Any, Any]:
    """ONNX Script translation of ``fewbits::pow2`` for PyTorch's exporter
    (:func:`pow2_levels`; the straight-through mask is not exported: an empty uint8 tensor)."""
    from onnxscript import opset18 as op  # only when exporting

    from ..ops.onnx import float32_only, no_mask

    float32_only(x, "pow2")
    return pow2_levels(op, x, sign, with_zero, n, m, fn), no_mask()


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

    weight_form = "power-of-two float constant"

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        return {torch.ops.fewbits.pow2.default: pow2_onnx}

    def onnx_act(self, op: Any, x: Any) -> tuple[Any, str]:
        return pow2_levels(op, x, self.sign, self.with_zero, self.n, self.m), \
            "exact pow2 subgraph"

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
