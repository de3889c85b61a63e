"""A native inference engine for BinaryNet (``binary_net``): the whole network in one C call.

A binary_net network (the zoo's ResNet-23, LeNet and MLP, or a user's model converted with
``quantize_``, read off its ``torch.fx`` graph by :mod:`~fewbits.runtime.binary_graph`, which
lists the operations covered) is compiled into a short program that ``_binary_engine.c`` runs
per image with no Python per layer:
* the **stem** (float input, +-1 weights) is a float32 convolution, followed by a float32
  threshold in place of batch norm + binary tanh (:func:`~.binary_fold.float_thresholds`);
* every other convolution / hidden affine is an **XNOR-popcount** convolution (any stride)
  on bit-packed activations (32 channels per word, NHWC), with an integer threshold per
  channel in place of batch norm + binary tanh (:func:`~.binary_fold.integer_thresholds`),
  zero-padding corrected exactly, and the ResNet residual sum ``binary_tanh(BN(s) + x)``
  folded into two thresholds selected by the residual bit; 2x2 max pooling of +-1 values is
  a bitwise OR;
* a **float residual stream** (torchvision's ResNet: ``relu(BN(s) + identity)``, identity a
  float map or a downsampling conv's batch-norm output): the layer's epilogue computes
  ``y = fma(s, alpha, beta)`` (PyTorch's eval batch norm, :func:`~.binary_fold.bn_affine`),
  adds the float map, applies the ReLU, and writes both the float map (NHWC) and its bits
  ``y > 0`` (what the next binary layer reads); max pooling of any square window (the 3x3/2
  with padding after the stem) runs on float maps;
* the **head** (average pool + affine with float bias) is an exact integer sum, one division
  and one bias addition in float32; a head of other than +-1 weights (an 8-bit classifier),
  or on a float map, sums its products in float32, in channel order (within float rounding
  of PyTorch's).

Everything after the stem is exact with respect to the float32 PyTorch model (logits up to
the order of the head's bias addition: rtol 1e-6, atol 1e-5; a head of float weights or on a
float map up to its float32 summation order, which can exceed that: 5e-5 on logits of ~60 from
512 channels, rtol 1e-5). The one difference is the stem's
float summation order (PyTorch's convolution sums in its own): a stem pre-activation within
float32 rounding of its threshold can flip, and the logits then differ. Inputs whose stem sums
are exact in any order (e.g. images ``k / 256``) give PyTorch's logits; ``tests/
test_binary_engine.py`` checks both cases. The float epilogue equals PyTorch's batch norm bit
for bit where PyTorch's CPU kernel contracts it to an FMA (x86-64 builds with AVX2 or
AVX-512), within one rounding elsewhere; a float-map value within rounding of 0 can then
binarize the other way (the planner's agreement check covers it). All ISA paths are
bit-identical to each other where the stem's weights are +-1 or its products exact (images
``k / 256`` with 8-bit weights); with other float stem weights (a float or fixed-point first
convolution) the AVX2 / AVX-512 stems sum with FMA and the portable one rounds each product,
so a stem sum may differ by float rounding between paths (each within the tolerance above).
One exception to the first case: on images of 8-bit pixels (``uint8 / 255``) the AVX-512 path
decides the stem on exact integer sums of the codes (``_binary_engine.c``), the other paths
on float sums, so a stem sum within rounding of its threshold (an untrained net's thresholds
are all 0, where such ties are common) can binarize differently between paths.

CPU paths (``engine.isa``): ``"avx512_vpopcntdq"`` (AVX-512 F + VPOPCNTDQ), ``"avx2"`` (AVX2 +
FMA, nibble-table popcount; 1x1 layers of at most 127 input channels in byte lanes, one output
channel per byte, and decisions on the mismatch count against thresholds precomputed here) and
``"generic"`` (portable C), picked at run time by cpuid; set
``FEWBITS_BINARY_ISA`` (or pass ``isa=``) to force one. One thread per call; several threads
may call one engine at once (each gets its own scratch). The engine holds a copy of the
weights and batch-norm statistics taken by :meth:`BinaryEngine.from_model`: a later change to
the model does not reach it (build it again).

Non-finite inputs raise ``ValueError`` as the model's quantizers do; inside
``fewbits.functional.finite_checks(False)`` they follow the unchecked model (``binary_tanh`` of
NaN is ``-1``; the stem's decisions at +-inf are folded too). Finite inputs whose stem sums
overflow (magnitudes near float32's largest) raise ``NonFiniteError`` (a ``ValueError``) as
PyTorch's ``binary_tanh`` does on the NaN/inf that follows; inside ``finite_checks(False)``
they give logits (where a sum overflows in one summation order and not in another, those may
differ between ISA paths and from PyTorch's). A batch-norm output that overflows to inf from
finite stem sums is detected only for a stem with a float epilogue (one that keeps its float
map); elsewhere its decision is folded (the thresholds are exact for every finite sum).

    >>> from fewbits.models import create_model
    >>> _ = torch.manual_seed(0)
    >>> model = create_model("mnist_binary_net_mlp", width=64, depth=2).eval()
    >>> engine = BinaryEngine.from_model(model)
    >>> x = torch.randint(0, 256, (3, 1, 28, 28)).float() / 256
    >>> torch.allclose(engine(x), model(x), rtol=1e-6, atol=1e-5)
    True
"""

