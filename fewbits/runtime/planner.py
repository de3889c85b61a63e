"""Pick the fastest exact way to run a fewbits network on this CPU.

:func:`compile_for_cpu` builds every candidate backend of :data:`CANDIDATES` that applies,
checks each against the PyTorch model on a probe batch (:func:`check_outputs`: logits within
:func:`tolerance` and top-1 agreement of at least :data:`MIN_TOP1_AGREEMENT`), times the ones
that pass on a batch of ``batch_size``, checks them again on that batch, and returns the
fastest as a :class:`Deployed` callable. A candidate is a function ``Context -> runner`` that
raises with the reason when it cannot run the model (``ValueError``: the model has something
it does not cover, named; anything else also warns); why each candidate was left out (not
covered, tolerance exceeded with the numbers, slower with the times) is in
:attr:`Deployed.notes`.

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

Another backend is one entry of :data:`CANDIDATES` and :data:`AUTO` (a runner: any callable
``images -> logits``, bounded by :func:`tolerance`; one exact bit for bit may join :data:`EXACT`).

    >>> from fewbits.models import create_model
    >>> fast = compile_for_cpu(create_model("mnist_fp_net_mlp", width=32), batch_size=4)
    >>> fast.backend in CANDIDATES, fast(torch.rand(3, 1, 28, 28)).shape
    (True, torch.Size([3, 10]))
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._cbuild import IsaError
from ..export.onnx import (
    ResolvedSource,
    input_shape_of,
    modes_kept,
    resolve_source,
    to_onnx,
    to_onnx_forms,
)
from .agreement import (  # noqa: F401 (QUANTIZED_RTOL, FLOAT_RTOL: read from here too)
    FLOAT_RTOL,
    MIN_TOP1_AGREEMENT,
    QUANTIZED_RTOL,
    check_outputs,
    checked_probe,
    initial_statistics_hint,
    leaf_error,
    relative_tolerance,
    top1_agreement,
    top1_flips,
)
from .binary import BinaryEngine
from .integer import IntegerEngine
from .ort import CheckedRunner, Runner, openvino_runner, ort_runner, plain_runner

__all__ = ["AUTO", "CANDIDATES", "EXACT", "MIN_TOP1_AGREEMENT", "PROBE_SIZE", "Context",
           "Deployed", "check_outputs", "compile_for_cpu", "leaf_error", "probe_images",
           "tolerance", "top1_agreement"]

#: Seeded probe inputs :func:`compile_for_cpu` checks every backend on (:func:`probe_images`).
PROBE_SIZE = 32
#: Backends that compute PyTorch's own arithmetic (tolerance 0).
EXACT = frozenset({"torch"})


@dataclass
class Context:
    """What a candidate gets: the PyTorch model (eval mode), the resolved source it came from
    (a ``.fewbits`` file keeps the integer codes; its ``exports`` hold the ONNX graphs, built
    once per source on first use), the thread count and the input shape."""

    model: nn.Module
    source: ResolvedSource
    threads: int | None = None
    input_shape: tuple[int, ...] | None = None
    example: Any = None  # the example inputs of a model that does not take one image batch

    def proto(self, flavour: str = "ort") -> Any:
        """The fused ONNX export: ``"ort"``, ``"checked"`` (checked uint8 residual sums) or
        ``"openvino"``."""
        if self.example is not None:
            raise ValueError("the fused ONNX runners feed one image batch; this model takes "
                             "other inputs (the 'ort-plain' backend runs it)")
        key = ("fused", self.input_shape)  # kept on the resolved source: one export per source
        if key not in self.source.exports:
            # one export by PyTorch, the three fused forms passes over it
            forms = {"ort": (True, False), "checked": (True, True),
                     "openvino": ("openvino", False)}
            protos = to_onnx_forms(self.source, list(forms.values()),
                                   input_shape=self.input_shape)
            self.source.exports[key] = {k: p for k, (p, _) in zip(forms, protos, strict=True)}
        return self.source.exports[key][flavour]


def _torch(ctx: Context) -> Runner:
    model = ctx.model
    # one call at a time: a call starting while another had put the model in eval mode saw
    # nothing to give back, and ran on in training mode once the first gave the flags back
    # (wrong outputs, the user's batch-norm statistics updated); PyTorch's own threads still
    # run each call
    lock = threading.Lock()

    def run(*args: Any, **kwargs: Any) -> Any:
        with lock, torch.inference_mode(), modes_kept(model):
            if any(m.training for m in model.modules()):  # put back in training by its user
                model.eval()
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
    key = ("plain", ctx.input_shape)  # an image model's plain graph, reused as the fused ones
    proto = ctx.source.exports.get(key) if ctx.example is None else None
    if proto is None:
        proto = to_onnx(ctx.model, example)[0]
        if ctx.example is None:
            ctx.source.exports[key] = proto
    return plain_runner(proto, ctx.model, example, ctx.threads)


def _binary(ctx: Context) -> Runner:
    if ctx.example is not None:
        raise ValueError("the binary engine takes one float image batch")
    # raises ValueError naming the operation it does not cover
    return BinaryEngine.from_model(ctx.model, input_shape=ctx.input_shape)


def _int(ctx: Context) -> Runner:
    if ctx.input_shape is None:
        raise ValueError("the integer engine takes one image batch")
    # a packed file's model has no weight quantizers left: its stored codes stand in
    return IntegerEngine.from_model(ctx.model, ctx.input_shape, codes=ctx.source.codes)


def _openvino(ctx: Context) -> Runner:
    return openvino_runner(ctx.proto("openvino"), ctx.threads)


#: name -> builder, in the order they are tried (ties in speed go to the earlier one).
CANDIDATES: dict[str, Callable[[Context], Runner]] = {
    "binary": _binary, "int": _int, "openvino": _openvino, "ort-checked": _ort_checked,
    "ort": _ort, "ort-plain": _ort_plain, "torch": _torch}
#: What ``backend="auto"`` tries. Not OpenVINO: once its worker threads exist, a SIGTERM raised
#: later in the same process (fewbits' own interrupt handling in training) crashes it; ask for
#: it by name (``backend="openvino"``) or through ``candidates``.
AUTO = ("binary", "int", "ort-checked", "ort", "ort-plain", "torch")


def tolerance(model: nn.Module, backend: str) -> float:
    """Allowed ``max |logits - PyTorch logits| / max |PyTorch logits|`` of ``backend``."""
    if backend in EXACT:
        return 0.0
    return relative_tolerance(model)


@dataclass
class Deployed:
    """A network ready to run: ``deployed(images) -> logits`` (float32 ``(N, C, H, W)``), or
    for another model ``deployed(*args, **kwargs)`` as the model is called, returning what it
    returns. Every backend but ``"torch"`` holds a copy of the model as it was when compiled: a
    later change to its weights or statistics does not reach it (compile again)."""

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


def probe_images(n: int, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """``n`` seeded probe inputs of per-sample ``shape`` in ``[0, 1]``: every other one i.i.d.
    uniform noise, the rest smooth noise (uniform noise at 1/8 .. 1/2 of the size, upsampled
    bilinearly) where ``shape`` is ``(C, H, W)`` with ``H, W >= 8``; those others in 8-bit
    pixels ``uint8 / 255`` as decoded images (checks the integer engine's codes path too).

    Why smooth: a net trained on images answers pixel noise with nearly one class and small
    activations, where a backend's level flips stay few; image-like inputs drive it where real
    data do (measured on a min-max ResNet-23 a few Adam steps into training: ONNX Runtime's
    fused path gave 97 % top-1 agreement on uniform noise, 42-55 % on smooth noise and 69 % on
    CIFAR-10 test images)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    if len(shape) == 3 and min(shape[1:]) >= 8:
        for i in range(1, n, 2):
            f = (2, 4, 8)[(i // 2) % 3]
            small = torch.rand(1, shape[0], max(1, shape[1] // f), max(1, shape[2] // f),
                               generator=g)
            x[i] = nn.functional.interpolate(small, size=shape[1:], mode="bilinear",
                                             align_corners=False)[0]
    x[1::2] = (x[1::2] * 255).round().to(torch.uint8).float() / 255
    return x


def _call_args(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


#: Timed calls per candidate, round-robin over the candidates (see :func:`_best_times`).
TIMING_ROUNDS = 4


def _best_times(runs: Mapping[str, Runner], x: tuple[tuple, dict],
                rounds: int = TIMING_ROUNDS, one_thread: bool = False
                ) -> tuple[dict[str, float], dict[str, Any]]:
    """Each runner's fastest of ``rounds`` timed calls, the runners taking turns, and its
    output (of an untimed first call). On a machine shared with other jobs a call is slowed
    only by being descheduled, so the minimum is the estimate; taking turns exposes every
    candidate to the same load (the median of 3 calls in a row let one burst of load decide:
    min-max ResNet-23 went to OpenVINO 1.2x slower than the integer engine). ``one_thread``
    (every candidate on one thread): CPU time of the process, which time spent descheduled
    does not inflate (by wall time, under load 3.7 on 2 cores, OpenVINO's 66 ms of CPU beat
    the integer engine's 49)."""
    now = time.process_time if one_thread else time.perf_counter
    outs = {name: run(*x[0], **x[1]) for name, run in runs.items()}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = now()
            run(*x[0], **x[1])
            best[name] = min(best[name], now() - t0)
    return best, outs


def compile_for_cpu(source: nn.Module | str | os.PathLike, *, backend: str = "auto",
                    threads: int | None = None, batch_size: int = 64,
                    input_shape: tuple[int, int, int] | None = None,
                    candidates: tuple[str, ...] = AUTO, example_inputs: Any = None,
                    probe_inputs: Tensor | None = None) -> Deployed:
    """The fastest exact-enough CPU form of ``source`` (model, ``.fewbits`` file, run folder or
    checkpoint).

    ``backend="auto"`` builds every candidate (among ``candidates``, default :data:`AUTO`),
    keeps those whose outputs pass :func:`check_outputs` against PyTorch's (logits within
    :func:`tolerance` and top-1 agreement of at least :data:`MIN_TOP1_AGREEMENT`) on the probe
    (:func:`probe_images`: 32 seeded noise and smooth-noise images, plus ``probe_inputs``), times
    them on a batch of ``batch_size`` (made of ``probe_inputs`` where given), checks each
    output on that batch against PyTorch's again (a lone candidate too, where the batch is
    larger than the probe; top-1 agreement is a rate over the probe's ``n`` rows, which the
    batch repeats: a row flipped in either check counts once; ``floor(0.005 n)`` flips
    allowed: none below 200, so
    give a few hundred ``probe_inputs`` to tell 99.9 % from 99.2 %), and keeps the fastest.
    Every candidate left out gets a line in :attr:`Deployed.notes` saying why:
    ``operation not covered: ...``,
    ``tolerance exceeded on the probe: ...`` (with the numbers) or ``slower: ...`` (with the
    times). A candidate that fails for another reason than not covering the model (a missing
    package, a failed native build) also warns (``RuntimeWarning``): no fast path drops
    silently.

    A name from :data:`CANDIDATES` forces that one (raising with the reason if it cannot run).
    ``threads``: the runtime's intra-op threads (PyTorch's are the caller's).
    ``example_inputs`` (a tensor, a tuple of arguments or a dict of keyword arguments) for a
    model that does not take one image batch: they are the probe and the timing batch.
    ``probe_inputs``: real inputs (one float image batch, as the model takes them), which are
    what tells a backend's level flips on a trained net; ``fewbits eval --fast`` passes the
    first images of the split. Raises ``ValueError`` for an unknown backend.

    Given a :class:`~fewbits.export.onnx.ResolvedSource` (``resolve_source(model)``), every
    call reuses the ONNX graphs the first one exported from it (PyTorch's exporter takes seconds
    per network); given a model, each call exports it afresh.
    """

    if backend != "auto" and backend not in CANDIDATES:
        raise ValueError(f"unknown backend {backend!r}; known: auto, {', '.join(CANDIDATES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # the model runs in eval mode here; a model given mid-training gets its modules'
    # train/eval flags back (it went on training with frozen batch-norm statistics, silently)
    with modes_kept(source):
        source = resolve_source(source)  # once: every backend below reads this object
        return _plan(source, backend, threads, batch_size, input_shape, candidates,
                     example_inputs, probe_inputs)


def _plan(source: ResolvedSource, backend: str, threads: int | None, batch_size: int,
          input_shape: tuple[int, ...] | None, candidates: tuple[str, ...],
          example_inputs: Any, probe_inputs: Tensor | None) -> Deployed:
    model = source.model.eval()
    if example_inputs is not None:
        if input_shape is not None or probe_inputs is not None:
            raise ValueError("give example_inputs, or input_shape / probe_inputs, not both")
        shape, probe, x = None, _call_args(example_inputs), None
    else:
        shape = tuple(input_shape) if input_shape is not None else _probe_shape(model)
        x = probe_images(PROBE_SIZE, shape)
        if probe_inputs is not None:
            x = torch.cat([x, checked_probe(probe_inputs, shape)])
        probe = ((x,), {})
    with torch.inference_mode():
        ref = model(*probe[0], **probe[1])
    ctx = Context(model, source, threads, shape, example=example_inputs)
    unknown = sorted(set(candidates) - set(CANDIDATES))
    if unknown:
        raise ValueError(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    names = [n for n in CANDIDATES if n in candidates] if backend == "auto" else [backend]
    built: dict[str, tuple[Runner, float]] = {}
    seen: dict[str, Tensor | None] = {}  # top-1 flips on the probe's rows
    notes: list[str] = []
    alone: dict[int, Tensor] = {}  # probe rows run alone (_check)

    hint = initial_statistics_hint(model)

    def drop(name: str, why: str) -> None:
        why += hint if why.startswith("tolerance exceeded") else ""
        if backend != "auto":
            raise RuntimeError(f"backend {name!r} cannot run this model: {why}")
        notes.append(f"{name}: {why}")

    for name in names:
        if backend == "auto" and name == "ort-plain" and {"ort", "ort-checked"} & set(built):
            notes.append("ort-plain: not tried: a fused ONNX Runtime form passed")
            continue
        tol = tolerance(model, name)
        try:
            run = CANDIDATES[name](ctx)
            got = run(*probe[0], **probe[1])
        except Exception as e:  # each candidate's reason for not applying
            covered = not isinstance(e, ValueError) or isinstance(e, IsaError)  # $FEWBITS_*_ISA
            why = (f"{'failed' if covered else 'operation not covered'}: "
                   f"{type(e).__name__}: {e}")
            if covered and backend == "auto":  # not the model's fault: say it out loud
                warnings.warn(f"compile_for_cpu: backend {name!r} {why}; trying the next "
                              "candidate", RuntimeWarning, stacklevel=2)
            drop(name, why)
            continue
        bad, used = _check(model, x, got, ref, tol, notes, name, alone=alone)
        if bad is not None:
            drop(name, bad)
            continue
        built[name] = (run, tol)
        seen[name] = top1_flips(got, used)
    timings: dict[str, float] = {}
    if shape is None:
        xt = probe
        index = None  # the probe's rows themselves
    else:
        base = probe[0][0] if probe_inputs is None else probe_inputs.detach().float().cpu()
        reps = -(-batch_size // base.shape[0])
        xt = ((base.repeat(reps, *([1] * len(shape)))[:batch_size].contiguous(),), {})
        # row i of the batch repeats probe row off + i % len(base) (base: the probe's tail)
        off = probe[0][0].shape[0] - base.shape[0]
        index = off + torch.arange(batch_size) % base.shape[0]
    outs: dict[str, Any] = {}
    if len(built) > 1:
        timings, outs = _best_times({name: run for name, (run, _) in built.items()}, xt,
                                    one_thread=threads == 1 and torch.get_num_threads() == 1)
    elif built and shape is not None and batch_size > probe[0][0].shape[0] and \
            next(iter(built)) not in EXACT:
        # a lone candidate is checked on the batch it will run too, where that is larger
        # than the probe (a fault that shows only past the probe's rows must not ship unseen)
        name, (run, _) = next(iter(built.items()))
        with torch.inference_mode():
            outs[name] = run(*xt[0], **xt[1])
    if outs:  # every output on the timing batch is checked against PyTorch's
        with torch.inference_mode():
            ref_t = outs["torch"] if "torch" in outs else model(*xt[0], **xt[1])
        for name in outs:
            flips = seen[name]
            rep = None if flips is None else \
                (flips, torch.arange(flips.numel()) if index is None else index)
            bad, _ = _check(model, None if x is None else xt[0][0], outs[name], ref_t,
                            built[name][1], notes, name, "timing batch", rep, index, alone)
            if bad is not None:
                del built[name]
                timings.pop(name, None)
                drop(name, bad)
    if not built:
        raise RuntimeError("no candidate backend runs this model within its tolerance: "
                           + "; ".join(notes))
    best = min(timings, key=timings.__getitem__) if timings else next(iter(built))
    for name, t in timings.items():
        if name != best:
            notes.append(f"{name}: slower: {1e3 * t:.3g} ms per batch of "
                         f"{_rows(xt)} against {best}'s {1e3 * timings[best]:.3g} ms")
    run, tol = built[best]
    return Deployed(best, run, tol, notes, timings, getattr(model, "fewbits_spec", None))


#: At most this many probe rows are run alone per compile (:func:`_check`).
ROW_REFS_MAX = 128


def _check(model: nn.Module, x: Tensor | None, got: Any, ref: Any, tol: float,
           notes: list[str], name: str, what: str = "probe",
           repeats: tuple[Tensor, Tensor] | None = None, rows_of: Tensor | None = None,
           alone: dict[int, Tensor] | None = None) -> tuple[str | None, Any]:
    """:func:`check_outputs` of a candidate's ``got`` against PyTorch's batched ``ref``; where
    that fails, against PyTorch's own output for each deviating row run alone: PyTorch's float
    sums follow the batch (oneDNN), so an input near a binary threshold gets one answer in a
    batch and another alone (a binary_net ResNet-23's probe row: 3.5 apart; exact backends
    failed). A row passes by matching either, where some row did not deviate and PyTorch's
    batched answer of the deviating ones follows the batch's shape, not its content (the same
    bits where the other rows are copies of them: ``x - x.mean(0)`` or a softmax over the batch
    moves them). ``x``: the planner's image batch (None: no re-run; ``example_inputs``' first
    dim need not be a batch); ``rows_of``: the probe row each row of ``x`` repeats; ``alone``:
    the compile's probe rows run alone so far: each at most once, :data:`ROW_REFS_MAX` in all,
    each a forward call with the model's side effects (hooks, counters). Returns ``(why it
    fails or None, the reference used)``."""
    bad = check_outputs(got, ref, tol, what, repeats)
    if bad is None or x is None or alone is None or not (
            isinstance(got, Tensor) and isinstance(ref, Tensor) and got.shape == ref.shape
            and ref.dim() == 2 and ref.shape[0] == x.shape[0] and ref.is_floating_point()):
        return bad, ref
    off = (got - ref).abs().amax(1) > tol * ref.abs().max()
    rows = (off | (got.argmax(1) != ref.argmax(1))).nonzero().flatten()
    keys = (rows if rows_of is None else rows_of[rows]).tolist()
    if not 0 < len(rows) < len(ref) or len(alone.keys() | set(keys)) > ROW_REFS_MAX:
        return bad, ref
    try:
        with torch.inference_mode():
            for i, k in zip(rows.tolist(), keys, strict=True):
                if k not in alone:
                    y = model(x[i:i + 1])
                    if not isinstance(y, Tensor) or y.shape != (1, ref.shape[1]):
                        return bad, ref
                    alone[k] = y[0]
            alt = ref.clone()
            alt[rows] = torch.stack([alone[k] for k in keys]).to(ref.dtype)
            moved = {k for i, k in zip(rows.tolist(), keys, strict=True)
                     if (alt[i] != ref[i]).any()}
            if not moved or check_outputs(got, alt, tol, what, repeats) is not None:
                return bad, ref
            x2 = x.clone()  # last (a batched call): the other rows made copies of these
            x2[~torch.isin(torch.arange(len(x)), rows)] = x[rows.repeat(len(x))[len(rows):len(x)]]
            same = model(x2)
    except Exception:  # a model that cannot run one row alone: no second answer
        return bad, ref
    if not (isinstance(same, Tensor) and same.shape == ref.shape
            and torch.equal(same[rows], ref[rows])):
        return bad, ref
    where = "" if rows_of is None else f" in the {what}"
    notes.append(f"{name}: on {len(moved)} probe row(s){where} PyTorch's own logits change with "
                 "the batch (float summation order); matched PyTorch run on each row alone")
    return None, alt


def _rows(x: tuple[tuple, dict]) -> str:
    t = next((v for v in (*x[0], *x[1].values()) if isinstance(v, Tensor)), None)
    return str(t.shape[0]) if t is not None and t.dim() else "?"
