"""The binary engine's stem on images of 8-bit pixels (exact integer sums of the codes, AVX-512
VNNI): equal to PyTorch and to the float stem on users' binary_net CNNs of many stem shapes,
on images on the grid, off it by one ulp, with -0, > 1 and mixed batches, on every ISA path;
the integer stem taken per image exactly where a NumPy oracle of the grid says, its tables."""

from __future__ import annotations

import numpy as np
import oracle as O
import pytest
import torch
from torch import nn
from trained import BinaryStemNet

from fewbits.models import create_model
from fewbits.runtime.binary import BinaryEngine, _lib, _stem_q, supported_isas


def _model(cin: int, cout: int, k: int, s: int, p: int, seed: int = 0) -> nn.Module:
    """Converted to binary_net (fixed-point classifier), batch norms with statistics as
    training leaves them (thresholds off the 1/255 grid), in eval mode."""
    from fewbits.convert import family_config, quantize_

    torch.manual_seed(seed)
    m = BinaryStemNet(cin, cout, k, s, p)
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


def _net(name: str = "cifar10_binary_net_resnet23_prediction") -> nn.Module:
    torch.manual_seed(0)
    m = create_model(name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # batch-norm statistics as training leaves them (no exact ties)
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d | nn.BatchNorm1d):
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                bn.weight.copy_(torch.randn(c, generator=g))
                bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return m.eval()


@pytest.mark.parametrize("isa", supported_isas())
def test_each_image_takes_the_integer_stem_exactly_where_the_oracle_says(isa: str) -> None:
    m = _net()
    eng = BinaryEngine.from_model(m, input_shape=(3, 32, 32), isa=isa)
    bad = BinaryEngine.from_model(m, input_shape=(3, 32, 32), isa=isa)
    stem = bad._layers[0]
    assert stem.w8 and stem.ti and stem.nq == 1
    ti = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_int32 * 64).from_address(stem.ti))
    ti[:] = np.iinfo(np.int32).min  # every integer-stem bit +1 (xor flip): wrong on purpose
    runs_q = bool(_lib().fbb_stem_q(eng._isa_id))
    assert runs_q == (isa == "avx512_vpopcntdq" and "avx512_vnni" in _cpu_flags())
    rows, want = O.uint8_grid_edge_rows(_pixels((1, 3, 32, 32), seed=2), 131)
    assert any(want) and not all(want)
    x = torch.from_numpy(np.concatenate(rows))
    got, clean = bad(x), eng(x)
    for i, on in enumerate(want):
        assert torch.equal(got[i], clean[i]) != (on and runs_q), (O.UINT8_GRID_EDGES[i], on)
    with torch.no_grad():
        assert torch.equal(clean, m(x))  # both stems give PyTorch's logits here


def _cpu_flags() -> set[str]:
    from pathlib import Path

    p = Path("/proc/cpuinfo")
    return set(p.read_text().split()) if p.exists() else set()


@pytest.mark.parametrize("name,shape", [("cifar10_binary_net_resnet23_prediction", (3, 32, 32)),
                                        ("mnist_binary_net_lenet", (1, 28, 28))])
def test_integer_stem_logits_equal_pytorch_and_the_float_stem(name: str, shape: tuple) -> None:
    m = _net(name)
    eng = BinaryEngine.from_model(m, input_shape=shape)
    flt = BinaryEngine.from_model(m, input_shape=shape)
    flt._layers[0].w8 = None  # the float stem only
    x = _pixels((32, *shape), seed=3)
    with torch.no_grad():
        want = m(x)
    assert torch.equal(eng(x), want)
    assert torch.equal(flt(x), want)


def test_stem_q_tables_and_when_there_are_none() -> None:
    # taps (c, ky, kx) in, [ky][kx][quad][cout][4] out; thresholds ceil(255 t)
    from types import SimpleNamespace

    s = SimpleNamespace(k=2, cin=5)
    g = np.random.default_rng(0)
    wf = g.choice([-1.0, 1.0], size=(5 * 2 * 2, 32)).astype(np.float32)
    tf = np.array([0.0, 1 / 255, 0.5, -np.inf, np.inf] + [0.1] * 27, np.float32)
    q = _stem_q(s, wf, tf)
    w8 = q["w8"]
    assert w8.shape == (2, 2, 2, 32, 4) and w8.dtype == np.int8
    for c in range(8):
        for ky in range(2):
            for kx in range(2):
                want = wf[(c * 2 + ky) * 2 + kx] if c < 5 else np.zeros(32)
                assert (w8[ky, kx, c // 4, :, c % 4] == want).all()
    t64 = tf.astype(np.float64) * 255
    assert q["ti"][0] == 0 and q["ti"][1] == np.ceil(t64[1]) and q["ti"][2] == 128
    assert q["ti"][3] == -2**31 and q["ti"][4] == 2**31 - 1
    assert _stem_q(s, wf * 0.5, tf) == {}  # not +-1: a fixed-point first conv
    assert _stem_q(s, wf, np.full(32, np.nan, np.float32)) == {}
    assert _stem_q(SimpleNamespace(k=7, cin=2**31 // (255 * 49) + 1), wf, tf) == {}  # int32


def test_a_malformed_integer_stem_is_refused() -> None:
    m = _net("mnist_binary_net_lenet")
    eng = BinaryEngine.from_model(m, input_shape=(1, 28, 28))
    eng._layers[0].nq = 2  # a quad count that does not match cin
    assert _lib().fbb_workspace(eng._layers, len(eng.plan)) == -3