from __future__ import annotations

import ctypes
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._cbuild import CLibrary, isa_paths, pick_isa
from .._checks import NonFiniteError, checks_enabled
from ..layers import QuantLayer
from .binary_fold import bn_affine, float_thresholds, integer_thresholds
from .binary_graph import Step, binary_plan

__all__ = ["ISAS", "ISA_ENV", "BinaryEngine", "Step", "binary_plan", "fold_binary_net",
           "supported_isas"]

#: CPU code paths, in the order of the C enum (index = ISA id).
ISAS = ("generic", "avx2", "avx512_vpopcntdq")
#: Environment variable that forces a path (one of ``ISAS``).
ISA_ENV = "FEWBITS_BINARY_ISA"
# headf: a head of any float weights; poolf / headm: max pool / head of a float map
_OPS = {"stem": 0, "bconv": 1, "head": 2, "headf": 3, "poolf": 4, "headm": 5}
_P = ctypes.c_void_p


class _Layer(ctypes.Structure):  # mirrors fbb_layer in _binary_engine.c
    _fields_ = [(n, ctypes.c_int32) for n in
                ("op", "cin", "cout", "h", "w", "k", "pad", "pool", "src", "dst", "res",
                 "cout_pad")] + [(n, _P) for n in
                                 ("wf", "wb", "wpop", "t0", "t1", "tf", "flip", "ninf", "pinf",
                                  "bias")] + \
        [(n, ctypes.c_int32) for n in ("stride", "fsrc", "fdst", "fres", "relu")] + \
        [(n, _P) for n in ("alpha", "beta", "wbb", "dt0", "dt1", "di0", "di1", "w8", "ti")] + \
        [("nq", ctypes.c_int32)]


# fbb_run(layers, nl, isa, x, n, in_size, out, out_size, check_finite, ws, ws_size): addresses
# as plain integers (the engine keeps its program and scratch alive), no conversion per call
_RUN_ARGS = [_P, ctypes.c_int, ctypes.c_int, _P, ctypes.c_int64, ctypes.c_int64, _P,
             ctypes.c_int64, ctypes.c_int, _P, ctypes.c_int64]
# No -march=native: each ISA path carries its own target attribute and is chosen by cpuid.
_LIB = CLibrary(
    Path(__file__).with_name("_binary_engine.c"), "binary-engine",
    ["-O3", "-ffp-contract=off", "-shared", "-fPIC"],
    {"fbb_isa_supported": ([ctypes.c_int], ctypes.c_int),
     "fbb_stem_q": ([ctypes.c_int], ctypes.c_int),
     "fbb_workspace": ([ctypes.POINTER(_Layer), ctypes.c_int], ctypes.c_int64),
     "fbb_run": (_RUN_ARGS, ctypes.c_int)},
)


def _lib():
    lib = _LIB.get()
    if lib is None:
        raise RuntimeError(f"the binary engine cannot be built here: {_LIB.error}")
    return lib


def supported_isas() -> list[str]:
    """The CPU paths this machine can run, best first (empty when the C build fails)."""
    lib = _LIB.get()
    return [] if lib is None else isa_paths(ISAS, lib.fbb_isa_supported)


def _pick_isa(isa: str | None) -> str:
    _lib()
    return pick_isa(isa, ISA_ENV, ISAS, supported_isas(), "binary")


