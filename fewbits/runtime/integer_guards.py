"""What the integer engine's walk (:mod:`fewbits.runtime.integer_walk`) checks of the whole
model before it reads the graph: forward hooks fx does not trace, and a graph that computes
other numbers than the forward (an in-place update fx records out of place); and the code range
of a quantized map, which the engine holds as int16."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..layer_kinds import global_hooks, runs_hooks

__all__ = ["I16", "int16_codes", "no_hooks", "same_as_forward"]

#: the widest code magnitude of the engine's maps (int16), symmetric as all its checks
I16 = 32767


def no_hooks(model: nn.Module, engine: str = "integer") -> None:
    """Raise for a forward hook: fx does not trace them (one on a layer changing its output
    was left out of the engine's result without an error). ``engine`` names the engine (the
    binary engine reads the fx graph too)."""
    if global_hooks():
        raise ValueError(f"a global forward hook is registered: the {engine} engine does not "
                         "run hooks (remove it before compiling)")
    for name, m in model.named_modules():
        if runs_hooks(m):
            raise ValueError(f"{name or type(model).__name__} ({type(m).__name__}) has a "
                             f"forward hook: the {engine} engine does not run hooks (remove "
                             "it, or write what it does into the forward)")


def same_as_forward(model: nn.Module, graph: fx.Graph, in_shape: tuple[int, ...]) -> None:
    """Raise where the traced graph computes other numbers than ``model`` on two random images:
    the fx trace records ``a += b`` as ``a + b``, so a tensor updated in place while another
    name still holds it (``c = a; a += b``) is seen unchanged (the engine then returned
    wrong logits without an error)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *in_shape), generator=g)
    with torch.no_grad():
        try:
            want, got = model(x.clone()), fx.GraphModule(model, graph)(x.clone())
        except Exception:  # the walk names what it cannot run
            return
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and \
            (want.shape != got.shape or not bool(((want == got) | (want.isnan() & got.isnan()))
                                                 .all())):
        raise ValueError(f"{type(model).__name__}: its torch.fx graph computes other values than "
                         "its forward (an in-place update, such as a += b, of a tensor another "
                         "name still holds?): write it out of place (a = a + b)")


def int16_codes(lo: int, hi: int, where: str, what: str = "codes",
                fix: str = ": use a narrower grid") -> None:
    """Raise where codes ``[lo, hi]`` (a quantizer's after the clamps folded into it, or
    ``what``: an exact sum's, a sum pool's, a concatenation's) leave ``[-32767, 32767]``: every
    map of codes is int16, and wider codes were stored wrapped (the portable C path) or
    saturated (AVX2 / VNNI) with ``exact`` True: a 16-bit unsigned grid
    (``MinMax(ql_max=65535)``, ``FixedPoint(sign=False, n=16)``) gave wrong outputs."""
    if max(-lo, hi) > I16:
        raise ValueError(f"{where}: {what} in [{lo}, {hi}] need more than 16 bits; the integer "
                         f"engine holds codes in [-32767, 32767] (int16){fix}")
