"""Fast CPU inference where the bits allow it: int8 convolutions and XNOR / popcount binary convs.

:func:`compile_for_cpu` takes a fewbits network (live, rebuilt from a ``.fewbits`` file, or the
file itself), freezes its quantized weights, and replaces each convolution / linear layer whose
*input* is known to lie on an integer grid by an integer kernel:

* **int8** (oneDNN through ``torch.ops.onednn``, the kernels PyTorch's x86 quantization uses):
  when the input comes out of a uniform activation quantizer (fixed point, min-max; possibly
  through ReLU, max-pool or a residual sum of same-scale grids) and the weight is an int8 grid
  (fixed point ``n <= 8``, min-max levels within ``[-128, 127]`` of the zero point, INQ, +-1).
  The input is turned into its uint8 codes *exactly* (it already is on the grid), the product
  is accumulated in int32, and the float output is ``acc * x_scale * w_scale[o]``: the same real
  numbers the float network computes, rounded once instead of along a float sum. Grids wider than
  256 levels (a residual sum of 8-bit tensors) are checked per batch and run in float when a value
  leaves the uint8 window, so the result never saturates.
* **xnor** (binary net): both operands are +-1. Signs are bit-packed 64 channels to a word and
  each output is ``taps * C - 2 * popcount(x XOR w)``, an exact integer, identical to the float
  convolution of the same +-1 tensors. A small C kernel (``_cpu_kernels.c``, compiled with the
  system C compiler on first use into ``$FEWBITS_CACHE`` or ``~/.cache/fewbits``) does this;
  without a compiler a pure-PyTorch version (SWAR popcount on int64 words) gives the same
  numbers, slower.

Everything else (batch norm, activation quantizers, pooling, the float stem and classifier)
computes what the float network computes, in inference-only forms: in place where the traced
graph shows nobody else reads a tensor, channels-last, with batch norm as the same fused
multiply-add as PyTorch's (checked on probes). Families whose activations are float (the
``*_connect`` ones, binary weight, INQ) have no integer path: their layers stay float (frozen
weights).

A :class:`CompiledModel` is for inference only and keeps scratch buffers between calls: do not
call one instance from several threads at once, nor keep intermediate tensors (hooks) across
calls.

    >>> from fewbits.models import create_model
    >>> fast = compile_for_cpu(create_model("mnist_fp_net_mlp", width=64))
    >>> sorted(set(fast.plan.values()))  # the first layer sees float pixels
    ['float', 'int8']
"""

from __future__ import annotations

import copy
import ctypes
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from .._cbuild import CLibrary
from ..layers import QuantAct, QuantConv2d, QuantLinear
from ..quantizers import BinaryTanh, Codes, FixedPoint, MinMax, Quantizer
from .onnx import _trace, resolve_source

__all__ = [
    "CompiledModel",
    "Grid",
    "Int8Conv2d",
    "Int8Linear",
    "XnorConv2d",
    "XnorLinear",
    "compile_for_cpu",
    "fast_path_kind",
    "pack_signs",
    "xnor_backend",
    "xnor_conv2d",
]


# --------------------------------------------------------------------------- grids

@dataclass(frozen=True)
class Grid:
    """Values ``(k - zero_point) * scale`` for integers ``k`` in ``[kmin, kmax]``;
    ``binary``: the values are exactly +-1."""

    scale: float
    zero_point: int
    kmin: int
    kmax: int
    binary: bool = False

    @property
    def levels(self) -> int:
        return self.kmax - self.kmin + 1


def _quantizer_grid(q: Quantizer | None) -> Grid | None:
    if isinstance(q, FixedPoint):
        k = 2 ** (q.n - 1) - 1 if q.sign else 2**q.n - 1
        return Grid(q.delta, 0, -k if q.sign else 0, k)
    if isinstance(q, MinMax) and q.qr_min.numel() == 1:
        scale, zp, _, _ = q.grid(torch.zeros(()))
        return Grid(float(scale), int(zp), q.ql_min, q.ql_max)
    if isinstance(q, BinaryTanh):
        return Grid(1.0, 0, -1, 1, binary=True)
    return None


