"""The binary engine's program, read off the model's ``torch.fx`` graph (not off attribute
names): any model whose forward is made of the operations below compiles, the zoo's
binary_net networks and a user's model converted with ``quantize_(model, "binary_net")`` alike.

Operations covered (anything else raises ``ValueError`` naming the node and the operation,
which the planner records before it tries the next backend):

* the **stem**: the first convolution / affine, on the float input (any float weights: +-1, or
  a fixed-point first layer), then batch norm and a binarization;
* **binary layers**: a convolution (square kernel, any equal stride, zero padding smaller
  than the kernel, no bias, groups 1, dilation 1) or affine of +-1 weights
  (``binary_connect``) on binary activations, then batch norm and a binarization; an affine
  on a flattened ``c x h x h`` map is a ``h x h`` convolution;
* **binarization**: ``binary_tanh`` as a ``QuantAct`` module or as the ``input_quantizer`` of
  the layer that reads the value (``quantize_``'s placement); a ReLU between batch norm and
  ``binary_tanh`` changes nothing (``binary_tanh(relu(y)) == binary_tanh(y)``: both are +1
  exactly where ``y > 0``);
* **residual sums** ``binary_tanh(BN(s) + x)`` with ``x`` a binary activation (the ResNet
  unit of the zoo); and **float maps**: a batch-norm output that is added to a float map or
  to another batch-norm output (torchvision's ``relu(bn2(conv2) + downsample(x))``), pooled
  by a window other than 2x2, averaged by the head, or ReLU-ed after such a sum, is kept as a
  float map (and its bits ``> 0`` for the binary layers that read it);
* **max pooling**: 2x2 (stride 2) of binary activations, or of a batch-norm output before its
  binarization (``binary_tanh`` is monotone, so the two commute); any square window, stride
  and padding (no dilation or ceil mode) of a float map;
* the **head**: global average pooling (``adaptive_avg_pool2d(., 1)``, ``AdaptiveAvgPool2d(1)``,
  ``mean`` over the map) or none, flatten, and a final affine with bias (+-1 or any float
  weights); identity, dropout (evaluation) and flatten anywhere.

Example: ``binary_plan(create_model("mnist_binary_net_mlp", width=32, depth=1))`` gives a stem
step, then the head.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch import nn

from ..layers import QuantAct, QuantLayer
from ..models import is_model, model_info
from .binary_ops import (
    conv_geometry,
    is_binary_tanh,
    is_flatten,
    is_global_pool,
    max_pool_geometry,
    out_size,
    refuse,
)
from .integer_guards import no_hooks

__all__ = ["Step", "binary_plan"]

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class Step:
    """One operation of an engine program: ``op`` is ``"stem"`` (float conv), ``"bconv"``
    (binary conv), ``"head"`` (average pool of bits + affine), ``"poolf"`` (max pool of a
    float map) or ``"headm"`` (average pool of a float map + affine); ``weight``/``bn`` name
    the modules; the input map is ``cin x h x w``; kernel ``k`` with zero padding ``pad`` and
    ``stride``; ``pool``: 2x2 max pool after; ``residual``: binary_tanh(BN(s) + x) with ``x``
    the bits of buffer ``res``; ``src``/``dst``: bit-map buffers. ``float_out``: the batch
    norm output ``y`` (plus the float map ``fres``, then a ReLU if ``relu``) is kept as a
    float map ``fdst`` and its bits ``y > 0`` go to ``dst``; ``fsrc``: the float map a
    ``poolf`` / ``headm`` reads."""

    op: str
    weight: str
    bn: str | None
    cin: int
    cout: int
    h: int
    w: int
    k: int = 1
    pad: int = 0
    pool: bool = False
    residual: bool = False
    src: int = -1
    dst: int = -1
    res: int = -1
    stride: int = 1
    float_out: bool = False
    relu: bool = False
    fsrc: int = -1
    fdst: int = -1
    fres: int = -1

    @property
    def range(self) -> tuple[int, int]:
        """Integer range of a binary conv's pre-activation: ``+-cin*k*k``."""
        n = self.cin * self.k * self.k
        return -n, n