@torch.no_grad()
def _weights(model: nn.Module, name: str, binary: bool) -> np.ndarray:
    """The layer's weights as the forward uses them (its quantizer, or stored values): int8
    +-1 for a binary layer (``binary``), else float32 (the stem and the head may hold any
    weights: a fixed-point first conv and classifier, say)."""
    layer = model.get_submodule(name)
    q = getattr(layer, "weight_quantizer", None)
    w = layer.quantized_weight() if isinstance(layer, QuantLayer) else layer.weight
    w = w.detach().float()
    if not binary:
        if not bool(w.isfinite().all()):
            raise ValueError(f"{name}: weights hold NaN or inf")
        return w.numpy()
    # The engine computes with the values the forward uses, so the values decide, not the
    # quantizer's class: any family whose weights come out +-1 runs here.
    if not bool((w.abs() == 1).all()):
        what = type(q).__name__ if q is not None else "no weight quantizer"
        raise ValueError(f"{name}: weights are not all +-1 ({what}); the binary engine runs "
                         "+-1 weights after the first layer (binary_connect)")
    return w.to(torch.int8).numpy()


def fold_binary_net(model: nn.Module, plan: list[Step]) -> dict[str, np.ndarray]:
    """The engine's data for ``plan``: ``<layer>.weight`` (int8 +-1, the layer's shape),
    ``<head>.bias`` (float32), and per batch norm ``<bn>.threshold`` (float32 for the stem,
    int64 else, ``[2, C]`` for a residual), ``<bn>.flip`` (bool) and, for the stem,
    ``<bn>.nonfinite`` (bool ``[2, C]``); for a step that keeps a float map, ``<bn>.alpha``
    and ``<bn>.beta`` (float32 ``[C]``) instead. Batch norm uses running statistics."""
    out: dict[str, np.ndarray] = {}
    for s in plan:
        if s.op == "poolf":
            continue
        out[f"{s.weight}.weight"] = _weights(model, s.weight, s.op == "bconv")
        if s.float_out:
            out[f"{s.bn}.alpha"], out[f"{s.bn}.beta"] = bn_affine(model.get_submodule(s.bn))
            continue
        if s.op in ("head", "headm"):
            layer = model.get_submodule(s.weight)
            b = layer.quantized_bias() if isinstance(layer, QuantLayer) else layer.bias
            out[f"{s.weight}.bias"] = (np.zeros(s.cout, np.float32) if b is None
                                       else b.detach().float().numpy())
            continue
        bn = model.get_submodule(s.bn)
        if s.op == "stem":
            t, flip, nonfinite = float_thresholds(bn, where=s.bn)
            out[f"{s.bn}.nonfinite"] = nonfinite
        else:
            t, flip = integer_thresholds(bn, *s.range, residual=s.residual, where=s.bn)
        out[f"{s.bn}.threshold"], out[f"{s.bn}.flip"] = t, flip
    return out


