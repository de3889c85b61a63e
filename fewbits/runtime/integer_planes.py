"""1x1 layers on a non-negative float stream, run on integer planes of the map.

Min-max's residual sums have no common integer grid: they are float32 NHWC maps of PyTorch's
own values (:class:`~fewbits.runtime.integer_plan.FAdd`, the ReLU after them folded in), and
the 1x1 layer that opens each next bottleneck multiplied them in float32 FMAs (16 multiply-adds
a cycle on Zen 4, against ``vpdpbusd``'s 64). Where such a layer reads a map proven ``>= 0``
(:func:`nonneg_values`) and below a bound ``B`` (:func:`upper_bounds`: float32 sums of the
quantizers' largest values, clamped as the sums are), with int8 weights, :func:`plane_layers`
gives it a twin (:class:`PlaneConv`) that ``fbi_run``'s step kind 9 runs image by image
(``_integer_engine.c``, "float streams as planes"): ``delta = 2^e`` with ``B < 2^24 delta``
(the smallest such power of two), each value ``x`` becomes the integer ``m = RNE(x / delta)``
in ``[0, 2^24)`` (ties to even; the division by a power of two is exact), the sums ``S = sum k
m`` of the integer weights ``k`` are exact (on AVX-512 VNNI three ``u8 x s8`` sums of the bytes
of ``m``; AVX2 and portable C reach the same integer their own way) and rounded to float32
once, ``S_f = RN(S)``; the layer's epilogue then runs on ``S_f`` with ``sacc = sw delta``
(``W ~ sw k``; exact), the IEEE operations the float layer runs on its float sums. Every path
gives the same outputs. On Zen 4 the layers of the trained min-max ResNet-23 run ~1.08x
faster than in float (docs/PERFORMANCE.md, session 13: three byte planes cost 3/4 of the
float layer's arithmetic; converting the map and the epilogue take back most of the rest), and
on AVX2 ~1.7x slower (no ``u8 x s8`` sums into int32 there).

Accuracy: each value moves by at most ``delta / 2 <= 2^-24 B``, so before the epilogue ``v =
fl(S_f sw delta)`` differs from the exact sum ``y* = sum W x`` of PyTorch's weights by at most
``|sw| sum|k| delta / 2 + sum |W - sw k| x + (2 u + u^2) |S sw delta|`` per pixel (``u =
2^-24``: the roundings of ``S`` and of the product; :func:`error_bound`): ``2^-24 B sum|W|``
and float32's own relative roundings, far inside the float layer's worst case ``~K 2^-24 M
sum|W|`` for an image whose max ``M`` is within a few bits of ``B`` (``K`` inputs; the zoo's
ResNet-23: ``B`` is 1-2 bits above the maps' max). Unlike the float layer's, the bound does not
shrink with the pixel's own values: a pixel far below ``B`` keeps fewer significant bits (its
values are multiples of ``delta``). On the trained min-max ResNet-23 (1000 CIFAR-10 test
images) the logits agree with PyTorch's on 99.8 % of the answers (99.9 % with the float layer;
the one more flip is an image whose two best logits are 0.034 apart).

An image runs the float layer instead where an ``m`` falls outside ``[0, 2^24)``: NaN, inf, a
value below ``-delta / 2`` or above the bound, which only a bug could put there (checked on
every value as it is converted); and where every ``m`` is below ``2^16`` (the image's max
under ``2^-8`` of ``2^24 delta``): a bound far above the image's values (a min-max range its
data never reaches) would make ``delta`` coarse against them (at worst every ``m`` 0, the
outputs the bias alone); above it each value moves by at most ``2^-17`` of the image's max.
A layer is taken where it is 1x1, stride 1, unpadded, one
group, at most 1024 input channels, int8 weights with ``sum|k| <= 32768`` per output channel
(the int32 sums of the byte planes), ``sw delta`` exact and no epilogue value able to overflow.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .integer_plan import Add, Clamp, Compiler, Conv, FAdd, Pool, Program, Quantize

__all__ = ["PlaneConv", "error_bound", "nonneg_values", "plane_layers", "plane_steps",
           "upper_bounds"]

_CIN_MAX = 1024  # PLANE_CIN_MAX in _integer_engine.c
_SUM_K_MAX = 32768  # |acc1 * 256 + acc0| <= 65535 sum|k| < 2^31
_MARGIN = 1 + 2.0**-20  # a float32 rounding's relative error (2^-24) with room to spare


@dataclass
class PlaneConv(Conv):
    """A float-stream layer's twin on planes: its integer weights (``wpack`` int16,
    ``wpack8`` int8), ``sacc`` their scales times ``delta = 2^e``, every other epilogue field
    the float layer's."""

    e: int = 0