@dataclass
class _V:
    """What a graph value is to the engine."""

    kind: str  # image | flat_image | pre | bn | bits | pooled | fmap | pooledf
    c: int
    h: int
    w: int
    step: Step | None = None  # pre / bn: the step being built; bits: the one that wrote it
    buf: int = -1  # bits
    res: _V | None = None  # bn + binary residual
    pool: bool = False  # bn: a 2x2 max pool waits for its binarization
    flat: bool = False  # bits flattened to c * h * w features
    src: _V | None = None  # pre: the input value
    relu: bool = False  # bn: a ReLU was applied (harmless before binary_tanh, not before a sum)
    fres: _V | None = None  # bn + a float map (fmap)
    relu_after: bool = False  # bn + fres: a ReLU after the sum; fmap: its values are >= 0
    fbuf: int = -1  # fmap, pooledf: the float map

    @property
    def said(self) -> str:
        """The kind in the words of a refusal message."""
        return _KIND_WORDS.get(self.kind, self.kind)


_KIND_WORDS = {"image": "float input", "flat_image": "flattened float input",
               "pre": "layer output before its batch norm", "bn": "batch-normalized map",
               "bits": "binary (+-1) map", "pooled": "globally pooled binary map",
               "fmap": "float map", "pooledf": "globally pooled float map"}


class _Proxy(fx.Proxy):
    # fx has no __iadd__: ``y += x`` became a new value, and another name of ``y`` (which
    # PyTorch changes in place) read it unchanged (silently wrong logits); recorded as iadd,
    # the in-place sum is refused where another node reads ``y``
    def __iadd__(self, other: object) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantAct, QuantLayer)) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