def _propagate(model: nn.Module, graph: fx.Graph) -> dict[str, Grid | None]:
    """The grid of every node's output (``None``: not known to be on a grid)."""
    modules = dict(model.named_modules())
    grids: dict[str, Grid | None] = {}

    def of(a: Any) -> Grid | None:
        return grids.get(a.name) if isinstance(a, fx.Node) else None

    for node in graph.nodes:
        g: Grid | None = None
        if node.op == "call_module":
            m = modules[node.target]
            x = of(node.args[0]) if node.args else None
            if isinstance(m, QuantAct):
                g = _quantizer_grid(m.quantizer) if m.quantizer is not None else x
            elif isinstance(m, (QuantConv2d, QuantLinear)):
                g = _quantizer_grid(m.output_quantizer)
            elif isinstance(m, nn.ReLU) and x is not None and x.kmin <= x.zero_point <= x.kmax:
                g = Grid(x.scale, x.zero_point, max(x.kmin, x.zero_point), x.kmax)
            elif isinstance(m, (nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten)):
                g = x
        elif node.op == "call_function":
            if node.target is torch.flatten:
                g = of(node.args[0])
            elif node.target in (nn.functional.relu, torch.relu):
                x = of(node.args[0])
                if x is not None and x.kmin <= x.zero_point <= x.kmax:
                    g = Grid(x.scale, x.zero_point, max(x.kmin, x.zero_point), x.kmax)
            elif getattr(node.target, "__name__", "") == "add" and len(node.args) == 2:
                a, b = of(node.args[0]), of(node.args[1])
                if (a is not None and b is not None and a.scale == b.scale
                        and a.zero_point == b.zero_point == 0):
                    g = Grid(a.scale, 0, a.kmin + b.kmin, a.kmax + b.kmax)
        grids[node.name] = g
    return grids


# --------------------------------------------------------------------------- int8 (oneDNN)

