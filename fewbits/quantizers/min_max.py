"""Min-max quantization to integers ``[ql_min, ql_max]``: learned, per-batch or EMA ranges,
per tensor or per channel, kept equal across DDP ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _math
from .._checks import check_finite, check_float_tensor, check_positive
from ..ops import min_max_op as qf
from ..ops._core import capturing, recomputing
from ..ops.onnx_form import const, int_type, qdq, qdq_type, round_half_away
from . import optim
from .base import AffineCodes, Codes, IntGrid, Quantizer, register_quantizer

__all__ = [
    "MinMax",
    "ddp_group",
    "gather_in_rank_order",
]


_MINMAX_MODES = ("learnable", "batch", "ema")
_NP_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}


def gather_in_rank_order(t: Tensor, group: Any = None) -> tuple[Tensor, int]:
    """``t`` of every rank of ``group`` (default: the whole job), stacked in rank order, and
    this process's rank in it: the statistics exchange of DDP min-max quantizers."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts), dist.get_rank(group)


def ddp_group() -> Any:
    """The process group of the DistributedDataParallel forward now running, when it spans
    more than one process; else None. Quantizer statistics are exchanged only inside a DDP
    forward, which every rank runs (a forward outside DDP on one rank must not wait for the
    others)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
    group = getattr(ddp, "process_group", None)
    if ddp is None or dist.get_world_size(group) < 2:
        return None
    return group

# --------------------------------------------------------------------------- ONNX translations
# PyTorch's exporter writes these for the family's operators (onnx_translations below).

def _range(op: Any, r: Any, x: Any) -> Any:
    """A 0-d range, or ``(C,)`` viewed over ``x``'s axis 0 (as
    :func:`fewbits.ops.min_max_op.range_view`)."""
    shape = getattr(r, "shape", None)
    if shape is not None and len(shape) == 1 and shape[0] != 1:
        rank = len(x.shape)
        return op.Reshape(r, const(op, [-1] + [1] * (rank - 1), np.int64))
    return op.Reshape(r, const(op, np.zeros(0, np.int64), np.int64))


def min_max_onnx(x: Any, qr_min: Any, qr_max: Any, ql_min: int, ql_max: int, eps: float, fine: bool,
            want_code: bool, check: int, fn: str) -> tuple[Any, Any]:
    """:func:`fewbits._math.min_max_range` then :func:`fewbits._math.min_max`, operation for
    operation in float32 (the grid folds to constants when the ranges are)."""
    from onnxscript import opset18 as op  # only when exporting

    from ..ops.onnx import float32_only, no_mask

    float32_only(x, "min_max")
    rmin, rmax = _range(op, qr_min, x), _range(op, qr_max, x)
    rmax = op.Where(op.Less(op.Sub(rmax, rmin), const(op, eps)), op.Add(rmin, const(op, eps)), rmax)
    lmin, lmax = const(op, float(ql_min)), const(op, float(ql_max))
    scale = op.Div(op.Sub(rmax, rmin), op.Sub(lmax, lmin))
    zp = op.Sub(lmin, op.Div(rmin, scale))
    zp = op.Where(op.LessOrEqual(zp, lmin), lmin,
                  op.Where(op.GreaterOrEqual(zp, lmax), lmax, round_half_away(op, zp)))
    lo = op.Mul(op.Sub(lmin, zp), scale)
    hi = op.Mul(op.Sub(lmax, zp), scale)
    v = op.Div(op.Sub(op.Min(op.Max(x, lo), hi), lo), scale)
    r = op.Round(v)  # v >= 0: half to even, plus 1 at the ties it sent down
    r = op.Add(r, op.Cast(op.Equal(op.Sub(v, r), const(op, 0.5)), to=1))
    return op.Add(op.Mul(r, scale), lo), no_mask()


@register_quantizer("min_max")
class MinMax(Quantizer):
    """Min-max quantization to integers ``[ql_min, ql_max]`` (Jacob et al., CVPR 2018).

    ``mode``: ``"learnable"`` (seed default: ``qr_min``/``qr_max`` are parameters trained by the
    spec's gradients), ``"batch"`` (``x_min_max``: ranges set from each training batch) or
    ``"ema"`` (``x_min_max`` + ``ema``: ``r = decay * r + (1 - decay) * batch``). At evaluation
    the stored ranges are used unchanged, as the seed. ``per_channel`` (weights, beyond the seed)
    keeps one range per output channel. ``bits = ceil(log2(ql_max - ql_min + 1))``.

    Learned ranges stay valid: :meth:`after_optimizer_step` (run after every
    ``optimizer.step()`` that holds them, by a global optimizer hook of
    :mod:`fewbits.quantizers.optim`, and by :func:`fewbits.layers.apply_weight_constraints`)
    projects them onto ``qr_min <= 0 <= qr_max`` (the range holds zero, as torch.ao's
    observers and Jacob et al.'s nudging require) and ``qr_max >= qr_min + eps`` (the forward's
    own nudge, which leaves the forward as it was). The seed's gradients are unchanged. Without
    the projection, ``qr_min > 0`` pins the zero point at ``ql_min`` (the grid is
    ``[0, qr_max - qr_min]``), ``qr_min`` keeps receiving gradient, passes ``qr_max`` and
    leaves the quantizer on a grid ``eps`` wide for good. Ranges that stay valid never change.
    A range the projection leaves ``eps`` wide (it had crossed or collapsed), or that starts
    narrower than ``eps``, restarts from the data at the next training forward:
    ``[min(x, 0), max(x, 0)]`` of the tensor quantized there (per channel where the ranges are).

    Activation checkpointing: a forward that ``torch.utils.checkpoint`` recomputes during the
    backward neither observes its batch again nor restarts a range (it quantizes with the
    ranges of the first run), so state advances once per step.

    Under DDP batch/EMA statistics are those of one process running the ranks' micro-batches
    in rank order (see :func:`fewbits.distributed.sync_quantizers`); inside the forward of a
    ``DistributedDataParallel`` spanning several processes this holds without any call (the
    statistics are exchanged over its process group). Loops that run the model on several
    processes without DDP call ``sync_quantizers``.

        >>> q = MinMax(init_min=0.5, init_max=1.0); q.after_optimizer_step()
        >>> q.qr_min.item(), q.qr_max.item()
        (0.0, 1.0)
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
        check_positive("MinMax", "eps", eps)
        self.ql_min, self.ql_max = int(ql_min), int(ql_max)
        self.init_min, self.init_max = float(init_min), float(init_max)
        self.mode, self.decay, self.eps = mode, float(decay), float(eps)
        self.per_channel, self.ste_fine_grained = bool(per_channel), bool(ste_fine_grained)
        self.bits = max(1, math.ceil(math.log2(self.ql_max - self.ql_min + 1)))
        # float32 finds a level index as (clamp(x) - lo) / scale with a relative error up to
        # 3 * 2**-24: below 2**21 levels it rounds to the right index, wider grids can put a
        # saturated value one code past ql_max (not a code of `bits` bits).
        if self.ql_max - self.ql_min >= 2**21 or max(-self.ql_min, self.ql_max) > 2**24:
            raise ValueError(
                f"MinMax: ql_min..ql_max = {self.ql_min}..{self.ql_max} is wider than float32 "
                "computes level indices exactly (at most 2**21 levels, |ql| <= 2**24): a "
                "saturated value could encode one code past ql_max; use at most 21 bits")
        #: ``stats -> (stats of every rank in rank order, this rank)``; set by
        #: :func:`fewbits.distributed.sync_quantizers` under DDP, else None (this process only).
        self.stats_sync: Callable[[Tensor], tuple[Tensor, int]] | None = None
        #: True for a weight/bias quantizer (its layer called :meth:`setup`), False for
        #: activations.
        self.serves_tensor = False
        # the ranges the last training forward quantized with (for a recomputation)
        self._used: tuple[Tensor, Tensor] | None = None
        # learned ranges narrower than eps (collapsed, crossed, or started so): restarted from
        # the data at the next training forward. A bool, or a device tensor off the CPU
        self._restart: bool | Tensor = (mode == "learnable"
                                        and max(init_max, 0.0) - min(init_min, 0.0) < eps)
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
                optim.register_range(getattr(self, name), self)
            else:
                self.register_buffer(name, v)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.mode != "learnable":
            return
        lo, hi = self.qr_min, self.qr_max
        if self._valid_scalar_range():
            return  # the projection below would leave both values as they are, bit for bit
        lo.clamp_(max=0.0)
        hi.clamp_(min=0.0)
        narrow = hi - lo < self.eps
        hi.copy_(torch.where(narrow, lo + self.eps, hi))  # the forward's nudge
        if not lo.is_meta:
            self._set_restart(narrow if self._restart is False else narrow | self._restart)

    def _set_restart(self, mask: Tensor) -> None:
        # on the CPU a range without anything to restart costs nothing at the next forward;
        # elsewhere the mask stays on the device (no host sync) and the restart is branch-free
        self._restart = False if mask.device.type == "cpu" and not bool(mask.any()) else mask

    @torch.no_grad()
    def _restart_from(self, x: Tensor) -> None:
        """Learned ranges that collapsed (narrower than ``eps``: a crossing projected to
        ``[0, eps]``, or an ``eps``-wide start) start again from ``x``, the tensor this forward
        quantizes, as :meth:`init_from_` does for weights: ``[min(x, 0), max(x, 0)]``. Under a
        DDP forward the min and max are those of every rank's batch, so ranks stay equal."""
        bmin, bmax = self._range_of(x)
        bmin, bmax = bmin.clamp(max=0.0).to(self.qr_min.dtype), bmax.clamp(min=0.0).to(
            self.qr_max.dtype)
        group = ddp_group()
        if group is not None:
            dist.all_reduce(bmin, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(bmax, op=dist.ReduceOp.MAX, group=group)
        if not bool(torch.isfinite(bmin).all() and torch.isfinite(bmax).all()):
            check_finite(x, "MinMax", "x")  # raises, naming it
        narrow = bmax - bmin < self.eps
        bmax = torch.where(narrow, bmin + self.eps, bmax)
        restart = self._restart
        if isinstance(restart, Tensor):  # only the collapsed channels restart
            restart = restart.to(bmin.device)
            bmin = torch.where(restart, bmin, self.qr_min)
            bmax = torch.where(restart, bmax, self.qr_max)
            narrow = narrow & restart
        self.qr_min.copy_(bmin)
        self.qr_max.copy_(bmax)
        self._set_restart(narrow)  # data without width (all zero): try again next time

    def _valid_scalar_range(self) -> bool:
        """Per-tensor ranges with ``qr_min < 0 < qr_max`` and ``qr_max - qr_min >= eps`` in
        their own dtype (float32 arithmetic as the tensors do it, via NumPy): what every step
        of a stable run has, checked on two host values instead of seven tensor operations
        per quantizer (46 quantizers in the min-max ResNet). CPU tensors only."""
        lo, hi = self.qr_min, self.qr_max
        np_dtype = _NP_FLOAT.get(lo.dtype)
        # CPU only: on CUDA two .item() calls per quantizer and step would sync the host 92
        # times a step (the tensor ops below queue without waiting); meta tensors hold no value
        if lo.numel() != 1 or hi.dtype != lo.dtype or np_dtype is None or \
                lo.device.type != "cpu" or hi.device.type != "cpu":
            return False
        lo_v, hi_v = np_dtype(lo.item()), np_dtype(hi.item())
        with np.errstate(over="ignore"):  # an inf width compares as the tensors' does, silently
            return bool(lo_v < 0 < hi_v and not hi_v - lo_v < np_dtype(self.eps))

    def setup(self, param: Tensor) -> None:
        self.serves_tensor = True
        if self.per_channel:
            if param.dim() < 1:
                raise ValueError("MinMax(per_channel=True) needs a tensor with a channel axis")
            self._make_ranges((param.shape[0],), param.device)

    def _range_of(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.per_channel:
            return torch.aminmax(x.detach().flatten(1), dim=1)
        return torch.aminmax(x.detach())

    calibrates = True

    def calibrate_end(self, lo: float, hi: float) -> tuple[float, float]:
        """The range becomes ``[lo, hi]`` (:func:`fewbits.calibrate`)."""
        self.qr_min.fill_(lo)
        self.qr_max.fill_(hi)
        return lo, hi

    def sync_statistics(self, gather: Callable[[Tensor], tuple[Tensor, int]]) -> None:
        """Batch and EMA ranges exchange their statistics with ``gather`` (learned ranges are
        parameters: DDP all-reduces their gradients)."""
        if self.mode != "learnable":
            self.stats_sync = gather

    def init_from_(self, x: Tensor) -> None:
        """Ranges = the min and max of ``x`` (per output channel with ``per_channel``), so that
        a converted weight starts on a grid that covers it (not the fixed ``init_min/max``)."""
        check_finite(x, "MinMax", "x")
        bmin, bmax = self._range_of(x)
        with torch.no_grad():
            self.qr_min.copy_(bmin)
            self.qr_max.copy_(bmax)
        self._restart = False  # a fresh start; a range without width restarts (projection)
        self.after_optimizer_step()  # learned ranges must stay valid (qr_min <= 0 <= qr_max)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any
                              ) -> None:
        # args: local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        mine = [prefix + "qr_min", prefix + "qr_max"]
        absent = not any(k in state_dict for k in mine)
        super()._load_from_state_dict(state_dict, prefix, *args)
        if not absent:
            lo, hi = self.qr_min, self.qr_max
            if self.mode == "learnable" and not lo.is_meta and lo.shape == hi.shape:
                # a collapsed range saved as [lo, lo + eps] restarts at the next forward
                self._set_restart((hi - lo <= self.eps * (1 + 2**-10)).detach())
            return
        # No key of this quantizer at all: a float checkpoint (or one without this quantizer)
        # loaded into the converted model. Weight/bias ranges are started from the loaded
        # tensor by the layer (fewbits.layers), as converting the float layer does; an
        # activation range has no stored tensor to start from.
        missing = args[2]
        for k in mine:
            if k in missing:
                missing.remove(k)
        if not self.serves_tensor:
            warnings.warn(
                "a min-max activation range is not in the loaded state dict (a float "
                "checkpoint): it keeps its current value; set activation ranges from data with "
                "fewbits.calibrate(model, batches)", stacklevel=2)

    def _update(self, bmin: Tensor, bmax: Tensor) -> None:
        if self.mode == "ema":
            self.qr_min.mul_(self.decay).add_((1 - self.decay) * bmin)
            self.qr_max.mul_(self.decay).add_((1 - self.decay) * bmax)
        else:
            self.qr_min.copy_(bmin)
            self.qr_max.copy_(bmax)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Update the ranges from ``x``; returns the ranges this forward quantizes with."""
        bmin, bmax = self._range_of(x)
        sync = self.stats_sync
        if sync is None:
            group = ddp_group()
            if group is not None:
                sync = partial(gather_in_rank_order, group=group)
        if sync is None:
            # a NaN or inf in x shows in its min or max: checked before the ranges take them
            # (inside a captured graph as a device-side assertion on the two sums, no sync)
            stats = torch.stack([bmin.sum(), bmax.sum()])
            if capturing():
                check_finite(stats, "MinMax", "x")
            elif not bool(torch.isfinite(stats).all()):
                check_finite(x, "MinMax", "x")
            self._update(bmin, bmax)
            return self.qr_min, self.qr_max
        # DDP: replay every rank's statistics in rank order, as one process running the ranks'
        # micro-batches one after the other; this rank quantizes with the ranges its own
        # micro-batch gives there, and every rank ends with the same state.
        stats, rank = sync(torch.stack([bmin, bmax]))
        if not bool(torch.isfinite(stats).all()):  # every rank raises, none waits
            check_finite(x, "MinMax", "x")
            raise ValueError("MinMax: another rank's batch contains NaN or inf; quantizers "
                             "need finite input (a diverging run: lower the learning rate)")
        used = (self.qr_min, self.qr_max)
        for r in range(stats.shape[0]):
            self._update(stats[r, 0], stats[r, 1])
            if r == rank:
                used = (self.qr_min.clone(), self.qr_max.clone())
        return used

    def forward(self, x: Tensor) -> Tensor:
        qr_min, qr_max = self.qr_min, self.qr_max
        if self.mode == "learnable":
            optim.register_range(qr_min, self)  # a copy (deepcopy, load with assign=True)
            optim.register_range(qr_max, self)
            if self.training and self._restart is not False and not recomputing():
                check_float_tensor(x, "MinMax", "x")
                self._restart_from(x)
        elif self.training:
            check_float_tensor(x, "MinMax", "x")
            if torch._C._functorch.is_batchedtensor(x):
                raise RuntimeError(
                    f"MinMax(mode={self.mode!r}): a training forward sets the ranges from the "
                    "whole batch, which torch.func.vmap splits into samples; under vmap use "
                    "model.eval() (the stored ranges) or mode='learnable' (torch.func.grad "
                    "works in both modes)")
            if recomputing() and self._used is not None:
                # activation checkpointing runs this forward again in the backward: quantize
                # with the ranges of the first run, without observing the batch twice
                qr_min, qr_max = self._used
            else:
                qr_min, qr_max = self._observe(x)
                self._used = (qr_min, qr_max)
        return qf.min_max_quantize(x, qr_min, qr_max, self.ql_min, self.ql_max,
                                   self.eps, self.ste_fine_grained)

    def grid(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(scale, zero_point, lo, hi)`` broadcastable to ``like`` (as the forward uses)."""
        rmin = qf.checked_range_view(self.qr_min.detach(), like, "MinMax", "qr_min")
        rmax = qf.checked_range_view(self.qr_max.detach(), like, "MinMax", "qr_max")
        return qf.min_max_grid(rmin.float(), rmax.float(), self.ql_min, self.ql_max, self.eps,
                               "MinMax")

    def int_grid(self) -> IntGrid:
        """The per-tensor grid ``(q - zero_point) * scale``, ``q`` in ``[ql_min, ql_max]``, of
        :meth:`grid` (the forward computes ``round((c - lo) / scale) * scale + lo``, which is
        the same set of reals; float rounding of the two forms can differ in the last bit).
        Raises ``ValueError`` for per-channel ranges (no single grid)."""
        if self.qr_min.numel() != 1:
            raise ValueError("MinMax: per-channel ranges have one grid per channel, not one; "
                             "use grid(like) for the per-channel scales and zero points")
        scale, zp, _, _ = self.grid(torch.zeros(()))
        return IntGrid(float(scale), int(zp), self.ql_min, self.ql_max)

    def engine_grid(self) -> tuple[float, float, float, float, int, int, int]:
        """``k = rha((clamp(x, lo, hi) - lo) / scale) + ql_min - zero_point``, value
        ``k * scale``: the forward as the integer engine runs it. ``ValueError`` for
        per-channel ranges (no single grid)."""
        if self.qr_min.numel() != 1:
            raise ValueError("per-channel activation ranges have no single grid")
        scale, zp, lo, hi = (float(t) for t in self.grid(torch.zeros(())))
        kofs = self.ql_min - int(zp)
        return lo, hi, lo, scale, kofs, kofs, self.ql_max - int(zp)

    def infer(self, x: Tensor) -> Tensor:
        """The evaluation forward without autograd or range updates (inference paths):
        :func:`fewbits._math.min_max` on the stored ranges, ties away from zero."""
        with torch.no_grad():
            scale, _, lo, hi = self.grid(x)
            return _math.min_max(x, scale, lo, hi)

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

    # the family protocol (fewbits.quantizers.base.Quantizer)
    uniform = True

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        return {torch.ops.fewbits.min_max.default: min_max_onnx}

    def integer_weight(self, w: Tensor, codes: Codes | None = None
                       ) -> tuple[Tensor, Tensor] | None:
        """``int_repr - zero_point`` of :meth:`affine` and its scale, one per output channel
        (the value up to one float rounding)."""
        w = w.detach().float()
        a = self.affine(codes if codes is not None else self.encode(w))
        view = (-1,) + (1,) * (w.dim() - 1) if a.axis is not None else ()
        return (a.int_repr - a.zero_point.reshape(view),
                a.scale.reshape(-1).float().expand(w.shape[0]).clone())

    def onnx_act(self, op: Any, x: Any) -> tuple[Any, str]:
        """``Clip`` to ``[lo, hi]``, ``Sub``, ``Div``, exact rounding, ``Mul``, ``Add``, then
        (grids of at most 16 bits) ``QuantizeLinear`` / ``DequantizeLinear`` of those grid
        values: ``QuantizeLinear`` alone rounds ties half to even. Per tensor only."""
        if self.qr_min.numel() != 1:
            raise ValueError("per-channel min-max activation ranges cannot be exported")
        _, _, lo, hi = (float(t) for t in self.grid(torch.zeros(())))
        grid = self.int_grid()
        kind = int_type(grid.qmin, grid.qmax)
        c = op.Clip(x, const(op, lo), const(op, hi))
        lo_c, s_c = const(op, lo), const(op, grid.scale)
        r = round_half_away(op, op.Div(op.Sub(c, lo_c), s_c))
        v = op.Add(op.Mul(r, s_c), lo_c)
        if kind is not None:  # QuantizeLinear alone rounds ties half to even: a level off
            return qdq(op, v, grid.scale, int(grid.zero_point), kind), \
                f"Clip + exact rounding + {qdq_type(kind)} Q/DQ"
        return v, "Clip + exact rounding (float)"

    def affine(self, codes: Codes) -> AffineCodes:
        """``int_repr = q + ql_min`` with the encoded scale and zero point, one per output
        channel (``axis=0``) for per-channel ranges."""
        scale = codes.params["scale"].reshape(-1).float()
        zp = codes.params["zero_point"].reshape(-1).to(torch.int64)
        per_channel = scale.numel() > 1
        return AffineCodes(codes.codes.reshape(codes.shape) + self.ql_min,
                           scale if per_channel else scale[0], zp if per_channel else zp[0],
                           0 if per_channel else None, self.ql_min, self.ql_max)
