"""The node-by-node walk of :func:`fewbits.runtime.integer_plan.compile_program`: which
``torch.fx`` node becomes which engine step, what is folded into the open epilogue of a layer,
and the clear ``ValueError`` for every node the integer engine does not cover. Branches
concatenated before a quantizer (``quantize_`` quantizes a concatenation where it is read)
are closed each on that quantizer's grid; a concatenation read otherwise (by several layers,
a mean, a sum) is one of their float maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..layers import QuantAct, QuantConv2d, QuantLinear
from . import integer_calls as calls
from .integer_calls import BATCH, cat_args, clamp_bounds, input_first, spatial_mean
from .integer_grid import grid_layer
from .integer_guards import int16_codes, no_hooks, same_as_forward
from .integer_plan import (
    ADDS,
    FLATTENS,
    GAP_FNS,
    I16,
    MAXPOOL_FNS,
    RELU_FNS,
    Add,
    Clamp,
    Compiler,
    Concat,
    Conv,
    FAdd,
    GlobalAvg,
    Pool,
    Tracer,
    Value,
    bn_affine,
    clamp_after,
    quant_params,
)
from .integer_planes import plane_layers
from .integer_pools import AVGPOOL_FNS, avg_args, avg_pool, maxpool_geom, pool_args

__all__ = ["compile_program", "walk"]

_PASS = (nn.Identity, nn.Dropout)
#: the module forwards the walk knows what they compute (a subclass overriding one is refused)
_KNOWN = (nn.Conv2d, nn.Linear, QuantConv2d, QuantLinear, nn.modules.batchnorm._BatchNorm,
          nn.ReLU, nn.ReLU6, nn.Hardtanh, QuantAct, nn.MaxPool2d, nn.AvgPool2d,
          nn.AdaptiveAvgPool2d, nn.Flatten, *_PASS)
_KNOWN_FORWARDS = frozenset(c.forward for c in _KNOWN)


@dataclass
class _Pending:
    """A layer whose epilogue is still open: batch norm, ReLU / clamps and max pools seen
    after it, not yet a quantizer."""

    conv: Conv
    shape: tuple[int, ...]
    bn: bool = False
    post: list = field(default_factory=list)  # ("clamp", lo, hi) / ("maxpool", module-like)
    out: Any = None  # the emitted value (a second name for it reads the same float map)


@dataclass
class _PendingCat:
    """A channel concatenation of layers whose epilogues are still open (``quantize_``'d
    models quantize a concatenation where it is read). A quantizer reading it (one grid for
    every channel) closes each part on that grid: ``q(cat(a, b))`` runs as ``cat(q(a), q(b))``,
    the same codes; clamps after it go into each part."""

    parts: list[_Pending]


def _distinct(x: _Pending | _PendingCat) -> list[_Pending]:
    """The open layers of ``x``, each once (a branch may be concatenated twice)."""
    return list({id(p): p for p in x.parts}.values()) if isinstance(x, _PendingCat) else [x]


def post_clamp(p: _Pending) -> tuple[float, float]:
    """The one clamp that the clamps after ``p``'s layer make, taken in their order."""
    lo, hi = -math.inf, math.inf
    for item in (i for i in p.post if i[0] == "clamp"):
        lo, hi = clamp_after(lo, hi, item[1], item[2])
    return lo, hi


def _desc(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    t = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {t})"


