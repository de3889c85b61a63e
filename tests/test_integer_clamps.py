"""Clamps the integer engine folds (into a float residual sum, a quantizer's code range, a
layer's epilogue) keep PyTorch's meaning when they cannot all hold: ``torch.clamp(v, lo, hi)``
is ``min(max(v, lo), hi)``, so ``hi`` wins where ``lo > hi``, and of two clamps in a row the
second wins where their ranges are disjoint. Folding them as ``[max(lo), min(hi)]`` gave the
other bound: every output wrong, with ``exact`` True."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewbits.layers import QuantAct, QuantConv2d
from fewbits.quantizers import FixedPoint, MinMax
from fewbits.runtime.integer import IntegerEngine, supported_int_isas
from fewbits.runtime.integer_plan import clamp_after


def _fp(n: int = 6) -> FixedPoint:
    return FixedPoint(n=n, delta=2**-4)


class _Clamped(nn.Module):
    """Two clamps in a row on: a float residual sum (no common grid: min-max), the same
    sum max pooled (its pooled step), int codes, a layer's output before its quantizer, or a
    layer's float output (no quantizer: its float epilogue)."""

    def __init__(self, where: str, c1: tuple, c2: tuple) -> None:
        super().__init__()
        self.where, self.c1, self.c2 = where, c1, c2
        self.ca = QuantConv2d(3, 16, 3, padding=1, weight_quantizer=_fp())
        self.qa = QuantAct(_fp(8))
        self.cb = QuantConv2d(3, 16, 1, weight_quantizer=_fp())
        self.qb = QuantAct(MinMax())
        self.qc = QuantAct(_fp(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def cl(z: torch.Tensor) -> torch.Tensor:
            return torch.clamp(torch.clamp(z, *self.c1), *self.c2)

        if self.where == "float_sum":
            return cl(self.qa(self.ca(x)) + self.qb(self.cb(x)))
        if self.where == "pooled_sum":
            return nn.functional.max_pool2d(cl(self.qa(self.ca(x)) + self.qb(self.cb(x))), 2)
        if self.where == "codes":
            return cl(self.qa(self.ca(x)))
        if self.where == "pending":
            return self.qc(cl(self.ca(x)))
        return cl(self.ca(x))  # "float_out"


CLAMPS = [((-4.0, 4.0), (1.0, 0.5)),  # min > max: max wins
          ((0.5, 1.0), (-0.5, 0.25)),  # disjoint, the second below the first
          ((-0.5, 0.25), (0.5, 1.0)),  # disjoint, the second above the first
          ((-1.0, 0.5), (0.25, 2.0))]  # overlapping


@pytest.mark.parametrize("isa", supported_int_isas())
@pytest.mark.parametrize("where", ["float_sum", "pooled_sum", "codes", "pending", "float_out"])
@pytest.mark.parametrize("c1,c2", CLAMPS)
def test_folded_clamps_are_pytorchs(isa: str, where: str, c1: tuple, c2: tuple) -> None:
    torch.manual_seed(0)
    m = _Clamped(where, c1, c2).eval()
    x = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(1)) / 256
    eng = IntegerEngine.from_model(m, (3, 8, 8), isa=isa)
    with torch.no_grad():
        ref = m(x)
    assert eng.exact
    assert torch.equal(eng(x), ref)


@pytest.mark.parametrize("first,then,want", [
    ((-4.0, 4.0), (1.0, 0.5), (0.5, 0.5)), ((0.5, 1.0), (-0.5, 0.25), (0.25, 0.25)),
    ((-0.5, 0.25), (0.5, 1.0), (0.5, 0.5)), ((-1.0, 0.5), (0.25, 2.0), (0.25, 0.5)),
    ((float("-inf"), float("inf")), (0.0, float("inf")), (0.0, float("inf")))])
def test_clamp_after_is_the_two_clamps_in_a_row(first: tuple, then: tuple, want: tuple) -> None:
    assert clamp_after(*first, *then) == want
    v = torch.linspace(-5, 5, 101)
    lo, hi = clamp_after(*first, *then)
    assert torch.equal(torch.clamp(torch.clamp(v, *first), *then), v.clamp(lo).clamp(max=hi))


@pytest.mark.parametrize("where", ["float_sum", "codes", "pending", "float_out"])
def test_a_nan_clamp_bound_is_refused_by_name(where: str) -> None:
    # PyTorch's clamp with a NaN bound gives NaN everywhere; folded into an epilogue the bound
    # was ignored (finite logits), on codes the error did not name the node
    m = _Clamped(where, (-4.0, 4.0), (float("nan"), 1.0)).eval()
    with pytest.raises(ValueError, match="a clamp bound is NaN"):
        IntegerEngine.from_model(m, (3, 8, 8), isa="generic")