def _onednn_ok() -> str | None:
    """``None`` when oneDNN int8 kernels with float output work here, else the reason."""
    try:
        ops = torch.ops.onednn
        w = torch.ones(2, 3, 1, 1, dtype=torch.int8)
        s = torch.ones(2)
        packed = ops.qconv_prepack(w, s, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
        x = torch.ones(1, 3, 2, 2, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        y = ops.qconv2d_pointwise(x, 1.0, 0, packed, s, torch.zeros(2, dtype=torch.int64), None,
                                  [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [],
                                  "")
        if not torch.equal(y, torch.full_like(y, 3.0)):
            return "oneDNN int8 convolution gave a wrong test result"
    except (AttributeError, RuntimeError) as e:
        return f"oneDNN int8 kernels unavailable in this torch build ({e})"
    return None


def _int8_weight(w: Tensor, coded: tuple[Quantizer, Codes] | None
                 ) -> tuple[Tensor, Tensor] | None:
    """``(int8 codes, float32 scale per output channel)`` with ``codes * scale == w``, or None."""
    w = w.detach().float()
    out = w.shape[0]
    if coded is not None:
        q, c = coded
        if isinstance(q, FixedPoint):
            k = c.codes.reshape(c.shape) - q._offset
            if k.numel() and -128 <= int(k.min()) and int(k.max()) <= 127:
                return k.to(torch.int8), torch.full((out,), q.delta)
        elif isinstance(q, MinMax):
            zp = c.params["zero_point"].reshape(-1)
            view = (-1,) + (1,) * (len(c.shape) - 1) if zp.numel() > 1 else ()
            k = c.codes.reshape(c.shape) + q.ql_min - zp.reshape(view)
            if k.numel() and -128 <= int(k.min()) and int(k.max()) <= 127:
                scale = c.params["scale"].reshape(-1).float().expand(out).clone()
                return k.to(torch.int8), scale
    # Infer the grid from the values: one step for the whole tensor (fixed point, INQ, +-1),
    # else one per output channel (+-alpha).
    flat = w.reshape(out, -1)
    u = torch.unique(flat)
    cands = []
    if u.numel() > 1:
        cands.append(float((u[1:] - u[:-1]).min()))
    nz = flat.abs()[flat != 0]
    if nz.numel():
        cands.append(float(nz.min()))
    for s in cands:
        if s > 0:
            k = torch.round(flat / s)
            if k.abs().max() <= 127 and torch.equal(k * s, flat):
                return k.reshape(w.shape).to(torch.int8), torch.full((out,), s)
    per = torch.where(flat == 0, torch.full_like(flat, float("inf")), flat.abs()).amin(1)
    per = torch.where(torch.isinf(per), torch.ones_like(per), per)
    k = torch.round(flat / per[:, None])
    if k.abs().max() <= 127 and torch.equal(k * per[:, None], flat):
        return k.reshape(w.shape).to(torch.int8), per.float()
    return None


class _Buffers:
    """Scratch tensors reused across calls (fresh tensors cost a page fault per 4 KiB on first
    touch, which on small CPUs takes longer than the arithmetic); internal use only."""

    def __init__(self) -> None:
        self._bufs: dict[Any, Tensor] = {}

    def get(self, key: str, like: Tensor, dtype: torch.dtype) -> Tensor:
        fmt = (torch.channels_last if like.dim() == 4
               and like.is_contiguous(memory_format=torch.channels_last)
               and not like.is_contiguous() else torch.contiguous_format)
        k = (key, tuple(like.shape), dtype, fmt)
        buf = self._bufs.get(k)
        if buf is None:
            if len(self._bufs) > 16:  # shapes keep changing: do not hoard memory
                self._bufs.clear()
            buf = self._bufs[k] = torch.empty(like.shape, dtype=dtype, memory_format=fmt)
        return buf


class _FloatCodes:
    """uint8 codes of a float input already on ``grid`` (exact: it is on the grid)."""

    def __init__(self, grid: Grid) -> None:
        if grid.levels <= 256:
            w0, self.check = grid.kmin, False
        else:  # a wide grid: use the 256-level window around zero, verify per batch
            w0 = max(grid.kmin, min(grid.zero_point - 128, grid.kmax - 255))
            self.check = True
        self.x_zp = grid.zero_point - w0
        self.x_scale = float(grid.scale)
        self._scale = torch.tensor(self.x_scale)
        self.bufs = _Buffers()

    def __call__(self, x: Tensor) -> Tensor | None:
        u = torch.div(x, self._scale, out=self.bufs.get("f", x, torch.float32)).round_()
        if self.x_zp:
            u += self.x_zp
        if self.check:
            lo, hi = torch.aminmax(u)
            if lo < 0 or hi > 255:
                return None
        return self.bufs.get("u", x, torch.uint8).copy_(u.clamp_(0, 255))


class _QuantizerCodes:
    """uint8 codes of ``[relu](quantizer(x))`` computed from ``x`` itself (the float output of
    the quantizer is never needed when it only feeds this layer).

    Fixed point: ``k = floor(|c| / delta + 0.5) * sign(c)``, ``c = clamp(x, lo, hi)``; min-max:
    ``k = floor((c - lo) / scale + 0.5) + ql_min``: the very integers the quantizer's float output
    is made of, so the layer computes what it computes on that output. ``inplace``: ``x`` is a
    fresh tensor nobody else reads, so it is used as scratch space.
    """

    def __init__(self, q: Quantizer, relu: bool, grid: Grid, inplace: bool = False) -> None:
        self.q, self.relu, self.inplace = q, relu, inplace
        self.x_zp, self.x_scale = grid.zero_point - grid.kmin, float(grid.scale)
        self.shift = -grid.kmin  # u = k - kmin
        self.bufs = _Buffers()
        if isinstance(q, FixedPoint):
            k = 2 ** (q.n - 1) - 1 if q.sign else 2**q.n - 1
            self.lo = 0.0 if (relu or not q.sign) else -k * q.delta
            self.hi, self.d = k * q.delta, torch.tensor(q.delta)
            self.signed = self.lo < 0
        else:
            assert isinstance(q, MinMax)
            scale, zp, lo, hi = q.grid(torch.zeros(()))
            self.scale, self.lo_t = scale.float(), lo.float()
            self.lo, self.hi, self.zp = float(lo), float(hi), int(zp)

    def __call__(self, x: Tensor) -> Tensor:
        c = x.clamp_(self.lo, self.hi) if self.inplace else torch.clamp(
            x, self.lo, self.hi, out=self.bufs.get("f", x, torch.float32))
        if isinstance(self.q, FixedPoint):
            if self.signed:
                k = torch.abs(c, out=self.bufs.get("a", c, torch.float32))
                k.div_(self.d).add_(0.5).floor_().copysign_(c)
            else:
                k = c.div_(self.d).add_(0.5).floor_()
        else:
            k = c.sub_(self.lo_t).div_(self.scale).add_(0.5).floor_()
            k += self.q.ql_min
            if self.relu:
                k.clamp_min_(self.zp)
        if self.shift:
            k += self.shift
        return self.bufs.get("u", x, torch.uint8).copy_(k)


class _Int8Base(nn.Module):
    def __init__(self, grid: Grid, float_layer: nn.Module, pre: Quantizer | None,
                 post: Quantizer | None, codes: Any = None) -> None:
        super().__init__()
        self.grid = grid
        self.codes = codes if codes is not None else _FloatCodes(grid)
        self.x_zp, self.x_scale = self.codes.x_zp, self.codes.x_scale
        self.float_layer = float_layer  # used when a batch leaves the uint8 window
        self.pre, self.post = pre, post
        self.fallbacks = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.pre is not None:
            x = self.pre(x)
        u = self.codes(x)
        if u is None:
            self.fallbacks += 1
            y = self.float_layer(x)
        else:
            y = self._int(u)
        return y if self.post is None else self.post(y)


class Int8Conv2d(_Int8Base):
    """A conv on an input grid: uint8 input codes x int8 weights -> float (oneDNN)."""

    def __init__(self, conv: nn.Conv2d, w: tuple[Tensor, Tensor], grid: Grid,
                 pre: Quantizer | None = None, post: Quantizer | None = None,
                 codes: Any = None) -> None:
        super().__init__(grid, _frozen_float(conv), pre, post, codes)
        k, scale = w
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.w_scale = scale.float().contiguous()
        self.w_zp = torch.zeros(k.shape[0], dtype=torch.int64)
        self.bias = None if conv.bias is None else conv.bias.detach().float().clone()
        self.packed = torch.ops.onednn.qconv_prepack(
            k.contiguous(), self.w_scale, self.x_scale, self.x_zp, self.stride, self.padding,
            self.dilation, self.groups, None)

    def _int(self, u: Tensor) -> Tensor:
        return torch.ops.onednn.qconv2d_pointwise(
            u.contiguous(memory_format=torch.channels_last), self.x_scale, self.x_zp,
            self.packed, self.w_scale, self.w_zp, self.bias, self.stride, self.padding,
            self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], "")


class Int8Linear(_Int8Base):
    """A linear layer on an input grid: uint8 input codes x int8 weights -> float (oneDNN)."""

    def __init__(self, linear: nn.Linear, w: tuple[Tensor, Tensor], grid: Grid,
                 pre: Quantizer | None = None, post: Quantizer | None = None,
                 codes: Any = None) -> None:
        super().__init__(grid, _frozen_float(linear), pre, post, codes)
        k, scale = w
        self.w_scale = scale.float().contiguous()
        self.w_zp = torch.zeros(k.shape[0], dtype=torch.int64)
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.packed = torch.ops.onednn.qlinear_prepack(k.contiguous(), None)

    def _int(self, u: Tensor) -> Tensor:
        return torch.ops.onednn.qlinear_pointwise(
            u.contiguous(), self.x_scale, self.x_zp, self.packed, self.w_scale, self.w_zp,
            self.bias, 1.0, 0, torch.float32, "none", [], "")


# --------------------------------------------------------------------------- xnor

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_KERNELS = CLibrary(
    Path(__file__).with_name("_cpu_kernels.c"), "cpu-kernels",
    ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"],
    {"fb_pack_signs": ([_PTR, _PTR, _I64, _I64, _I64], _INT),
     "fb_xnor_conv": ([_PTR, _PTR, _PTR, *([_I64] * 12)], _INT),
     "fb_affine_inplace": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64], _INT)},
)