def _words(bits: np.ndarray) -> np.ndarray:
    """bool ``[..., n]`` -> uint32 ``[..., ceil(n/32)]``, bit ``i % 32`` of word ``i // 32``."""
    n = bits.shape[-1]
    pad = np.zeros((*bits.shape[:-1], -n % 32), bool)
    b = np.packbits(np.concatenate([bits, pad], -1), axis=-1, bitorder="little")
    return np.ascontiguousarray(b).view("<u4")


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of uint32 ``[..., n]`` summed over the last axis, int32 ``[...]``. Through
    ``np.unpackbits`` (numpy 1.x has no ``np.bitwise_count``, and pyproject allows it)."""
    b = np.ascontiguousarray(words, "<u4").view(np.uint8)
    return np.unpackbits(b, axis=-1).sum(-1, dtype=np.int64).astype(np.int32)


def _padded(a: np.ndarray, n: int, fill: float | int) -> np.ndarray:
    out = np.full((*a.shape[:-1], n), fill, a.dtype)
    out[..., :a.shape[-1]] = a
    return np.ascontiguousarray(out)


def _stem_q(s: Step, wf: np.ndarray, tf: np.ndarray) -> dict[str, np.ndarray]:
    """The stem on images of 8-bit pixels (``fbb_layer.w8`` / ``ti``): its +-1 weights as bytes
    ``[k*k taps][quads of input channels][cout_pad][4]`` and the integer thresholds
    ``ceil(255 t)`` on the exact sums of +-k (``sum / 255 >= t`` exactly; float64 holds
    ``255 t`` exactly). None where a weight is not +-1, a threshold is NaN, or a sum could
    leave int32."""
    if 255 * s.cin * s.k * s.k >= 2**31 or not np.isin(wf, (-1.0, 0.0, 1.0)).all() or \
            np.isnan(tf).any():
        return {}
    k, cp, nq = s.k, wf.shape[1], -(-s.cin // 4)
    w = np.zeros((k, k, nq * 4, cp), np.int8)  # wf rows are taps (c, ky, kx)
    w[:, :, :s.cin] = wf.reshape(s.cin, k, k, cp).transpose(1, 2, 0, 3)
    w8 = w.reshape(k, k, nq, 4, cp).transpose(0, 1, 2, 4, 3)
    ti = np.clip(np.ceil(tf.astype(np.float64) * 255), -2**31, 2**31 - 1).astype(np.int32)
    return {"w8": np.ascontiguousarray(w8), "ti": ti}


def _layer_arrays(s: Step, d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    cp = -(-s.cout // 32) * 32
    if s.op == "poolf":
        return {}
    w = d[f"{s.weight}.weight"]
    if s.op == "bconv":
        w = w.astype(np.int8)
    if s.op in ("head", "headm"):
        return {"wf": np.ascontiguousarray(w.reshape(s.cout, s.cin), np.float32),
                "bias": np.ascontiguousarray(d[f"{s.weight}.bias"], np.float32)}
    out: dict[str, np.ndarray] = {}
    if s.float_out:  # padded channels: alpha = beta = 0, so y = 0 and their bits stay 0
        out = {n: _padded(np.asarray(d[f"{s.bn}.{n}"], np.float32), cp, 0.0)
               for n in ("alpha", "beta")}
    if s.op == "stem":  # taps in PyTorch order (c, ky, kx), output channels contiguous
        out["wf"] = _padded(np.asarray(w, np.float32).reshape(s.cout, -1).T, cp, 0.0)
        if s.float_out:
            return out
    if s.op == "bconv" and s.float_out:
        return out | _bconv_weights(s, w, cp)
    flip = _words(_padded(d[f"{s.bn}.flip"].astype(bool), cp, False))
    t = d[f"{s.bn}.threshold"]
    if s.op == "stem":  # taps in PyTorch order (c, ky, kx), output channels contiguous
        nf = d[f"{s.bn}.nonfinite"].astype(bool)
        tf = _padded(t.astype(np.float32), cp, np.inf)
        return {"wf": out["wf"], "tf": tf, "flip": flip,
                "ninf": _words(_padded(nf[0], cp, False)),
                "pinf": _words(_padded(nf[1], cp, False)), **_stem_q(s, out["wf"], tf)}
    t = np.atleast_2d(t).astype(np.int64)
    big = np.iinfo(np.int32).max  # padded channels: never +1, so their bits stay 0
    out = {"t0": _padded(t[0].astype(np.int32), cp, big),
           "t1": _padded(t[-1].astype(np.int32), cp, big), "flip": flip,
           **_bconv_weights(s, w, cp)}
    out |= _count_thresholds(out, "di", s.cin * s.k * s.k, np.int32)
    if s.k == 1 and s.pad == 0 and s.cin <= 127:
        out |= _bytes_kernel(s, out)
    return out


def _count_thresholds(a: dict[str, np.ndarray], name: str, n: int, dtype: type
                      ) -> dict[str, np.ndarray]:
    """Thresholds ``t0``, ``t1`` on the sum ``n - 2 D`` of ``n`` +-1 products as thresholds on
    the mismatch count ``D``: ``(n - 2 D >= T)`` is ``(D <= floor((n - T) / 2))``, clamped to
    ``[-1, n]`` (``0 <= D <= n``, so the clamp keeps every decision)."""
    return {f"{name}{i}": np.ascontiguousarray(np.clip(
        (n - a[f"t{i}"].astype(np.int64)) // 2, -1, n).astype(dtype)) for i in (0, 1)}


def _bytes_kernel(s: Step, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The AVX2 1x1 kernel's data (``fbb_layer.wbb``, ``dt0``, ``dt1``): the weight words as
    bytes, ``wbb[t][o]`` = byte ``t % 4`` of word ``t // 4`` of channel ``o``, and the
    thresholds on the mismatch count ``D`` (:func:`_count_thresholds`, int8 as
    ``cin <= 127``)."""
    words = a["wb"].reshape(-1, a["wb"].shape[-1])  # [wd_in, cout_pad] uint32, little-endian
    wbb = np.ascontiguousarray(words.T).view(np.uint8).reshape(-1, 4 * words.shape[0]).T
    return {"wbb": np.ascontiguousarray(wbb), **_count_thresholds(a, "dt", s.cin, np.int8)}


