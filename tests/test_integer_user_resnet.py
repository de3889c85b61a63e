"""A user's CIFAR ResNet as the popular reference code writes it (kuangliu's ``BasicBlock``:
``F.relu``, a 1x1 conv shortcut, ``F.avg_pool2d(out, 4)``, ``out.view(out.size(0), -1)``)
converted with ``quantize_`` runs on the integer engine: the functional average pool over the
whole float map is the global average, ``x.view(x.size(0), -1)`` / ``x.reshape(x.shape[0],
-1)`` / ``torch.reshape`` are flatten; the batch size read anywhere else, a view to another
shape and a partial average pool of a float map are refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trained import trained_looking

import fewbits
from fewbits.runtime.integer import IntegerEngine, supported_int_isas


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self, flat: str = "view", pool: int = 4) -> None:
        super().__init__()
        self.flat, self.pool = flat, pool
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layers = nn.Sequential(_Block(16, 16, 1), _Block(16, 32, 2), _Block(32, 32, 2))
        self.linear = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.avg_pool2d(out, self.pool)
        if self.flat == "view":
            out = out.view(out.size(0), -1)
        elif self.flat == "reshape":
            out = out.reshape(out.shape[0], -1)
        elif self.flat == "torch.reshape":
            out = torch.reshape(out, (out.size(0), -1))
        elif self.flat == "view3":  # (N, C, 1): not a flatten to (N, -1)
            out = out.view(out.size(0), -1, 1)[..., 0]
        else:  # the batch size read by a sum
            out = out.view(out.size(0), -1) + out.size(0)
        return self.linear(out)


def _net(fam: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = _ResNet(**kw)
    fewbits.quantize_(m, fam)
    return trained_looking(m, 1)


@pytest.mark.parametrize("isa", supported_int_isas())
@pytest.mark.parametrize("fam", ["fp_net", "min_max"])
@pytest.mark.parametrize("flat", ["view", "reshape", "torch.reshape"])
def test_a_users_cifar_resnet_runs_on_the_integer_engine(fam: str, flat: str, isa: str) -> None:
    m = _net(fam, flat=flat)
    x = (torch.rand(5, 3, 16, 16) * 255).round() / 255
    eng = IntegerEngine.from_model(m, (3, 16, 16), isa=isa)
    with torch.no_grad():
        ref = m(x)
    out = eng(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    assert torch.equal(out.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("kw,match", [
    (dict(flat="view3"), "does not cover"),
    (dict(flat="add"), "the batch size"),
    (dict(pool=2), "average pooling of an unquantized map"),  # 2x2 windows of a float map
])
def test_what_it_cannot_run_is_refused_by_name(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IntegerEngine.from_model(_net("min_max", **kw), (3, 16, 16))


@pytest.mark.parametrize("pool,match", [
    (nn.AvgPool2d(2, divisor_override=3), "divisor_override=3"),
    (nn.AvgPool2d(3, 1, padding=1, count_include_pad=False), "count_include_pad=False"),
])
def test_average_pools_of_codes_it_does_not_divide_so_are_refused_by_name(pool: nn.Module,
                                                                          match: str) -> None:
    from fewbits.layers import QuantAct
    from fewbits.quantizers import FixedPoint

    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                      QuantAct(FixedPoint(sign=False, n=8, delta=2**-4)), pool, nn.Flatten())
    with pytest.raises(ValueError, match=match):
        IntegerEngine.from_model(m.eval(), (3, 6, 6))
