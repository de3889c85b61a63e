"""Uniform fixed point ``k * delta`` with ``n``-bit codes and the float32 bounds of its grid.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _math
from .._checks import check_bits, check_positive, in_onnx_export
from ..ops import fixed_point_op as qf
from ..ops.onnx_form import const, int_type, qdq, qdq_type, round_half_away
from .base import (
    AffineCodes,
    Codes,
    IntGrid,
    Quantizer,
    fill_missing_extra_state,
    fitted_step,
    register_quantizer,
)

__all__ = [
    "FixedPoint",
]

# --------------------------------------------------------------------------- ONNX translations
# PyTorch's exporter writes these for the family's operators (onnx_translations below).

def fixed_point_onnx(x: Any, sign: bool, n: int, delta: float, want_mask: bool, check: int,
                fn: str) -> tuple[Any, Any]:
    """:func:`fewbits._math.fixed_point_mask`: clamp, ``* (1/delta)`` (or ``/ delta``),
    :func:`round_half_away`, ``* delta``."""
    from onnxscript import opset18 as op  # only when exporting

    from ..ops.onnx import float32_only, no_mask

    float32_only(x, "fixed_point")
    nb = n - 1 if sign else n
    with np.errstate(over="ignore"):
        hi, d = np.float32((2.0**nb - 1.0) * delta), np.float32(delta)
    lo = -hi if sign else np.float32(0.0)
    c = op.Min(op.Max(x, const(op, lo)), const(op, hi))
    # 1/d where d is a power of two with a normal reciprocal: x * (1/d) == x / d bit for bit,
    # and PyTorch multiplies then (fewbits._math.fixed_point_mask)
    inv = None
    if 0 < d < np.inf and math.frexp(float(d))[0] == 0.5:
        r = 1.0 / float(d)
        inv = r if np.finfo(np.float32).tiny <= r <= np.finfo(np.float32).max else None
    v = op.Mul(c, const(op, inv)) if inv is not None else op.Div(c, const(op, d))
    return op.Mul(round_half_away(op, v), const(op, d)), no_mask()


@register_quantizer("fixed_point")
class FixedPoint(Quantizer):
    """Uniform fixed point: ``n`` bits, step ``delta``, signed or not (see
    :func:`fewbits.functional.fixed_point_quantize`). Codes are ``k + offset`` for
    ``y = k * delta``."""

    def __init__(self, sign: bool = True, n: int = 8, delta: float = 2**-4,
                 ste_fine_grained: bool = True) -> None:
        super().__init__()
        check_bits("FixedPoint", "n", n, low=2 if sign else 1)
        check_positive("FixedPoint", "delta", delta)
        self.sign, self.n, self.delta = bool(sign), int(n), float(delta)
        self.ste_fine_grained = bool(ste_fine_grained)
        self.bits = self.n
        self._check_grid()
        self.register_load_state_dict_pre_hook(fill_missing_extra_state)

    # delta is state as well as configuration: quantize_ fits it to each layer's weights, so a
    # state dict loaded into a model converted from other weights must bring it along.
    def get_extra_state(self) -> dict[str, float] | Tensor:
        # PyTorch's TorchScript exporter takes tensors only, as do safetensors files
        # (fewbits.hf sets tensor_extra_state on the quantizers of a transformers model)
        if in_onnx_export() or getattr(self, "tensor_extra_state", False):
            return torch.tensor(self.delta, dtype=torch.float64)
        return {"delta": self.delta}

    def set_extra_state(self, state: dict[str, float] | Tensor) -> None:
        if isinstance(state, Tensor):  # a float64 scalar: ONNX export, safetensors (fewbits.hf)
            if state.numel() != 1 or not state.is_floating_point():
                raise ValueError(f"FixedPoint: a tensor extra state is delta (1 float), got "
                                 f"shape {tuple(state.shape)} {state.dtype}")
            state = {"delta": float(state)}
        delta = float(state["delta"])
        FixedPoint(self.sign, self.n, delta)  # the same checks as a constructed grid
        self.delta = delta

    def fit_grid_(self, x: Tensor) -> None:
        """Set ``delta`` to the smallest power of two whose largest level
        ``(2^(n-1) - 1) * delta`` (unsigned: ``2^n - 1``) holds ``max |x|`` unclipped (what
        ``quantize_`` does for a config without ``delta``); all-zero or non-finite ``x`` keeps
        it."""
        kmax = 2 ** (self.n - 1) - 1 if self.sign else 2**self.n - 1
        delta = fitted_step(x, kmax)
        if delta is not None:
            self.delta = delta

    def _check_grid(self) -> None:
        """Refuse a grid whose levels ``k * delta`` float32 cannot hold, so that every accepted
        configuration encodes to n-bit codes that decode to exactly its forward values.

        float32 has a 24-bit significand: with ``delta`` a float32 power of two, levels are
        exact up to ``|k| = 2**24 - 1`` (signed ``n <= 25``); otherwise ``k * delta`` rounds and
        ``y / delta`` finds ``k`` back only for ``|k| < 2**22``. Beyond that the bound
        ``(2**nb - 1) * delta`` rounds up (``n = 26, delta = 1`` saturates at ``2**25``, one
        level outside the range, and the negative extreme encodes to code ``-1``). The two
        extremes are then encoded and decoded as a check (``delta`` rounding to 0 or inf in
        float32, a bound beyond float32, or a subnormal ``delta`` that rounds far fail it)."""
        nb = self.n - 1 if self.sign else self.n
        d32 = float(torch.tensor(self.delta, dtype=torch.float32, device="cpu"))
        pow2 = d32 == self.delta and math.frexp(self.delta)[0] == 0.5
        limit = 24 if pow2 else 22
        if nb > limit:
            raise ValueError(
                f"FixedPoint: n={self.n} ({'signed' if self.sign else 'unsigned'}) needs levels "
                f"k * delta up to |k| = 2**{nb} - 1, beyond what float32 holds exactly for "
                f"delta={self.delta!r} (|k| < 2**{limit}): the bound would round to another "
                f"level and codes would not survive export; use n <= {limit + int(self.sign)}"
                + ("" if pow2 else " or a power-of-two delta (then n <= "
                   f"{24 + int(self.sign)})"))
        with torch.device("cpu"):  # a default device (meta, cuda) must not change the check
            x = torch.tensor([-3.4028234663852886e38, 3.4028234663852886e38],
                             dtype=torch.float32)
            y = self.forward(x)
            c = self.encode(x)
            back = self.decode(c)
        ok = 0 < d32 < math.inf and bool(torch.isfinite(y).all())
        if not ok or int(c.codes.min()) < 0 or int(c.codes.max()) >= 2**self.n or \
                not torch.equal(back, y):
            raise ValueError(
                f"FixedPoint: delta={self.delta!r} (float32 {d32!r}) with n={self.n} saturates "
                f"at {float(y[1])!r}, which is not a level of the {self.n}-bit grid in float32; "
                "use a delta whose bound (2**nb - 1) * delta is a finite float32 (a power-of-"
                "two delta is exact)")

    def _kwargs(self) -> dict[str, Any]:
        return {"sign": self.sign, "n": self.n, "delta": self.delta,
                "ste_fine_grained": self.ste_fine_grained}

    @property
    def _offset(self) -> int:
        return 2 ** (self.n - 1) - 1 if self.sign else 0

    def forward(self, x: Tensor) -> Tensor:
        return qf.fixed_point_quantize(x, self.sign, self.n, self.delta, self.ste_fine_grained)

    def int_grid(self) -> IntGrid:
        """``k * delta`` for ``k`` in ``[-(2^(n-1) - 1), 2^(n-1) - 1]`` (signed) or
        ``[0, 2^n - 1]``; zero point 0."""
        kmax = 2 ** (self.n - 1) - 1 if self.sign else 2**self.n - 1
        return IntGrid(self.delta, 0, -kmax if self.sign else 0, kmax)

    def engine_grid(self) -> tuple[float, float, float, float, int, int, int]:
        """``k = clamp(rha(clamp(x, qmin * delta, qmax * delta) / delta), qmin, qmax)``:
        the forward of :func:`fewbits._math.fixed_point` as the integer engine runs it."""
        g = self.int_grid()
        f = np.float32
        return (float(f(g.qmin * g.scale)), float(f(g.qmax * g.scale)), 0.0, g.scale, 0,
                g.qmin, g.qmax)

    def infer(self, x: Tensor) -> Tensor:
        """The forward's values without autograd or finiteness check (inference paths): the
        same formula, :func:`fewbits._math.fixed_point`, rounding ties away from zero."""
        with torch.no_grad():
            return _math.fixed_point(x, self.sign, self.n, self.delta)[0]

    def encode(self, x: Tensor) -> Codes:
        with torch.no_grad():
            y = self.forward(x.detach().float())
            k = _math.round_half_away(y / torch.tensor(self.delta))
        codes = k.to(torch.int64).reshape(-1) + self._offset
        return Codes(codes, self.bits, tuple(x.shape))

    def decode(self, codes: Codes) -> Tensor:
        k = (codes.codes - self._offset).to(torch.float32).reshape(codes.shape)
        return k * torch.tensor(self.delta, dtype=torch.float32)

    # the family protocol (fewbits.quantizers.base.Quantizer)
    uniform = True

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        return {torch.ops.fewbits.fixed_point.default: fixed_point_onnx}

    def integer_weight(self, w: Tensor, codes: Codes | None = None
                       ) -> tuple[Tensor, Tensor] | None:
        """``round(w / delta)`` and ``delta``, when ``w`` is exactly on the grid."""
        w = w.detach().float()
        grid = self.int_grid()
        k = torch.round(w / grid.scale)
        if not torch.equal(k * grid.scale, w):
            return None
        return k.to(torch.int64), torch.full((w.shape[0],), grid.scale)

    def onnx_act(self, op: Any, x: Any) -> tuple[Any, str]:
        """``Clip`` to the grid's range, ``Div``, exact rounding, ``Mul``, then (grids of at
        most 16 bits) ``QuantizeLinear`` / ``DequantizeLinear`` of those grid values.
        ``QuantizeLinear`` alone rounds ties half to even: an input on exact ties (an average
        pool of grid values) would land a level off."""
        grid = self.int_grid()
        c = op.Clip(x, const(op, grid.qmin * grid.scale), const(op, grid.qmax * grid.scale))
        d = const(op, grid.scale)
        r = op.Mul(round_half_away(op, op.Div(c, d)), d)
        kind = int_type(grid.qmin, grid.qmax)
        if kind is not None:
            return qdq(op, r, grid.scale, 0, kind), f"Clip + exact rounding + {qdq_type(kind)} Q/DQ"
        return r, "Clip + exact rounding (float)"

    def affine(self, codes: Codes) -> AffineCodes:
        """``k * delta``: ``int_repr = k``, ``scale = delta``, zero point 0, per tensor."""
        grid = self.int_grid()
        return AffineCodes((codes.codes - self._offset).reshape(codes.shape),
                           torch.tensor(grid.scale, dtype=torch.float32),
                           torch.tensor(grid.zero_point, dtype=torch.int64), None,
                           grid.qmin, grid.qmax)
