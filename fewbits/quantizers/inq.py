"""Incremental Network Quantization: the mask of fixed weights, their power-of-two values and
the schedule (the seed's :data:`INQ_ITERATIONS`) that fixes more of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import check_bits, check_finite, in_onnx_export
from ..ops import inq_op as qf
from ..ops._core import recomputing
from ..ops.onnx_form import const
from .base import Codes, Quantizer, register_quantizer

__all__ = [
    "INQ",
    "INQ_ITERATIONS",
    "INQ_SELECTIONS",
]


#: The seed's INQ schedule: the iterations at which more weights are fixed.
INQ_ITERATIONS = (5000, 6000, 7000, 8000, 9000)
INQ_SELECTIONS = ("largest_abs", "random")

# --------------------------------------------------------------------------- ONNX translations
# PyTorch's exporter writes these for the family's operators (onnx_translations below).

def _floor_log2(op: Any, a: Any) -> tuple[Any, Any]:
    """``(k, 2^k)`` with ``k = floor(log2 a)`` for ``a > 0`` (float32, exact): ``Log`` may be
    one off next to a power of two; exact comparisons correct it."""
    k = op.Floor(op.Mul(op.Log(a), const(op, 1.0 / math.log(2.0))))
    p = op.Pow(const(op, 2.0), k)
    over = op.Greater(p, a)
    k = op.Where(over, op.Sub(k, const(op, 1.0)), k)
    p = op.Where(over, op.Mul(p, const(op, 0.5)), p)
    up = op.LessOrEqual(op.Mul(p, const(op, 2.0)), a)
    return op.Where(up, op.Add(k, const(op, 1.0)), k), op.Where(up, op.Mul(p, const(op, 2.0)), p)


def inq_onnx(w: Any, num_bits: int, check: int, fn: str) -> Any:
    """:func:`fewbits._math.inq_levels`: ``frexp`` as :func:`_floor_log2`, the ``>= 0.75``
    mantissa test as ``a >= 1.5 * 2^k`` (exact)."""
    from onnxscript import opset18 as op  # only when exporting

    from ..ops.onnx import float32_only

    float32_only(w, "inq")
    a = op.Abs(w)
    s = op.ReduceMax(op.Reshape(a, const(op, [-1], np.int64)), keepdims=0)
    s = op.Where(op.Equal(s, const(op, 0.0)), const(op, 1.0), s)
    ks, ps = _floor_log2(op, s)
    n1 = op.Add(ks, op.Cast(op.GreaterOrEqual(s, op.Mul(ps, const(op, 1.5))), to=1))
    n2 = op.Sub(n1, const(op, float(2 ** (num_bits - 2) - 1)))
    prune = op.Pow(const(op, 2.0), op.Sub(n2, const(op, 1.0)))
    safe = op.Where(op.Equal(a, const(op, 0.0)), const(op, 1.0), a)
    kw, pw = _floor_log2(op, safe)
    kw = op.Add(kw, op.Cast(op.GreaterOrEqual(safe, op.Mul(pw, const(op, 1.5))), to=1))
    kw = op.Min(op.Max(kw, n2), n1)
    q = op.Mul(op.Sign(w), op.Pow(const(op, 2.0), kw))
    return op.Where(op.Less(a, prune), const(op, 0.0), q)


@register_quantizer("inq")
class INQ(Quantizer):
    """Incremental Network Quantization (Zhou et al., ICLR 2017) of one weight tensor.

    State: ``mask`` (bool, True = fixed), ``fixed`` (the power-of-two values of fixed weights) and
    ``counter``, the optimizer iterations done. At the first training forward of iteration
    ``counter`` equal to an entry of ``inq_iterations``, half of the still-learnable weights are
    fixed (``largest_abs``: those of largest ``|w|``; ``random``: each with probability 0.5),
    and all of them at the last entry. Fixed weights are quantized with
    :func:`fewbits.functional.inq_quantize` at that moment and never change again: the forward
    reads them from ``fixed``, so no optimizer (momentum, weight decay) can move them, and their
    gradient is zero. Evaluation forwards do not advance the counter. ``bits`` codes: ``0`` =
    zero, else ``[sign][exponent index]``.

    Counting iterations: by default each training forward is one iteration (a loop with one
    forward per optimizer step, as the seed's). With gradient accumulation (several forwards per
    step) call :func:`fewbits.layers.count_optimizer_steps` once before training and
    :func:`fewbits.layers.apply_weight_constraints` after every optimizer step (the trainer does
    both): the counter then advances once per step, and a fix never lands between the
    micro-batches of one step. Under DDP every rank then holds the same counter.

        >>> q = INQ(num_bits=4, inq_iterations=(0, 1)); w = torch.tensor([[0.9, -0.3, 0.2, 0.01]])
        >>> q.setup(w); _ = q(w); q.mask.tolist()           # first training forward: fix half
        [[True, True, False, False]]
    """

    weight_only = True
    weight_form = "power-of-two float constant"

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        return {torch.ops.fewbits.inq.default: inq_onnx}

    def __init__(self, num_bits: int = 4, inq_iterations: Sequence[int] = INQ_ITERATIONS,
                 selection: str = "largest_abs", seed: int = 0) -> None:
        super().__init__()
        check_bits("INQ", "num_bits", num_bits, low=2)
        its = [int(i) for i in inq_iterations]
        if not its or any(i < 0 for i in its) or sorted(set(its)) != its:
            raise ValueError(
                f"INQ: inq_iterations must be a non-empty, strictly increasing list of "
                f"iterations >= 0, got {list(inq_iterations)!r}"
            )
        if selection not in INQ_SELECTIONS:
            raise ValueError(f"INQ: unknown selection {selection!r}; known: {INQ_SELECTIONS}")
        self.num_bits, self.bits = int(num_bits), int(num_bits)
        self.inq_iterations, self.selection, self.seed = tuple(its), selection, int(seed)
        self.counter = 0
        self.stage = 0  # schedule entries applied: the next fix is at inq_iterations[stage]
        self.step_counted = False
        self.register_buffer("mask", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("fixed", torch.zeros(0))

    def _kwargs(self) -> dict[str, Any]:
        return {"num_bits": self.num_bits, "inq_iterations": list(self.inq_iterations),
                "selection": self.selection, "seed": self.seed}

    def setup(self, param: Tensor) -> None:
        self.mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        self.fixed = torch.zeros_like(param.detach())

    # The counter is a Python int kept in the state dict as extra state: reading a device
    # buffer every forward would sync the GPU. How it counts (step_counted) belongs to the
    # training loop, not to the model: a loaded state keeps the caller's choice.
    def get_extra_state(self) -> dict[str, int] | Tensor:
        # PyTorch's TorchScript exporter takes tensors only, as do safetensors files
        # (fewbits.hf sets tensor_extra_state on the INQ quantizers of a transformers model)
        if in_onnx_export() or getattr(self, "tensor_extra_state", False):
            return torch.tensor([self.counter, self.stage])
        return {"counter": self.counter, "stage": self.stage}

    def set_extra_state(self, state: dict[str, int] | Tensor) -> None:
        if isinstance(state, Tensor):  # [counter, stage]: ONNX export, safetensors (fewbits.hf)
            if state.numel() != 2 or state.is_floating_point():
                raise ValueError(f"INQ: a tensor extra state is [counter, stage] (2 integers), "
                                 f"got shape {tuple(state.shape)} {state.dtype}")
            state = {"counter": int(state[0]), "stage": int(state[1])}
        self.counter = int(state["counter"])
        # states saved before "stage" existed counted forwards: entries below the counter ran
        self.stage = int(state.get("stage", sum(i < self.counter for i in self.inq_iterations)))

    def init_from_(self, x: Tensor) -> None:
        """Start the schedule afresh for the tensor ``x``: nothing fixed, counter 0 (what a
        float checkpoint loaded under a converted layer needs: fixed values of the old weights
        would override the loaded ones)."""
        self.setup(x)
        self.counter, self.stage = 0, 0

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any
                              ) -> None:
        # args: local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        mine = [prefix + k for k in ("mask", "fixed", "_extra_state")]
        absent = not any(k in state_dict for k in mine)
        super()._load_from_state_dict(state_dict, prefix, *args)
        if absent:  # a float checkpoint: the layer restarts the schedule (init_from_)
            missing = args[2]
            for k in mine:
                if k in missing:
                    missing.remove(k)

    def count_optimizer_steps(self) -> None:
        self.step_counted = True

    def schedule(self) -> tuple[int, ...]:
        """``inq_iterations``: where more weights are fixed (the run must reach the last)."""
        return self.inq_iterations

    def after_optimizer_step(self) -> None:
        if self.step_counted:
            self.counter += 1

    @property
    def fixed_fraction(self) -> float:
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0

    def _fix_more(self, w: Tensor) -> None:
        learnable = ~self.mask
        if self.stage == len(self.inq_iterations) - 1:
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
        q = qf.inq_levels(current, self.num_bits, "INQ")
        self.fixed = torch.where(new, q, self.fixed)
        self.mask = self.mask | new

    def forward(self, w: Tensor) -> Tensor:
        if self.mask.shape != w.shape:
            raise RuntimeError(
                f"INQ state has shape {tuple(self.mask.shape)} but the weight has "
                f"{tuple(w.shape)}; attach INQ through a fewbits layer (it calls setup)"
            )
        check_finite(w, "INQ", "w")
        if self.training and not recomputing():  # a checkpoint's recompute: counted
            its = self.inq_iterations
            if self.stage < len(its) and its[self.stage] <= self.counter:
                with torch.no_grad():
                    self._fix_more(w.detach())
                self.stage += 1
            if not self.step_counted:
                self.counter += 1
        return torch.where(self.mask, self.fixed, w)

    def infer(self, x: Tensor) -> Tensor:
        """The forward's values without autograd and without advancing the schedule: fixed
        entries where the mask says so, ``x`` elsewhere (the base ``infer`` would run a training
        forward in train mode, counting an iteration and possibly fixing weights)."""
        if self.mask.shape != x.shape:
            raise RuntimeError(f"INQ state has shape {tuple(self.mask.shape)} but the weight has "
                               f"{tuple(x.shape)}")
        with torch.no_grad():
            return torch.where(self.mask, self.fixed, x)

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
