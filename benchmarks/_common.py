"""Shared helpers of the fewbits benchmarks: interleaved timing, peak memory, profiles, and the
Brevitas twins of the seed ResNet-23 (fewbits' own network with Brevitas layers swapped in).

Timing is *interleaved*: every round runs one training step of every candidate in turn (the
start rotating from round to round), so that a burst of load from another process on a shared
machine hits all candidates alike; ratios are taken inside each round and their median is
reported.

    >>> import torch
    >>> fns = {"a": lambda: torch.ones(10).sum(), "b": lambda: torch.ones(20).sum()}
    >>> t = interleave(fns, rounds=3, warmup=1, ref="a")
    >>> sorted(t.times), len(t.times["b"]), len(t.ratios()["b"])
    (['a', 'b'], 3, 3)
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Run from a checkout without installing: `python benchmarks/<script>.py` finds fewbits.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

__all__ = [
    "BREVITAS_PAIRS",
    "CLOCKS",
    "FLOAT_NET",
    "ROOT",
    "Step",
    "Timings",
    "brevitas_twin",
    "environment",
    "interleave",
    "median",
    "peak_memory",
    "profile_top",
    "quartiles",
    "seed_nets",
    "sync",
]

FLOAT_NET = "cifar10_resnet23_prediction"


def seed_nets() -> list[str]:
    """The float reference first, then the nine ``cifar10_<family>_resnet23_prediction``."""
    from fewbits.models import list_models

    return [FLOAT_NET, *list_models("cifar10_*_resnet23_prediction")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def quartiles(xs: Iterable[float]) -> tuple[float, float]:
    """(25th, 75th) percentile; both equal the value for fewer than two samples."""
    v = sorted(xs)
    if len(v) < 2:
        return (v[0], v[0]) if v else (float("nan"), float("nan"))
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[2]


@dataclass
class Step:
    """One training step of ``model``: zero grads, forward, cross entropy, backward, Adam step,
    weight constraints (what a training loop runs per batch, data excluded)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: Tensor
    y: Tensor
    device: torch.device
    forward: Callable[[Tensor], Tensor] | None = None  # e.g. a torch.compile'd model
    finite_checks: bool = True

    @classmethod
    def build(cls, model: nn.Module, batch: int, device: torch.device, seed: int = 0,
              compile_model: bool = False) -> Step:
        """``compile_model``: forward through ``torch.compile(model)`` with the quantizers' NaN
        checks off (each check reads a value on the host: a graph break per quantizer)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        model = model.to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        fwd = torch.compile(model) if compile_model else None
        return cls(model, opt, x, y, device, fwd, finite_checks=not compile_model)

    def __call__(self) -> None:
        from fewbits.functional import finite_checks
        from fewbits.layers import apply_weight_constraints

        self.optimizer.zero_grad(set_to_none=True)
        with finite_checks(self.finite_checks):
            out = (self.forward or self.model)(self.x)
            nn.functional.cross_entropy(out, self.y).backward()
        self.optimizer.step()
        apply_weight_constraints(self.model)

    def state_bytes(self) -> int:
        """Bytes alive between steps: parameters, buffers, optimizer state and the batch."""
        ts: list[Tensor] = [*self.model.parameters(), *self.model.buffers(), self.x, self.y]
        for st in self.optimizer.state.values():
            ts += [v for v in st.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in ts)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Timings:
    """Seconds per call, one sample per round, and, when a reference was interleaved, the
    reference's time next to each sample (mean of the reference calls just before and after)."""

    times: dict[str, list[float]]
    ref: str | None = None
    near: dict[str, list[float]] | None = None

    def ratios(self, ref: str | None = None) -> dict[str, list[float]]:
        """Per-round ratio of each candidate to the reference: to the adjacent reference calls
        when they were interleaved, else to the reference's call of the same round."""
        ref = ref or self.ref
        if ref is None:
            raise ValueError("no reference to take ratios to")
        if self.near is not None and ref == self.ref:
            return {n: [a / b for a, b in zip(ts, self.near[n], strict=True)]
                    for n, ts in self.times.items()}
        return {n: [a / b for a, b in zip(ts, self.times[ref], strict=True)]
                for n, ts in self.times.items()}


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
               device: torch.device | None = None, clock: str = "wall",
               ref: str | None = None) -> Timings:
    """Time each function round-robin: ``warmup`` untimed rounds, then ``rounds`` timed rounds;
    round ``r`` starts at the ``r``-th function so order effects cancel.

    With ``ref``, the reference runs before every other candidate and once more at the end of
    the round, and each candidate's time is paired with the mean of the two reference calls
    around it: on a machine shared with other jobs the load changes within seconds, and the
    adjacent pair cancels it far better than one reference call per round.

    ``clock="cpu"`` counts the CPU time of this process (all its threads) instead of wall time:
    time spent descheduled by other processes is not counted, which makes single-thread
    measurements on a busy machine far less noisy.
    """
    dev = device or torch.device("cpu")
    now = CLOCKS[clock]
    names = [n for n in fns if n != ref]

    def timed(n: str) -> float:
        sync(dev)
        t0 = now()
        fns[n]()
        sync(dev)
        return now() - t0

    for _ in range(warmup):
        for n in list(fns):
            fns[n]()
    sync(dev)
    times: dict[str, list[float]] = {n: [] for n in fns}
    near: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(rounds):
        k = r % max(1, len(names))
        order = names[k:] + names[:k]
        if ref is None:
            for n in order:
                times[n].append(timed(n))
            continue
        before = timed(ref)
        ref_times = [before]
        for n in order:
            t = timed(n)
            after = timed(ref)
            ref_times.append(after)
            times[n].append(t)
            near[n].append(0.5 * (before + after))
            before = after
        times[ref].append(median(ref_times))
        near[ref].append(times[ref][-1])
    return Timings(times, ref, near if ref is not None else None)


