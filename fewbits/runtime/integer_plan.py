"""Compile a network's ``torch.fx`` graph into the integer engine's program
(:mod:`fewbits.runtime.integer`).

Every hidden tensor lives on an integer grid: int16 codes ``k`` in NHWC order with value
``k * scale`` (zero points are folded into ``k``, so zero padding is exact). A convolution /
linear layer and what follows it up to the next quantizer become one :class:`Conv` step:
integer weights from the weight quantizer's codes (:meth:`Quantizer.affine`), int32 sums, and
an epilogue ``q(fma(relu?(acc * s_acc + bias), alpha, beta))`` that folds the conv bias, a
ReLU before batch norm (min-max's order), batch norm (PyTorch's own ``rsqrt`` / fused
multiply-add arithmetic) and the quantizer, whose clamp also takes ReLU / clamps after it.
Max pooling and ReLU commute with a (monotone) quantizer, so a quantizer further down (the
next layer's ``input_quantizer``, as ``quantize_`` places them) is pulled back through them.

Residual sums: two grids whose scales differ by a power of two, and whose codes' values are
``k * scale`` (no zero-point offset), are summed exactly on the finer one (int16; the bound is
tracked and checked). Other operands (min-max's learned ranges: no common grid) are summed as
PyTorch sums them (:class:`FAdd`): a float32 NHWC map of PyTorch's values bit for bit, from
each code's value ``fl(fl((k - kofs) * scale) + sub)`` (:attr:`Value.pt`), read by float-input
layers (their float sums in their own order; a 1x1 one on the map's integer planes where
:mod:`~fewbits.runtime.integer_planes` proves it can), max pooling, global average and channel
concatenation. A ReLU right after such a sum is folded into it; other operations on a float
map raise. Nothing is approximated today (``Program.exact`` True; a step that approximates
must set it False and say where in ``Program.notes``).

Anything else raises ``ValueError`` naming the node and the operation, so that the planner
falls back to the next backend.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..layers import QuantAct, QuantConv2d, QuantLinear
from .conv_pad import zero_padding
from .integer_guards import I16, int16_codes

__all__ = ["ADDS", "FLATTENS", "GAP_FNS", "I16", "MAXPOOL_FNS", "RELU_FNS", "Add", "Clamp",
           "Compiler", "Concat", "Conv", "FAdd", "GlobalAvg", "Pool", "Program", "QuantParams",
           "Quantize", "Tracer", "Value", "bn_affine", "clamp_after", "fold_params", "pack_u8",
           "pair", "quant_params"]

_I32 = 2**31 - 1
_NB, _NBF = 16, 8  # output channels per packed block (int16 / float), as _integer_engine.c
_RELUS = (nn.ReLU,)
RELU_FNS = (torch.relu, nn.functional.relu, torch.nn.functional.relu)
ADDS = (operator.add, torch.add)
FLATTENS = (torch.flatten,)
MAXPOOL_FNS = (nn.functional.max_pool2d, torch.max_pool2d)
GAP_FNS = (nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_avg_pool2d)


@dataclass
class QuantParams:
    """A quantizer as the engine applies it: ``k = clamp(rha((clamp(v, clo, chi) - sub) /
    scale) + kofs, klo, khi)``, value ``k * step``."""

    clo: float
    chi: float
    sub: float
    scale: float
    kofs: int
    klo: int
    khi: int
    step: float

    def code(self, v: float) -> int:
        """The code of one float value (for clamps pulled through the quantizer)."""
        f = np.float32
        c = min(max(f(v), f(self.clo)), f(self.chi))
        q = (c - f(self.sub)) / f(self.scale)
        r = math.floor(abs(q) + 0.5) if abs(q) % 1 == 0.5 else round(abs(q))
        k = int(math.copysign(r, q)) + self.kofs
        return min(max(k, self.klo), self.khi)


def quant_params(q: Any, where: str) -> QuantParams:
    """The engine form of an activation quantizer; ``ValueError`` for a grid it cannot run."""
    # ask the family for its forward in the engine's form; never its class
    form = getattr(q, "engine_grid", lambda: None)
    try:
        grid = form()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if grid is not None:
        clo, chi, sub, scale, kofs, klo, khi = grid
        return QuantParams(clo, chi, sub, scale, kofs, klo, khi, scale)
    raise ValueError(f"{where}: the integer engine runs uniform activation grids (fixed point, "
                     f"min-max), not {type(q).__name__}")


@dataclass
class Value:
    """A tensor of the program: ``kind`` ``"input"`` (the float NCHW images), ``"int"`` (int16
    NHWC codes, value ``k * scale``, codes within ``[lo, hi]``) or ``"float"`` (float32 NHWC /
    flat). ``shape``: ``(C, H, W)`` or ``(F,)``; ``flat_from``: the ``(C, H, W)`` a flat int
    tensor was flattened from (NHWC order: the next linear layer permutes its columns)."""

    id: int
    kind: str
    shape: tuple[int, ...]
    scale: float = 1.0
    lo: int = 0
    hi: int = 0
    producer: Any = None
    flat_from: tuple[int, int, int] | None = None
    #: ``(kofs, sub)`` where PyTorch's value of code ``k`` is ``fl(fl((k - kofs) * scale) +
    #: sub)`` (its quantizer's output), ``None`` where not known; a float sum needs it
    pt: tuple[int, float] | None = None


@dataclass
class Conv:
    """conv / linear + epilogue; see the module docstring. ``wpack``: packed weights."""

    src: int
    dst: int
    geom: dict
    wpack: np.ndarray
    sacc: np.ndarray
    bias: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    float_in: bool
    pre_relu: bool = False
    nhwc: bool = False  # float input is a float32 NHWC map (a residual stream), not images
    quant: QuantParams | None = None
    fclamp: tuple[float, float] = (-math.inf, math.inf)
    #: the value-domain clamps (ReLUs) between the epilogue and ``quant``: what its input is
    qclamp: tuple[float, float] = (-math.inf, math.inf)
    name: str = ""
    wpack8: np.ndarray | None = None  # u8 x s8 weights (AVX2 / VNNI paths), where exact
    kq4: int = 0
    kchunk: int = 1  # AVX2 u8 path: quads summed in int16 lanes before widening (see pack_u8)
    ushift: int = 0  # u8 path: bytes are codes - ushift; sums corrected by ``corr``
    corr: np.ndarray | None = None
    acc_range: np.ndarray | None = None  # int input: each channel's [min, max] int32 sum


@dataclass
class Add:
    """``dst = clamp(rha(a * fa + b * fb), lo, hi)``."""

    a: int
    b: int
    dst: int
    fa: float
    fb: float
    lo: int
    hi: int


@dataclass
class FAdd:
    """``dst = clamp(va + vb, lo, hi)`` in float32 (PyTorch's values, bit for bit): an int
    operand (``ka``/``kb`` ``(scale, kofs, sub)``) has value ``fl(fl((k - kofs) * scale) +
    sub)``; a float one (``None``) is its float32 map. ``pool``: the geometry of a max pooling
    (dilation 1) that reads the sum and nothing else: ``dst`` is the pooled map."""

    a: int
    b: int
    dst: int
    ka: tuple[float, int, float] | None
    kb: tuple[float, int, float] | None
    lo: float = -math.inf
    hi: float = math.inf
    pool: dict | None = None


@dataclass
class Concat:
    """Channel concatenation of int maps, each times an integer ``muls`` (a common grid), or
    of float maps (``muls`` 1)."""

    srcs: list
    muls: list
    chans: list
    dst: int


@dataclass
class Pool:
    """NHWC int max (``op`` 0), int sum (``op`` 1) or float max (``op`` 2) pooling."""

    src: int
    dst: int
    op: int
    geom: dict


@dataclass
class GlobalAvg:
    """Global average pool to float ``(N, C)`` (int input: ``sum * scale / HW``; float
    input: ``sum / HW``)."""

    src: int
    dst: int
    scale: float
    from_int: bool


@dataclass
class Quantize:
    """float -> int16 codes with ``quant``; ``nchw``: the source is the NCHW images, whose
    codes are NHWC (not where they were flattened: a linear layer reads them in C, H, W order)."""

    src: int
    dst: int
    quant: QuantParams
    nchw: bool = False


@dataclass
class Clamp:
    """int codes clamped to ``[lo, hi]`` (a ReLU or clamp that could not be folded)."""

    src: int
    dst: int
    lo: int
    hi: int


@dataclass
class Program:
    """The compiled network: ``steps`` in order, the input ``(C, H, W)`` and the output
    value (float ``(N, F)``, float NHWC or int NHWC to be scaled)."""

    steps: list = field(default_factory=list)
    in_shape: tuple[int, ...] = ()
    out: Value | None = None
    exact: bool = True
    notes: list[str] = field(default_factory=list)
    #: the first layer on the images' 8-bit codes (:mod:`~fewbits.runtime.integer_grid`)
    grid: Conv | None = None
    #: 1x1 layers on float streams on the map's planes, by output value (integer_planes)
    planes: dict = field(default_factory=dict)


class Tracer(fx.Tracer):
    """fewbits layers and activation quantizers stay leaves of the fx graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantAct, QuantConv2d, QuantLinear)) or \
            super().is_leaf_module(m, qualname)


def pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def clamp_after(lo: Any, hi: Any, lo2: Any, hi2: Any) -> tuple[Any, Any]:
    """The one clamp ``[lo, hi]`` then ``[lo2, hi2]`` make (each ``min(max(v, lo), hi)``, as
    torch.clamp: the upper bound wins where they cross): ``[max(lo, lo2), min(hi, hi2)]`` gave
    the lower one where a clamp has ``lo > hi`` or two ranges are disjoint."""
    return min(max(lo, lo2), hi2), min(max(hi, lo2), hi2)


def bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, beta)`` as PyTorch's CPU batch norm in eval mode computes them (then
    ``y = fma(x, alpha, beta)``)."""
    with torch.no_grad():
        var, mean = bn.running_var.float(), bn.running_mean.float()
        w = bn.weight.float() if bn.weight is not None else torch.ones_like(var)
        b = bn.bias.float() if bn.bias is not None else torch.zeros_like(var)
        alpha = w * torch.rsqrt(var + bn.eps)
        beta = (b.double() - mean.double() * alpha.double()).float()
    return alpha.numpy().copy(), beta.numpy().copy()


def _int_weights(m: nn.Module, name: str, coded: tuple | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(k, scale per output channel)``: integer weights with ``w = k * scale``. ``coded``:
    the ``(quantizer, Codes)`` a ``.fewbits`` file stored for a layer whose weight quantizer
    :func:`~fewbits.export.load_packed` dropped (its weight is their decoded values)."""
    q = getattr(m, "weight_quantizer", None)
    if q is None and coded is not None and tuple(coded[1].shape) == tuple(m.weight.shape):
        q, codes = coded
    elif q is None:
        raise ValueError(f"{name}: float weights on integer activations; the integer engine "
                         "needs a weight quantizer")
    else:
        codes = None
    with torch.no_grad():
        aff = q.affine(q.encode(m.weight) if codes is None else codes)
    if aff is None:
        raise ValueError(f"{name}: weights of {type(q).__name__} are not on a uniform grid")
    k = aff.int_repr.to(torch.int64)
    cout = k.shape[0]
    zp = aff.zero_point.reshape(-1)
    scale = aff.scale.reshape(-1).float()
    k = k - (zp.reshape(-1, *([1] * (k.dim() - 1))) if zp.numel() > 1 else zp)
    if int(k.abs().max()) > 255:
        raise ValueError(f"{name}: weight codes beyond 8 bits")
    s = scale.expand(cout) if scale.numel() == 1 else scale
    return k.numpy(), s.numpy().astype(np.float32)