def _load_kernels() -> Any:
    """The compiled C kernels (ctypes), building them on first use; None when impossible."""
    return _KERNELS.get()


def xnor_backend() -> str:
    """``"c"`` when the compiled XNOR kernel is usable here, else ``"torch"``."""
    return "c" if _load_kernels() is not None else "torch"


def _nhwc(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) as a contiguous (N, H, W, C) float tensor (free if channels-last)."""
    return x.float().permute(0, 2, 3, 1).contiguous()


def _words(c: int) -> int:
    return (c + 63) // 64


_BYTE_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack_rows_torch(rows: Tensor) -> Tensor:
    """(R, C) floats -> (R, ceil(C/64)) int64 words, bit c of word j = (x[64 j + c] > 0)."""
    r, c = rows.shape
    bits = torch.zeros(r, _words(c) * 64, dtype=torch.uint8)
    bits[:, :c] = rows > 0
    byte = (bits.view(r, -1, 8) * _BYTE_WEIGHTS).sum(-1, dtype=torch.uint8)
    # little-endian bytes -> words, the same bit order as the C kernel on x86/ARM
    return byte.contiguous().view(torch.int64)


def pack_signs(x: Tensor, backend: str = "auto") -> Tensor:
    """Pack the signs of ``x`` (N, C, H, W) into (N, H, W, ceil(C/64)) int64 words (bit 1: x > 0).

        >>> pack_signs(torch.tensor([1.0, -1.0, 1.0]).reshape(1, 3, 1, 1), "torch").item()
        5
    """
    n, c, h, w = x.shape
    if backend == "auto":
        backend = xnor_backend()
    if backend == "c":
        lib = _load_kernels()
        if lib is None:
            raise RuntimeError(f"XNOR C kernel unavailable: {_KERNELS.error}")
        xs = _nhwc(x)
        out = torch.empty(n, h, w, _words(c), dtype=torch.int64)
        lib.fb_pack_signs(xs.data_ptr(), out.data_ptr(), n * h * w, c, torch.get_num_threads())
        return out
    return _pack_rows_torch(_nhwc(x).reshape(-1, c)).reshape(n, h, w, _words(c))


_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101


def _popcount64(v: Tensor) -> Tensor:
    """SWAR popcount of int64 words (masks after each shift make arithmetic shifts harmless)."""
    v = v - ((v >> 1) & _M1)
    v = (v & _M2) + ((v >> 2) & _M2)
    v = (v + (v >> 4)) & _M4
    return (v * _H01) >> 56


def _xnor_conv_torch(xb: Tensor, wb: Tensor, c: int, pad: tuple[int, int],
                     stride: tuple[int, int], wsum: Tensor) -> Tensor:
    n, h, w, wd = xb.shape
    kh, kw, o, _ = wb.shape
    ph, pw = pad
    # padded positions hold word 0 (= all -1); correct for them below
    xp = torch.zeros(n, h + 2 * ph, w + 2 * pw, wd, dtype=torch.int64)
    xp[:, ph:ph + h, pw:pw + w] = xb
    win = xp.unfold(1, kh, stride[0]).unfold(2, kw, stride[1])  # (n, ho, wo, wd, kh, kw)
    ho, wo = win.shape[1], win.shape[2]
    cols = win.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * wd)
    wcols = wb.reshape(kh * kw, o, wd).permute(1, 0, 2).reshape(o, kh * kw * wd)
    mism = torch.empty(n * ho * wo, o, dtype=torch.int64)
    step = max(1, (1 << 21) // max(1, o * cols.shape[1]))
    for i in range(0, cols.shape[0], step):
        mism[i:i + step] = _popcount64(cols[i:i + step, None, :] ^ wcols[None]).sum(-1)
    out = (kh * kw * c - 2 * mism).reshape(n, ho, wo, o).float()
    # taps in the padding contributed sum_c(-1 * w) = -wsum[tap, o]; they must contribute 0
    valid = torch.zeros(1, 1, h + 2 * ph, w + 2 * pw)
    valid[..., ph:ph + h, pw:pw + w] = 1
    vwin = valid[0, 0].unfold(0, kh, stride[0]).unfold(1, kw, stride[1]).reshape(ho, wo, kh * kw)
    corr = (1 - vwin) @ wsum  # (ho, wo, o)
    return out + corr


def xnor_conv2d(x: Tensor, weight: Tensor, padding: int | tuple[int, int] = 0,
                stride: int | tuple[int, int] = 1, backend: str = "auto") -> Tensor:
    """``conv2d(x, weight)`` for +-1 ``x`` and +-1 ``weight`` by XNOR / popcount (exact).

    Returns a float (N, O, Ho, Wo) tensor (channels-last in memory).

        >>> x = torch.tensor([1.0, -1, 1, 1]).reshape(1, 4, 1, 1)
        >>> xnor_conv2d(x, torch.ones(1, 4, 1, 1), backend="torch").item()
        2.0
    """
    return _XnorWeights(weight, backend).conv(x, _pair(padding), _pair(stride))


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _XnorWeights:
    def __init__(self, weight: Tensor, backend: str) -> None:
        w = weight.detach().float()
        if not bool(((w == 1) | (w == -1)).all()):
            raise ValueError("xnor_conv2d needs a weight of +-1 values only")
        self.backend = xnor_backend() if backend == "auto" else backend
        if self.backend not in ("c", "torch"):
            raise ValueError(f"backend must be 'auto', 'c' or 'torch', got {backend!r}")
        o, c, kh, kw = w.shape
        self.shape = (o, c, kh, kw)
        taps = w.permute(2, 3, 0, 1).reshape(kh * kw * o, c)  # rows (kh, kw, o)
        self.wb = _pack_rows_torch(taps).reshape(kh, kw, o, _words(c))
        self.wsum = w.sum(1).permute(1, 2, 0).reshape(kh * kw, o)  # (tap, o)

    def conv(self, x: Tensor, pad: tuple[int, int], stride: tuple[int, int]) -> Tensor:
        o, c, kh, kw = self.shape
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"xnor conv expects (N, {c}, H, W) input, got {tuple(x.shape)}")
        n, _, h, w = x.shape
        xb = pack_signs(x, self.backend)
        if self.backend == "torch":
            out = _xnor_conv_torch(xb, self.wb, c, pad, stride, self.wsum)
        else:
            ho = (h + 2 * pad[0] - kh) // stride[0] + 1
            wo = (w + 2 * pad[1] - kw) // stride[1] + 1
            out = torch.empty(n, ho, wo, o)
            rc = _load_kernels().fb_xnor_conv(xb.data_ptr(), self.wb.data_ptr(), out.data_ptr(),
                                           n, h, w, c, o, kh, kw, pad[0], pad[1], stride[0],
                                           stride[1], torch.get_num_threads())
            if rc:
                raise MemoryError("XNOR kernel could not allocate its accumulators")
        return out.permute(0, 3, 1, 2)


class XnorConv2d(nn.Module):
    """A conv with +-1 weights on +-1 inputs, by XNOR / popcount (exact)."""

    def __init__(self, conv: nn.Conv2d, backend: str = "auto", pre: Quantizer | None = None,
                 post: Quantizer | None = None) -> None:
        super().__init__()
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or isinstance(conv.padding, str):
            raise ValueError("XnorConv2d supports groups=1, dilation=1, numeric padding")
        self.w = _XnorWeights(conv.weight, backend)
        self.backend = self.w.backend
        self.pad, self.stride = _pair(conv.padding), _pair(conv.stride)
        self.bias = None if conv.bias is None else conv.bias.detach().float().clone()
        self.pre, self.post = pre, post

    def forward(self, x: Tensor) -> Tensor:
        if self.pre is not None:
            x = self.pre(x)
        y = self.w.conv(x, self.pad, self.stride)
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y if self.post is None else self.post(y)


class XnorLinear(nn.Module):
    """A linear layer with +-1 weights on +-1 inputs: the XNOR conv of a 1 x 1 image."""

    def __init__(self, linear: nn.Linear, backend: str = "auto", pre: Quantizer | None = None,
                 post: Quantizer | None = None) -> None:
        super().__init__()
        self.w = _XnorWeights(linear.weight[:, :, None, None], backend)
        self.backend = self.w.backend
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.pre, self.post = pre, post

    def forward(self, x: Tensor) -> Tensor:
        if self.pre is not None:
            x = self.pre(x)
        y = self.w.conv(x[:, :, None, None], (0, 0), (1, 1))[:, :, 0, 0]
        if self.bias is not None:
            y = y + self.bias
        return y if self.post is None else self.post(y)


# --------------------------------------------------------------------------- compile

class _FastAct(nn.Module):
    """Inference form of an activation quantizer: the same values as its ``forward`` (same
    operations on the same operands, without the finiteness check and autograd), computed in
    ``x`` itself when ``inplace`` (``x`` is a fresh tensor nobody else reads)."""

    def __init__(self, q: Quantizer, inplace: bool = False) -> None:
        super().__init__()
        self.q, self.inplace, self.bufs = q, inplace, _Buffers()
        if isinstance(q, FixedPoint):
            k = 2 ** (q.n - 1) - 1 if q.sign else 2**q.n - 1
            self.lo, self.hi = (-k * q.delta if q.sign else 0.0), k * q.delta
            self.d = torch.tensor(q.delta)
        elif isinstance(q, MinMax):
            scale, _, lo, hi = q.grid(torch.zeros(()))
            self.scale, self.lo_t = scale.float(), lo.float()
            self.lo, self.hi = float(lo), float(hi)

    def forward(self, x: Tensor) -> Tensor:
        q = self.q
        if isinstance(q, BinaryTanh):
            # sign(x) - 1/2 is -1.5, -0.5 or 0.5: its sign is +1 exactly where x > 0 (and -1 at
            # x = 0, as binary tanh); three passes where torch.where takes about eight times as long
            y = x.sign_() if self.inplace else torch.sign(x)
            return y.sub_(0.5).sign_()
        c = x.clamp_(self.lo, self.hi) if self.inplace else torch.clamp(x, self.lo, self.hi)
        if isinstance(q, FixedPoint):
            # |c| goes through a scratch buffer, then sign(c) * a lands in c itself
            a = torch.abs(c, out=self.bufs.get("a", c, torch.float32))
            a.div_(self.d).add_(0.5).floor_().mul_(self.d)
            return torch.copysign(a, c, out=c)  # equal to sign(c) * a up to the sign of zeros
        return c.sub_(self.lo_t).div_(self.scale).add_(0.5).floor_().mul_(self.scale) \
            .add_(self.lo_t)


class _InplaceBatchNorm(nn.Module):
    """Evaluation batch norm computed in a fresh input tensor: ``fma(x, alpha, beta)`` per
    channel (the C kernel), or ``x.mul_(alpha).add_(beta)``; built by :func:`_inplace_bn` only
    after probes show the chosen arithmetic is ``F.batch_norm``'s to the bit."""

    def __init__(self, alpha: Tensor, beta: Tensor, fused: bool) -> None:
        super().__init__()
        self.alpha, self.beta, self.fused = alpha.contiguous(), beta.contiguous(), fused

    def forward(self, x: Tensor) -> Tensor:
        c = self.alpha.numel()
        if self.fused and x.dtype == torch.float32:
            rest = x.numel() // max(1, x.shape[0] * c)
            if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
                    x.is_contiguous() and rest == 1):
                rows, inner = x.numel() // c, 1  # rows of C channels
            elif x.is_contiguous():
                rows, inner = x.shape[0] * c, rest  # planes of one channel
            else:
                rows = -1
            if rows >= 0:
                _load_kernels().fb_affine_inplace(x.data_ptr(), self.alpha.data_ptr(),
                                               self.beta.data_ptr(), rows, c, inner,
                                               torch.get_num_threads())
                return x
            return torch.addcmul(self.beta.view(_bn_view(x)), x, self.alpha.view(_bn_view(x)))
        return x.mul_(self.alpha.view(_bn_view(x))).add_(self.beta.view(_bn_view(x)))


