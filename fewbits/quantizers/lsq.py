"""Learned step size quantization (LSQ) of weights or activations, with LSQ+'s learned offset as
an option: the step (and offset) are parameters trained with the paper's scaled gradient.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _math
from ..ops import lsq as L
from ..ops._core import recomputing
from ..ops.onnx_form import const, int_type, qdq
from ..ops.onnx_form import round_half_away as onnx_round
from . import optim
from .base import (
    AffineCodes,
    Codes,
    IntGrid,
    Quantizer,
    float_checkpoint_load,
    register_quantizer,
)
from .min_max import ddp_group

__all__ = ["LSQ"]

#: The smallest step :meth:`LSQ.after_optimizer_step` leaves (a step of 0 has no grid).
MIN_STEP = 1e-8
#: The learning-rate factor of the step (and offset) under an adaptive optimizer (Adam):
#: Adam normalises away LSQ's gradient scale g and moves a step of ~0.01 by ~lr per iteration,
#: which sends it to MIN_STEP within a few iterations (docs/QUANTIZERS.md, ``lsq``).
ADAPTIVE_LR_SCALE = 0.01


@register_quantizer("lsq")
class LSQ(Quantizer):
    """LSQ (Esser et al., ICLR 2020): ``y = round_half_away(clamp(x / s, -Q_N, Q_P)) * s`` with
    the step ``s`` a parameter; ``offset=True`` adds LSQ+'s learned ``beta`` (Bhalgat et al.
    2020): ``y = round_half_away(clamp((x - beta) / s, -Q_N, Q_P)) * s + beta``. ``bits`` in
    2..8; ``signed``: ``Q_N = 2**(bits-1)``, ``Q_P = 2**(bits-1) - 1``, else ``0`` and
    ``2**bits - 1``. Formula and gradients: :mod:`fewbits.ops.lsq`.

    The step starts from the data as the paper says, ``s = 2 * mean|x| / sqrt(Q_P)``: from the
    weights when a layer calls :meth:`setup`, from the first training batch for activations
    (``init_step`` overrides both; inside a DistributedDataParallel forward every rank starts
    from rank 0's batch, as one process accumulating the ranks' micro-batches would). With
    ``offset`` both start from the range:
    ``s = (max - min) / (Q_N + Q_P)``, ``beta = min + Q_N * s``. The gradient scale is
    ``g = 1 / sqrt(N * Q_P)``, ``N`` the number of weights, or the features of one sample
    (``x[0].numel()``) for activations. After every optimizer step that holds it
    (:mod:`fewbits.quantizers.optim`) the step is clamped to ``>= 1e-8``. Under Adam the step
    and offset train at ``0.01 * lr`` in a group of their own (``fewbits train``,
    ``quantize_(..., optimizer=opt)``, or :func:`fewbits.quantizers.optim.param_groups` for
    one's own optimizer): Adam normalises away ``g`` and would move a step of ~0.01 by ~lr
    per iteration, down to the floor, where the layer's output vanishes under the next batch
    norm's epsilon and training stops for good.
    An unsigned quantizer (no offset) whose first tensor holds negative values warns: it
    clips them to 0.

    Codes: ``k + Q_N`` in ``bits`` bits; affine form ``int_repr = k``, scale ``s``, zero point
    0 (without an offset: ``beta`` is a real number, not an integer zero point).

        >>> q = LSQ(bits=3, init_step=0.5)
        >>> q(torch.tensor([-3.0, 0.3, 0.5, 9.0]))
        tensor([-2.0000,  0.5000,  0.5000,  1.5000], grad_fn=<_LSQBackward>)
    """

    #: Set by :func:`fewbits.quantize_` where it made this input unsigned because the fx graph
    #: shows a ReLU before it: the first batch then warns if it holds negatives. The zoo's
    #: unsigned quantizers replace the ReLU (they clip negatives by design) and leave it False.
    expects_nonnegative = False

    def __init__(self, bits: int = 4, signed: bool = True, offset: bool = False,
                 init_step: float | None = None) -> None:
        super().__init__()
        self.qn, self.qp = L.lsq_levels(bits, signed)
        if init_step is not None and not 0.0 < float(init_step) < math.inf:
            raise ValueError(f"LSQ: init_step must be a finite number > 0, got {init_step!r}")
        self.bits, self.signed, self.offset = int(bits), bool(signed), bool(offset)
        #: the family protocol: integer affine codes, except with LSQ+'s real-valued offset
        self.uniform = not self.offset
        self.init_step = None if init_step is None else float(init_step)
        self.step = nn.Parameter(torch.tensor(self.init_step or 1.0))
        optim.register_range(self.step, self)
        optim.register_lr_scale(self.step, ADAPTIVE_LR_SCALE)
        if self.offset:
            self.beta = nn.Parameter(torch.tensor(0.0))
            optim.register_lr_scale(self.beta, ADAPTIVE_LR_SCALE)
        # whether the step was started from data (state: a loaded quantizer keeps its step)
        self.register_buffer("initialized", torch.tensor(self.init_step is not None))
        #: N of the gradient scale: the weights' count (set by setup), else per sample.
        self.count: int | None = None
        self._started = False  # python mirror of `initialized` once seen True (no host sync)

    def _kwargs(self) -> dict[str, Any]:
        return {"bits": self.bits, "signed": self.signed, "offset": self.offset,
                "init_step": self.init_step}

    def setup(self, param: Tensor) -> None:
        self.count = int(param.numel())
        self.init_from_(param)

    calibrates = True

    def calibrate_start(self, x: Tensor) -> None:
        """The step (and offset) start from calibration's first batch (:meth:`init_from_`)."""
        self.init_from_(x)

    def calibrate_end(self, lo: float, hi: float) -> tuple[float, float]:
        """The grid's ends ``(-Q_N * s + beta, Q_P * s + beta)``; the observed range sets
        nothing (the step is learned)."""
        s, b = float(self.step), float(self.beta) if self.offset else 0.0
        return -self.qn * s + b, self.qp * s + b

    @torch.no_grad()
    def init_from_(self, x: Tensor) -> None:
        """Start the step (and offset) from ``x`` as the paper says (class doc); a quantizer
        given ``init_step`` keeps it."""
        if self.init_step is not None or x.is_meta or not x.numel():
            return
        if self.offset:
            s, b = L.lsq_range(x, self.qn, self.qp)
            self.beta.fill_(b)
        else:
            s = L.init_step(x, self.qp)
            check = self.expects_nonnegative and not self.signed  # once: the first batch
            low = float(x.detach().min()) if check else 0.0
            if low < 0:  # quantize_ chose unsigned where fx saw a ReLU the run did not apply
                warnings.warn(f"LSQ(signed=False, {self.bits} bits): the first tensor it "
                              f"quantizes holds negative values (min {low:.3g}), which it "
                              "clips to 0; quantize this input signed (spec "
                              '{"name": "lsq", "signed": True})', UserWarning, stacklevel=3)
        self.step.fill_(s)
        group = ddp_group()  # inside a DDP forward: every rank starts from rank 0's batch
        if group is not None:
            src = dist.get_global_rank(group, 0)
            dist.broadcast(self.step.data, src, group=group)
            if self.offset:
                dist.broadcast(self.beta.data, src, group=group)
        self.initialized.fill_(True)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any
                              ) -> None:
        # a float checkpoint (no step): an activation step starts again from the next
        # training batch; a weight's from the loaded weights (the layer calls init_from_)
        if float_checkpoint_load(self, state_dict, prefix, args):
            self.initialized.fill_(self.init_step is not None)
        self._started = False

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.step.clamp_(min=MIN_STEP)

    def _g(self, x: Tensor) -> float:
        n = self.count if self.count is not None else (x[0].numel() if x.dim() > 1 else x.numel())
        return L.grad_scale(n, self.qp)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self._started and not recomputing():
            if not bool(self.initialized):
                self.init_from_(x)
            self._started = bool(self.initialized)
        return L.lsq(x, self.step, self.bits, self.signed, self.beta if self.offset else None,
                     self._g(x))

    def int_grid(self) -> IntGrid | None:
        """``k * s`` for ``k`` in ``[-Q_N, Q_P]``, zero point 0 (``None`` with an offset)."""
        if self.offset:
            return None
        return IntGrid(float(self.step.detach()), 0, -self.qn, self.qp)

    def encode(self, x: Tensor) -> Codes:
        with torch.no_grad():
            xf = x.detach().float()
            s = self.step.detach().float()
            beta = self.beta.detach().float() if self.offset else None
            v = (xf - beta) / s if beta is not None else xf / s
            k = _math.round_half_away(v.clamp(-float(self.qn), float(self.qp)))
        params = {"step": s.reshape(()).clone()}
        if beta is not None:
            params["beta"] = beta.reshape(()).clone()
        return Codes(k.to(torch.int64).reshape(-1) + self.qn, self.bits, tuple(x.shape), params)

    def decode(self, codes: Codes) -> Tensor:
        k = (codes.codes - self.qn).to(torch.float32).reshape(codes.shape)
        y = k * codes.params["step"].float()
        if "beta" in codes.params:
            y = y + codes.params["beta"].float()
        return y

    def affine(self, codes: Codes) -> AffineCodes | None:
        """``k * s``: ``int_repr = k``, ``scale = s``, zero point 0, per tensor (``None`` with
        an offset)."""
        if "beta" in codes.params:
            return None
        return AffineCodes((codes.codes - self.qn).reshape(codes.shape),
                           codes.params["step"].float().reshape(()),
                           torch.tensor(0, dtype=torch.int64), None, -self.qn, self.qp)

    # the family protocol (fewbits.quantizers.base.Quantizer); the forward is standard PyTorch
    # operators, which PyTorch's exporter translates itself (no onnx_translations)
    weight_form = "LSQ step multiples as float constants"

    def integer_weight(self, w: Tensor, codes: Codes | None = None
                       ) -> tuple[Tensor, Tensor] | None:
        """``k`` and the step (per output channel, all equal), when ``w = k * s`` exactly (no
        offset)."""
        if self.offset:
            return None
        w = w.detach().float()
        s = self.step.detach().float()
        k = torch.round(w / s)
        if not torch.equal(k * s, w):
            return None
        return k.to(torch.int64), s.expand(w.shape[0]).clone()

    def onnx_act(self, op: Any, x: Any) -> tuple[Any, str]:
        """Without an offset: ``Clip`` to ``[-Q_N s, Q_P s]``, exact rounding, then
        ``QuantizeLinear`` / ``DequantizeLinear`` with scale ``s`` (8-bit grids; alone it rounds
        ties half to even); with one: ``Sub``, ``Div``, ``Clip``, exact rounding, ``Mul``,
        ``Add``."""
        s = float(self.step.detach())
        if not self.offset:
            c = op.Clip(x, const(op, -self.qn * s), const(op, self.qp * s))
            d = const(op, s)  # exact rounding first: QuantizeLinear rounds ties half to even
            r = op.Mul(onnx_round(op, op.Div(c, d)), d)
            return qdq(op, r, s, 0, int_type(-self.qn, self.qp)), \
                "LSQ: Clip + exact rounding + Q/DQ"
        beta = const(op, float(self.beta.detach()))
        d = const(op, s)
        v = op.Clip(op.Div(op.Sub(x, beta), d), const(op, float(-self.qn)),
                    const(op, float(self.qp)))
        return op.Add(op.Mul(onnx_round(op, v), d), beta), "LSQ+: exact rounding (float)"