class _Plan:
    def __init__(self, model: nn.Module, shape: tuple[int, ...]) -> None:
        self.model, self.shape = model, shape
        self.modules = dict(model.named_modules())
        self.steps: list[Step] = []
        self.vals: dict[fx.Node, _V] = {}
        self.nbuf = [0, 0]  # virtual bit maps, float maps (buffers assigned by _allocate)
        # id of a bn value's step -> (pool, residual, bits): each step is emitted once; None
        # once its bits were pooled in place
        self.binarized: dict[int, tuple | None] = {}
        self.floats: dict[int, tuple[_V, _V]] = {}  # id of a bn value -> (it, its fmap)

    def new(self, pool: int) -> int:
        self.nbuf[pool] += 1
        return self.nbuf[pool] - 1

    def sole_reader(self, a: fx.Node) -> bool:
        """Whether ``a``'s value is read by one node only, through nodes that pass it on."""
        v, chain = self.vals.get(a), set()
        while len(a.users) == 1:
            chain.add(a)
            prev = a.args[0] if a.args and isinstance(a.args[0], fx.Node) else None
            if prev is None or self.vals.get(prev) is not v:
                # and no other name: a bn output binarized twice is one bit map (pooling it
                # in place under one name changed what a convolution read under the other)
                return all(n in chain for n, u in self.vals.items() if u is v)
            a = prev
        return False

    def binarize(self, node: fx.Node, v: _V) -> _V:
        if v.kind == "bits":
            return v
        if v.kind == "fmap" or (v.kind == "bn" and (v.fres is not None or v.relu_after)):
            f = self.materialize(node, v)
            return _V("bits", f.c, f.h, f.w, step=f.step, buf=f.buf)
        if v.kind != "bn":
            raise refuse(node, f"binary_tanh of a {v.said} (the engine binarizes batch "
                          "norm outputs of its layers)")
        s = v.step
        assert s is not None
        if id(s) in self.binarized:
            seen = self.binarized[id(s)]
            if seen is not None and seen[0] == v.pool and seen[1] is v.res:
                return seen[2]
            raise refuse(node, "a batch-norm output read twice (binarized with and without "
                          "a residual sum or pooling, or after its bits were pooled)")
        s.dst, s.pool = self.new(0), v.pool
        if v.res is not None:
            s.residual, s.res = True, v.res.buf
        self.steps.append(s)
        h, w = (v.h // 2, v.w // 2) if v.pool else (v.h, v.w)
        out = _V("bits", v.c, h, w, step=s, buf=s.dst)
        self.binarized[id(s)] = (v.pool, v.res, out)
        return out

    def materialize(self, node: fx.Node, v: _V) -> _V:
        """The float map of a batch-norm value (its step with the float epilogue), once."""
        if v.kind == "fmap":
            return v
        if v.kind != "bn" or v.res is not None:
            raise refuse(node, f"a float map of a {v.said}" + (
                " with a binary residual" if v.kind == "bn" else ""))
        if id(v) in self.floats:
            return self.floats[id(v)][1]
        s = replace(v.step, float_out=True, relu=v.relu or v.relu_after, dst=self.new(0),
                    fdst=self.new(1), fres=v.fres.fbuf if v.fres is not None else -1,
                    pool=False, residual=False, res=-1)
        self.steps.append(s)
        out = _V("fmap", v.c, v.h, v.w, step=s, buf=s.dst, fbuf=s.fdst, relu_after=s.relu)
        if v.pool:  # a 2x2 max pool of the batch-norm output, now of its float map
            out = self.pool_floats(out, 2, 2, 0)
        self.floats[id(v)] = (v, out)
        return out

    def pool_floats(self, v: _V, k: int, stride: int, pad: int) -> _V:
        s = Step("poolf", "", None, v.c, v.c, v.h, v.w, k, pad, stride=stride,
                 fsrc=v.fbuf, dst=self.new(0), fdst=self.new(1))
        self.steps.append(s)
        return _V("fmap", v.c, out_size(v.h, k, pad, stride), out_size(v.w, k, pad, stride), step=s,
                  buf=s.dst, fbuf=s.fdst, relu_after=v.relu_after)

    def layer(self, node: fx.Node, m: nn.Module, v: _V) -> _V:
        iq = getattr(m, "input_quantizer", None)
        if getattr(m, "output_quantizer", None) is not None:
            raise refuse(node, f"output quantizer {type(m.output_quantizer).__name__}")
        if iq is not None:
            if not is_binary_tanh(iq):
                raise refuse(node, f"input quantizer {type(iq).__name__} (binary_tanh only)")
            v = self.binarize(node, v)
        k, pad, stride = conv_geometry(node, m)
        lin = isinstance(m, nn.Linear)
        cin, cout = (m.in_features, m.out_features) if lin else (m.in_channels, m.out_channels)
        name = str(node.target)
        if v.kind == "pooledf" and lin and cin == v.c:
            return _V("pre", cout, 1, 1, step=Step("headm", name, None, v.c, cout, v.h, v.w,
                                                   fsrc=v.fbuf), src=v)
        if v.kind == "pooled" and lin and cin == v.c:
            return _V("pre", cout, 1, 1, step=Step("head", name, None, v.c, cout, v.h, v.w,
                                                   src=v.buf), src=v)
        if v.kind in ("image", "flat_image") and not self.steps:
            if lin != (v.kind == "flat_image") or cin != v.c * v.h * v.w // (1 if lin else
                                                                           v.h * v.w):
                raise refuse(node, f"first layer {name} on an input of shape {self.shape}")
            c, h, w = (cin, 1, 1) if lin else (v.c, v.h, v.w)
            oh, ow = (1, 1) if lin else (out_size(h, k, pad, stride), out_size(w, k, pad, stride))
            return _V("pre", cout, oh, ow, step=Step("stem", name, None, c, cout, h, w,
                                                     1 if lin else k, pad, stride=stride),
                      src=v)
        if v.kind != "bits":
            raise refuse(node, f"layer {name} on a {v.said} (binary activations or the "
                          "float input only)")
        if lin:
            if not v.flat and (v.h, v.w) != (1, 1):
                raise refuse(node, f"affine {name} on an unflattened map")
            if v.h != v.w or cin != v.c * v.h * v.w:
                raise refuse(node, f"affine {name} of {cin} inputs on a {v.c} x {v.h} x "
                              f"{v.w} map")
            k = v.h
        elif cin != v.c or v.flat:
            raise refuse(node, f"convolution {name} of {cin} channels on {v.c}")
        if not lin and (v.h + 2 * pad < k or v.w + 2 * pad < k):
            raise refuse(node, f"convolution {name}: kernel {k} larger than its padded input")
        oh, ow = (1, 1) if lin else (out_size(v.h, k, pad, stride), out_size(v.w, k, pad, stride))
        return _V("pre", cout, oh, ow,
                  step=Step("bconv", name, None, v.c, cout, v.h, v.w, k, pad, src=v.buf,
                            stride=stride), src=v)

    def run(self, graph: fx.Graph) -> list[Step]:
        for node in graph.nodes:
            out = self.node(node)
            if out is not None:
                self.vals[node] = out
            if node.op == "output":
                break
        return self.steps

    def add(self, node: fx.Node, ins: list[_V]) -> _V:
        if len(ins) != 2 or len(node.args) != 2 or node.kwargs:
            raise refuse(node, "an addition of other than two values")
        if node.target in ("add_", operator.iadd) and not self.sole_reader(node.args[0]):
            raise refuse(node, "an in-place sum of a value read elsewhere")
        a, b = ins
        if a.kind == "bn" and b.kind == "bn":  # two batch-norm outputs: the second as a map
            b = self.materialize(node, b)
        bn, other = (a, b) if a.kind == "bn" else (b, a)
        if bn.kind != "bn" or other.kind not in ("bits", "fmap") or bn.res is not None or \
                bn.fres is not None or bn.pool or bn.relu_after or \
                (other.c, other.h, other.w) != (bn.c, bn.h, bn.w) or other.flat:
            raise refuse(node, f"a residual sum of a {a.said} and a {b.said} (the "
                          "engine adds a binary activation or a float map to a batch-normed "
                          "layer output of the same shape)")
        if bn.relu:
            raise refuse(node, "a ReLU before a residual sum (relu(y) + x is not y + x)")
        return replace(bn, res=other) if other.kind == "bits" else replace(bn, fres=other)

    def relu(self, node: fx.Node, m: nn.Module | None, v: _V) -> _V:
        inplace = getattr(m, "inplace", False) or node.kwargs.get("inplace", False)
        if inplace and not self.sole_reader(node.args[0]):
            raise refuse(node, "an in-place ReLU of a value read elsewhere")
        if v.kind == "fmap" and v.relu_after:
            return v  # relu(relu(y)) == relu(y)
        if v.kind != "bn":  # binary_tanh(relu(y)) == binary_tanh(y) only before binarizing
            raise refuse(node, f"ReLU of a {v.said}")
        if v.res is not None:
            raise refuse(node, "a ReLU after a binary residual sum")
        return replace(v, relu_after=True) if v.fres is not None else replace(v, relu=True)

    def output(self, node: fx.Node) -> None:
        arg = node.args[0]
        v = self.vals.get(arg) if isinstance(arg, fx.Node) else None
        if v is None or v.kind != "pre" or not isinstance(
                self.model.get_submodule(v.step.weight), nn.Linear):
            raise refuse(node, "a model output that is not a final affine (logits)")
        s = v.step
        if s.op == "bconv":  # an affine on binary activations ends the network: the head
            if (v.src.h, v.src.w) != (1, 1):
                raise refuse(node, "a final affine on a flattened map (the head averages "
                              "the map: pool it to 1 x 1 first)")
            s = replace(s, op="head", k=1)
        if s.op not in ("head", "headm"):
            raise refuse(node, "a network with no binary layer")
        self.steps.append(s)

    def node(self, node: fx.Node) -> _V | None:
        if node.op == "placeholder":
            if any(isinstance(v, _V) and v.kind in ("image", "flat_image")
                   for v in self.vals.values()):
                raise refuse(node, "a second model input")
            c, h, w = self.shape if len(self.shape) == 3 else (self.shape[0], 1, 1)
            return _V("image" if len(self.shape) == 3 else "flat_image", c, h, w)
        if node.op == "output":
            self.output(node)
            return None
        if node.op == "get_attr":
            raise refuse(node, "a parameter used directly by the forward")
        ins = [self.vals.get(a) for a in node.args if isinstance(a, fx.Node)]
        if any(v is None for v in ins) or not ins:
            raise refuse(node, "an operation on values the engine does not hold")
        v = ins[0]
        m = self.modules[str(node.target)] if node.op == "call_module" else None
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return v
        if isinstance(m, QuantAct):
            if m.quantizer is None:
                return v
            if not is_binary_tanh(m.quantizer):
                raise refuse(node, f"activation quantizer {type(m.quantizer).__name__}")
            return self.binarize(node, v)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return self.layer(node, m, v)
        if isinstance(m, _BN):
            if v.kind != "pre" or v.step.op in ("head", "headm") or v.step.bn is not None:
                raise refuse(node, f"batch norm {node.target} not right after a layer")
            if m.running_mean is None:
                raise refuse(node, f"batch norm {node.target} without running statistics")
            if getattr(self.model.get_submodule(v.step.weight), "bias", None) is not None:
                raise refuse(node, f"layer {v.step.weight} with a bias before its batch norm "
                              "(the engine folds batch norm alone)")
            return _V("bn", v.c, v.h, v.w, step=replace(v.step, bn=str(node.target)), src=v.src)
        if isinstance(m, nn.ReLU) or node.target in (torch.relu, nn.functional.relu) or (
                node.op == "call_method" and node.target == "relu"):
            return self.relu(node, m, v)
        pool = max_pool_geometry(m, node)
        if pool is not None:
            return self.max_pool(node, v, *pool)
        if (m is None and node.target in (operator.add, torch.add, operator.iadd)) or (
                node.op == "call_method" and node.target in ("add", "add_")):
            return self.add(node, ins)
        if is_flatten(node, m):
            if v.kind == "image":
                return _V("flat_image", v.c * v.h * v.w, 1, 1)
            if v.kind == "bits":
                return replace(v, flat=True)
            if v.kind in ("pooled", "pooledf"):
                return v
            raise refuse(node, f"flatten of a {v.said}")
        if v.kind in ("bits", "bn", "fmap") and not v.flat and is_global_pool(node, m, v.h, v.w):
            if v.kind == "bits":
                return _V("pooled", v.c, v.h, v.w, buf=v.buf)
            f = self.materialize(node, v)
            return _V("pooledf", f.c, f.h, f.w, fbuf=f.fbuf)
        what = type(m).__name__ if m is not None else getattr(node.target, "__name__",
                                                                str(node.target))
        raise refuse(node, f"operation {what}")

    def max_pool(self, node: fx.Node, v: _V, k: int, stride: int, pad: int) -> _V:
        pool2 = (k, stride, pad) == (2, 2, 0)
        if pool2 and v.kind == "bn" and not v.pool and v.fres is None and not v.relu_after \
                and v.h % 2 == 0 and v.w % 2 == 0:
            return replace(v, pool=True)  # binary_tanh is monotone: pool its input
        if pool2 and v.kind == "bits" and self.sole_reader(node.args[0]) and \
                v.step is self.steps[-1] and not v.step.pool and not v.step.float_out and \
                v.step.op != "poolf" and v.h % 2 == 0 and v.w % 2 == 0 and not v.flat:
            v.step.pool = True
            self.binarized[id(v.step)] = None  # its unpooled bits are gone
            return replace(v, h=v.h // 2, w=v.w // 2)
        if v.kind in ("bn", "fmap") and v.h + 2 * pad >= k and v.w + 2 * pad >= k:
            return self.pool_floats(self.materialize(node, v), k, stride, pad)
        raise refuse(node, f"max pooling {k}x{k}/{stride} (padding {pad}) of a {v.said} "
                      "(bits: 2x2 right after a binarization that no other node reads, on an "
                      "even map; a batch-norm output or float map: any)")


def _allocate(steps: list[Step], nbuf: list[int]) -> None:
    """Scratch buffers for the program's virtual maps: a map's buffer is free again after its
    last reader, and never the one a step reads (the C program writes while it reads)."""
    fields = (("src", "res"), ("dst",)), (("fsrc", "fres"), ("fdst",))
    for pool, (reads, writes) in enumerate(fields):
        last = [-1] * nbuf[pool]
        for i, s in enumerate(steps):
            for f in (*reads, *writes):
                if getattr(s, f) >= 0:
                    last[getattr(s, f)] = i
        phys: dict[int, int] = {}
        held: dict[int, int] = {}  # physical buffer -> virtual map it holds
        for i, s in enumerate(steps):
            for b in [b for b, m in held.items() if last[m] < i]:
                del held[b]
            for f in writes:
                m = getattr(s, f)
                if m >= 0:
                    b = next(b for b in range(len(held) + 1) if b not in held)
                    held[b], phys[m] = m, b
            for f in (*reads, *writes):
                if getattr(s, f) >= 0:
                    setattr(s, f, phys[getattr(s, f)])


def binary_plan(model: nn.Module, input_size: tuple[int, int] | None = None,
                input_shape: tuple[int, ...] | None = None) -> list[Step]:
    """The engine program of ``model``'s eval-mode forward, from its ``torch.fx`` graph.

    ``input_shape``: the per-sample input shape, ``(C, H, W)`` or ``(features,)`` (default: the
    registered model's, else required); ``input_size``: just the image ``(H, W)``. Raises
    ``ValueError`` naming the first operation the engine does not cover (a zoo model of
    another family, a dilated convolution, a ReLU before a residual sum, ...).
    """
    fam = getattr(model, "family", None)
    if fam is not None and fam != "binary_net":
        raise ValueError(f"the binary engine runs binary_net models only; this one is family "
                         f"{fam!r}: run it with PyTorch or ONNX Runtime")
    if input_shape is None:  # a registered model declares it
        spec = getattr(model, "fewbits_spec", None) or {}
        name = str(spec.get("name", ""))
        input_shape = model_info(name).input_shape_for(spec.get("kwargs", {})) \
            if is_model(name) else None
        if input_shape is None:
            raise ValueError(f"cannot tell the input shape of {type(model).__name__}; pass "
                             "input_shape=(C, H, W)")
    shape = tuple(input_shape)
    if input_size is not None:
        if len(shape) != 3:
            raise ValueError(f"input_size given for a model of input shape {shape}")
        shape = (shape[0], *input_size)
    no_hooks(model, "binary")  # fx leaves hooks out: their effect was silently dropped
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many kinds for data-dependent control flow
        raise ValueError(f"the binary engine reads the model's torch.fx graph, and "
                         f"{type(model).__name__} cannot be traced: {e}") from e
    plan = _Plan(model, shape)
    steps = plan.run(graph)
    _allocate(steps, plan.nbuf)
    if not steps or steps[0].op != "stem" or steps[-1].op not in ("head", "headm"):
        raise ValueError("the binary engine needs a float first layer, binary layers and a "
                         "final affine")
    return steps
