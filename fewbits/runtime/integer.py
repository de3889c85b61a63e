"""A native integer inference engine for the uniform-grid families (fixed point, min-max; any
bit width up to 8): :class:`IntegerEngine`.

The network is compiled from its ``torch.fx`` graph (:mod:`fewbits.runtime.integer_plan`:
no attribute names of the zoo; conv with groups / stride / padding / dilation, linear, batch
norm folded, ReLU / clamps, max / average pooling, residual add, flatten, concatenation) into
steps that ``_integer_engine.c`` runs on int16 NHWC codes with int32 sums: one requantising
epilogue per layer (conv bias, batch norm in PyTorch's own float arithmetic, the quantizer with
the clamps of ReLUs folded in), residual sums exact on the finer grid where the scales allow.
A residual sum of grids with no common integer grid (min-max's learned scales) is a float32
NHWC map holding PyTorch's own values bit for bit (each operand's quantizer output
``fl(fl(r * scale) + lo)``, one float add, the ReLU after it folded in); max pooling and global
average read it natively, and so does the next layer: on AVX-512 VNNI a 1x1 one on the map's
integer planes (:mod:`~fewbits.runtime.integer_planes`; ``planes=`` forces them on or off for
any path), others in float32 (6 x 16 FMAs), as do the layers on the images or a global average.

Exactness: with power-of-two scales (fixed point) every hidden code equals PyTorch's (its float
sums of ``k * 2**-e`` values are exact) except where the first layer's float sums, which
PyTorch orders its own way, put a value within rounding of a level boundary; the logits then
agree within the planner's tolerance. Min-max's residual streams are PyTorch's values: a float
layer reading one sums in its own order, as the first layer does; a 1x1 one on planes sums it
rounded to 24 bits below a proven bound, exactly (an image whose values all round below 2^16
runs the float layer): an error within the float layer's own worst case (integer_planes). The
logits agree within the planner's tolerance (99.8 % top-1 on 1000 CIFAR-10 test images of a
trained min-max ResNet-23). :attr:`IntegerEngine.exact` stays True: every difference from
PyTorch is a float32-sized rounding of a sum. What the engine cannot run so (a float map
flattened, quantized, clamped where it is also read unclamped, a forward hook, a tensor updated
in place while another name holds it, ...) it refuses with ``ValueError`` naming the operation.
All CPU paths give identical outputs with the same ``planes``.

CPU paths (``engine.isa``): ``"avx512_vnni"`` (AVX-512 F/BW/VL/DQ + VNNI), ``"avx2"`` (AVX2 +
FMA) and ``"generic"`` (portable C), the best this CPU runs picked by cpuid;
``FEWBITS_INT_ISA`` (or ``isa=``) forces one. Codes of 8 bits or less are multiplied u8 x s8
(signed codes shifted into ``[0, 255]`` with a per-channel correction): on AVX-512 VNNI by
``vpdpbusd``, four products summed straight into int32 lanes, for every layer whose weights
are int8 (:func:`~fewbits.runtime.integer_plan.pack_u8`); on AVX2 by ``vpmaddubsw``, whose
int16 lane sums are widened by ``vpmaddwd`` before they could wrap, only where ``pack_u8``
proves no pair sum saturates. Wider codes are multiplied int16 x int16 (``vpdpwssd`` /
``vpmaddwd``). Stride-1 layers read their taps straight from a zero-padded image (no im2col).
Images of 8-bit pixels (every value ``uint8 / 255``, checked per image) run the first layer on
their codes in integers (:mod:`~fewbits.runtime.integer_grid`). The VNNI epilogue runs 16
channels per vector and, where every scale is a power of two and the conv has no bias (fixed
point), folds the requantisation into one FMA on the int32 sums (exact:
:func:`~fewbits.runtime.integer_plan.fold_params`). AVX-VNNI (256-bit VEX) and AMX are not
written (no machine to test them on: those CPUs run the AVX2 path). One thread. A failed C
build raises ``RuntimeError`` (the planner warns and runs the next candidate).

    >>> from fewbits.models import create_model
    >>> _ = torch.manual_seed(0)
    >>> model = create_model("mnist_fp_net_lenet").eval()
    >>> engine = IntegerEngine.from_model(model, (1, 28, 28))
    >>> x = torch.rand(4, 1, 28, 28)
    >>> bool((engine(x).argmax(1) == model(x).argmax(1)).all())
    True
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .._cbuild import CLibrary, isa_paths, pick_isa
from .._checks import NonFiniteError, checks_enabled
from .integer_cert import attach_cert
from .integer_mem import Buffers, link_u8_maps, padded16
from .integer_plan import (
    Add,
    Clamp,
    Concat,
    Conv,
    FAdd,
    GlobalAvg,
    Pool,
    Program,
    Quantize,
    QuantParams,
    fold_params,
)
from .integer_planes import plane_steps
from .integer_walk import compile_program

__all__ = ["INT_ISAS", "INT_ISA_ENV", "IntegerEngine", "supported_int_isas"]

#: CPU code paths, in the order of the C enum.
INT_ISAS = ("generic", "avx2", "avx512_vnni")
#: Environment variable that forces a path (one of ``INT_ISAS``).
INT_ISA_ENV = "FEWBITS_INT_ISA"
_AVX2, _VNNI = INT_ISAS.index("avx2"), INT_ISAS.index("avx512_vnni")
_P = ctypes.c_void_p
_F = ctypes.POINTER(ctypes.c_float)


class _ConvArgs(ctypes.Structure):  # mirrors fbi_conv in _integer_engine.c
    _fields_ = [(n, ctypes.c_int32) for n in
                ("isa", "in_kind", "out_kind", "n", "h", "w", "cin", "oh", "ow", "cout", "kh",
                 "kw", "sh", "sw", "ph", "pw", "dh", "dw", "groups", "kp", "kf", "pre_relu",
                 "klo", "khi", "kofs")] + \
        [(n, ctypes.c_float) for n in ("clo", "chi", "sub", "scale", "inv")] + \
        [("x", _P), ("wpack", _P), ("wpack8", _P), ("kq4", ctypes.c_int32),
         ("ushift", ctypes.c_int32), ("kchunk", ctypes.c_int32), ("corr", _P)] + \
        [(n, _P) for n in ("sacc", "bias", "alpha", "beta", "y", "scratch")] + \
        [("qcheck", ctypes.c_int32), ("qlo", ctypes.c_float), ("qhi", ctypes.c_float),
         ("rcp_ok", ctypes.c_int32), ("fold", ctypes.c_int32), ("alpha2", _P), ("beta2", _P),
         ("out_u8", ctypes.c_int32), ("u8shift", ctypes.c_int32), ("in_u8", ctypes.c_int32),
         ("nobias", ctypes.c_int32), ("cert", _P), ("cert_stride", ctypes.c_int32)]


class _Step(ctypes.Structure):  # mirrors fbi_step
    _fields_ = [("kind", ctypes.c_int32), ("i", ctypes.c_int32 * 16), ("f", ctypes.c_float * 2),
                ("count", ctypes.c_int64), ("conv", ctypes.POINTER(_ConvArgs)), ("x0", _P),
                ("x1", _P), ("y", _P), ("work", _P)]


_I = ctypes.c_int32
_LIB = CLibrary(
    Path(__file__).with_name("_integer_engine.c"), "integer-engine",
    ["-O3", "-ffp-contract=off", "-shared", "-fPIC"],
    {"fbi_isa_supported": ([ctypes.c_int], ctypes.c_int),
     "fbi_u8_direct": ([ctypes.POINTER(_ConvArgs)], ctypes.c_int),
     "fbi_conv_run": ([ctypes.POINTER(_ConvArgs)], ctypes.c_int),
     "fbi_rcp_exact": ([ctypes.c_float], ctypes.c_int),
     "fbi_rcp_div": ([ctypes.c_float, ctypes.c_int64, _P, _P], ctypes.c_int),
     "fbi_quantize": ([ctypes.POINTER(_ConvArgs), ctypes.c_int64, _P, _P], None),
     "fbi_add": ([_I, ctypes.c_int64, _P, _P, ctypes.c_float, ctypes.c_float, _I, _I, _P], None),
     "fbi_pool": ([_I] * 16 + [_P, _P, _P], None),
     "fbi_global_avg": ([_I, _I, _I, _P, ctypes.c_float, _P], None),
     "fbi_run": ([ctypes.POINTER(_Step), _I, _I], ctypes.c_int), "fbi_cert_stats": ([_P, _I], None),
     "fbi_epi_sums": ([ctypes.POINTER(_ConvArgs), ctypes.c_int64, _P, _P, _I], ctypes.c_int64),
     "fbi_run_images": ([ctypes.POINTER(_Step), _I, _I, ctypes.c_int64, _P, ctypes.c_int64, _P,
                         _P, ctypes.c_int64, _P], ctypes.c_int)},
)


def _lib() -> ctypes.CDLL:
    lib = _LIB.get()
    if lib is None:  # not the model's fault: RuntimeError, so the planner warns, not "not covered"
        raise RuntimeError(f"the integer engine cannot be built here: {_LIB.error}")
    return lib


def supported_int_isas() -> list[str]:
    """The CPU paths this machine can run, best first (empty when the C build fails)."""
    lib = _LIB.get()
    return [] if lib is None else isa_paths(INT_ISAS, lib.fbi_isa_supported)


def _pick_isa(isa: str | None) -> str:
    _lib()
    return pick_isa(isa, INT_ISA_ENV, INT_ISAS, supported_int_isas(), "integer")


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _set_quant(a: _ConvArgs, q: QuantParams) -> _ConvArgs:
    a.klo, a.khi, a.kofs = q.klo, q.khi, q.kofs
    a.clo, a.chi, a.sub, a.scale = q.clo, q.chi, q.sub, q.scale
    m, _ = math.frexp(q.scale)
    a.inv = 1.0 / q.scale if m == 0.5 and 2.0**-126 <= q.scale <= 2.0**126 else 0.0
    return a


@functools.lru_cache(maxsize=4096)
def _rcp_exact(scale: float) -> int:
    """1 where the AVX2 epilogue's division by ``scale`` can be a multiply by its reciprocal
    with one exact correction (checked over every significand, ~3 ms), else 0."""
    return int(_lib().fbi_rcp_exact(scale))


def _conv_args(s: Conv, isa: int, keep: list) -> _ConvArgs:
    g = s.geom
    a = _ConvArgs(isa=isa, in_kind=(2 if s.nhwc else 1) if s.float_in else 0,
                  out_kind=0 if s.quant is not None else 1, pre_relu=int(s.pre_relu),
                  **{k: v for k, v in g.items()})
    q = s.quant
    if q is not None:
        _set_quant(a, q)
        if a.inv == 0.0 and isa >= _AVX2:  # a division: exact as a multiply?
            a.rcp_ok = _rcp_exact(a.scale)
        # the quantizer after a float-input layer: NaN/inf it would see is reported (rc 1)
        a.qcheck, (a.qlo, a.qhi) = int(s.float_in), s.qclamp
    else:
        a.clo, a.chi = s.fclamp
    arrays = [padded16(v, np.float32) for v in (s.sacc, s.bias, s.alpha, s.beta)]
    a.nobias = int(not s.bias.any())  # the VNNI epilogue skips adding a zero bias
    keep += [s.wpack, *arrays]
    folded = fold_params(s, a.inv) if isa == _VNNI and q is not None else None
    if folded is not None:
        keep += folded
        a.fold, a.alpha2, a.beta2 = 1, _ptr(folded[0]), _ptr(folded[1])
    a.wpack = _ptr(s.wpack)
    # u8 weights: VNNI takes every packing; AVX2 those whose int16 pair sums cannot saturate
    if s.wpack8 is not None and (isa == _VNNI or (isa == _AVX2 and s.kchunk >= 1)):
        keep.append(s.wpack8)
        a.wpack8, a.kq4, a.ushift, a.kchunk = _ptr(s.wpack8), s.kq4, s.ushift, s.kchunk
        if s.corr is not None:
            corr = padded16(s.corr, np.int32)
            keep.append(corr)
            a.corr = _ptr(corr)
    a.sacc, a.bias, a.alpha, a.beta = (_ptr(v) for v in arrays)
    return a


def _fadd_step(s: FAdd, vals: dict[int, np.ndarray], keep: list, bufs: Buffers, k: int
               ) -> tuple[np.ndarray, _Step]:
    """The native step of a float residual sum (kind 4) and its float32 output map (written
    over a float operand read here for the last time: each element is read, then written)."""
    g = s.pool
    if g is not None:  # max pooled as it is summed: a new buffer
        y = bufs.take(s.dst, (vals[s.a].shape[0], g["oh"], g["ow"], g["c"]), np.float32)
    else:
        over = tuple(v for v in (s.a, s.b) if vals[v].dtype == np.float32)
        y = bufs.take(s.dst, vals[s.a].shape, np.float32, over=over, at=k)
    ka, kb = (d if d is not None else (1.0, 0, 0.0) for d in (s.ka, s.kb))
    p = np.array([ka[0], ka[2], kb[0], kb[2], s.lo, s.hi], np.float32)
    keep.append(p)
    st = _Step(kind=4 if g is None else 7, count=vals[s.a].size, x0=_ptr(vals[s.a]),
               x1=_ptr(vals[s.b]), y=_ptr(y), work=_ptr(p))
    st.i[0], st.i[1], st.i[2], st.i[3] = int(s.ka is None), ka[1], int(s.kb is None), kb[1]
    if g is not None:
        st.i[4:16] = [vals[s.a].shape[0], *(g[f] for f in ("h", "w", "c", "oh", "ow", "kh",
                                                           "kw", "sh", "sw", "ph", "pw"))]
    return y, st


def _scratch_bytes(g: dict, kq4: int) -> int:
    """Work bytes of one conv: its im2col rows (int16 / float / u8 with 8 rows of slack) or
    the zero-padded image of a direct path (bytes, or float planes; 8 pixels of slack)."""
    padded = ((g["h"] + 2 * g["ph"]) * (g["w"] + 2 * g["pw"]) + 8) * g["cin"] * 4
    rows = g["oh"] * g["ow"]
    return max(rows * g["kp"] * 2, rows * g["kf"] * 4, (rows + 8) * kq4, padded) + 64


class IntegerEngine:
    """``engine(images) -> logits`` for a compiled :class:`Program` (float32 ``(N, C, H, W)``
    images of the compiled shape). ``isa``: the CPU path; ``exact``/``notes``: see the module
    docstring. Non-finite inputs raise ``ValueError``. Finite inputs whose first-layer float
    sums overflow (magnitudes near float32's largest) raise ``NonFiniteError`` (a
    ``ValueError``) where the quantizer after that layer would see NaN/inf, as PyTorch's does
    (after the ReLUs / clamps in front of it: a ``-inf`` a ReLU makes 0 is no error); inside
    ``fewbits.functional.finite_checks(False)`` they give logits. A batch norm that overflows
    finite sums is not detected. Work buffers are kept between calls: calls from several
    threads run one at a time (a lock; they shared the buffers and returned wrong logits)."""

    def __init__(self, prog: Program, isa: str | None = None, planes: bool | None = None
                 ) -> None:
        self.isa = _pick_isa(isa)
        self.prog, self.exact, self.notes = prog, prog.exact, list(prog.notes)
        self._lib = _lib()
        self._keep: list = []
        isa_id = self._isa_id = INT_ISAS.index(self.isa)
        #: the twins on planes that run (integer_planes; default: on VNNI, the one path they pay)
        self.planes = prog.planes if (isa_id == _VNNI if planes is None else planes) else {}
        convs = [s for s in prog.steps if isinstance(s, Conv)] + \
            ([prog.grid] if prog.grid is not None else []) + list(self.planes.values())
        self.plane_counts = np.zeros(2, np.int64)  # images on planes / on the float layer
        self._args = {id(s): _conv_args(s, isa_id, self._keep) for s in convs}
        #: values held as bytes (code - shift) between two VNNI layers: {value: shift}
        self.u8_maps = link_u8_maps(
            prog, self._args, lambda a: bool(self._lib.fbi_u8_direct(ctypes.byref(a)))
        ) if isa_id == _VNNI else {}
        if prog.grid is not None and isa_id == _VNNI:  # the images' codes as bytes
            a = self._args[id(prog.grid)]
            a.in_u8 = int(bool(self._lib.fbi_u8_direct(ctypes.byref(a))))
        for s in convs:  # the certified VNNI epilogue, with each layer's final u8 linking
            attach_cert(s, self._args[id(s)], self._keep, self._lib)
        self._qargs = {id(s): _set_quant(_ConvArgs(), s.quant) for s in prog.steps
                       if isinstance(s, Quantize)}
        self._batch: tuple | None = None
        self._single: tuple | None = None
        self._fixed: tuple = ()  # the one-image run's pointers (made with _single)
        self._keep_batch: dict[int, list] = {}
        self._lock = threading.Lock()
        self._scratch = max([_scratch_bytes(s.geom, s.kq4) for s in convs], default=64)

    @classmethod
    def from_model(cls, model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32), *,
                   isa: str | None = None, codes: dict | None = None,
                   planes: bool | None = None) -> IntegerEngine:
        """Compile ``model`` (put in eval mode) for images ``(N, *input_shape)``; raises
        ``ValueError`` naming the first operation the engine does not cover, ``RuntimeError``
        when the C engine cannot be built here. ``codes``: a ``.fewbits`` file's weight codes
        (``fewbits.export.onnx.resolve_source(path).codes``) for a model rebuilt from it by
        ``load_packed``, which drops the weight quantizers."""
        was = model.training
        model.eval()
        try:
            return cls(compile_program(model, tuple(input_shape), codes), isa, planes)
        finally:
            model.train(was)

    def __call__(self, images: Tensor) -> Tensor:
        shape = self.prog.in_shape
        if not isinstance(images, Tensor):
            raise TypeError(f"the integer engine takes a torch.Tensor of images (N, {shape}), "
                            f"got {type(images).__name__}")
        if tuple(images.shape[1:]) != shape or images.dim() != len(shape) + 1:
            raise ValueError(f"the integer engine was compiled for images (N, {shape}), got "
                             f"{tuple(getattr(images, 'shape', ()))}")
        if images.dtype != torch.float32:  # PyTorch's float32 layers refuse it too
            hint = " (uint8 pixels: images.float() / 255)" if images.dtype == torch.uint8 \
                else ""
            raise TypeError(f"the integer engine takes float32 images, got {images.dtype}"
                            f"{hint}: convert them as the model expects")
        t = images
        if t.device.type != "cpu" or t.requires_grad or \
                not t.is_contiguous():  # else as it is: each conversion costs microseconds
            t = images.detach().to("cpu").contiguous()
        with self._lock:  # ctypes releases the GIL; the buffers are shared
            return self._run(t)

    def _run(self, t: Tensor) -> Tensor:
        n = t.shape[0]
        if n == 0:  # an empty batch: PyTorch's empty output (no step runs)
            return self._output(np.empty(0, np.float32), 0)
        if self._single is None:
            self._single = self._build(1)
            vals, segments = self._single
            y1 = vals[self.prog.out.id]
            # the pointers of the one-image run, made once (each _ptr costs microseconds)
            self._fixed = (_ptr(vals[1]), _ptr(y1), y1.nbytes, y1.shape[1:], y1.dtype,
                           vals[1].size)
        vals, segments = self._single
        if len(segments) == 1 and isinstance(segments[0], tuple):  # all native: image by image
            in_ptr, y_ptr, nbytes, shape, dtype, size = self._fixed
            out = np.empty((n, *shape), dtype)
            rc = self._lib.fbi_run_images(segments[0][0], segments[0][1], self._isa_id, n,
                                          t.data_ptr(), size, in_ptr, y_ptr, nbytes,
                                          out.__array_interface__["data"][0])
            if rc == -3:  # the C run checks the images first, with nothing run
                raise ValueError("the images contain NaN or inf")
            self._check_rc(rc)
            return self._output(out, n)
        x = t.numpy()
        if not np.isfinite(x).all():  # NumPy's: torch.isfinite costs ~10x more on one image
            raise ValueError("the images contain NaN or inf")
        if self._batch is None or self._batch[0] != n:
            self._batch = (n, *self._build(n))  # buffers of the last batch size, reused
        _, vals, segments = self._batch
        np.copyto(vals[1], x)
        for seg in segments:
            if isinstance(seg, tuple):
                self._check_rc(self._lib.fbi_run(seg[0], seg[1], self._isa_id))
            else:
                self._python_step(seg, vals, n)
        return self._output(vals[self.prog.out.id].copy(), n)

    @staticmethod
    def _check_rc(rc: int) -> None:
        if rc == 1:  # every step ran; raise as PyTorch's quantizer does under finite checks
            if checks_enabled():
                raise NonFiniteError(
                    "integer engine: the first layer's float sums overflow to NaN/inf (inputs of "
                    "magnitude near float32's largest, ~3e38); the quantizer after it refuses "
                    "them, as PyTorch's does: scale the inputs (or wrap the call in "
                    "fewbits.functional.finite_checks(False) for unchecked semantics)")
        elif rc:
            why = {-1: "this CPU lacks the ISA", -2: "malformed step", -3: "NaN/inf images",
                   -4: "out of memory"}.get(rc, "unknown")
            raise RuntimeError(f"integer engine: a step failed (code {rc}: {why})")

    def _build(self, n: int) -> tuple[dict[int, np.ndarray], list]:
        """Every value's buffer for batches of ``n`` and the program as runs of native steps
        (one ``fbi_run`` call each) between the few steps done in NumPy. Buffers are reused
        once their value is dead (:class:`~fewbits.runtime.integer_mem.Buffers`): one
        image's maps of ResNet-23 take ~0.4 MB instead of 1.2 MB, so a call that finds the
        caches cold (after another runtime's call) reloads less."""
        vals: dict[int, np.ndarray] = {1: np.empty((n, *self.prog.in_shape), np.float32)}
        bufs = Buffers(self.prog)
        scratch = np.empty(self._scratch, np.uint8)
        keep: list = [scratch, bufs]
        segments: list = []
        run: list = []

        def flush() -> None:
            if run:
                arr = (_Step * len(run))(*run)
                keep.append(arr)
                segments.append((arr, len(run)))
                run.clear()

        def conv_step(s: Conv, x: np.ndarray, y: np.ndarray) -> _Step:
            a = _ConvArgs()
            ctypes.pointer(a)[0] = self._args[id(s)]
            a.n, a.x, a.y, a.scratch = n, _ptr(x), _ptr(y), _ptr(scratch)
            keep.append(a)
            return _Step(kind=0, conv=ctypes.pointer(a))

        grid = self.prog.grid
        for k, s in enumerate(self.prog.steps):
            if isinstance(s, Conv):
                g = s.geom
                y = bufs.take(s.dst, (n, g["oh"], g["ow"], g["cout"]),
                              np.float32 if s.quant is None else
                              np.uint8 if s.dst in self.u8_maps else np.int16)
                if grid is not None and s.float_in and s.dst == grid.dst:
                    # images of 8-bit pixels: the first layer on their codes (integer_grid),
                    # bytes where it reads bytes (VNNI); padding channels stay 0
                    cy, u8 = grid.geom["cin"], self._args[id(grid)].in_u8
                    codes = np.zeros((n, g["h"], g["w"], cy), np.uint8 if u8 else np.int16)
                    keep.append(codes)
                    st = _Step(kind=8, x0=_ptr(vals[s.src]), y=_ptr(codes))
                    st.i[:5] = [n, g["cin"], g["h"] * g["w"], cy, u8]
                    run += [st, conv_step(grid, codes, y)]
                run += plane_steps(self.planes, s, conv_step, vals[s.src], y, self.plane_counts)
                run.append(conv_step(s, vals[s.src], y))
            elif isinstance(s, Add):  # elementwise: may write over an operand that dies here
                y = bufs.take(s.dst, vals[s.a].shape, vals[s.a].dtype, over=(s.a, s.b), at=k)
                st = _Step(kind=1, count=y.size, x0=_ptr(vals[s.a]), x1=_ptr(vals[s.b]),
                           y=_ptr(y))
                st.i[0], st.i[1], st.f[0], st.f[1] = s.lo, s.hi, s.fa, s.fb
                run.append(st)
            elif isinstance(s, Pool):
                g = s.geom
                y = bufs.take(s.dst, (n, g["oh"], g["ow"], g["c"]),
                              np.float32 if s.op == 2 else np.int16)
                work = np.empty(g["c"], np.int32)
                keep.append(work)
                st = _Step(kind=6 if s.op == 2 else 2, x0=_ptr(vals[s.src]), y=_ptr(y),
                           work=_ptr(work))
                st.i[:15] = [s.op, n, g["h"], g["w"], g["c"], g["oh"], g["ow"], g["kh"],
                             g["kw"], g["sh"], g["sw"], g["ph"], g["pw"], g["dh"], g["dw"]]
                run.append(st)
            elif isinstance(s, FAdd):
                y, st = _fadd_step(s, vals, keep, bufs, k)
                run.append(st)
            elif isinstance(s, GlobalAvg):
                src = vals[s.src]
                c = src.shape[-1]  # every map NHWC, a global average's (N, 1, 1, C) too
                y = bufs.take(s.dst, (n, 1, 1, c), np.float32)
                st = _Step(kind=3 if s.from_int else 5, x0=_ptr(src), y=_ptr(y))
                st.i[0], st.i[1], st.i[2], st.f[0] = n, src.size // (n * c), c, s.scale
                run.append(st)
            else:
                flush()
                segments.append(s)
                shape, dtype = self._python_buffer(s, vals, n)
                y = bufs.take(s.dst, shape, dtype)
            vals[s.dst] = y
            bufs.step_done(k)
        flush()
        self._keep_batch[n] = keep
        return vals, segments

    @staticmethod
    def _python_buffer(s: object, vals: dict[int, np.ndarray], n: int
                       ) -> tuple[tuple[int, ...], type]:
        if isinstance(s, Concat):
            a = vals[s.srcs[0]]
            return (*a.shape[:-1], sum(s.chans)), np.float32 if a.dtype == np.float32 else np.int16
        x = vals[s.src]
        if getattr(s, "nchw", False):  # images quantized: NCHW -> NHWC codes
            return (x.shape[0], *x.shape[2:], x.shape[1]), np.int16
        return x.shape, np.int16  # Quantize, Clamp

    def _python_step(self, s: object, vals: dict[int, np.ndarray], n: int) -> None:
        y = vals[s.dst]
        if isinstance(s, Quantize):
            src = vals[s.src]
            # the images' NCHW map -> NHWC codes; flattened images keep PyTorch's C, H, W order
            src = np.ascontiguousarray(src.transpose(0, 2, 3, 1) if s.nchw else src, np.float32)
            self._lib.fbi_quantize(ctypes.byref(self._qargs[id(s)]), src.size, _ptr(src),
                                   _ptr(y))
        elif isinstance(s, Clamp):
            np.clip(vals[s.src], s.lo, s.hi, out=y)
        elif isinstance(s, Concat):
            off = 0
            for i, m, c in zip(s.srcs, s.muls, s.chans, strict=True):
                y[..., off:off + c] = vals[i] * np.int16(m)
                off += c

    def _output(self, y: np.ndarray, n: int) -> Tensor:
        out = self.prog.out
        if out.kind == "input":  # the model returns its images (NCHW, as they came)
            return torch.from_numpy(y.reshape(n, *out.shape))
        if out.kind == "float" and len(out.shape) == 1 and y.flags.c_contiguous:
            return torch.from_numpy(y.reshape(n, out.shape[0]))  # the logits, as they are
        if out.kind == "int":  # each code's value as PyTorch forms it (Value.pt)
            kofs, sub = out.pt if out.pt is not None else (0, 0.0)
            y = (y.astype(np.float32) - np.float32(kofs)) * np.float32(out.scale)
            if sub:
                y = y + np.float32(sub)
        if out.flat_from is not None:  # an NHWC map flattened: PyTorch's (C, H, W) order
            c, h, w = out.flat_from
            y = y.reshape(n, h, w, c).transpose(0, 3, 1, 2)
        elif len(out.shape) == 3:
            return torch.from_numpy(np.ascontiguousarray(y.reshape(n, *out.shape[1:],
                                                                   out.shape[0])
                                                         .transpose(0, 3, 1, 2)))
        return torch.from_numpy(np.ascontiguousarray(y.reshape(n, math.prod(out.shape))))
