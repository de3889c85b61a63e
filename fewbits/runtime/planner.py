"""Pick the fastest exact way to run a fewbits network on this CPU.

:func:`compile_for_cpu` builds every candidate backend of :data:`CANDIDATES` that applies,
checks each against the PyTorch model on a probe batch (logits within :func:`tolerance`), times
the ones that pass on a batch of ``batch_size`` and returns the fastest as a :class:`Deployed`
callable. A candidate is a function ``Context -> runner`` that raises (any ``Exception``) with
the reason when it cannot run the model; the reasons end up in :attr:`Deployed.notes`.

Candidates today:
* ``openvino`` -- OpenVINO on the fused ONNX export (optional: the ``bench`` extra; by name
  only, see :data:`AUTO`);
* ``ort``      -- ONNX Runtime on the fused ONNX export (:mod:`fewbits.export.onnx_qdq`: batch
  norm folded, QDQ that ONNX Runtime turns into ``QLinearConv``);
* ``ort-checked`` -- the same with fixed-point residual sums as uint8 ``QLinearAdd`` (every
  convolution after the stem then runs in int8), recomputed with ``ort``'s graph for a batch
  where a sum may have saturated (:class:`~fewbits.runtime.ort.CheckedRunner`);
* ``ort-plain`` -- ONNX Runtime on the plain export (PyTorch's exporter with fewbits' exact
  operators): any model ``torch.export`` captures, inputs of any kind (token ids stay integer),
  outputs of any structure (tensor, tuple, dict, HF ``ModelOutput``) rebuilt as PyTorch returns
  them (``auto`` tries it where neither fused ONNX Runtime form applies);
* ``torch``    -- the PyTorch model itself (always applies; the reference).

Example inputs: by default a batch of images of the model's input shape; ``example_inputs``
(a tensor, a tuple of arguments or a dict of keyword arguments) for any other model. Outputs are
compared leaf by leaf: each leaf within :func:`tolerance` of its own largest value.

* ``int``      -- the native integer engine (:class:`~fewbits.runtime.integer.IntegerEngine`:
  int16 codes, int32 sums, batch norm and quantizers folded; fixed point and min-max grids);
* ``binary``   -- the native BinaryNet engine (:class:`~fewbits.runtime.binary.BinaryEngine`:
  XNOR-popcount on bit-packed activations, batch norm folded into exact integer thresholds; one
  native call per batch); applies to binary_net networks only.

Plugging in another backend is one entry of :data:`CANDIDATES` (and of :data:`AUTO`)
(a runner is any callable ``images -> logits``; :func:`tolerance` bounds it like the ONNX
backends; a backend computing PyTorch's own arithmetic bit for bit may join :data:`EXACT`).

    >>> from fewbits.models import create_model
    >>> fast = compile_for_cpu(create_model("mnist_fp_net_mlp", width=32), batch_size=4)
    >>> fast.backend in CANDIDATES, fast(torch.rand(3, 1, 28, 28)).shape
    (True, torch.Size([3, 10]))
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..export.onnx import input_shape_of, resolve_source, to_onnx
from ..layers import QuantAct, quant_layers
from .binary import BinaryEngine
from .integer import IntegerEngine
from .ort import CheckedRunner, Runner, openvino_runner, ort_runner, plain_runner

__all__ = ["AUTO", "CANDIDATES", "EXACT", "Context", "Deployed", "compile_for_cpu", "leaf_error",
           "tolerance"]

#: Relative logit tolerance (of ``max |logit|``) when activations are quantized: the fused
#: export may put a value lying within float rounding of a level boundary (or on a tie, where
#: ``QuantizeLinear`` rounds half to even) on the neighbouring level; measured below 0.05 on
#: the seed networks (docs/PERFORMANCE.md).
QUANTIZED_RTOL = 0.08
#: ... and when only weights are quantized (float activations): float rounding only.
FLOAT_RTOL = 1e-3
#: Backends that compute PyTorch's own arithmetic (tolerance 0).
EXACT = frozenset({"torch"})


@dataclass
class Context:
    """What a candidate gets: the PyTorch model (eval mode), the source it came from (a
    ``.fewbits`` file keeps the integer codes), the thread count and the fused ONNX graph
    (built once, on first use)."""

    model: nn.Module
    source: Any
    threads: int | None = None
    input_shape: tuple[int, ...] | None = None
    _protos: dict = field(default_factory=dict)
    example: Any = None  # the example inputs of a model that does not take one image batch

    def proto(self, flavour: str = "ort") -> Any:
        """The fused ONNX export: ``"ort"``, ``"checked"`` (checked uint8 residual sums) or
        ``"openvino"``."""
        if flavour not in self._protos:
            if self.example is not None:
                raise ValueError("the fused ONNX form takes one image batch; this model takes "
                                 "other inputs (the 'ort-plain' backend runs it)")
            fuse = "openvino" if flavour == "openvino" else True
            self._protos[flavour] = to_onnx(self.source, fuse=fuse,
                                            checked_sums=flavour == "checked",
                                            input_shape=self.input_shape)[0]
        return self._protos[flavour]


def _torch(ctx: Context) -> Runner:
    model = ctx.model

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return model(*args, **kwargs)

    return run


def _ort(ctx: Context) -> Runner:
    return ort_runner(ctx.proto(), ctx.threads)


def _ort_checked(ctx: Context) -> Runner:
    run = CheckedRunner(ctx.proto("checked"), ctx.proto(), ctx.threads)
    if not run.checked:
        raise ValueError("no residual sum of two uint8 grids to check (same graph as 'ort')")
    return run


def _ort_plain(ctx: Context) -> Runner:
    example = ctx.example if ctx.example is not None else \
        torch.rand(2, *ctx.input_shape, generator=torch.Generator().manual_seed(0))
    return plain_runner(to_onnx(ctx.model, example)[0], ctx.model, example, ctx.threads)


def _binary(ctx: Context) -> Runner:
    return BinaryEngine.from_model(ctx.model)  # raises ValueError with the reason


def _int(ctx: Context) -> Runner:
    if ctx.input_shape is None:
        raise ValueError("the integer engine takes one image batch")
    return IntegerEngine.from_model(ctx.model, ctx.input_shape)  # ValueError names the op


def _openvino(ctx: Context) -> Runner:
    return openvino_runner(ctx.proto("openvino"), ctx.threads)


#: name -> builder, in the order they are tried (ties in speed go to the earlier one).
CANDIDATES: dict[str, Callable[[Context], Runner]] = {
    "binary": _binary,
    "int": _int,
    "openvino": _openvino,
    "ort-checked": _ort_checked,
    "ort": _ort,
    "ort-plain": _ort_plain,
    "torch": _torch,
}
#: What ``backend="auto"`` tries. Not OpenVINO: once its worker threads exist, a SIGTERM raised
#: later in the same process (fewbits' own interrupt handling in training) crashes it; ask for
#: it by name (``backend="openvino"``) or through ``candidates``.
AUTO = ("binary", "int", "ort-checked", "ort", "ort-plain", "torch")


def _quantizes_activations(model: nn.Module) -> bool:
    if any(isinstance(m, QuantAct) and m.quantizer is not None for m in model.modules()):
        return True
    return any(layer.input_quantizer is not None or layer.output_quantizer is not None
               for _, layer in quant_layers(model))


def tolerance(model: nn.Module, backend: str) -> float:
    """Allowed ``max |logits - PyTorch logits| / max |PyTorch logits|`` of ``backend``."""
    if backend in EXACT:
        return 0.0
    return QUANTIZED_RTOL if _quantizes_activations(model) else FLOAT_RTOL


@dataclass
class Deployed:
    """A network ready to run: ``deployed(images) -> logits`` (float32 ``(N, C, H, W)``), or
    for another model ``deployed(*args, **kwargs)`` as the model is called, returning what it
    returns."""

    backend: str
    run: Runner
    tolerance: float
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    fewbits_spec: dict | None = None

    @property
    def kind(self) -> str:
        """The backend's name (what ``fewbits eval --fast`` reports as ``fast_path``)."""
        return self.backend

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(*args, **kwargs)


