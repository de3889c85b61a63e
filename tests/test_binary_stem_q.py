"""The binary engine's stem on images of 8-bit pixels (exact integer sums of the codes, AVX-512
VNNI): equal to PyTorch and to the float stem on users' binary_net CNNs of many stem shapes,
on images on the grid, off it by one ulp, with -0, > 1 and mixed batches, on every ISA path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewbits.runtime.binary import BinaryEngine, supported_isas


class _Net(nn.Module):
    """A user's CNN: a stem of ``cin`` -> ``cout`` channels (kernel ``k``, stride ``s``,
    padding ``p``), one binary 3x3 conv, a pooled fixed-point classifier."""

    def __init__(self, cin: int, cout: int, k: int, s: int, p: int) -> None:
        from fewbits.layers import QuantAct

        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, k, s, p, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act = QuantAct("binary_tanh")
        self.conv2 = nn.Conv2d(cout, 40, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(40)
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.act(self.bn2(self.conv2(h)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def _model(cin: int, cout: int, k: int, s: int, p: int, seed: int = 0) -> nn.Module:
    """Converted to binary_net (fixed-point classifier), batch norms with statistics as
    training leaves them (thresholds off the 1/255 grid), in eval mode."""
    from fewbits.convert import family_config, quantize_

    torch.manual_seed(seed)
    m = _Net(cin, cout, k, s, p)
    g = torch.Generator().manual_seed(seed + 1)
    for bn in (m.bn1, m.bn2):
        c = bn.num_features
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(c, generator=g) * 2)
            bn.running_var.copy_(torch.rand(c, generator=g) * 4 + 0.05)
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    fixed = family_config("fp_connect", bit_width=8)
    quantize_(m, lambda n, _: fixed if n == "fc" else "binary_net")
    return m.eval()


def _pixels(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).float() / 255


def _check(m: nn.Module, x: torch.Tensor, isa: str) -> None:
    shape = tuple(x.shape[1:])
    engine = BinaryEngine.from_model(m, input_shape=shape, isa=isa)
    assert engine._layers[0].w8  # +-1 stem weights: the byte weights are built
    floats = BinaryEngine.from_model(m, input_shape=shape, isa=isa)
    floats._layers[0].w8 = None  # the float stem
    with torch.no_grad():
        ref = m(x)
    out = engine(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, floats(x))


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("cin,cout,k,s,p,h,w", [
    (1, 32, 5, 1, 0, 12, 11), (3, 64, 3, 1, 1, 9, 17), (3, 48, 7, 2, 3, 13, 19),
    (4, 96, 3, 2, 0, 7, 6), (5, 128, 5, 1, 2, 5, 3), (8, 32, 1, 2, 0, 10, 21),
    (2, 64, 3, 1, 2, 3, 3), (3, 32, 7, 1, 0, 7, 7)])
def test_stem_q_equals_pytorch(isa: str, cin: int, cout: int, k: int, s: int, p: int, h: int,
                               w: int) -> None:
    _check(_model(cin, cout, k, s, p), _pixels((4, cin, h, w)), isa)


def test_stem_q_mixed_batches() -> None:
    """Each image is checked on its own: off the grid by one ulp, -0, above 1, negative, all
    zeros or ones, next to images on the grid."""
    x = _pixels((8, 3, 9, 13), seed=3)
    x[1, 2, 4, 5] = torch.nextafter(x[1, 2, 4, 5], torch.tensor(2.0))
    x[2] = torch.where(x[2] > 0.5, x[2], torch.tensor(-0.0))
    x[3, 0, 0, 0] = 256 / 255
    x[4, 1, 8, 12] = -1 / 255
    x[5], x[6] = 0.0, 1.0
    for isa in supported_isas():
        _check(_model(3, 64, 3, 1, 1), x, isa)


def test_engine_built_for_row_images_takes_them() -> None:
    """A 1 x 1 stem on images one row high is a CNN, not an MLP: the engine takes (N, C, 1, W)
    images (it refused them, wanting (N, C), and read C * W floats of each (N, C) row: past the
    end of the input)."""
    m = _model(3, 32, 1, 1, 0)
    x = _pixels((5, 3, 1, 10), seed=1)
    engine = BinaryEngine.from_model(m, input_shape=(3, 1, 10))
    with torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(engine(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(N, 3, 1, 10\)"):
        engine(x[:, :, 0, :1].contiguous())
    engine._size = 3  # the C program itself refuses an input size that is not the stem's
    with pytest.raises(RuntimeError, match="malformed program"):
        engine(x)