def _bn_view(x: Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def _inplace_bn(bn: nn.Module) -> nn.Module | None:
    """An in-place equivalent of ``bn`` (eval mode) when probes show it is bit-identical."""
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or bn.running_mean is None:
        return None
    c = bn.num_features
    with torch.no_grad():
        # F.batch_norm(x) = x * alpha + beta: read beta at x = 0 and alpha at x = 2^40, where
        # beta is below half an ulp of 2^40 * alpha for any sane statistics (checked below)
        dims = (1, c) + ((1, 1) if isinstance(bn, nn.BatchNorm2d) else ())
        beta = bn(torch.zeros(dims)).reshape(c).clone()
        alpha = (bn(torch.full(dims, 2.0**40)).reshape(c) / 2.0**40).clone()
        g = torch.Generator().manual_seed(0)
        probes = [torch.randn(67, c, generator=g) * 4]
        if isinstance(bn, nn.BatchNorm2d):
            p = torch.randn(3, c, 9, 7, generator=g) * 4
            probes = [p, p.contiguous(memory_format=torch.channels_last)]
        for fused in ((True, False) if _load_kernels() is not None else (False,)):
            m = _InplaceBatchNorm(alpha, beta, fused)
            if all(torch.equal(m(q.clone()), bn(q)) for q in probes):
                return m
    return None


def _fast_act(q: Quantizer | None, inplace: bool = False) -> nn.Module | None:
    if isinstance(q, (FixedPoint, BinaryTanh)) or (isinstance(q, MinMax)
                                                    and q.qr_min.numel() == 1):
        return _FastAct(q, inplace)
    return None


def _frozen_float(layer: nn.Module) -> nn.Module:
    """A plain ``nn.Conv2d`` / ``nn.Linear`` holding the weights the layer's forward uses."""
    with torch.no_grad():
        w = layer.quantized_weight() if hasattr(layer, "quantized_weight") else layer.weight
        b = layer.quantized_bias() if hasattr(layer, "quantized_bias") else layer.bias
    if isinstance(layer, nn.Conv2d):
        out = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                        layer.padding, layer.dilation, layer.groups, b is not None,
                        layer.padding_mode)
    else:
        out = nn.Linear(layer.in_features, layer.out_features, b is not None)
    out.weight.data.copy_(w.detach())
    if b is not None:
        out.bias.data.copy_(b.detach())
    return out.eval().requires_grad_(False)