def _probe_shape(model: nn.Module) -> tuple[int, ...]:
    return input_shape_of(model)


def _call_args(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


def leaf_error(got: Any, ref: Any) -> float:
    """The largest ``max |got - ref| / max |ref|`` over the tensor leaves of two outputs of the
    same structure (tensor, tuple, dict, HF ``ModelOutput``); ``inf`` where the structures or
    shapes differ."""
    from torch.utils._pytree import tree_flatten

    g, _ = tree_flatten(got)
    r, _ = tree_flatten(ref)
    if len(g) != len(r):
        return float("inf")
    err = 0.0
    for a, b in zip(g, r, strict=True):
        if not isinstance(b, Tensor):
            if a != b:
                return float("inf")
            continue
        if not isinstance(a, Tensor) or a.shape != b.shape:
            return float("inf")
        if b.numel():
            scale = float(b.abs().max()) or 1.0
            err = max(err, float((a.double() - b.double()).abs().max()) / scale)
    return err


def _median_time(run: Runner, x: tuple[tuple, dict], repeats: int = 3) -> float:
    run(*x[0], **x[1])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(*x[0], **x[1])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compile_for_cpu(source: nn.Module | str | os.PathLike, *, backend: str = "auto",
                    threads: int | None = None, batch_size: int = 64,
                    input_shape: tuple[int, int, int] | None = None,
                    candidates: tuple[str, ...] = AUTO, example_inputs: Any = None) -> Deployed:
    """The fastest exact-enough CPU form of ``source`` (model, ``.fewbits`` file, run folder or
    checkpoint). ``backend="auto"`` times every candidate that passes the probe (logits
    within :func:`tolerance` of PyTorch's on 16 seeded random images) on a batch of
    ``batch_size`` and keeps the fastest (among ``candidates``, default :data:`AUTO`); a name
    from :data:`CANDIDATES` forces that one
    (raising with the reason if it cannot run). ``threads``: the runtime's intra-op threads
    (PyTorch's are the caller's). ``example_inputs`` (a tensor, a tuple of arguments or a dict
    of keyword arguments) for a model that does not take one image batch: they are the probe
    and the timing batch. Raises ``ValueError`` for an unknown backend.
    """

    if backend != "auto" and backend not in CANDIDATES:
        raise ValueError(f"unknown backend {backend!r}; known: auto, {', '.join(CANDIDATES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, _ = resolve_source(source)
    model = model.eval()
    g = torch.Generator().manual_seed(0)
    if example_inputs is not None:
        if input_shape is not None:
            raise ValueError("give example_inputs or input_shape, not both")
        shape, probe = None, _call_args(example_inputs)
    else:
        shape = tuple(input_shape) if input_shape is not None else _probe_shape(model)
        probe = ((torch.rand(16, *shape, generator=g),), {})
    with torch.inference_mode():
        ref = model(*probe[0], **probe[1])
    ctx = Context(model, source, threads, shape, example=example_inputs)
    unknown = sorted(set(candidates) - set(CANDIDATES))
    if unknown:
        raise ValueError(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    names = [n for n in CANDIDATES if n in candidates] if backend == "auto" else [backend]
    built: dict[str, tuple[Runner, float]] = {}
    notes: list[str] = []
    for name in names:
        if backend == "auto" and name == "ort-plain" and {"ort", "ort-checked"} & set(built):
            continue  # the fused form runs it faster; the plain one is for the others
        tol = tolerance(model, name)
        try:
            run = CANDIDATES[name](ctx)
            err = leaf_error(run(*probe[0], **probe[1]), ref)
        except Exception as e:  # each candidate's reason for not applying
            if backend != "auto":
                raise RuntimeError(f"backend {name!r} cannot run this model: {e}") from e
            notes.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if err > tol:
            msg = f"{name}: logits differ by {err:.3g} of their range (tolerance {tol:.3g})"
            if backend != "auto":
                raise RuntimeError(msg)
            notes.append(msg)
            continue
        built[name] = (run, tol)
    timings: dict[str, float] = {}
    if len(built) > 1:
        x = ((torch.rand(batch_size, *shape, generator=g),), {}) if shape is not None else probe
        timings = {name: _median_time(run, x) for name, (run, _) in built.items()}
        best = min(timings, key=timings.__getitem__)
    else:
        best = next(iter(built))
    run, tol = built[best]
    return Deployed(best, run, tol, notes, timings, getattr(model, "fewbits_spec", None))
