"""Every clamping call PyTorch offers is one clamp to the integer engine, by position or by
keyword: ``F.hardtanh`` (the function; the module always ran), ``clamp_min`` / ``clamp_max``
and ``clip`` were refused ("does not cover this operation") and the model fell back."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from trained import trained_looking

import fewbits
from fewbits.runtime.integer import IntegerEngine, supported_int_isas

CALLS = {
    "hardtanh": lambda h: F.hardtanh(h),
    "hardtanh_pos": lambda h: F.hardtanh(h, -0.5, 0.75),
    "hardtanh_kw": lambda h: F.hardtanh(h, min_val=0.0, max_val=2.0),
    "relu6": lambda h: F.relu6(h),
    "clamp_min": lambda h: h.clamp_min(0.25),
    "torch_clamp_max": lambda h: torch.clamp_max(h, 1.0),
    "clip": lambda h: h.clip(0, 1),
    "torch_clip_kw": lambda h: torch.clip(h, max=1.5),
    "clamp_max_kw": lambda h: torch.clamp(h, max=-0.25),
}


class _Net(nn.Module):
    def __init__(self, call: str) -> None:
        super().__init__()
        self.call = call
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 8, 3), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = CALLS[self.call](self.bn(self.c1(x))) if self.call in CALLS else \
            self.bn(self.c1(x)).clamp(torch.zeros(1))
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


def _net(call: str) -> nn.Module:
    torch.manual_seed(0)
    return trained_looking(fewbits.quantize_(_Net(call), "fp_net"), 0)


@pytest.mark.parametrize("isa", supported_int_isas())
@pytest.mark.parametrize("call", sorted(CALLS))
def test_clamping_calls_run_as_clamps(isa: str, call: str) -> None:
    m = _net(call)
    eng = IntegerEngine.from_model(m, (3, 10, 10), isa=isa)
    x = torch.randint(0, 256, (5, 3, 10, 10), generator=torch.Generator().manual_seed(2)) / 255
    with torch.no_grad():
        ref = m(x)
    assert eng.exact
    torch.testing.assert_close(eng(x), ref, rtol=1e-6, atol=1e-6)


def test_a_tensor_bound_is_refused_by_name() -> None:
    # the tensor is a get_attr node the walk refuses first; either way loud
    with pytest.raises(ValueError, match="does not cover|clamp bounds must be numbers"):
        IntegerEngine.from_model(_net("tensor_bound"), (3, 10, 10))