class _Wrapped(nn.Module):
    """A frozen float layer with the original layer's input/output quantizers."""

    def __init__(self, layer: nn.Module, pre: Quantizer | None, post: Quantizer | None) -> None:
        super().__init__()
        self.layer, self.pre, self.post = layer, pre, post

    def forward(self, x: Tensor) -> Tensor:
        if self.pre is not None:
            x = self.pre(x)
        y = self.layer(x)
        return y if self.post is None else self.post(y)


class CompiledModel(nn.Module):
    """A network with integer layers where possible; ``plan`` maps each conv / linear layer to
    ``"int8"``, ``"xnor"`` or ``"float"``; ``kind`` summarizes (``None``: no integer layer)."""

    def __init__(self, model: nn.Module, plan: dict[str, str], notes: list[str]) -> None:
        super().__init__()
        self.model, self.plan, self.notes = model, plan, notes
        self.fewbits_spec = getattr(model, "fewbits_spec", None)

    @property
    def kind(self) -> str | None:
        kinds = sorted({v for v in self.plan.values() if v != "float"})
        return "+".join(kinds) or None

    @property
    def fallbacks(self) -> int:
        """Batches where a wide-grid int8 layer ran in float (a value left its uint8 window)."""
        return sum(m.fallbacks for m in self.model.modules() if isinstance(m, _Int8Base))

    def forward(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            if x.dim() == 4:  # the int8 kernels want NHWC; keep one layout end to end
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).contiguous()


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


