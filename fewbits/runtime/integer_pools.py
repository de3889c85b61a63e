"""Pooling for the integer engine's walk (:mod:`fewbits.runtime.integer_walk`): a max pool's
geometry and arguments (refused where the engine does not run them, naming the pool), and
average pooling as an exact sum pool on a finer grid."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from .integer_plan import I16, Compiler, Pool, Value, pair

__all__ = ["avg_pool", "maxpool_geom", "pool_args"]


def maxpool_geom(m: Any, shape: tuple[int, ...], where: str) -> dict:
    k = pair(m["kernel_size"])
    s = pair(m["stride"] if m["stride"] not in (None, ()) else m["kernel_size"])
    p, d = pair(m["padding"]), pair(m["dilation"])
    if m["ceil_mode"]:
        raise ValueError(f"{where}: ceil_mode pooling is not run by the integer engine")
    c, h, w = shape
    oh = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return dict(h=h, w=w, c=c, oh=oh, ow=ow, kh=k[0], kw=k[1], sh=s[0], sw=s[1], ph=p[0],
                pw=p[1], dh=d[0], dw=d[1])


def pool_args(node: fx.Node, m: Any, where: str) -> dict:
    """A max pool's arguments (module ``m``, or the functional call's); refused here, where the
    pool is named, for what the engine does not run (a pool folded into the layer before it
    was refused later, naming the layer after it)."""
    if m is not None:
        vals = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, ceil_mode=m.ceil_mode, return_indices=m.return_indices)
    else:
        names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        vals = dict(zip(names, node.args[1:], strict=False))
        vals.update(node.kwargs)
    if vals.get("ceil_mode") or vals.get("return_indices"):
        raise ValueError(f"{where}: max pooling with ceil_mode or return_indices is not run by "
                         "the integer engine")
    out = dict(kernel_size=None, stride=None, padding=0, dilation=1, ceil_mode=False)
    out.update({k: v for k, v in vals.items() if k in out})
    return out


def avg_pool(comp: Compiler, x: Value, m: nn.AvgPool2d, where: str) -> Value:
    """Average pooling as a sum pool on a grid ``k*k`` times finer (exact)."""
    args = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=1,
                ceil_mode=m.ceil_mode)
    if x.kind != "int":  # quantize_ quantizes a map where a layer reads it, not before a pool
        raise ValueError(f"{where}: average pooling of an unquantized map (here {x.kind}) is "
                         "not run by the integer engine: it pools quantized maps only (put "
                         "an activation quantizer before the pool)")
    if m.divisor_override is not None or \
            (not m.count_include_pad and pair(m.padding) != (0, 0)):
        raise ValueError(f"{where}: average pooling of quantized maps with a fixed divisor "
                         "only")
    g = maxpool_geom(args, x.shape, where)
    kk = g["kh"] * g["kw"]
    lo, hi = min(0, x.lo * kk), max(0, x.hi * kk)
    if max(-lo, hi) > I16:
        raise ValueError(f"{where}: the pooled sums need codes beyond 16 bits")
    y = comp.new("int", (x.shape[0], g["oh"], g["ow"]), scale=x.scale / kk, lo=lo, hi=hi)
    comp.prog.steps.append(Pool(x.id, y.id, 1, g))
    return y