def nonneg_values(prog: Program) -> set[int]:
    """Float maps proven ``>= 0`` (or NaN): a float sum whose clamp's bounds are both ``>= 0``
    (``min(max(v, lo), hi)``: a ReLU folded in), a float layer's output clamped so, and a max
    pooling of such a map."""
    out: set[int] = set()
    for s in prog.steps:
        if (isinstance(s, FAdd) and min(s.lo, s.hi) >= 0) or \
                (isinstance(s, Conv) and s.quant is None and min(s.fclamp) >= 0) or \
                (isinstance(s, Pool) and s.op == 2 and s.src in out):
            out.add(s.dst)
    return out


def _codes(made: dict, v: int) -> tuple[int, int] | None:
    """The code range of an int value, from the step that makes it (None: not known)."""
    s = made.get(v)
    if isinstance(s, (Conv, Quantize)) and s.quant is not None:
        return s.quant.klo, s.quant.khi
    if isinstance(s, (Add, Clamp)):
        return s.lo, s.hi
    if isinstance(s, Pool) and s.op == 0:
        return _codes(made, s.src)
    return None


def upper_bounds(prog: Program) -> dict[int, float]:
    """An upper bound of each float map's values where one is proven (float32 arithmetic,
    monotone in each operand: a float sum's ``fl(a + b)`` is at most ``fl(ub_a + ub_b)``, a
    code's value ``fl(fl((k - kofs) scale) + sub)`` at most that of one end of its range),
    then clamped as the sum is; max pooling keeps its input's; a float layer's output its
    clamp's upper end."""
    f32, made, out = np.float32, {s.dst: s for s in prog.steps}, {}

    def ub(v: int, k: tuple | None) -> float | None:
        if k is None:
            return out.get(v)
        r = _codes(made, v)
        if r is None:
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            ends = [(f32(c - k[1]) * f32(k[0])) + f32(k[2]) for c in r]
        return float(max(ends))

    for s in prog.steps:
        if isinstance(s, FAdd):
            a, b = ub(s.a, s.ka), ub(s.b, s.kb)
            if a is not None and b is not None:
                with np.errstate(over="ignore", invalid="ignore"):
                    t = f32(f32(a) + f32(b))
                t = min(max(t, f32(s.lo)), f32(s.hi))
                if math.isfinite(t):
                    out[s.dst] = float(t)
        elif isinstance(s, Pool) and s.op == 2 and s.src in out:
            out[s.dst] = out[s.src]
        elif isinstance(s, Conv) and s.quant is None and math.isfinite(s.fclamp[1]):
            out[s.dst] = float(s.fclamp[1])
    return out


def _fits(s: Conv, sacc: np.ndarray, s1: np.ndarray) -> bool:
    """No epilogue value overflows (all below ``2^120``) for sums up to ``2^24 sum|k|``."""
    aw = np.abs(sacc.astype(np.float64))
    bias, a, b = (np.abs(v.astype(np.float64)) for v in (s.bias, s.alpha, s.beta))
    v = (2.0**24 * s1 * aw * _MARGIN + bias) * _MARGIN
    return bool(np.isfinite(v).all() and ((v * a + b) * _MARGIN).max(initial=0) < 2.0**120)