_FRESH_MODULES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.MaxPool2d,
                  nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.ReLU)
_FRESH_FUNCTIONS = ("add", "relu", "adaptive_avg_pool2d")


class _Plan:
    """The traced graph with call counts: which chains can be fused, which tensors overwritten."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model, self.graph = model, graph
        self.calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        self.dropped: set[str] = set()

    def module(self, node: Any) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.model.get_submodule(str(node.target))
        return None

    def private(self, node: Any) -> bool:
        """``node`` is a module called once whose output goes to one place only."""
        return (isinstance(node, fx.Node) and node.op == "call_module"
                and self.calls[str(node.target)] == 1 and len(node.users) == 1)

    def overwritable(self, node: Any) -> bool:
        """``node``'s output is a tensor of its own (not a view of another) read only by its one
        user, which may therefore compute in it."""
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return False
        if node.op == "call_module":
            m = self.module(node)
            if isinstance(m, QuantAct):
                return m.quantizer is not None
            return isinstance(m, _FRESH_MODULES) and not getattr(m, "inplace", False)
        return node.op == "call_function" and getattr(node.target, "__name__", "") in \
            _FRESH_FUNCTIONS

    def quantizer_chain(self, node: Any) -> tuple[QuantAct, bool, list[str], bool] | None:
        """``node`` = ``[ReLU](QuantAct(q)(x))`` feeding only the next layer:
        ``(act, relu?, modules to drop, x overwritable?)``."""
        relu, names = False, []
        if self.private(node) and isinstance(self.module(node), nn.ReLU):
            relu, names = True, [str(node.target)]
            node = node.args[0]
        m = self.module(node)
        if self.private(node) and isinstance(m, QuantAct) and m.quantizer is not None:
            return m, relu, [*names, str(node.target)], self.overwritable(node.args[0])
        return None


def compile_for_cpu(source: nn.Module | str | os.PathLike, *, int8: bool = True,
                    xnor: bool = True, backend: str = "auto") -> CompiledModel:
    """The fastest exact-enough CPU form of ``source`` (model, ``.fewbits`` file, run folder or
    checkpoint); see the module doc. ``backend`` picks the XNOR implementation: ``"auto"``
    (C kernel if it builds, else PyTorch), ``"c"`` or ``"torch"``. The source is not modified.

    Besides swapping layers: activation quantizers become inference modules computing the same
    values; a quantizer (plus ReLU) whose only use is an integer layer is not evaluated at all
    (the layer computes its integer codes, or for XNOR its signs, from the quantizer's input);
    batch norm, quantizers and ReLU compute in their input tensor when the traced graph shows
    nothing else reads it (batch norm only where probes show the in-place arithmetic is
    ``F.batch_norm``'s to the bit); the network runs channels-last.
    """
    if backend not in ("auto", "c", "torch"):
        raise ValueError(f"backend must be 'auto', 'c' or 'torch', got {backend!r}")
    model, codes = resolve_source(source)
    model = copy.deepcopy(model).eval()
    notes: list[str] = []
    graph = _trace(model)
    grids = _propagate(model, graph)
    onednn_err = _onednn_ok() if int8 else "int8 disabled"
    if onednn_err and int8:
        notes.append(onednn_err)
    if xnor and backend in ("auto", "c") and _load_kernels() is None:
        if backend == "c":
            raise RuntimeError(f"XNOR C kernel unavailable: {_KERNELS.error}")
        notes.append(f"XNOR runs in PyTorch: {_KERNELS.error}")
    p = _Plan(model, graph)
    nodes: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if isinstance(p.module(node), (nn.Conv2d, nn.Linear)):
            nodes.setdefault(str(node.target), []).append(node)
    plan: dict[str, str] = {}
    for name, calls in nodes.items():
        layer = model.get_submodule(name)
        pre = getattr(layer, "input_quantizer", None)
        post = getattr(layer, "output_quantizer", None)
        in_grids = [grids.get(n.args[0].name) if isinstance(n.args[0], fx.Node) else None
                    for n in calls]
        grid = _quantizer_grid(pre) if pre is not None else (
            in_grids[0] if all(g == in_grids[0] for g in in_grids) else None)
        chain = p.quantizer_chain(calls[0].args[0]) if len(calls) == 1 and pre is None \
            else None
        frozen = _frozen_float(layer)
        new: nn.Module = _Wrapped(frozen, pre, post) if (pre or post) else frozen
        plan[name] = "float"
        if grid is not None and grid.binary and xnor and \
                bool(((frozen.weight == 1) | (frozen.weight == -1)).all()) and \
                (isinstance(layer, nn.Linear) or (layer.groups == 1 and tuple(layer.dilation)
                                                  == (1, 1) and layer.padding_mode == "zeros")):
            cls = XnorConv2d if isinstance(layer, nn.Conv2d) else XnorLinear
            new = cls(frozen, backend, pre, post)
            plan[name] = "xnor"
            if chain is not None and isinstance(chain[0].quantizer, BinaryTanh) and not chain[1]:
                p.dropped.update(chain[2])  # the kernel packs x > 0: binary tanh's own test
        elif grid is not None and not onednn_err and (
                isinstance(layer, nn.Linear) or layer.padding_mode == "zeros"):
            w = _int8_weight(frozen.weight, codes.get(f"{name}.weight"))
            if w is not None:
                fused = None
                if chain is not None and isinstance(chain[0].quantizer, (FixedPoint, MinMax)) \
                        and grid.levels <= 256:
                    fused = _QuantizerCodes(chain[0].quantizer, chain[1], grid, chain[3])
                    p.dropped.update(chain[2])
                cls = Int8Conv2d if isinstance(layer, nn.Conv2d) else Int8Linear
                new = cls(frozen, w, grid, pre, post, fused)
                plan[name] = "int8"
        _set(model, name, new)
    for name in p.dropped:
        _set(model, name, nn.Identity())
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "call_module" or name in p.dropped or name in nodes:
            continue
        m = model.get_submodule(name)
        inplace = p.calls[name] == 1 and p.overwritable(node.args[0])
        new_m: nn.Module | None = None
        if isinstance(m, QuantAct):
            new_m = _fast_act(m.quantizer, inplace)
        elif inplace and isinstance(m, nn.ReLU):
            new_m = nn.ReLU(inplace=True)
        elif inplace and isinstance(m, nn.modules.batchnorm._BatchNorm):
            new_m = _inplace_bn(m)
        if new_m is not None:
            _set(model, name, new_m)
    return CompiledModel(model.requires_grad_(False), plan, notes)


def fast_path_kind(source: nn.Module | str | os.PathLike) -> str | None:
    """``"int8"``, ``"xnor"``, ``"int8+xnor"`` or ``None``: what :func:`compile_for_cpu` would
    use for ``source``."""
    return compile_for_cpu(source).kind