def _bconv_weights(s: Step, w: np.ndarray, cp: int) -> dict[str, np.ndarray]:
    """Binary conv weights in im2col order (ky, kx, channel words), output channels
    contiguous, and the padding correction's prefix sums."""
    taps = (w.reshape(s.cout, s.cin, s.k, s.k) > 0).transpose(0, 2, 3, 1)
    words = _words(taps)  # [cout, k, k, wi]
    out = {"wb": _padded(words.reshape(s.cout, -1).T, cp, 0)}
    if s.pad:  # only border pixels read it: none without padding (smaller working set)
        pop = _popcount(words)  # [cout, k, k]
        pre = np.zeros((s.k + 1, s.k + 1, s.cout), np.int32)  # 2-D prefix sums over the taps
        pre[1:, 1:] = pop.transpose(1, 2, 0).cumsum(0).cumsum(1)
        out["wpop"] = _padded(pre, cp, 0)
    return out


def _arena(tables: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, list[dict[str, int]]]:
    """Every table of the program copied into one buffer, in program order, each at a 64-byte
    boundary: a call that finds the caches cold (as between calls of other runtimes) reads a few
    pages in sequence, not ~100 scattered arrays. Returns the buffer and each table's address."""
    flat = [{n: np.ascontiguousarray(a).reshape(-1).view(np.uint8) for n, a in t.items()}
            for t in tables]
    size = sum(-(-b.size // 64) * 64 for t in flat for b in t.values())
    buf = np.zeros(size + 64, np.uint8)
    off, ptrs = -buf.ctypes.data % 64, []
    for t in flat:
        ptrs.append({})
        for n, b in t.items():
            buf[off:off + b.size] = b
            ptrs[-1][n] = buf.ctypes.data + off
            off += -(-b.size // 64) * 64
    return buf, ptrs


class BinaryEngine:
    """A compiled binary_net network: ``engine(x)`` -> float32 logits, one native call.

    Build with :meth:`from_model` (or ``fewbits.runtime.binary_file.load_engine`` for a
    batch-norm-folded ``.fewbits`` file). ``engine.isa`` names the CPU path in use.
    """

    def __init__(self, plan: list[Step], data: dict[str, np.ndarray],
                 in_shape: tuple[int, ...], isa: str | None = None) -> None:
        self.isa = _pick_isa(isa)
        self.plan, self.in_shape = plan, tuple(in_shape)
        self._size, self._isa_id, self._run = math.prod(in_shape), ISAS.index(self.isa), \
            _lib().fbb_run
        self.num_classes = plan[-1].cout
        self._layers = (_Layer * len(plan))()
        tables = [_layer_arrays(s, data) for s in plan]
        self._arena, ptrs = _arena(tables)  # the C program points into it
        for i, (s, arrs, ptr) in enumerate(zip(plan, tables, ptrs, strict=True)):
            cp = -(-s.cout // 32) * 32
            op = s.op
            if op == "head" and not bool((np.abs(arrs["wf"]) == 1).all()):
                op = "headf"
            self._layers[i] = _Layer(
                _OPS[op], s.cin, s.cout, s.h, s.w, s.k, s.pad, int(s.pool), s.src, s.dst,
                s.res, cp, *(ptr.get(n) for n in ("wf", "wb", "wpop", "t0", "t1", "tf", "flip",
                                                  "ninf", "pinf", "bias")),
                s.stride, s.fsrc, s.fdst, s.fres, int(s.relu),
                *(ptr.get(n) for n in ("alpha", "beta", "wbb", "dt0", "dt1", "di0", "di1", "w8",
                                       "ti")), -(-s.cin // 4) if "w8" in arrs else 0)
        size = _lib().fbb_workspace(self._layers, len(plan))
        if size < 0:
            raise ValueError("binary engine: malformed program (a layer's sizes)")
        self._ws_words = max(int(size), 1)
        # what every call passes unchanged, resolved once; the scratch is per thread (ctypes
        # releases the GIL: two threads sharing one scratch overwrote each other's maps and
        # returned wrong logits), allocated once for each thread that calls
        self._head = (ctypes.addressof(self._layers), len(plan), self._isa_id)
        self._local = threading.local()
        self._scratch()

    def _scratch(self) -> tuple[int, int]:
        """This thread's scratch ``(address, words)``, allocated on its first call."""
        ws = np.empty(self._ws_words, np.uint32)
        self._local.ws, self._local.tail = ws, (ws.ctypes.data, ws.size)
        return self._local.tail

    def __copy__(self) -> BinaryEngine:  # shares the program (scratch stays per thread)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __reduce__(self) -> Any:
        # the program holds addresses into this process's memory: ctypes' own refusal named
        # pointers, not what to do
        raise TypeError("a BinaryEngine cannot be pickled or deep-copied (it holds native "
                        "addresses); keep the model (BinaryEngine.from_model) or its folded "
                        ".fewbits file (export_packed(..., fold_bn=True), "
                        "binary_file.load_engine) and build the engine again")

    @classmethod
    def from_model(cls, model: nn.Module, *, isa: str | None = None,
                   input_size: tuple[int, int] | None = None,
                   input_shape: tuple[int, ...] | None = None) -> BinaryEngine:
        """Compile ``model`` (its eval-mode forward, read from its ``torch.fx`` graph by
        :func:`~fewbits.runtime.binary_graph.binary_plan`: a zoo binary_net network or a
        user's model converted with ``quantize_(model, "binary_net")``). ``input_shape``
        ``(C, H, W)`` for a model that is not registered. Raises ``ValueError`` naming the
        operation the engine does not cover."""
        plan = binary_plan(model, input_size, input_shape)
        return cls(plan, fold_binary_net(model, plan), cls.input_shape(plan), isa)

    @staticmethod
    def input_shape(plan: list[Step]) -> tuple[int, ...]:
        """Per-sample input shape of a program: ``(C, H, W)``, or ``(features,)`` (MLP)."""
        s = plan[0]  # an MLP's first layer is a 1 x 1 stem on a 1 x 1 map (not any row image)
        return (s.cin,) if s.h == 1 and s.w == 1 and s.k == 1 else (s.cin, s.h, s.w)

    def __call__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dtype != torch.float32:
            got = x.dtype if isinstance(x, Tensor) else \
                f"{type(x).__module__}.{type(x).__name__} (torch.from_numpy converts an array)"
            raise TypeError(f"the binary engine takes a float32 torch tensor, got {got}")
        if x.is_meta:
            raise ValueError("the binary engine computes on data: a meta tensor has none")
        shape = x.shape
        ok = (shape[1:] == self.in_shape if len(self.in_shape) == 3
              else len(shape) >= 2 and math.prod(shape[1:]) == self._size)
        if not ok:
            raise ValueError(f"the engine was built for inputs of shape (N, "
                             f"{', '.join(map(str, self.in_shape))}), got {tuple(shape)}; "
                             "build another with from_model(model, input_size=(H, W))")
        if not (x.is_cpu and x.is_contiguous()):  # the C program reads x's memory in order
            x = x.cpu().contiguous()
        n = shape[0]
        out = torch.empty(n, self.num_classes)
        if n == 0:
            return out
        try:
            tail = self._local.tail
        except AttributeError:  # this thread's first call
            tail = self._scratch()
        # The quantizers' NaN/inf switch (fewbits.functional.finite_checks), checked in C.
        rc = self._run(*self._head, x.data_ptr(), n, self._size, out.data_ptr(), out.numel(),
                       int(checks_enabled()), *tail)
        if rc == -4:
            raise ValueError("binary engine: the input contains NaN or inf, which the model's "
                             "binary_tanh refuses; check the data (or wrap the call in "
                             "fewbits.functional.finite_checks(False) for unchecked semantics)")
        if rc == -5:
            raise NonFiniteError(
                "binary engine: the first layer's float sums overflow to NaN/inf (inputs of "
                "magnitude near float32's largest, ~3e38); the model's binary_tanh refuses the "
                "NaN/inf that follows, as does PyTorch's: scale the inputs (or wrap the call in "
                "fewbits.functional.finite_checks(False) for unchecked semantics)")
        if rc != 0:
            why = {-1: "ISA unsupported", -2: "workspace too small"}.get(rc, "malformed program")
            raise RuntimeError(f"binary engine failed: {why} (code {rc})")
        return out
