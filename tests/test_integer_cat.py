"""Concatenations and spatial means the way ``quantize_`` leaves a user's model: the branches
end unquantized (conv, batch norm, ReLU) and the layer reading the concatenation quantizes
its input. The integer engine closes each branch on that quantizer's grid (``q(cat(a, b))``
is ``cat(q(a), q(b))`` for a per-tensor quantizer) instead of refusing the model; a
concatenation it cannot run that way is still refused by name. ``x.mean((2, 3))`` is the
global average pool."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trained import trained_looking

import fewbits
from fewbits.runtime.integer import IntegerEngine, supported_int_isas


class _Branches(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(4)
        self.c3, self.fc = nn.Conv2d(12, 8, 1), nn.Linear(8, 5)
        if how == "same_twice":
            self.c3 = nn.Conv2d(16, 8, 1)
        if how == "with_images":
            self.c3 = nn.Conv2d(11, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.bn1(self.c1(x)), self.bn2(self.c2(x))
        if self.how == "relu_before":
            h = torch.cat([torch.relu(a), torch.relu(b)], 1)
        elif self.how == "relu_after":
            h = torch.relu(torch.cat((a, b), dim=1))
        elif self.how == "with_images":  # a map and the images: no common kind of values
            return self.fc(self.c3(torch.cat([a, x], 1)).mean((2, 3)))
        else:  # "same_twice": one branch twice, closed once
            h = torch.relu(torch.cat([b, a, b], 1))
        h = torch.relu(self.c3(h))
        if self.how == "relu_after":
            return self.fc(torch.flatten(torch.mean(h, (-1, -2), keepdim=True), 1))
        return self.fc(h.mean((2, 3)))


def _model(how: str, family: str) -> nn.Module:
    torch.manual_seed(0)
    return trained_looking(fewbits.quantize_(_Branches(how), family), 0)


def _images(n: int = 6) -> torch.Tensor:
    # 8-bit pixels: the first layers' float sums are PyTorch's to the last bit on every path
    return torch.randint(0, 256, (n, 3, 12, 12), generator=torch.Generator().manual_seed(1)) / 255


@pytest.mark.parametrize("isa", supported_int_isas())
@pytest.mark.parametrize("how", ["relu_before", "relu_after", "same_twice"])
@pytest.mark.parametrize("family", ["fp_net", "min_max"])
def test_quantize_d_branches_concatenated_run_on_the_engine(isa: str, how: str,
                                                            family: str) -> None:
    m = _model(how, family)
    eng = IntegerEngine.from_model(m, (3, 12, 12), isa=isa)
    x = _images()
    with torch.no_grad():
        ref = m(x)
    out = eng(x)
    assert eng.exact
    # the branches' codes are PyTorch's; only float rounding of the last layer's sums differs
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_a_concatenation_it_cannot_run_is_refused_by_name() -> None:
    # a branch's float map and the NCHW images (a branch also read elsewhere is now
    # concatenated as float maps: tests/test_integer_qa13.py)
    with pytest.raises(ValueError, match="cat .*concatenation of quantized .* nor of the input"):
        IntegerEngine.from_model(_model("with_images", "fp_net"), (3, 12, 12))


_MEANS = {"channels": lambda x: x.mean(1),
          "dtype": lambda x: x.mean((2, 3), dtype=torch.float64).float(),
          "channels_and_rows": lambda x: x.mean((1, 2))}


@pytest.mark.parametrize("call", sorted(_MEANS))
def test_other_means_are_refused_by_name(call: str) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.c(x))
            return _MEANS[call](x)

    m = M()
    fewbits.quantize_(m, "fp_net")
    with pytest.raises(ValueError, match="mean"):
        IntegerEngine.from_model(m.eval(), (3, 12, 12))