def _pack_int(k: np.ndarray, groups: int) -> tuple[np.ndarray, int]:
    """``[cout, cg, kh, kw]`` -> per group ``[nb][kp/2][16][2]`` int16; returns (pack, kp)."""
    cout = k.shape[0]
    og = cout // groups
    kk = k.transpose(0, 2, 3, 1).reshape(cout, -1)  # taps (ky, kx, c): NHWC im2col order
    kp = kk.shape[1] + kk.shape[1] % 2
    nb = -(-og // _NB)
    out = np.zeros((groups, nb * _NB, kp), np.int16)
    out[:, :og, :kk.shape[1]] = kk.reshape(groups, og, -1)
    out = out.reshape(groups, nb, _NB, kp // 2, 2).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(out), kp


def _pow2(v: np.ndarray) -> bool:
    m, _ = np.frexp(v.astype(np.float64))
    return bool((m == 0.5).all())


def fold_params(s: Conv, inv: float) -> list[np.ndarray] | None:
    """``[alpha2, beta2]`` (float32, padded to whole blocks of 16 plus 16) for the VNNI
    epilogue's fold (``fbi_conv.fold`` in ``_integer_engine.c``): where every ``sacc`` is a
    power of two, the bias is 0 and ``inv`` a power of two, ``alpha * sacc * inv`` and
    ``beta * inv`` are exact in float32 (checked: zero or normal, and equal to the float64
    products), so one FMA on the int32 sums gives the codes of the unfolded epilogue bit for
    bit; None where not."""
    if not inv or not 2.0**-60 <= inv <= 2.0**60 or s.bias.any() or \
            not ((s.sacc > 0) & (s.sacc >= 2.0**-90) & (s.sacc <= 2.0**90)).all() or \
            not _pow2(s.sacc):
        return None
    a64 = s.alpha.astype(np.float64) * s.sacc.astype(np.float64) * inv
    b64 = s.beta.astype(np.float64) * inv
    out = []
    for v in (a64, b64):
        f = v.astype(np.float32)
        if not (f.astype(np.float64) == v).all() or not np.isfinite(f).all() or \
                ((f != 0) & (np.abs(f) < np.finfo(np.float32).tiny)).any() or \
                (np.abs(f) > 2.0**100).any():
            return None
        out.append(np.pad(f, (0, -(-len(f) // 16) * 16 + 16 - len(f))))
    return out


def pack_u8(k: np.ndarray, groups: int, hi: int) -> tuple[np.ndarray, int, int] | None:
    """u8 x s8 weights (codes in ``[0, hi]`` times int8): ``([groups][nb][kq4/4][16][4]``
    int8, ``kq4``, ``chunk``), or None where a weight is not int8 or ``hi > 255``. AVX-512
    VNNI (``vpdpbusd``) sums the products of a quad in int32 and takes any such weights (the
    caller bounds the int32 sums). AVX2's ``vpmaddubsw`` sums pairs of products in int16
    lanes: ``chunk`` is how many quads the kernel may sum there before widening them to int32
    (every partial sum of every lane of every chunk stays within int16, checked on these
    weights; at least 1), 0 where a single pair sum could saturate (AVX2 multiplies in int16
    instead)."""
    if hi > 255 or k.min() < -128 or k.max() > 127:
        return None
    cout = k.shape[0]
    og = cout // groups
    kk = k.transpose(0, 2, 3, 1).reshape(cout, -1)
    kq4 = -(-kk.shape[1] // 4) * 4
    full = np.zeros((cout, kq4), np.int64)
    full[:, :kk.shape[1]] = kk
    # lane sums: |w0| + |w1| (lane 0) and |w2| + |w3| (lane 1) of each quad, times hi
    lanes = (np.abs(full[:, 0::2]) + np.abs(full[:, 1::2])).reshape(cout, kq4 // 4, 2) * hi
    chunk = 0 if int(lanes.max(initial=0)) > 32767 else 1
    while 0 < chunk < kq4 // 4:
        c = chunk * 2
        pad = -(-lanes.shape[1] // c) * c - lanes.shape[1]
        sums = np.pad(lanes, ((0, 0), (0, pad), (0, 0))).reshape(cout, -1, c, 2).sum(2)
        if int(sums.max(initial=0)) > 32767:
            break
        chunk = c
    nb = -(-og // _NB)
    out = np.zeros((groups, nb * _NB, kq4), np.int8)
    out[:, :og] = full.reshape(groups, og, kq4)
    out = out.reshape(groups, nb, _NB, kq4 // 4, 4).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(out), kq4, chunk


def _pack_float(w: np.ndarray, groups: int, nhwc: bool = False) -> tuple[np.ndarray, int]:
    """``[cout, cg, kh, kw]`` float -> per group ``[nb][kf][8]``, taps (c, ky, kx) (NCHW
    input) or (ky, kx, c) (``nhwc``)."""
    cout = w.shape[0]
    og = cout // groups
    ww = (w.transpose(0, 2, 3, 1) if nhwc else w).reshape(cout, -1)
    kf = ww.shape[1]
    nb = -(-og // _NBF)
    out = np.zeros((groups, nb * _NBF, kf), np.float32)
    out[:, :og] = ww.reshape(groups, og, kf)
    out = out.reshape(groups, nb, _NBF, kf).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(out), kf


class Compiler:
    def __init__(self, model: nn.Module, in_shape: tuple[int, ...],
                 codes: dict | None = None) -> None:
        self.model, self.prog = model, Program(in_shape=tuple(in_shape))
        self.codes = codes or {}  # a packed file's weight codes ("layer.weight": (q, Codes))
        self.modules = dict(model.named_modules())
        self.n_vals = 0

    def new(self, kind: str, shape: tuple[int, ...], **kw: Any) -> Value:
        self.n_vals += 1
        return Value(self.n_vals, kind, tuple(shape), **kw)

    # ------------------------------------------------------------------ pending layers
    def layer(self, name: str, m: nn.Module, x: Value) -> Conv:
        """A conv / linear step with an open epilogue (output still float)."""
        q_in = getattr(m, "input_quantizer", None)
        if q_in is not None:
            x = self.quantize(x, quant_params(q_in, f"{name}.input_quantizer"), name)
        if getattr(m, "output_quantizer", None) is not None:
            raise ValueError(f"{name}: output_quantizer is not run by the integer engine")
        with torch.no_grad():
            b = m.quantized_bias() if isinstance(m, (QuantConv2d, QuantLinear)) else m.bias
            wq = m.quantized_weight() if isinstance(m, (QuantConv2d, QuantLinear)) else m.weight
        if isinstance(m, nn.Conv2d):
            if (pad := zero_padding(m)) is None:
                raise ValueError(f"{name}: padding {m.padding!r} / {m.padding_mode!r}: the "
                                 "integer engine runs zero padding, the same on both sides")
            if len(x.shape) != 3:
                raise ValueError(f"{name}: a convolution needs a (C, H, W) input")
            c, h, w = x.shape
            (kh, kw), (sh, sw) = pair(m.kernel_size), pair(m.stride)
            (ph, pw), (dh, dw) = pad, pair(m.dilation)
            oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            groups, cout, wt = m.groups, m.out_channels, wq
        elif isinstance(m, nn.Linear):
            c = m.in_features
            h = w = kh = kw = sh = sw = dh = dw = oh = ow = 1
            ph = pw = 0
            groups, cout = 1, m.out_features
            wt = wq.reshape(cout, c, 1, 1)
            if x.flat_from is not None:  # NHWC-flattened input: columns to (h, w, c) order
                fc, fh, fw = x.flat_from
                wt = wq.reshape(cout, fc, fh, fw).permute(0, 2, 3, 1).reshape(cout, c, 1, 1)
            if math.prod(x.shape) != c or len(x.shape) != 1:
                raise ValueError(f"{name}: expects {c} flat inputs (flatten first), gets "
                                 f"{x.shape}")
        else:
            raise ValueError(f"{name}: {type(m).__name__} is not a layer of the integer engine")
        geom = dict(n=0, h=h, w=w, cin=c, oh=oh, ow=ow, cout=cout, kh=kh, kw=kw, sh=sh,
                    sw=sw, ph=ph, pw=pw, dh=dh, dw=dw, groups=groups, kp=0, kf=0)
        bias = np.zeros(cout, np.float32) if b is None else b.detach().float().numpy().copy()
        ones, zeros = np.ones(cout, np.float32), np.zeros(cout, np.float32)
        if x.kind == "int":
            k, sw_ = _int_weights(m, name, self.codes.get(f"{name}.weight"))
            if isinstance(m, nn.Linear):
                if x.flat_from is not None:
                    k = k.reshape(cout, *x.flat_from).transpose(0, 2, 3, 1)
                k = np.ascontiguousarray(k.reshape(cout, c, 1, 1))
            elif groups == 1 and k.shape[1] < c:  # an input padded to whole quads of channels
                k = np.pad(k, ((0, 0), (0, c - k.shape[1]), (0, 0), (0, 0)))
            amax = max(abs(x.lo), abs(x.hi))
            peak = int(np.abs(k).reshape(cout, -1).sum(1).max()) * amax
            if peak > _I32:
                raise ValueError(f"{name}: int32 sums could reach {peak}: inputs too wide")
            pack, geom["kp"] = _pack_int(k, groups)
            sacc = (np.float32(x.scale) * sw_).astype(np.float32)
            # u8 path: bytes u = k - shift in [0, 255] (signed codes shifted up; the padding
            # byte is -shift), sums corrected by shift * (the channel's weight sum)
            shift = min(x.lo, 0)
            umax = x.hi - shift
            u8 = pack_u8(k, groups, umax) if umax <= 255 and \
                int(np.abs(k).reshape(cout, -1).sum(1).max()) * umax <= _I32 else None
        elif x.kind in ("input", "float"):
            nhwc = x.kind == "float" and len(x.shape) == 3  # a float map (a residual stream)
            pack, geom["kf"] = _pack_float(wt.detach().float().numpy(), groups, nhwc)
            sacc = ones.copy()
        else:
            raise ValueError(f"{name}: input of kind {x.kind}")
        conv = Conv(x.id, 0, geom, pack, sacc, bias, ones, zeros, x.kind != "int", name=name,
                    nhwc=x.kind == "float" and len(x.shape) == 3)
        if x.kind == "int":  # each channel's int32 sums' [min, max] (codes, 0 for padding)
            kk = k.reshape(cout, -1).astype(np.int64)[:, :, None] * [min(x.lo, 0), max(x.hi, 0)]
            conv.acc_range = np.stack([kk.min(2).sum(1), kk.max(2).sum(1)], 1)
        if x.kind == "int" and u8 is not None:
            conv.wpack8, conv.kq4, conv.kchunk = u8
            if shift:
                conv.ushift = shift
                conv.corr = (shift * k.reshape(cout, -1).sum(1)).astype(np.int32)
        return conv

    def quantize(self, x: Value, qp: QuantParams, name: str) -> Value:
        if x.kind == "int":
            if x.scale == qp.step and qp.klo <= x.lo and x.hi <= qp.khi:
                return x  # already on that grid, within its range: the quantizer is identity
            raise ValueError(f"{name}: requantizing an integer tensor to another grid is not "
                             "run by the integer engine")
        if x.kind not in ("float", "input"):
            raise ValueError(f"{name}: the integer engine quantizes float tensors, not "
                             f"{x.kind!r}")
        # elementwise: a flat map, a global average's (C, 1, 1), an NHWC map (a float layer's
        # output, a float stream, the images: quantize_input=True; NCHW, their codes NHWC)
        int16_codes(qp.klo, qp.khi, name)
        y = self.new("int", x.shape, scale=qp.step, lo=qp.klo, hi=qp.khi, pt=(qp.kofs, qp.sub))
        self.prog.steps.append(Quantize(x.id, y.id, qp, x.kind == "input" and len(x.shape) == 3))
        return y
