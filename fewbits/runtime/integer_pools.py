"""Pooling for the integer engine's walk (:mod:`fewbits.runtime.integer_walk`): a max pool's
geometry and arguments (refused where the engine does not run them, naming the pool), and
average pooling (``nn.AvgPool2d`` or ``F.avg_pool2d``) as an exact sum pool on a finer grid, or,
over a whole float map, as the global average."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn

from .integer_guards import int16_codes
from .integer_plan import Compiler, Pool, Value, pair

__all__ = ["AVGPOOL_FNS", "avg_args", "avg_pool", "maxpool_geom", "pool_args"]

#: functional average pooling (``F.avg_pool2d`` is torch._C._nn.avg_pool2d)
AVGPOOL_FNS = (nn.functional.avg_pool2d,)


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


def _call_args(node: fx.Node, m: Any, defaults: dict) -> dict:
    """A pool's arguments by name (``defaults``' names, in the functional call's order):
    module ``m``'s attributes, or the call's, by position after the map or by keyword."""
    if m is not None:
        return {k: getattr(m, k) for k in defaults}
    out = dict(defaults)
    out.update(zip(defaults, node.args[1:], strict=False))
    out.update(node.kwargs)
    return out


def pool_args(node: fx.Node, m: Any, where: str) -> dict:
    """A max pool's arguments (module ``m``, or the functional call's); refused here, where the
    pool is named, for what the engine does not run (a pool folded into the layer before it
    was refused later, naming the layer after it)."""
    vals = _call_args(node, m, dict(kernel_size=None, stride=None, padding=0, dilation=1,
                                    ceil_mode=False, return_indices=False))
    if vals["ceil_mode"] or vals["return_indices"]:
        raise ValueError(f"{where}: max pooling with ceil_mode or return_indices is not run by "
                         "the integer engine")
    return {k: v for k, v in vals.items() if k != "return_indices"}


def avg_args(node: fx.Node, m: nn.AvgPool2d | None) -> dict:
    """An average pool's arguments: module ``m``'s, or the ``F.avg_pool2d`` call's."""
    return _call_args(node, m, dict(kernel_size=None, stride=None, padding=0, ceil_mode=False,
                                    count_include_pad=True, divisor_override=None))


def avg_pool(comp: Compiler, x: Value, a: dict, where: str,
             gap: Callable[[Value, str], Value]) -> Value:
    """Average pooling (arguments ``a``, :func:`avg_args`) as a sum pool on a grid ``k*k``
    times finer (exact); over the whole of a float map, as ``gap`` (the global average); with
    one-pixel windows, the map itself."""
    args = dict(kernel_size=a["kernel_size"], stride=a["stride"], padding=a["padding"],
                dilation=1, ceil_mode=a["ceil_mode"])
    if x.kind != "int":  # quantize_ quantizes a map where a layer reads it, not before a pool
        if x.kind == "float" and len(x.shape) == 3 and pair(a["padding"]) == (0, 0) and \
                pair(a["kernel_size"]) == tuple(x.shape[1:]) and \
                a["divisor_override"] in (None, x.shape[1] * x.shape[2]):
            return gap(x, where)  # F.avg_pool2d(out, 4) on a 4 x 4 map: one window
        if pair(a["kernel_size"]) == pair(a["stride"] or 1) == (1, 1) and \
                pair(a["padding"]) == (0, 0) and a["divisor_override"] in (None, 1):
            return x  # nn.AvgPool2d(1, 1), as kuangliu's VGG ends: each value itself
        raise ValueError(f"{where}: average pooling of an unquantized map (here {x.kind}) is "
                         "not run by the integer engine: it pools quantized maps only, or a "
                         "whole float map (put an activation quantizer before the pool)")
    if a["divisor_override"] is not None or \
            (not a["count_include_pad"] and pair(a["padding"]) != (0, 0)):
        why = f"divisor_override={a['divisor_override']}" if a["divisor_override"] is not \
            None else "count_include_pad=False with padding (divisors that vary at the border)"
        raise ValueError(f"{where}: average pooling with {why} is not run by the integer "
                         "engine: it divides each window's sum by the window's size")
    g = maxpool_geom(args, x.shape, where)
    kk = g["kh"] * g["kw"]
    lo, hi = min(0, x.lo * kk), max(0, x.hi * kk)
    int16_codes(lo, hi, where, "the pooled sums' codes", "")
    y = comp.new("int", (x.shape[0], g["oh"], g["ow"]), scale=x.scale / kk, lo=lo, hi=hi)
    comp.prog.steps.append(Pool(x.id, y.id, 1, g))
    return y