def walk(comp: Compiler, tracer: type) -> Any:
    no_hooks(comp.model)
    try:
        graph = tracer().trace(comp.model)
    except Exception as e:  # fx raises many kinds for data-dependent control flow
        raise ValueError(f"cannot trace {type(comp.model).__name__} with torch.fx: {e}") from e
    same_as_forward(comp.model, graph, comp.prog.in_shape)
    prog, modules = comp.prog, comp.modules
    env: dict[str, Any] = {}
    alias: dict[str, fx.Node] = {}  # node -> its input, where both names hold one value object

    def emit_conv(p: _Pending, kind: str) -> Value:
        c = p.conv
        if p.out is not None:
            raise ValueError(f"{c.name}: its output is read both quantized and not")
        v = p.out = comp.new(kind, p.shape)
        c.dst = v.id
        prog.steps.append(c)
        if kind == "int":
            v.scale, v.lo, v.hi, v.producer = c.quant.step, c.quant.klo, c.quant.khi, c
            v.pt = (c.quant.kofs, c.quant.sub)
        return v

    def close(p: _Pending, qp: Any, where: str) -> Value:
        """Fold the quantizer ``qp`` (and the clamps before it) into the layer; max pools
        after it run on the codes (they commute with a monotone quantizer)."""
        clo, chi = p.conv.qclamp = post_clamp(p)
        lo = max(qp.klo, qp.code(clo)) if clo > -math.inf else qp.klo
        hi = min(qp.khi, qp.code(chi)) if chi < math.inf else qp.khi
        p.conv.quant = type(qp)(**{**qp.__dict__, "klo": lo, "khi": min(max(hi, lo), qp.khi)})
        int16_codes(p.conv.quant.klo, p.conv.quant.khi, where)
        v = emit_conv(p, "int")
        for item in p.post:
            if item[0] == "maxpool":
                v = int_pool(v, item[1], where)
        return v

    def int_pool(x: Value, args: dict, where: str, a: fx.Node | None = None) -> Value:
        """Max pooling of int codes or of a float map (both exact); a float sum (node ``a``)
        read only here is pooled as it is summed (its full map is never stored)."""
        if x.kind not in ("int", "float") or len(x.shape) != 3:
            raise ValueError(f"{where}: max pooling of a {x.kind} {x.shape} tensor is not run "
                             "by the integer engine")
        g = maxpool_geom(args, x.shape, where)
        y = comp.new(x.kind, (x.shape[0], g["oh"], g["ow"]), scale=x.scale, lo=x.lo, hi=x.hi,
                     pt=x.pt)
        f = x.producer
        if isinstance(f, FAdd) and f.pool is None and f.dst == x.id and a is not None and \
                single(a) and g["dh"] == g["dw"] == 1:
            f.pool, f.dst, y.producer = g, y.id, f
            return y
        prog.steps.append(Pool(x.id, y.id, 0 if x.kind == "int" else 2, g))
        return y

    def max_pool(a: fx.Node, pool: dict, where: str) -> Any:
        """Max pooling of node ``a``: an open layer (or concatenation of them) read only
        here keeps its epilogue open, the pool in it (it commutes with the clamps and the
        quantizer that close it, and works channel by channel: ``pool(cat(a, b))`` is
        ``cat(pool(a), pool(b))``); any other map is pooled as it is."""
        x = value(a, where, allow_pending=True)
        if isinstance(x, (_Pending, _PendingCat)) and single(a) and \
                all(p.conv.quant is None for p in _distinct(x)):
            for p in _distinct(x):  # a branch concatenated twice is pooled once
                p.post.append(("maxpool", pool))
            return x
        return int_pool(value(a, where), pool, where, a)

    def materialize(p: _Pending, where: str) -> Value:
        """``p``'s layer with a float epilogue (its clamps folded in: they commute with the
        max pools after it, which then run on the float map, exactly)."""
        if p.out is not None and p.out.kind == "float":
            return p.out
        p.conv.fclamp = post_clamp(p)
        v = emit_conv(p, "float")
        for item in p.post:
            if item[0] == "maxpool":
                v = int_pool(v, item[1], where)
        p.out = v  # a second reader of p reads the pooled map
        return v

    def value(a: Any, where: str, *, allow_pending: bool = False) -> Any:
        if not isinstance(a, fx.Node):
            raise ValueError(f"{where}: a constant operand is not run by the integer engine")
        if isinstance(v := env[a.name], type(BATCH)):  # x.size(0) read by other than a view
            raise ValueError(f"{where}: {v} is read by the integer engine in x.view(n, -1) only")
        if isinstance(v, (_Pending, _PendingCat)) and not allow_pending:
            v = env[a.name] = materialized(v, where)
        return v

    def materialized(x: Any, where: str) -> Any:
        """An open layer's (or concatenation's) float map, for a reader that is no quantizer
        or not the only reader."""
        if isinstance(x, _PendingCat):
            return concat([materialize(p, where) for p in x.parts], where)
        return materialize(x, where) if isinstance(x, _Pending) else x

    def quantized(a: fx.Node, x: Any, q: Any, name: str, where: str) -> Any:
        """``x`` (node ``a``'s value) read through the quantizer ``q``: closed into the open
        epilogue(s) where ``a`` has no other reader, else None (the caller quantizes)."""
        if not single(a) or not isinstance(x, (_Pending, _PendingCat)):
            return None
        qp = quant_params(q, name)
        if isinstance(x, _Pending):
            return close(x, qp, where)
        done: dict[int, Value] = {}  # a branch concatenated twice is closed once
        for p in _distinct(x):
            done[id(p)] = close(p, qp, where)
        return concat([done[id(p)] for p in x.parts], where)

    def single(a: fx.Node) -> bool:
        """Whether ``a``'s user is the one reader of its value, through every name holding the
        same object (``nn.Identity``, ``QuantAct(None)``, a quantizer already on the grid, a
        second flatten): a fold into its producer changed it for the other names too."""
        while len(a.users) == 1:
            if a.name not in alias:
                return True
            a = alias[a.name]
        return False

    def no_inplace(node: fx.Node, a: Any, where: str) -> None:
        m = modules[node.target] if node.op == "call_module" else None
        inplace = getattr(m, "inplace", False) if m is not None else \
            node.kwargs.get("inplace", len(node.args) > 1 and node.args[-1] is True)
        if inplace and isinstance(a, fx.Node) and not single(a):
            raise ValueError(f"{where}: an in-place operation on a tensor used elsewhere is "
                             "not run by the integer engine (use inplace=False)")

    def clamp(node: fx.Node, a: fx.Node, lo: float, hi: float, where: str) -> Any:
        if math.isnan(lo) or math.isnan(hi):  # PyTorch's output is NaN: no fold keeps that
            raise ValueError(f"{where}: a clamp bound is NaN")
        no_inplace(node, a, where)
        x = value(a, where, allow_pending=True)
        if isinstance(x, (_Pending, _PendingCat)):
            if not single(a):
                x = env[a.name] = value(a, where)
            else:
                for p in _distinct(x):
                    if lo == 0 and hi == math.inf and not p.bn and not p.post:
                        p.conv.pre_relu = True  # before batch norm (min-max's order)
                    elif p.conv.quant is None:
                        p.post.append(("clamp", lo, hi))
                return x
        if x.kind == "float" and isinstance(x.producer, FAdd) and single(a):
            f = x.producer  # a ReLU after a float sum: folded into it
            f.lo, f.hi = clamp_after(f.lo, f.hi, lo, hi)
            return x
        if x.kind != "int":
            raise ValueError(f"{where}: a clamp of a float tensor is not run by the integer "
                             "engine (only right after a residual sum)")
        klo = -I16 if lo == -math.inf else lo / x.scale
        khi = I16 if hi == math.inf else hi / x.scale
        if klo != int(klo) or khi != int(khi):
            raise ValueError(f"{where}: clamp bounds ({lo}, {hi}) are not levels of the "
                             f"grid (step {x.scale})")
        nlo, nhi = clamp_after(x.lo, x.hi, int(klo), int(khi))
        prod = x.producer
        if single(a) and isinstance(prod, (Conv, Add, Clamp)):
            if isinstance(prod, Conv):
                prod.quant.klo, prod.quant.khi = nlo, nhi
            else:
                prod.lo, prod.hi = nlo, nhi
            return Value(x.id, "int", x.shape, x.scale, nlo, nhi, prod, x.flat_from, x.pt)
        y = comp.new("int", x.shape, scale=x.scale, lo=nlo, hi=nhi,
                     flat_from=x.flat_from, pt=x.pt)
        y.producer = Clamp(x.id, y.id, nlo, y.hi)
        prog.steps.append(y.producer)
        return y

    def add(xa: Value, xb: Value, where: str) -> Value:
        if xa.kind not in ("int", "float") or xb.kind not in ("int", "float") or \
                xa.shape != xb.shape or xa.flat_from != xb.flat_from:
            raise ValueError(f"{where}: the integer engine sums two feature maps of one shape "
                             "(quantized or residual sums); here an operand is the input or "
                             "the shapes differ")  # flat maps in NHWC vs PyTorch's order
        s = min(xa.scale, xb.scale)
        fa, fb = xa.scale / s, xb.scale / s
        if xa.kind == xb.kind == "int" and xa.pt == xb.pt == (0, 0.0) and \
                all(f == 2.0 ** round(math.log2(f)) for f in (fa, fb)):
            # codes on a common grid whose values are k * scale: an exact integer sum
            lo = int(xa.lo * fa + xb.lo * fb)
            hi = int(xa.hi * fa + xb.hi * fb)
            int16_codes(lo, hi, where, "the exact sum's codes", "")
            y = comp.new("int", xa.shape, scale=s, lo=lo, hi=hi, flat_from=xa.flat_from,
                         pt=(0, 0.0))
            y.producer = Add(xa.id, xb.id, y.id, fa, fb, lo, hi)
        else:  # no common grid (min-max's learned scales): PyTorch's float32 sum itself
            if len(xa.shape) != 3:
                raise ValueError(f"{where}: a float sum of flat tensors is not run by the "
                                 "integer engine")
            ks = []
            for x in (xa, xb):
                if x.kind == "int" and x.pt is None:
                    raise ValueError(f"{where}: an operand's values (a pooled or concatenated "
                                     "map) are not known to PyTorch's bit here")
                ks.append(None if x.kind == "float" else (x.scale, *x.pt))
            y = comp.new("float", xa.shape)
            y.producer = FAdd(xa.id, xb.id, y.id, ks[0], ks[1])
        prog.steps.append(y.producer)
        return y

    def gap(x: Any, where: str) -> Value:
        x = materialized(x, where)
        if len(x.shape) != 3 or x.kind == "input":  # the images are NCHW, maps NHWC
            raise ValueError(f"{where}: global average pooling needs a (C, H, W) feature "
                             "map (not the input images)")
        y = comp.new("float", (x.shape[0], 1, 1))  # PyTorch's (N, C, 1, 1)
        prog.steps.append(GlobalAvg(x.id, y.id, x.scale, x.kind == "int"))
        return y

    def flatten(x: Value, where: str) -> Value:
        if len(x.shape) == 1:
            return x
        c, h, w = x.shape
        if h == w == 1:
            return Value(x.id, x.kind, (c,), x.scale, x.lo, x.hi, None, pt=x.pt)
        if x.kind == "input":  # the images, NCHW: flat in PyTorch's own order
            return Value(x.id, "float", (c * h * w,))
        if x.kind != "int":
            raise ValueError(f"{where}: flattening a float feature map is not run by the "
                             "integer engine")
        return Value(x.id, "int", (c * h * w,), x.scale, x.lo, x.hi, None, (c, h, w), x.pt)

    def concat(xs: list[Value], where: str) -> Value:
        if any(len(x.shape) != 3 for x in xs) or len({x.shape[1:] for x in xs}) != 1 or \
                len({x.kind for x in xs}) != 1 or xs[0].kind not in ("int", "float"):
            raise ValueError(f"{where}: concatenation of quantized (C, H, W) maps, or of "
                             "unquantized feature maps, only (not of both, nor of the input)")
        if xs[0].kind == "float":  # NHWC float maps: copied, PyTorch's values as they are
            y = comp.new("float", (sum(x.shape[0] for x in xs), *xs[0].shape[1:]))
            prog.steps.append(Concat([x.id for x in xs], [1] * len(xs),
                                     [x.shape[0] for x in xs], y.id))
            return y
        s = min(x.scale for x in xs)
        muls = [x.scale / s for x in xs]
        if any(f != 2.0 ** round(math.log2(f)) for f in muls):
            raise ValueError(f"{where}: concatenated grids have no common integer grid")
        pt = (0, 0.0) if all(x.pt == (0, 0.0) for x in xs) else None
        lo = min(int(x.lo * f) for x, f in zip(xs, muls, strict=True))
        hi = max(int(x.hi * f) for x, f in zip(xs, muls, strict=True))
        int16_codes(lo, hi, where, "the concatenation's codes", "")
        y = comp.new("int", (sum(x.shape[0] for x in xs), *xs[0].shape[1:]), scale=s, lo=lo,
                     hi=hi, pt=pt)
        prog.steps.append(Concat([x.id for x in xs], [int(f) for f in muls],
                                 [x.shape[0] for x in xs], y.id))
        return y

    for node in graph.nodes:
        where = _desc(node, modules) if node.op != "placeholder" else node.name
        if node.op == "placeholder":
            if env:
                raise ValueError("the integer engine runs single-input models")
            env[node.name] = comp.new("input", prog.in_shape)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise ValueError("the integer engine runs models returning one tensor")
            prog.out = value(out, "output")
        elif node.op == "call_module":
            m = modules[node.target]
            if node.kwargs or len(node.args) != 1:
                raise ValueError(f"{where}: modules must take one tensor")
            if type(m).forward not in _KNOWN_FORWARDS:  # a leaf fx does not look into
                own = " (a subclass with its own forward)" if isinstance(m, _KNOWN) else ""
                raise ValueError(f"{where}: the integer engine does not cover "
                                 f"{type(m).__name__}{own}")
            a = node.args[0]
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                x = value(a, where, allow_pending=True)
                q = getattr(m, "input_quantizer", None)
                if isinstance(x, (_Pending, _PendingCat)):
                    x = (q is not None and quantized(
                        a, x, q, f"{node.target}.input_quantizer", where)) or value(a, where)
                conv = comp.layer(str(node.target), m, x)
                oshape = (m.out_channels, conv.geom["oh"], conv.geom["ow"]) \
                    if isinstance(m, nn.Conv2d) else (m.out_features,)
                env[node.name] = _Pending(conv, oshape)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                x = value(a, where, allow_pending=True)
                if not isinstance(x, _Pending) or not single(a) or x.bn or x.post or \
                        x.conv.quant is not None:
                    raise ValueError(f"{where}: batch norm is folded into the layer before "
                                     "it; here it does not follow a layer directly")
                if m.running_mean is None or m.running_var is None:  # batch statistics
                    raise ValueError(f"{where}: batch norm without running statistics "
                                     "(track_running_stats=False) normalises by each batch's "
                                     "own statistics in eval mode: it cannot be folded")
                x.conv.alpha, x.conv.beta = bn_affine(m)
                if not (np.isfinite(x.conv.alpha).all() and np.isfinite(x.conv.beta).all()):
                    # PyTorch's output is NaN / inf there (its quantizers raise); the engine's
                    # float epilogue would clamp it to finite codes without a word
                    raise ValueError(f"{where}: batch norm with NaN or infinite scale or shift "
                                     "(a negative or zero running_var with eps=0?)")
                x.bn = True
                env[node.name] = x
            elif isinstance(m, nn.ReLU):
                env[node.name] = clamp(node, a, 0.0, math.inf, where)
            elif isinstance(m, (nn.ReLU6, nn.Hardtanh)):
                lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (m.min_val, m.max_val)
                env[node.name] = clamp(node, a, float(lo), float(hi), where)
            elif isinstance(m, QuantAct):
                x = value(a, where, allow_pending=True)
                if m.quantizer is None:
                    env[node.name] = x
                elif (y := quantized(a, x, m.quantizer, where, where)) is not None:
                    env[node.name] = y
                else:
                    x = value(a, where)
                    env[node.name] = comp.quantize(x, quant_params(m.quantizer, where), where)
            elif isinstance(m, nn.MaxPool2d):
                env[node.name] = max_pool(a, pool_args(node, m, where), where)
            elif isinstance(m, nn.AvgPool2d):
                env[node.name] = avg_pool(comp, value(a, where), avg_args(node, m), where, gap)
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                if m.output_size not in (1, (1, 1), [1, 1]):  # (None, None) keeps the size
                    raise ValueError(f"{where}: adaptive average pooling to "
                                     f"{m.output_size} (the integer engine runs size 1)")
                env[node.name] = gap(value(a, where, allow_pending=True), where)
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise ValueError(f"{where}: flatten from dimension 1 only")
                env[node.name] = flatten(value(a, where), where)
            elif isinstance(m, _PASS):
                env[node.name] = value(a, where, allow_pending=True)
            else:
                raise ValueError(f"{where}: the integer engine does not cover "
                                 f"{type(m).__name__}")
        elif node.op in ("call_function", "call_method"):
            t = node.target
            if not node.args and "input" in node.kwargs:  # torch.relu(input=x) as relu(x)
                node.args, node.kwargs = input_first(node.kwargs)
            args = node.args
            if t in ADDS and len(args) == 2 and not node.kwargs:
                env[node.name] = add(value(args[0], where), value(args[1], where), where)
            elif t in RELU_FNS or t == "relu":
                env[node.name] = clamp(node, args[0], 0.0, math.inf, where)
            elif (bounds := clamp_bounds(node, where)) is not None:
                env[node.name] = clamp(node, args[0], *bounds, where)
            elif t in FLATTENS or t == "flatten":
                dims = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
                if dims != 1 or len(args) > 2 or node.kwargs.get("end_dim", -1) != -1:
                    raise ValueError(f"{where}: flatten from dimension 1 only")
                env[node.name] = flatten(value(args[0], where), where)
            elif t in MAXPOOL_FNS:
                env[node.name] = max_pool(args[0], pool_args(node, None, where), where)
            elif t in AVGPOOL_FNS:
                env[node.name] = avg_pool(comp, value(args[0], where), avg_args(node, None),
                                          where, gap)
            elif (mark := calls.batch_size(node, env)) is not None:  # read by a flattening view
                env[node.name] = mark
            elif (src := calls.flat_view(node, env)) is not None:  # x.view(x.size(0), -1)
                env[node.name] = flatten(value(src, where), where)
            elif t in GAP_FNS and (args[1] if len(args) > 1 else node.kwargs.get(
                    "output_size")) in (1, (1, 1), [1, 1]):
                env[node.name] = gap(value(args[0], where, allow_pending=True), where)
            elif (t == "mean" or t is torch.mean) and (keep := spatial_mean(node)) is not None:
                y = gap(value(args[0], where, allow_pending=True), where)
                env[node.name] = y if keep else flatten(y, where)
            elif (cat := cat_args(node)) is not None:
                parts_in, dim = cat
                if dim not in (1, -3):
                    raise ValueError(f"{where}: concatenation along channels only")
                parts = [value(a, where, allow_pending=True) for a in parts_in]
                if all(
                        isinstance(p, (_Pending, _PendingCat)) and single(a) for p, a in zip(
                            parts, parts_in, strict=True)):  # a cat of cats: one cat
                    env[node.name] = _PendingCat([q for p in parts for q in (
                        p.parts if isinstance(p, _PendingCat) else [p])])
                else:
                    env[node.name] = concat([value(a, where) for a in parts_in], where)
            else:
                raise ValueError(f"{where}: the integer engine does not cover this operation")
        else:
            raise ValueError(f"{where}: the integer engine does not cover this node")
        src = node.args[0] if node.args else None
        if isinstance(src, fx.Node) and env.get(node.name) is env.get(src.name):
            alias[node.name] = src
    if prog.out is None:
        raise ValueError("the model has no output")
    return prog


def compile_program(model: nn.Module, in_shape: tuple[int, ...], codes: dict | None = None
                    ) -> Any:
    """The engine :class:`~fewbits.runtime.integer_plan.Program` of ``model`` (eval mode) for
    inputs ``(N, *in_shape)``; raises ``ValueError`` naming the first node the integer engine
    does not cover. ``codes``: a packed file's weight codes (``ResolvedSource.codes``), for
    the layers whose weight quantizers :func:`~fewbits.export.load_packed` dropped."""
    comp = Compiler(model, tuple(in_shape), codes)
    prog = walk(comp, Tracer)
    prog.grid = grid_layer(comp)
    prog.planes = plane_layers(comp)
    return prog