def _twin(comp: Compiler, s: Conv, bound: float) -> PlaneConv | None:
    m = comp.modules.get(s.name)
    if m is None or getattr(m, "input_quantizer", None) is not None or not bound > 0:
        return None
    e = math.frexp(bound)[1] - 24  # every value < 2^(e + 24)
    if not -126 <= e <= 126:  # 2^e and 2^-e: normal floats
        return None
    g = s.geom
    codes = comp.new("int", (g["cin"], g["h"], g["w"]), scale=1.0, lo=0, hi=255)
    try:
        alt = comp.layer(s.name, m, codes)  # ValueError: float weights, codes beyond 8 bits
    except ValueError:
        return None
    if alt.wpack8 is None or alt.geom["kp"] < g["cin"]:
        return None  # weights beyond int8
    cout, kp = g["cout"], alt.geom["kp"]
    k = alt.wpack[0].transpose(0, 2, 1, 3).reshape(-1, kp)[:cout].astype(np.int64)
    s1 = np.abs(k).sum(1)
    sacc64 = alt.sacc.astype(np.float64) * 2.0**e  # sw delta
    sacc = sacc64.astype(np.float32)
    if s1.max(initial=0) > _SUM_K_MAX or not np.isfinite(sacc).all() or \
            (sacc.astype(np.float64) != sacc64)[s1 > 0].any() or not _fits(s, sacc, s1):
        return None
    base = {f.name: getattr(s, f.name) for f in dataclasses.fields(Conv)}
    base.update(src=codes.id, geom={**g, "kp": kp, "kf": 0}, wpack=alt.wpack, sacc=sacc,
                float_in=False, nhwc=False, wpack8=alt.wpack8, kq4=alt.kq4,
                kchunk=alt.kchunk, ushift=0, corr=None)
    return PlaneConv(**base, e=e)


def plane_layers(comp: Compiler) -> dict[int, PlaneConv]:
    """``{output value: twin}`` of the program's 1x1 layers on non-negative float maps that
    run on planes (see the module docstring for which)."""
    nonneg, bounds, out = nonneg_values(comp.prog), upper_bounds(comp.prog), {}
    for s in comp.prog.steps:
        if not isinstance(s, Conv) or not s.float_in or not s.nhwc or s.src not in nonneg or \
                s.src not in bounds:
            continue
        g = s.geom
        if (g["kh"], g["kw"], g["sh"], g["sw"], g["ph"], g["pw"], g["groups"]) != \
                (1, 1, 1, 1, 0, 0, 1) or g["kf"] != g["cin"] or g["cin"] > _CIN_MAX:
            continue
        twin = _twin(comp, s, bounds[s.src])
        if twin is not None:
            out[s.dst] = twin
    return out


def plane_steps(planes: dict, s: Conv, conv_step: Any, x: np.ndarray, y: np.ndarray,
                counts: np.ndarray) -> list:
    """The native step in front of float layer ``s``'s where it has a twin in ``planes`` (the
    engine's ``{value: PlaneConv}``; ``fbi_run`` kind 9: each image on its planes, else by
    ``s``), else none; ``conv_step`` the engine's step maker, ``counts`` its int64 counters
    (images on planes, on the float layer)."""
    twin = planes.get(s.dst)
    if twin is None:
        return []
    st = conv_step(twin, x, y)
    st.kind, st.x1, st.i[0] = 9, counts.__array_interface__["data"][0], twin.e
    return [st]


def error_bound(x: np.ndarray, w: np.ndarray, k: np.ndarray, sw: np.ndarray,
                delta: float) -> np.ndarray:
    """The module docstring's bound on ``|v - sum W x|`` per pixel and output channel
    (``(pixels, cout)``) for a map ``x`` (``(pixels, cin)``, ``>= 0``), PyTorch's weights
    ``w`` (``(cout, cin)``), their integer form ``k`` and scales ``sw``, and ``delta``; with a
    margin for its own float64 arithmetic."""
    x64, w64, k64, sw64 = (np.asarray(a, np.float64) for a in (x, w, k, sw))
    ak, asw = np.abs(k64), np.abs(sw64)
    s_abs = (x64 @ ak.T + ak.sum(1) * delta / 2) * asw  # >= |S sw delta|
    b = asw * ak.sum(1) * delta / 2 + x64 @ np.abs(w64 - sw64[:, None] * k64).T
    return (b + (2 * 2.0**-24 + 2.0**-48) * s_abs) * (1 + 2.0**-30) + 2.0**-140
