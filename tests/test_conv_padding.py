"""``padding="same"`` / ``"valid"`` (runtime/conv_pad.py) in the native engines: read as the
zero padding they mean, so a user's CNN written with them runs natively with the outputs of the
same CNN written with integers; what has no such pair (an even ``"same"``, reflect padding) is
refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from trained import BinaryStemNet, trained_looking

import fewbits
from fewbits.runtime.binary import BinaryEngine
from fewbits.runtime.conv_pad import zero_padding
from fewbits.runtime.integer import IntegerEngine, supported_int_isas


@pytest.mark.parametrize("kw,want", [
    (dict(kernel_size=3, padding="same"), (1, 1)),
    (dict(kernel_size=(5, 3), padding="same", dilation=2), (4, 2)),
    (dict(kernel_size=1, padding="same"), (0, 0)),
    (dict(kernel_size=3, padding="valid"), (0, 0)),
    (dict(kernel_size=3, padding=(2, 1)), (2, 1)),
    (dict(kernel_size=2, padding="same"), None),  # PyTorch pads the bottom / right one more
    (dict(kernel_size=(3, 4), padding="same"), None),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), None),
])
def test_zero_padding_reads_the_padding_pytorch_applies(kw: dict, want) -> None:
    m = nn.Conv2d(2, 3, **kw)
    assert zero_padding(m) == want
    if want is not None:  # the same map as explicit zero padding
        x = torch.randn(1, 2, 9, 8)
        ref = nn.functional.conv2d(x, m.weight, m.bias, padding=want, dilation=m.dilation)
        torch.testing.assert_close(m(x), ref)


def _cnn(pad: object, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=pad, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 5, padding=pad if pad != 1 else 2, bias=False),
                      nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, padding=pad if pad != 1
                                                               else 0),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return m


@pytest.mark.parametrize("isa", supported_int_isas())
def test_the_integer_engine_runs_same_padding_as_its_integers(isa: str) -> None:
    same, ints = _cnn("same"), _cnn(1)
    ints.load_state_dict(same.state_dict())
    for m in (same, ints):
        fewbits.quantize_(m, "fp_net")
        trained_looking(m, 3)
    x = (torch.rand(3, 3, 9, 11) * 255).round() / 255
    a = IntegerEngine.from_model(same, (3, 9, 11), isa=isa)(x)
    assert torch.equal(a, IntegerEngine.from_model(ints, (3, 9, 11), isa=isa)(x))
    with torch.no_grad():
        torch.testing.assert_close(a, same(x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_the_integer_engine_refuses_an_uneven_same() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 2, padding="same"), nn.ReLU(), nn.Flatten())
    fewbits.quantize_(m, "fp_net")
    with pytest.raises(ValueError, match="padding 'same'"):
        IntegerEngine.from_model(m.eval(), (3, 6, 6))


@pytest.mark.parametrize("pad", ["same", "valid"])
def test_the_binary_engine_runs_same_and_valid_padding(pad: str) -> None:
    from fewbits.convert import family_config

    torch.manual_seed(0)
    ints = 1 if pad == "same" else 0
    nets = [BinaryStemNet(3, 32, 3, 1, pad, pad), BinaryStemNet(3, 32, 3, 1, ints, ints)]
    with torch.no_grad():
        for bn in (nets[0].bn1, nets[0].bn2):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    nets[1].load_state_dict(nets[0].state_dict())
    for m in nets:
        fixed = family_config("fp_connect", bit_width=8)
        fewbits.quantize_(m, lambda n, _, f=fixed: f if n == "fc" else "binary_net")
        m.eval()
    x = torch.rand(2, 3, 10, 10)
    a = BinaryEngine.from_model(nets[0], input_shape=(3, 10, 10))(x)
    assert torch.equal(a, BinaryEngine.from_model(nets[1], input_shape=(3, 10, 10))(x))
    with torch.no_grad():
        torch.testing.assert_close(a, nets[0](x), rtol=1e-5, atol=1e-5)
