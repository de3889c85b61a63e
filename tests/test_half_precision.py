"""float16 / bfloat16 inputs: every quantizer decides on the exact value and rounds back once.

Each family runs on EVERY finite value of each half type (65k values: all values near every
rounding tie, clamp bound, ``2**-0.5`` mantissa threshold and zero), forward and straight-through
mask, against the NumPy float32 oracle (``tests/oracle.py``) of the same value rounded back to the
half type. Plus autocast: CPU bfloat16 through quantized layers of every family (and CUDA float16
where a GPU exists).
"""

from __future__ import annotations

import numpy as np
import oracle as O
import pytest
import torch
from torch import nn

from fewbits import functional as fq
from fewbits.layers import QuantConv2d
from fewbits.models import FAMILIES, QuantConfig
from fewbits.quantizers import get

HALF = [torch.float16, torch.bfloat16]


def all_finite(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float type, -0.0 included."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[torch.isfinite(x)]


def _expect(oracle_y: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.asarray(oracle_y, dtype=np.float32)).to(dtype)


def _same(got: torch.Tensor, exp: torch.Tensor, x: torch.Tensor, what: str) -> None:
    g, e = got + 0.0, exp + 0.0  # -0 folded onto +0 (the spec leaves a zero's sign free)
    bad = (g.view(torch.int16) != e.view(torch.int16)).nonzero().reshape(-1)
    rows = [(x[i].item(), e[i].item(), g[i].item()) for i in bad[:5].tolist()]
    assert bad.numel() == 0, f"{what}: {bad.numel()} values differ (x, expected, got): {rows}"


def _run(fn, x: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, dx for dy = 1): the forward and the straight-through mask."""
    xr = x.clone().requires_grad_(True)
    y = fn(xr, **kw)
    y.backward(torch.ones_like(y))
    return y.detach(), xr.grad


FIXED = [(True, 8, 2**-4), (True, 4, 0.1), (False, 6, 0.3), (True, 16, 2**-10), (True, 2, 1.0)]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("sign,n,delta", FIXED)
def test_fixed_point_every_half_value(dtype, sign, n, delta):
    x = all_finite(dtype)
    y, dx = _run(fq.fixed_point_quantize, x, sign=sign, n=n, delta=delta)
    xf = x.float().numpy()
    assert y.dtype == dtype
    _same(y, _expect(O.fixed_point_quantize(xf, sign, n, delta), dtype), x, "value")
    g = O.fixed_point_quantize_grad(xf, np.ones_like(xf), sign, n, delta)
    _same(dx, _expect(g, dtype), x, "mask")


POW2 = [(True, True, 8, 1), (True, False, 4, 0), (False, True, 5, -1), (True, True, 3, 3),
        (True, False, 8, -1)]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("sign,with_zero,n,m", POW2)
def test_pow2_every_half_value(dtype, sign, with_zero, n, m):
    x = all_finite(dtype)
    y, dx = _run(fq.pow2_quantize, x, sign=sign, with_zero=with_zero, n=n, m=m)
    xf = x.float().numpy()
    _same(y, _expect(O.pow2_quantize(xf, sign, with_zero, n, m), dtype), x, "value")
    g = O.pow2_quantize_grad(xf, np.ones_like(xf), sign, with_zero, n, m)
    _same(dx, _expect(g, dtype), x, "mask")


def test_pow2_bfloat16_below_sqrt_half_rounds_down():
    """Issue 12 item 4: log2(0.70703125) = -0.50015 rounds to -1 (0.5), as float32 says; with
    p_max = 0.5 the value is inside the range, so its gradient passes."""
    x = torch.tensor([0.70703125, -0.70703125], dtype=torch.bfloat16, requires_grad=True)
    y = fq.pow2_quantize(x, n=8, m=-1)
    assert y.tolist() == [0.5, -0.5]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]
    assert fq.pow2_quantize(torch.tensor([0.70703125], dtype=torch.bfloat16)).item() == 0.5


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("num_bits", [2, 4, 5])
def test_inq_every_half_value(dtype, num_bits):
    x = all_finite(dtype)
    x = x[x.float().abs() <= 3.0]  # the tensor's max sets the levels: keep a usual scale
    y, dx = _run(fq.inq_quantize, x, num_bits=num_bits)
    _same(y, _expect(O.inq_quantize(x.float().numpy(), num_bits), dtype), x, "value")
    assert torch.equal(dx, torch.ones_like(dx))


MINMAX = [(-1.0, 1.0, 0, 255), (-0.3, 2.0, -128, 127), (0.1, 0.105, 0, 3), (-6.0, 6.0, 0, 15)]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("lo,hi,ql_min,ql_max", MINMAX)
def test_min_max_every_half_value(dtype, lo, hi, ql_min, ql_max):
    x = all_finite(dtype)
    x = x[x.float().abs() <= 8.0]
    a, b = torch.tensor(lo), torch.tensor(hi)
    y, dx = _run(fq.min_max_quantize, x, qr_min=a, qr_max=b, ql_min=ql_min, ql_max=ql_max)
    xf = x.float().numpy()
    exp = O.min_max_quantize(xf, np.float32(lo), np.float32(hi), ql_min, ql_max)
    _same(y, _expect(exp, dtype), x, "value")
    g, _, _ = O.min_max_quantize_grad(xf, np.float32(lo), np.float32(hi), np.ones_like(xf),
                                      ql_min, ql_max)
    _same(dx, _expect(g, dtype), x, "mask")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", ["binary_tanh", "binary_sigmoid", "binary_connect"])
def test_binary_every_half_value(dtype, name):
    x = all_finite(dtype)
    y, dx = _run(getattr(fq, name), x)
    xf = x.float().numpy()
    _same(y, _expect(getattr(O, name)(xf), dtype), x, "value")
    _same(dx, _expect(getattr(O, name + "_grad")(xf, np.ones_like(xf)), dtype), x, "mask")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_binary_weight_half(dtype):
    w = all_finite(dtype)[::64].reshape(-1, 4)
    w = w[w.float().abs().amax(1) < 1e4]  # mean |w| representable in the half type
    y, dx = _run(fq.binary_weight, w)
    _same(y.reshape(-1), _expect(O.binary_weight(w.float().numpy()), dtype).reshape(-1),
          w.reshape(-1), "value")
    assert torch.equal(dx, torch.ones_like(dx))


# --------------------------------------------------------------------------- autocast

_CFG = QuantConfig(inq_iterations=(0, 1))


def _family_layer(fam: str) -> QuantConv2d:
    f = FAMILIES[fam]
    act = f.act(_CFG) or ("binary_tanh" if fam == "binary_net" else None)
    return QuantConv2d(3, 4, 3, padding=1, bias=False, weight_quantizer=f.weight(_CFG),
                       output_quantizer=act)


def _autocast_case(fam: str, device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = _family_layer(fam).to(device).train()
    x = torch.randn(2, 3, 6, 6, device=device)
    with torch.autocast(device, dtype=dtype):
        y = layer(x)
        # what the layer computes, step by step: autocast runs the convolution in `dtype` on
        # the float32 quantized weight; the output quantizer decides on the exact values
        z = nn.functional.conv2d(x, layer.quantized_weight(), None, padding=1)
    assert z.dtype == dtype
    q = layer.output_quantizer
    if q is not None:
        assert y.dtype == dtype
        want = get(q.config())(z.float())  # the float32 answer, rounded back below
        if q.name == "min_max":  # learnable ranges: the same (initial) ranges
            want = q(z.float())
        assert torch.equal((y.float() + 0.0), (want.to(dtype).float() + 0.0)), fam
    y.float().square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    assert bool(torch.isfinite(layer.weight.grad).all())


@pytest.mark.parametrize("fam", sorted(set(FAMILIES) - {"float"}))
def test_autocast_cpu_bfloat16_every_family(fam):
    _autocast_case(fam, "cpu", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast: no GPU here")
@pytest.mark.parametrize("fam", sorted(set(FAMILIES) - {"float"}))
def test_autocast_cuda_float16_every_family(fam):
    _autocast_case(fam, "cuda", torch.float16)
