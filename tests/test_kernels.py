"""The fused C training kernels (fewbits._kernels) against the PyTorch path, bit for bit.

test_functional.py already runs the NumPy oracle through both paths on small edge-case tensors;
here the tensors are large enough to be split over threads, in both memory layouts, with exact
rounding ties, out-of-range values and zeros planted at chunk boundaries.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fewbits import _kernels
from fewbits import functional as fq

pytestmark = pytest.mark.skipif(not _kernels.available(),
                                reason=f"no fused kernels here: {_kernels.error()}")


def _bits(t: torch.Tensor) -> np.ndarray:
    return (t.detach().numpy().astype(np.float32) + np.float32(0)).view(np.uint32)


def _activation(seed: int, delta: float, channels_last: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 16, 24, 24, generator=g) * 3  # 73,728 elements: several thread chunks
    flat = x.view(-1)
    k = torch.randint(-40, 40, (4000,), generator=g).float()
    idx = torch.randperm(flat.numel(), generator=g)[:4000]
    flat[idx] = (k + 0.5) * delta  # exact ties of the grid
    flat[:7] = torch.tensor([0.0, -0.0, 1e30, -1e30, 0.5 * delta, -0.5 * delta, 2.5 * delta])
    flat[16384:16390] = torch.tensor([1.5 * delta, -1.5 * delta, 0.0, 9.0, -9.0, 0.49999997])
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _both(fn, x, *args, integer_dy: bool = False, **kw):
    """(fused result, torch result) of fn(x, ...) with forward and input/range gradients."""
    out = []
    for flag in ("1", "0"):
        old = os.environ.get("FEWBITS_FUSED")
        os.environ["FEWBITS_FUSED"] = flag
        try:
            xi = x.detach().clone().requires_grad_(True)
            extra = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor)
                     else a for a in args]
            y = fn(xi, *extra, **kw)
            dy = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
            if integer_dy:
                dy = torch.arange(y.numel()).remainder(7).add(1).float().reshape(y.shape)
            y.backward(dy)
            grads = [a.grad for a in extra if isinstance(a, torch.Tensor)]
            out.append((y.detach(), xi.grad, grads))
        finally:
            if old is None:
                os.environ.pop("FEWBITS_FUSED", None)
            else:
                os.environ["FEWBITS_FUSED"] = old
    return out


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("sign,n,delta", [(True, 8, 2**-4), (True, 4, 0.3), (False, 8, 2**-5),
                                          (True, 2, 1.0)])
def test_fixed_point_fused_equals_torch(channels_last, threads, sign, n, delta):
    x = _activation(1, delta, channels_last)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (yf, gf, _), (yt, gt, _) = _both(fq.fixed_point_quantize, x, sign=sign, n=n, delta=delta)
    finally:
        torch.set_num_threads(old)
    np.testing.assert_array_equal(_bits(yf), _bits(yt))
    np.testing.assert_array_equal(_bits(gf), _bits(gt))
    assert yf.stride() == x.stride()  # the layout is kept


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ranges", [(-2.0, 2.0), (0.0, 6.0), (-3.7, 0.11), (1.0, 1.001)])
@pytest.mark.parametrize("fine", [True, False])
def test_min_max_fused_equals_torch(channels_last, ranges, fine):
    lo, hi = ranges
    x = _activation(2, (hi - lo) / 255, channels_last)
    (yf, gf, (af, bf)), (yt, gt, (at, bt)) = _both(
        fq.min_max_quantize, x, torch.tensor(lo), torch.tensor(hi), 0, 255, 0.01, fine)
    np.testing.assert_array_equal(_bits(yf), _bits(yt))
    np.testing.assert_array_equal(_bits(gf), _bits(gt))
    # Range gradients are sums over ~70k values: float64 (fused) vs float32 (torch) order.
    for f, t in ((af, at), (bf, bt)):
        assert f.shape == t.shape
        torch.testing.assert_close(f, t, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sign,with_zero,n,m", [(True, True, 8, 1), (True, False, 4, 0),
                                                (False, True, 5, 2), (False, False, 3, -2),
                                                (True, True, 2, 0)])
def test_pow2_fused_equals_torch(channels_last, sign, with_zero, n, m):
    x = _activation(4, 0.25, False)
    flat = x.view(-1)
    b = torch.tensor(float(np.float32(2.0**-0.5)))
    # mantissas at the rounding boundary sqrt(1/2), either side, at several exponents
    edges = torch.cat([b * 2.0**k * f for k in range(-6, 4)
                       for f in (torch.tensor([1.0, -1.0]), torch.tensor([1.0000001, -0.9999999]))])
    flat[20000:20000 + edges.numel()] = edges
    flat[40000:40004] = torch.tensor([0.0, -0.0, 1e-40, -1e-40])  # zero and subnormals
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    (yf, gf, _), (yt, gt, _) = _both(fq.pow2_quantize, x, sign=sign, with_zero=with_zero, n=n,
                                     m=m)
    np.testing.assert_array_equal(_bits(yf), _bits(yt))
    np.testing.assert_array_equal(_bits(gf), _bits(gt))


@pytest.mark.parametrize("fn", [fq.binary_tanh, fq.binary_sigmoid])
@pytest.mark.parametrize("channels_last", [False, True])
def test_binary_act_fused_equals_torch(fn, channels_last):
    x = _activation(3, 0.5, False)
    x.view(-1)[100:104] = torch.tensor([1.0, -1.0, 0.999999, -0.0])  # the |x| < 1 edges
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    (yf, gf, _), (yt, gt, _) = _both(fn, x)
    np.testing.assert_array_equal(_bits(yf), _bits(yt))
    np.testing.assert_array_equal(_bits(gf), _bits(gt))


@pytest.mark.parametrize("zero_to", [1.0, -1.0, 0.0, 0.3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_binary_connect_fused_equals_torch(zero_to, channels_last):
    x = _activation(4, 0.5, False)
    x.view(-1)[100:104] = torch.tensor([0.0, -0.0, 1e-45, -1e-45])  # sign(0) and its neighbours
    x.view(-1)[200] = float("nan")  # with the checks off: -1 on both paths
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with fq.finite_checks(False):
        (yf, gf, _), (yt, gt, _) = _both(fq.binary_connect, x, zero_to)
    assert torch.equal(yf.view(torch.int32), yt.view(torch.int32))
    assert yf.stride() == yt.stride() and torch.equal(gf, gt)
    assert yf.flatten()[200] == -1
    assert set(yf.unique().tolist()) == {-1.0, 1.0, float(torch.tensor(zero_to))}


def test_min_max_range_sums_exact():
    # Upstream gradients that are small integers sum exactly in any order: equality holds.
    x = torch.linspace(-5, 5, 50_000)
    (_, _, (af, bf)), (_, _, (at, bt)) = _both(
        lambda v, a, b: fq.min_max_quantize(v, a, b) * 1.0, x, torch.tensor(-1.0),
        torch.tensor(1.0), integer_dy=True)
    assert af != 0 and bf != 0
    assert torch.equal(af, at) and torch.equal(bf, bt)


@pytest.mark.parametrize("where", [0, 16383, 16384, 70000])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fused_kernels_find_non_finite(where, bad):
    x = torch.randn(73_728)
    x[where] = bad
    for fn in (fq.fixed_point_quantize, fq.binary_tanh, fq.pow2_quantize, fq.binary_connect,
               lambda v: fq.min_max_quantize(v, torch.tensor(-1.0), torch.tensor(1.0))):
        with pytest.raises(ValueError, match="NaN|inf"):
            fn(x)
    with fq.finite_checks(False):  # turned off: no error, values as the torch path gives
        y = fq.fixed_point_quantize(x)
    assert y.shape == x.shape


def test_other_layouts_take_the_torch_path():
    base = torch.randn(64, 64)
    x = base.t()  # not dense in either layout the kernels accept
    assert not _kernels.usable(x) and _kernels.usable(base)
    y = fq.fixed_point_quantize(x.requires_grad_(False))
    assert torch.equal(y, fq.fixed_point_quantize(x.contiguous()))
    assert not _kernels.usable(base.double()) and not _kernels.usable(base[:0])


def test_gradient_in_another_layout_falls_back():
    # dy arrives channels-last while the mask was made contiguous: the PyTorch backward runs.
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    y = fq.fixed_point_quantize(x * 20)
    dy = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    y.backward(dy)
    xr = x.detach().clone().requires_grad_(True)
    inside = ((xr * 20).abs() <= 127 * 2**-4).float()
    assert torch.equal(x.grad, dy * inside * 20)


def _lane_order_sum(v: np.ndarray, n: int) -> np.float32:
    """The documented order of the fused range sums for one thread (fewbits/_train_kernels.c):
    16 float64 lanes, lane k adding the elements k (mod 16) in order from +0.0, the tail beyond
    the last whole block of 16 added to lane 0, then the lanes added in order 0..15."""
    body = n - n % 16
    lanes = [0.0] * 16
    for k in range(16):
        for t in v[k:body:16].astype(np.float64):
            lanes[k] += float(t)
    for t in v[body:n].astype(np.float64):
        lanes[0] += float(t)
    s = 0.0
    for a in lanes:
        s += a
    return np.float32(s)


@pytest.mark.parametrize("n", [16 * 4000, 16 * 4000 + 11])
def test_min_max_range_sums_in_lane_order(n, one_thread):
    # Random upstream values: the sums are exactly those of the documented lane order (the
    # vector code and the portable loop both promise it), not merely close.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g) * 2
    lo, hi = torch.tensor(-1.0, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    xi = x.clone().requires_grad_(True)
    y = fq.min_max_quantize(xi, lo, hi, ql_max=15)
    dy = torch.randn(n, generator=g)
    y.backward(dy)
    _, _, glo, ghi = fq.min_max_grid(lo.detach(), hi.detach(), 0, 15, 0.01)
    below, above = (x < glo).numpy(), (x > ghi).numpy()
    d = dy.numpy()
    assert lo.grad.item() == _lane_order_sum(np.where(below, d, 0.0), n)
    assert hi.grad.item() == _lane_order_sum(np.where(above, d, 0.0), n)
    assert torch.equal(xi.grad, torch.where(torch.from_numpy(below | above), 0.0, dy))


def test_min_max_grid_equals_torch():
    # The fused path's scalar grid against _math.min_max_range on the same float32 ranges:
    # eps nudges, zero points clamped at either end, zero-point ties, wide and 32-bit grids.
    from fewbits import _math

    g = torch.Generator().manual_seed(5)
    edge = [0.0, -0.0, 1.0, -1.0, 6.0, -6.0, 0.1, 0.105, 1e-30, 1e30, -1e30, 3e38, 1e-45, 0.25]
    ends = torch.tensor(edge + (torch.randn(40, generator=g) * 4).tolist())
    ties = [(-(k + 0.5) * 2 / 255, 2.0 - (k + 0.5) * 2 / 255) for k in range(0, 255, 17)]
    cases = [(float(a), float(b)) for a in ends for b in ends[::3]] + ties
    for (lo, hi), (ql_min, ql_max), eps in zip(
            cases, [(0, 255), (-128, 127), (0, 3), (0, 2**32 - 1), (-7, 7)] * len(cases),
            [0.01, 1e-8, 0.1000000020, 1.0] * len(cases), strict=False):
        rmin, rmax = torch.tensor(lo), torch.tensor(hi)
        scale, _, glo, ghi = _math.min_max_range(rmin, rmax, float(ql_min), float(ql_max), eps)
        want = torch.stack([scale, glo, ghi])
        got = torch.tensor(_kernels.min_max_grid(float(rmin), float(rmax), ql_min, ql_max, eps))
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), (lo, hi, ql_min, ql_max, eps)
        assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))
