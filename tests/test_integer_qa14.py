"""Activation grids wider than the engine's int16 codes (QA session 14): a 16-bit unsigned grid
(``MinMax(ql_max=65535)``, ``FixedPoint(sign=False, n=16)``) compiled, and its codes above
32767 were stored wrapped (portable C) or saturated (AVX2 / VNNI): wrong outputs, different on
each path, with ``exact`` True. Such a grid is refused naming the layer; one whose codes the
clamps before it keep within int16 still runs, on every path PyTorch's values. And a model on
flat inputs ``(N, F)`` (an MLP) compiled until the 8-bit pixel grid (integer_grid) unpacked
the input shape as ``(C, H, W)``: since then it was refused with "not enough values to
unpack"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fewbits
from fewbits.layers import QuantAct, QuantConv2d
from fewbits.quantizers import FixedPoint, MinMax
from fewbits.runtime.integer import IntegerEngine, supported_int_isas


def _minmax16() -> MinMax:
    q = MinMax(ql_min=0, ql_max=65535)
    with torch.no_grad():
        q.qr_min.fill_(-0.1)
        q.qr_max.fill_(2.0)
    return q


def _wide(where: str) -> nn.Module:
    q = _minmax16() if where.endswith("minmax") else FixedPoint(sign=False, n=16, delta=2**-15)
    if where.startswith("images"):  # the images quantized (a Quantize step)
        return nn.Sequential(QuantAct(q), QuantConv2d(3, 4, 1, weight_quantizer=FixedPoint()),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), QuantAct(q),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


@pytest.mark.parametrize("where", ["layer_fixed", "layer_minmax", "images_fixed",
                                   "images_minmax"])
def test_codes_beyond_int16_are_refused(where: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="more than 16 bits"):
        IntegerEngine.from_model(_wide(where), (3, 5, 5), isa="generic")


@pytest.mark.parametrize("isa", supported_int_isas())
def test_a_16_bit_grid_the_clamps_keep_within_int16_runs(isa: str) -> None:
    torch.manual_seed(0)
    q = FixedPoint(sign=False, n=16, delta=2**-14)  # codes up to 16384 after the clamp
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Hardtanh(0.0, 1.0), QuantAct(q),
                      QuantConv2d(4, 5, 1, weight_quantizer=FixedPoint(delta=2**-6)),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    eng = IntegerEngine.from_model(m, (3, 5, 5), isa=isa)
    x = torch.randint(0, 256, (2, 3, 5, 5)) / 255
    with torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(eng(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("isa", supported_int_isas())
def test_a_model_on_flat_inputs_runs(isa: str) -> None:
    torch.manual_seed(0)
    m = fewbits.quantize_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 17),
                                        nn.ReLU(), nn.Linear(17, 5)), "fp_net").eval()
    eng = IntegerEngine.from_model(m, (16,), isa=isa)
    x = torch.randint(0, 256, (3, 16)) / 255
    with torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(eng(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