def peak_memory(fn: Callable[[], Any], device: torch.device, state_bytes: int) -> int:
    """Peak bytes of tensors alive while ``fn`` runs.

    CUDA: the allocator's peak. CPU: ``state_bytes`` (tensors alive before the call) plus the
    peak of the running sum of the CPU allocator's allocations and frees recorded by
    ``torch.profiler`` during the call.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return state_bytes + peak


def profile_top(fn: Callable[[], Any], steps: int = 3, top: int = 12,
                device: torch.device | None = None) -> list[dict[str, Any]]:
    """The ``top`` operators by self time (ms per step) over ``steps`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    dev = device or torch.device("cpu")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    fn()
    sync(dev)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(dev)
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in prof.key_averages()) or 1.0
    return [{"op": e.key, "ms_per_step": getattr(e, attr) / 1e3 / steps,
             "share": getattr(e, attr) / total, "calls_per_step": e.count / steps}
            for e in rows[:top]]


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "../fewbits"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import brevitas

        env["brevitas"] = brevitas.__version__
    except ImportError:
        env["brevitas"] = None
    return env


# --------------------------------------------------------------------------- Brevitas twins

#: Brevitas configurations benchmarked, each against the fewbits net of the same quantization.
BREVITAS_PAIRS: dict[str, tuple[str, str]] = {
    "fixed_point_const": (
        "cifar10_fp_net_resnet23_prediction",
        "8-bit fixed-point weights+activations, constant step 2^-4 (fewbits' quantization)",
    ),
    "fixed_point_stock": (
        "cifar10_fp_net_resnet23_prediction",
        "Brevitas stock Int8WeightPerTensorFixedPoint + Int8ActPerTensorFixedPoint "
        "(power-of-two scale from max|w| / learned)",
    ),
    "binary_connect": (
        "cifar10_binary_connect_resnet23_prediction",
        "binary weights sign(w), scale 1",
    ),
    "binary_weight": (
        "cifar10_binary_weight_resnet23_prediction",
        "binary weights, per-channel scale mean|w| (XNOR BWN)",
    ),
}


def _brevitas_quants(kind: str) -> tuple[Any, Any, Any]:
    """(weight_quant, act_quant or None, bias_quant or None) Brevitas injectors for ``kind``."""
    from brevitas.core.function_wrapper import TensorClamp
    from brevitas.inject.enum import ScalingImplType, ScalingPerOutputType, StatsOp
    from brevitas.quant import (
        Int8ActPerTensorFixedPoint,
        Int8BiasPerTensorFixedPointInternalScaling,
        Int8WeightPerTensorFixedPoint,
        SignedBinaryWeightPerTensorConst,
    )

    if kind == "fixed_point_stock":
        return (Int8WeightPerTensorFixedPoint, Int8ActPerTensorFixedPoint,
                Int8BiasPerTensorFixedPointInternalScaling)
    if kind == "fixed_point_const":
        # Threshold 8 / 2**7 (signed 8-bit power-of-two int scaling) = step 2**-4, range
        # [-127, 127] steps: fewbits' fixed_point_quantize(n=8, delta=2**-4) but for ties.
        class W(Int8WeightPerTensorFixedPoint):
            scaling_impl_type = ScalingImplType.CONST
            scaling_const = 8.0

        class A(Int8ActPerTensorFixedPoint):
            scaling_impl_type = ScalingImplType.CONST
            scaling_const, min_val, max_val = 8.0, -8.0, 8.0
            narrow_range = True

        class B(Int8BiasPerTensorFixedPointInternalScaling):
            scaling_impl_type = ScalingImplType.CONST
            scaling_const = 8.0
            narrow_range = True

        return W, A, B
    if kind == "binary_connect":
        class BC(SignedBinaryWeightPerTensorConst):
            scaling_const = 1.0
            tensor_clamp_impl = TensorClamp  # do not clip the latent weights in place

        return BC, None, None
    if kind == "binary_weight":
        class BW(SignedBinaryWeightPerTensorConst):
            scaling_impl_type = ScalingImplType.STATS
            scaling_stats_op = StatsOp.AVE
            scaling_per_output_type = ScalingPerOutputType.CHANNEL
            scaling_min_val = 1e-10
            tensor_clamp_impl = TensorClamp

        return BW, None, None
    raise ValueError(f"unknown Brevitas configuration {kind!r}; known: {list(BREVITAS_PAIRS)}")


def brevitas_twin(kind: str) -> nn.Module:
    """The fewbits network that ``kind`` is paired with (:data:`BREVITAS_PAIRS`), built by
    fewbits (``create_model``: the stage table ``RESNET23_UNITS`` and the family's recipe),
    with every quantized layer swapped for its Brevitas counterpart and the weights copied:
    ``QuantConv2d`` / ``QuantLinear`` -> ``brevitas.nn.QuantConv2d`` / ``QuantLinear`` with the
    configuration's weight (and bias) quantizer, ``QuantAct`` -> ``brevitas.nn.QuantIdentity``.
    So both sides of a comparison have one architecture, declared once."""
    import brevitas.nn as bnn

    from fewbits.layers import QuantAct, QuantConv2d, QuantLinear
    from fewbits.models import create_model

    if kind not in BREVITAS_PAIRS:
        raise ValueError(f"unknown Brevitas configuration {kind!r}; known: "
                         f"{list(BREVITAS_PAIRS)}")
    wq, aq, bq = _brevitas_quants(kind)
    model = create_model(BREVITAS_PAIRS[kind][0])

    def twin(m: nn.Module) -> nn.Module | None:
        if isinstance(m, QuantAct):
            if aq is None:
                raise ValueError(f"{kind}: the fewbits net quantizes activations, the "
                                 "Brevitas configuration has no activation quantizer")
            return bnn.QuantIdentity(act_quant=aq, return_quant_tensor=False)
        if isinstance(m, QuantConv2d):
            t = bnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                padding=m.padding, dilation=m.dilation, groups=m.groups,
                                bias=m.bias is not None, weight_quant=wq)
        elif isinstance(m, QuantLinear):
            t = bnn.QuantLinear(m.in_features, m.out_features, bias=m.bias is not None,
                                weight_quant=wq, bias_quant=bq if m.bias is not None else None)
        else:
            return None
        with torch.no_grad():
            t.weight.copy_(m.weight)
            if m.bias is not None:
                t.bias.copy_(m.bias)
        return t

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = twin(child)
            if new is not None:
                setattr(parent, name, new)
    model.fewbits_spec = None  # no longer a fewbits model: export refuses it
    return model
