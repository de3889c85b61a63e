"""QA 14b: the ends of kuangliu's CIFAR nets (the most copied user models) in the integer
engine. ``F.avg_pool2d(out, 4)`` and ``out.view(out.size(0), -1)`` run since b90b3e9; VGG's
``nn.AvgPool2d(kernel_size=1, stride=1)`` on the float map before the classifier was still
refused ("average pooling of an unquantized map"): a one-pixel window is the map itself.
Views that would mix rows stay refused naming the view."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trained import trained_looking

import fewbits
from fewbits.runtime.integer import IntegerEngine, supported_int_isas


class _Tail(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(1, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))  # (8, 4, 4)
        if self.how == "keep":  # VGG's 1x1 average pool; rows flattened by their size
            return self.fc(F.avg_pool2d(self.pool(out), 4).reshape(out.size(0), -1))
        out = F.avg_pool2d(out, 4)
        if self.how == "shape":
            return self.fc(out.view(out.shape[0], -1))
        return self.fc(out.view(out.size(0), -1))


def _net(how: str) -> nn.Module:
    torch.manual_seed(0)
    return trained_looking(fewbits.quantize_(_Tail(how), "fp_net"), 0)


@pytest.mark.parametrize("isa", supported_int_isas())
@pytest.mark.parametrize("how", ["size", "shape", "keep"])
def test_kuangliu_tails_run(isa: str, how: str) -> None:
    m = _net(how)
    eng = IntegerEngine.from_model(m, (3, 8, 8), isa=isa)
    for n in (1, 5, 64):
        x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ref = m(x)
        torch.testing.assert_close(eng(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


class _BadView(nn.Module):
    def __init__(self, dims: tuple) -> None:
        super().__init__()
        self.dims = dims
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(F.relu(self.conv(x)), 4)  # (N, 8, 1, 1)
        return self.fc(out.view(*self.dims))  # (2N, 4): rows of other samples mixed


@pytest.mark.parametrize("dims", [(-1, 4), (2, -1)])
def test_other_views_are_refused(dims: tuple) -> None:
    torch.manual_seed(0)
    m = fewbits.quantize_(_BadView(dims), "fp_net").eval()
    with pytest.raises(ValueError, match="view"):
        IntegerEngine.from_model(m, (3, 8, 8))
