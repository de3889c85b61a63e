"""Hold ``fewbits.functional`` to the independent NumPy oracle (``tests/oracle.py``) bit for bit.

Forward values are compared as float32 bit patterns (``-0`` folded onto ``+0``, the spec never
says which zero), backward passes through torch autograd with a random upstream ``dy``. Every
test runs twice: with the fused C kernels (float32 on CPU takes them) and with them off (the
PyTorch path that CUDA, float64 and machines without a C compiler use).
"""

from __future__ import annotations

import math
import os

import numpy as np
import oracle as O
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fewbits import _kernels
from fewbits import functional as fq


@pytest.fixture(scope="module", autouse=True, params=["fused", "torch"])
def kernel_path(request):
    """Run the module once per implementation (module scope: hypothesis allows it)."""
    old = os.environ.get("FEWBITS_FUSED")
    os.environ["FEWBITS_FUSED"] = "1" if request.param == "fused" else "0"
    if request.param == "fused" and not _kernels.available():
        pytest.skip(f"fused kernels unavailable here: {_kernels.error()}")
    yield request.param
    if old is None:
        del os.environ["FEWBITS_FUSED"]
    else:
        os.environ["FEWBITS_FUSED"] = old


F32 = np.float32
CUDA = torch.cuda.is_available()

# --------------------------------------------------------------------------- helpers


def _bits(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32) + F32(0)  # -0 -> +0
    return a.view(np.uint32)


def assert_bits(got, exp, x=None, what: str = "") -> None:
    """float32 bit equality; on failure the message lists (input, expected, got) per mismatch."""
    got = np.asarray(got, dtype=np.float32)
    exp = np.asarray(exp, dtype=np.float32)
    assert got.shape == exp.shape, f"{what}: shape {got.shape} != {exp.shape}"
    bad = np.flatnonzero(_bits(got) != _bits(exp))
    msg = ""
    if bad.size:
        rows = []
        xs = None if x is None else np.broadcast_to(np.asarray(x), exp.shape).ravel()
        for i in bad[:12]:
            xi = "" if xs is None else f"x={float(xs[i])!r} ({xs[i].view(np.uint32):#010x}) "
            rows.append(
                f"  [{i}] {xi}expected={float(exp.ravel()[i])!r} got={float(got.ravel()[i])!r}"
            )
        msg = f"{what}: {bad.size} of {exp.size} differ\n" + "\n".join(rows)
    np.testing.assert_array_equal(_bits(got), _bits(exp), err_msg=msg)


def run(fn, x_np, dy_np, *tensor_args, device: str = "cpu", grad_args: bool = True, **kw):
    """Forward + backward through ``fn``; returns (y, [dx, d tensor_args...]) as NumPy."""
    x = torch.tensor(np.asarray(x_np, dtype=np.float32), device=device, requires_grad=True)
    targs = [
        torch.tensor(np.asarray(a, dtype=np.float32), device=device, requires_grad=grad_args)
        for a in tensor_args
    ]
    x_before = x.detach().clone()
    y = fn(x, *targs, **kw)
    assert isinstance(y, torch.Tensor)
    assert y.dtype == torch.float32, f"{fn.__name__}: output dtype {y.dtype}"
    assert y.shape == x.shape, f"{fn.__name__}: output shape {tuple(y.shape)} != {tuple(x.shape)}"
    assert y.device == x.device
    y.backward(torch.tensor(np.asarray(dy_np, dtype=np.float32), device=device))
    assert torch.equal(x.detach(), x_before), f"{fn.__name__} modified its input"
    grads = [x.grad] + [t.grad for t in targs]
    out = [None if g is None else g.detach().cpu().numpy() for g in grads]
    assert out[0] is not None, f"{fn.__name__}: no gradient reached the input"
    return y.detach().cpu().numpy(), out


def _dy(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _dyadic_dy(shape, seed: int = 0) -> np.ndarray:
    """Upstream grads whose float32 sums are exact in any order (for the range gradients)."""
    k = np.random.default_rng(seed).integers(-8, 9, size=shape)
    return (k.astype(np.float32) * F32(0.25)).astype(np.float32)


def _around(v) -> list[np.float32]:
    """v and its two float32 neighbours."""
    v = F32(v)
    return [np.nextafter(v, F32(-np.inf)), v, np.nextafter(v, F32(np.inf))]


TINY = [0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.1754944e-38, -1.1754944e-38, 1e-30, -1e-30]
HUGE = [1e30, -1e30, 3e38, -3e38]
MANTS = [0.5, 0.70710677, 0.7071068, 0.74999994, 0.75, 0.75000006, 0.99999994]


def _arr(vals) -> np.ndarray:
    a = np.array([F32(v) for v in vals], dtype=np.float32)
    return a[np.isfinite(a)]


# --------------------------------------------------------------------------- oracle self-checks


def test_oracle_round_half_away_is_std_round():
    """The oracle's rounding equals exact rational rounding (ties away), incl. float32 traps."""
    from fractions import Fraction

    vals = _arr(
        [0.49999997, -0.49999997, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 8388609.0, -8388609.0,
         8388607.5, 16777215.0, 1e-45, -0.0, 0.0, 123.49999, 3e38,
         *np.random.default_rng(1).uniform(-1e4, 1e4, 200)]
    )
    for v in vals:
        f = Fraction(float(v))
        exact = math.floor(abs(f) + Fraction(1, 2)) * (1 if f >= 0 else -1)
        assert float(O.round_half_away(v)) == exact, v


def test_oracle_log2_rules_match_float64_log2():
    """Exact log2 roundings agree with float64 log2 away from ties (float64 is ample there)."""
    rng = np.random.default_rng(2)
    a = np.concatenate([
        np.abs(rng.standard_normal(2000)).astype(np.float32) * F32(2.0) ** rng.integers(
            -140, 120, 2000).astype(np.float32),
        _arr([1e-45, 3e-45, 1e30, 0.70710677, 0.7071068, 0.75, 0.74999994, 1.0, 1.5]),
    ]).astype(np.float32)
    a = a[(a > 0) & np.isfinite(a)]
    l2 = np.log2(a.astype(np.float64))
    away = np.where(l2 >= 0, np.floor(l2 + 0.5), -np.floor(-l2 + 0.5))
    np.testing.assert_array_equal(O.exact_round_log2(a), away.astype(np.int64))
    inq = np.floor(l2) + ((l2 - np.floor(l2)) >= math.log2(1.5))
    np.testing.assert_array_equal(O.exact_inq_log2(a), inq.astype(np.int64))
    # the one float32 mantissa the float32 constant gets wrong: 0.70710677 < sqrt(0.5)
    assert O.exact_round_log2(F32(0.70710677)) == -1


def test_oracle_fixed_point_matches_float64_for_dyadic_delta():
    x = np.random.default_rng(3).uniform(-10, 10, 500).astype(np.float32)
    x = np.concatenate([x, (np.arange(-200, 200) * F32(2**-5)).astype(np.float32)])
    d = 2.0**-4
    xc = np.clip(x.astype(np.float64), -127 * d, 127 * d)
    ref = np.sign(xc) * np.floor(np.abs(xc) / d + 0.5) * d
    assert_bits(O.fixed_point_quantize(x, True, 8, d), ref.astype(np.float32), x)


# --------------------------------------------------------------------------- binary families


BIN_EDGE = _arr(
    TINY + HUGE + _around(1.0) + _around(-1.0) + [0.5, -0.5, 2.0, -2.0, 0.999, -0.999]
)


@pytest.mark.parametrize("zero_to", [1.0, -1.0, 0.0])
def test_binary_connect_deterministic(zero_to):
    dy = _dy(BIN_EDGE.shape)
    y, (dx,) = run(fq.binary_connect, BIN_EDGE, dy, quantize_zero_to=zero_to)
    assert_bits(y, O.binary_connect(BIN_EDGE, zero_to), BIN_EDGE, "binary_connect")
    assert_bits(dx, O.binary_connect_grad(BIN_EDGE, dy), BIN_EDGE, "binary_connect grad")


def test_binary_tanh_and_sigmoid():
    dy = _dy(BIN_EDGE.shape, 1)
    y, (dx,) = run(fq.binary_tanh, BIN_EDGE, dy)
    assert_bits(y, O.binary_tanh(BIN_EDGE), BIN_EDGE, "binary_tanh")
    assert_bits(dx, O.binary_tanh_grad(BIN_EDGE, dy), BIN_EDGE, "binary_tanh grad")
    y, (dx,) = run(fq.binary_sigmoid, BIN_EDGE, dy)
    assert_bits(y, O.binary_sigmoid(BIN_EDGE), BIN_EDGE, "binary_sigmoid")
    assert_bits(dx, O.binary_sigmoid_grad(BIN_EDGE, dy), BIN_EDGE, "binary_sigmoid grad")


@pytest.mark.parametrize(
    "w",
    [
        np.array([[0.5, -0.25, 0.0, -0.0], [1e30, -1e-45, 3.0, -2.0], [0, 0, 0, 0]], F32),
        np.random.default_rng(4).standard_normal((6, 3, 3, 3)).astype(np.float32),
        np.array([[1e30, 1e30, -1e30, 1e-45], [0.1, 0.2, 0.3, 0.4]], F32),
        np.array([[-0.0], [1e-40], [-3.5]], F32),
    ],
    ids=["edges", "conv", "huge", "one-per-channel"],
)
def test_binary_weight(w):
    dy = _dy(w.shape, 5)
    y, (dx,) = run(fq.binary_weight, w, dy)
    assert_bits(y, O.binary_weight(w), w, "binary_weight")
    assert_bits(dx, O.binary_weight_grad(w, dy), w, "binary_weight grad")


@pytest.mark.parametrize("shape", [(), (5,)])
def test_binary_weight_needs_a_channel_axis(shape):
    """A vector has no axis to average over (alpha would be |w|): refused, not silently identity."""
    with pytest.raises(ValueError, match="binary_weight"):
        fq.binary_weight(torch.ones(shape))


def test_binary_connect_stochastic_statistics():
    vals = np.array([-3.0, -1.0, -0.999, -0.5, 0.0, 0.3, 0.5, 0.9, 0.999, 1.0, 2.0], F32)
    n = 20000
    w = torch.tensor(np.repeat(vals[:, None], n, axis=1), requires_grad=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        y = fq.binary_connect(w, stochastic=True)
    assert y.dtype == torch.float32 and y.shape == w.shape
    yn = y.detach().numpy()
    assert set(np.unique(yn).tolist()) <= {-1.0, 1.0}, np.unique(yn)
    p = np.clip((vals.astype(np.float64) + 1) / 2, 0, 1)
    emp = (yn == 1).mean(axis=1)
    tol = 5 * np.sqrt(p * (1 - p) / n) + 1e-3
    report = {v: (e, q) for v, e, q in zip(vals.tolist(), emp, p, strict=True)}
    assert np.all(np.abs(emp - p) <= tol), report
    assert np.all(yn[vals >= 1] == 1) and np.all(yn[vals <= -1] == -1)
    dy = torch.tensor(_dy(w.shape, 6))
    y.backward(dy)
    assert torch.equal(w.grad, dy), "stochastic binary_connect gradient is not the identity"


# --------------------------------------------------------------------------- fixed point


def _fixed_edge(sign: bool, n: int, delta: float) -> np.ndarray:
    xmin, xmax = O.fixed_point_limits(sign, n, delta)
    d = F32(delta)
    vals = list(TINY) + HUGE
    for k in range(-6, 7):
        vals += [*_around(F32(k + 0.5) * d), F32(k) * d]
    vals += _around(d * F32(0.5)) + _around(-d * F32(0.5))
    vals += _around(xmax) + _around(-xmax) + _around(xmin) + [xmax * 2, -xmax * 2]
    for big in (2**23 + 1, 2**23 + 3, 2**24 - 1, 2**20 + 0.5, 1000.5, 2**30 + 1):
        if F32(big) <= F32(2 ** (n - 1 if sign else n)):
            vals += [F32(big) * d, -F32(big) * d]
    return _arr(vals)


FIXED_CASES = [
    (s, n, d)
    for s in (True, False)
    for n in (1, 2, 3, 8, 32)
    for d in (2**-4, 0.1, 1.0, 3.0)
    if n - s >= 1  # signed n=1 has no nonzero level and is refused (see oracle docstring)
]


@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("sign,n,delta", FIXED_CASES)
def test_fixed_point_edges(sign, n, delta, ste):
    x = _fixed_edge(sign, n, delta)
    dy = _dy(x.shape, 7)
    y, (dx,) = run(fq.fixed_point_quantize, x, dy, sign=sign, n=n, delta=delta,
                   ste_fine_grained=ste)
    assert_bits(y, O.fixed_point_quantize(x, sign, n, delta), x, "fixed_point forward")
    exp = O.fixed_point_quantize_grad(x, dy, sign, n, delta, ste)
    assert_bits(dx, exp, x, "fixed_point grad")
    if not ste:
        assert_bits(dx, dy, x, "ste_fine_grained=False must pass dy unchanged")


def test_fixed_point_round_half_away_traps():
    """Ties go away from zero; just-below-half stays down; odd integers >= 2**23 stay put."""
    d = 2.0**-4
    x = _arr([0.09375, -0.09375, 0.15625, -0.15625, np.nextafter(F32(0.03125), F32(0))])
    y, _ = run(fq.fixed_point_quantize, x, np.ones_like(x), sign=True, n=8, delta=d)
    assert_bits(y, _arr([0.125, -0.125, 0.1875, -0.1875, 0.0]), x, "fixed point ties")
    x = _arr([2**23 + 1, -(2**23 + 1), 2**24 - 1])
    y, _ = run(fq.fixed_point_quantize, x, np.ones_like(x), sign=True, n=32, delta=1.0)
    assert_bits(y, x, x, "fixed point n=32 odd integers")


# --------------------------------------------------------------------------- power of two


def _pow2_edge(sign, with_zero, n, m) -> np.ndarray:
    p_max, p_min, thr = O.pow2_levels(sign, with_zero, n, m)
    vals = list(TINY) + HUGE
    lo_k = max(m - 70, -148)
    for k in [*list(range(lo_k, m + 4)), -126, -140, -149]:
        for mant in MANTS:
            v = F32(mant) * O.pow2_exact(k + 1)[()]
            vals += [v, -v]
    for v in (p_max, p_min, thr, p_max * F32(1.4142135), p_max * F32(1.5)):
        vals += _around(v) + _around(-v)
    return _arr(vals)


POW2_CASES = [
    (s, z, n, m)
    for s in (True, False)
    for z in (True, False)
    for n in (1, 2, 3, 8, 32)
    for m in (-2, 0, 1, 3)
    if (n - (1 if s else 0) - (1 if z else 0)) >= 1  # nb = 0: test_pow2_single_magnitude_level
]


@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("sign,with_zero,n,m", POW2_CASES)
def test_pow2_edges(sign, with_zero, n, m, ste):
    x = _pow2_edge(sign, with_zero, n, m)
    dy = _dy(x.shape, 8)
    y, (dx,) = run(fq.pow2_quantize, x, dy, sign=sign, with_zero=with_zero, n=n, m=m,
                   ste_fine_grained=ste)
    assert_bits(y, O.pow2_quantize(x, sign, with_zero, n, m), x, "pow2 forward")
    exp = O.pow2_quantize_grad(x, dy, sign, with_zero, n, m, ste)
    assert_bits(dx, exp, x, "pow2 grad")
    if not ste:
        assert_bits(dx, dy, x, "ste_fine_grained=False must pass dy unchanged")


@pytest.mark.parametrize("sign,with_zero,n", [(True, True, 2), (True, False, 1), (False, True, 1)])
@pytest.mark.parametrize("m", [0, 1])
def test_pow2_single_magnitude_level(sign, with_zero, n, m):
    """nb = 0 is a valid level set with p_min = p_max (e.g. n=2 signed with zero: ternary
    {-2**m, 0, 2**m}); the contract only refuses n < 1."""
    x = _pow2_edge(sign, with_zero, n, m)
    dy = _dy(x.shape, 8)
    y, (dx,) = run(fq.pow2_quantize, x, dy, sign=sign, with_zero=with_zero, n=n, m=m)
    assert_bits(y, O.pow2_quantize(x, sign, with_zero, n, m), x, "pow2 nb=0 forward")
    assert_bits(dx, O.pow2_quantize_grad(x, dy, sign, with_zero, n, m), x, "pow2 nb=0 grad")


def test_pow2_exact_log2_rounding():
    """float32(2**-0.5) = 0.70710677 is below sqrt(0.5): its log2 rounds down, not up."""
    x = _arr([0.70710677, 0.7071068, 1.4142135, 1.4142137, 0.35355338, 0.3535534])
    y, _ = run(fq.pow2_quantize, x, np.ones_like(x), sign=True, with_zero=True, n=8, m=1)
    assert_bits(y, _arr([0.5, 1.0, 1.0, 2.0, 0.25, 0.5]), x, "pow2 exact log2")


def test_pow2_seed_weight_zero_maps_to_p_min():
    x = _arr([0.0, -0.0])
    y, _ = run(fq.pow2_quantize, x, np.ones_like(x), sign=True, with_zero=False, n=8, m=1)
    # nb = n - 1 = 7, p_min = 2**(1 - (2**7 - 1)) = 2**-126
    assert_bits(y, np.full(2, 2.0**-126, F32), x, "pow2 with_zero=False at 0")


# --------------------------------------------------------------------------- INQ


def _inq_case(s: float, num_bits: int, seed: int) -> np.ndarray:
    s = F32(s)
    n1, n2, prune = O.inq_levels(np.array([s], F32), num_bits)
    vals = [s, 0.0, -0.0, *_around(prune), *_around(-prune), *TINY]
    for k in range(max(n2 - 3, -148), n1 + 2):
        for mant in MANTS:
            v = F32(mant) * O.pow2_exact(k + 1)[()]
            vals += [v, -v]
    a = _arr(vals)
    a = a[np.abs(a) <= s]
    np.random.default_rng(seed).shuffle(a)
    return a


INQ_SCALES = [1.0, 0.75, 0.74999994, 3.0, 1e30, 1e-40, 1.5 * 2**-3, 0.1]


@pytest.mark.parametrize("num_bits", [2, 3, 4, 5, 8, 32])
@pytest.mark.parametrize("s", INQ_SCALES)
def test_inq_edges(s, num_bits):
    w = _inq_case(s, num_bits, num_bits)
    dy = _dy(w.shape, 9)
    y, (dx,) = run(fq.inq_quantize, w, dy, num_bits=num_bits)
    assert_bits(y, O.inq_quantize(w, num_bits), w, f"inq forward (max|w|={s})")
    assert_bits(dx, O.inq_quantize_grad(w, dy), w, "inq grad")


def test_inq_all_zero_and_ties():
    w = np.zeros((3, 4), F32)
    w[0, 0] = -0.0
    y, _ = run(fq.inq_quantize, w, np.ones_like(w), num_bits=4)
    assert_bits(y, np.zeros_like(w), w, "inq all zero")
    # max 1.5 rounds up to n1 = 1, n2 = 1 + 1 - 4 = -2, prune = 2**-3; |w| = 1.5 * 2**k ties
    # round up; [prune, 2**n2) goes up to 2**n2
    w = _arr([1.5, 0.75, -0.375, 0.1875, 0.15625, 0.125, 0.12499999, 0.09375])
    y, _ = run(fq.inq_quantize, w, np.ones_like(w), num_bits=4)
    assert_bits(y, _arr([2.0, 1.0, -0.5, 0.25, 0.25, 0.25, 0.0, 0.0]), w, "inq ties")


# --------------------------------------------------------------------------- min-max

# (qr_min, qr_max, ql_min, ql_max, eps)
MM_CASES = [
    (-6.0, 6.0, 0, 255, 0.01),
    (-2.0, 2.0, 0, 255, 0.01),
    (0.5, 0.5, 0, 255, 0.01),  # eps nudge
    (1.0, -1.0, 0, 255, 0.01),  # reversed range -> nudge
    (0.3, 0.305, 0, 255, 0.01),
    (1.0, 3.0, 0, 255, 0.01),  # zp <= ql_min
    (-3.0, -1.0, 0, 255, 0.01),  # zp >= ql_max
    (-1.0, 1.0, -128, 127, 0.01),
    (-0.15625, 15.78125, 0, 255, 0.01),  # zp = 2.5 exactly -> 3
    (-7.84375, 8.09375, -128, 127, 0.01),  # zp = -2.5 exactly -> -3
    (-0.7, 0.3, 0, 3, 0.01),
    (-0.1, 0.2, 0, 1, 0.5),
    (-1e-3, 2e-3, 0, 15, 1e-3),
    (-100.0, 37.5, 0, 255, 0.01),
]


def _mm_edge(qr_min, qr_max, ql_min, ql_max, eps) -> np.ndarray:
    p = O.min_max_params(F32(qr_min), F32(qr_max), ql_min, ql_max, eps)
    lo, hi, sc = F32(p["lo"]), F32(p["hi"]), F32(p["scale"])
    vals = list(TINY) + HUGE + _around(lo) + _around(hi) + [lo - 1, hi + 1, lo * 3, hi * 3]
    steps = max(ql_max - ql_min, 1)
    for k in sorted({0, 1, 2, steps // 2, steps - 2, steps - 1}):
        vals += [*_around(lo + F32(k + 0.5) * sc), lo + F32(k) * sc]
    vals += _around(F32(qr_min)) + _around(F32(qr_max))
    return _arr(vals)


@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("qr_min,qr_max,ql_min,ql_max,eps", MM_CASES)
def test_min_max_edges(qr_min, qr_max, ql_min, ql_max, eps, ste):
    x = _mm_edge(qr_min, qr_max, ql_min, ql_max, eps)
    a, b = np.array(qr_min, F32), np.array(qr_max, F32)
    kw = dict(ql_min=ql_min, ql_max=ql_max, eps=eps)
    for dy, exact in ((_dyadic_dy(x.shape, 10), True), (_dy(x.shape, 11), False)):
        y, (dx, da, db) = run(fq.min_max_quantize, x, dy, a, b, ste_fine_grained=ste, **kw)
        assert_bits(y, O.min_max_quantize(x, a, b, **kw), x, "min_max forward")
        ex, ea, eb = O.min_max_quantize_grad(x, a, b, dy, ste_fine_grained=ste, **kw)
        assert_bits(dx, ex, x, "min_max grad x")
        if not ste:
            assert_bits(dx, dy, x, "ste_fine_grained=False must pass dy unchanged")
        assert da is not None and db is not None, "qr_min/qr_max got no gradient"
        assert da.shape == () and db.shape == ()
        if exact:
            assert_bits(da, ea, what="d qr_min")
            assert_bits(db, eb, what="d qr_max")
        else:
            scale = float(np.abs(dy).sum()) * 1e-6 + 1e-7
            np.testing.assert_allclose(da, ea, rtol=0, atol=scale)
            np.testing.assert_allclose(db, eb, rtol=0, atol=scale)


def test_min_max_ties_round_away():
    # scale = 1/16, zp = 3 -> lo = -3/16; (x - lo)/scale = k + 0.5 must round up
    a, b = np.array(-0.15625, F32), np.array(15.78125, F32)
    k = np.arange(0, 8, dtype=np.float32)
    x = (F32(-0.1875) + (k + F32(0.5)) * F32(0.0625)).astype(np.float32)
    y, _ = run(fq.min_max_quantize, x, np.ones_like(x), a, b)
    assert_bits(y, (F32(-0.1875) + (k + 1) * F32(0.0625)).astype(np.float32), x, "mm ties")


@pytest.mark.parametrize("ste", [True, False])
@pytest.mark.parametrize("shape", [(4,), (4, 7), (4, 3, 2, 2)])
def test_min_max_per_channel(shape, ste):
    rng = np.random.default_rng(12)
    a = np.array([-6.0, 0.5, 1.0, -0.15625], F32)
    b = np.array([6.0, 0.5, 3.0, 15.78125], F32)
    x = (rng.standard_normal(shape) * 5).astype(np.float32)
    x.reshape(4, -1)[:, 0] = [-1e30, 1e-45, -0.0, 0.03125]
    dy = _dyadic_dy(shape, 13)
    y, (dx, da, db) = run(fq.min_max_quantize, x, dy, a, b, ste_fine_grained=ste)
    assert_bits(y, O.min_max_quantize(x, a, b), x, "min_max per-channel forward")
    ex, ea, eb = O.min_max_quantize_grad(x, a, b, dy, ste_fine_grained=ste)
    assert_bits(dx, ex, x, "min_max per-channel grad x")
    assert da is not None and da.shape == (4,) and db.shape == (4,)
    assert_bits(da, ea, what="per-channel d qr_min")
    assert_bits(db, eb, what="per-channel d qr_max")


def test_min_max_ranges_without_grad():
    x = np.linspace(-8, 8, 33, dtype=np.float32)
    a, b = np.array(-6.0, F32), np.array(6.0, F32)
    dy = _dy(x.shape, 14)
    y, (dx, da, db) = run(fq.min_max_quantize, x, dy, a, b, grad_args=False)
    assert da is None and db is None
    assert_bits(y, O.min_max_quantize(x, a, b), x)
    assert_bits(dx, O.min_max_quantize_grad(x, a, b, dy)[0], x)


# --------------------------------------------------------------------------- properties

SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)


def _elements(unit: float):
    """Any float32, plus multiples of unit/2 (ties) and their float32 neighbours."""
    u = F32(unit) * F32(0.5)

    def near_tie(k_side):
        k, side = k_side
        v = F32(k) * u
        return v if side == 0 else np.nextafter(v, F32(side * np.inf))

    return st.one_of(
        st.floats(-1e4, 1e4, width=32),
        st.floats(width=32, allow_nan=False, allow_infinity=False),
        st.tuples(st.integers(-600, 600), st.sampled_from([-1, 0, 1])).map(near_tie),
        st.sampled_from([F32(v) for v in TINY]),
    )


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fixed_point_property(data):
    sign = data.draw(st.booleans())
    n = data.draw(st.sampled_from([2, 3, 4, 8, 16, 32] + ([] if sign else [1])))
    delta = data.draw(st.sampled_from([2**-4, 0.1, 0.3, 1.0, 2.0**-10, 5.0]))
    ste = data.draw(st.booleans())
    x = data.draw(hnp.arrays(np.float32, SHAPES, elements=_elements(delta), fill=st.nothing()))
    dy = _dy(x.shape, 15)
    y, (dx,) = run(fq.fixed_point_quantize, x, dy, sign=sign, n=n, delta=delta,
                   ste_fine_grained=ste)
    assert_bits(y, O.fixed_point_quantize(x, sign, n, delta), x, "fixed_point")
    assert_bits(dx, O.fixed_point_quantize_grad(x, dy, sign, n, delta, ste), x, "grad")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_pow2_property(data):
    sign, with_zero = data.draw(st.booleans()), data.draw(st.booleans())
    n = data.draw(st.integers(1 + int(sign) + int(with_zero), 32))
    m = data.draw(st.integers(-4, 6))
    ste = data.draw(st.booleans())
    elements = _elements(2.0 ** (m - 3))
    x = data.draw(hnp.arrays(np.float32, SHAPES, elements=elements, fill=st.nothing()))
    dy = _dy(x.shape, 16)
    y, (dx,) = run(fq.pow2_quantize, x, dy, sign=sign, with_zero=with_zero, n=n, m=m,
                   ste_fine_grained=ste)
    assert_bits(y, O.pow2_quantize(x, sign, with_zero, n, m), x, "pow2")
    assert_bits(dx, O.pow2_quantize_grad(x, dy, sign, with_zero, n, m, ste), x, "grad")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_inq_property(data):
    num_bits = data.draw(st.integers(2, 10))
    elements = st.one_of(
        st.floats(float(F32(-1e30)), float(F32(1e30)), width=32),
        st.integers(-40, 40).map(lambda k: F32(1.5) * O.pow2_exact(k)[()]),
        st.integers(-40, 40).map(lambda k: -F32(1.5) * O.pow2_exact(k)[()]),
        st.sampled_from([F32(v) for v in TINY]),
    )
    w = data.draw(hnp.arrays(np.float32, SHAPES, elements=elements, fill=st.nothing()))
    dy = _dy(w.shape, 17)
    y, (dx,) = run(fq.inq_quantize, w, dy, num_bits=num_bits)
    assert_bits(y, O.inq_quantize(w, num_bits), w, "inq")
    assert_bits(dx, dy, w, "inq grad")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_min_max_property(data):
    ql_min, ql_max = data.draw(st.sampled_from([(0, 255), (0, 15), (-128, 127), (0, 1), (-8, 7)]))
    eps = data.draw(st.sampled_from([0.01, 0.5, 1e-3]))
    per_channel = data.draw(st.booleans())
    ste = data.draw(st.booleans())
    # 1-D per-channel input is test_min_max_per_channel[shape0]'s business
    shapes = hnp.array_shapes(min_dims=2 if per_channel else 1, max_dims=4, max_side=5)
    x = data.draw(hnp.arrays(np.float32, shapes, elements=st.floats(-20, 20, width=32)))
    c = x.shape[0] if per_channel else None
    rshape = (c,) if per_channel else ()
    rng_el = st.floats(-10, 10, width=32)
    a = data.draw(hnp.arrays(np.float32, rshape, elements=rng_el))
    b = data.draw(hnp.arrays(np.float32, rshape, elements=rng_el))
    # overwrite part of x with exact ties k + 0.5 of each channel's grid
    p = O.min_max_params(a, b, ql_min, ql_max, eps)
    lo, sc = (np.broadcast_to(p[k], (x.shape[0],)) for k in ("lo", "scale"))
    ks = data.draw(st.lists(st.integers(-2, ql_max - ql_min + 2), min_size=x.shape[0],
                            max_size=x.shape[0]))
    x2 = x.reshape(x.shape[0], -1)
    ties = (lo + (np.array(ks, F32) + F32(0.5)) * sc).astype(np.float32)
    x2[:, 0] = ties
    if x2.shape[1] > 1:
        x2[:, 1] = np.nextafter(ties, F32(-np.inf))
    kw = dict(ql_min=ql_min, ql_max=ql_max, eps=eps)
    dy = _dyadic_dy(x.shape, 18)
    y, (dx, da, db) = run(fq.min_max_quantize, x, dy, a, b, ste_fine_grained=ste, **kw)
    assert_bits(y, O.min_max_quantize(x, a, b, **kw), x, "min_max")
    ex, ea, eb = O.min_max_quantize_grad(x, a, b, dy, ste_fine_grained=ste, **kw)
    assert_bits(dx, ex, x, "min_max grad x")
    assert_bits(da, ea, what="d qr_min")
    assert_bits(db, eb, what="d qr_max")


@settings(max_examples=40, deadline=None)
@given(
    w=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=4, max_side=5),
        elements=st.floats(-1e6, 1e6, width=32),
    )
)
def test_binary_property(w):
    dy = _dy(w.shape, 19)
    y, (dx,) = run(fq.binary_weight, w, dy)
    assert_bits(y, O.binary_weight(w), w, "binary_weight")
    assert_bits(dx, dy, w, "binary_weight grad")
    y, (dx,) = run(fq.binary_connect, w, dy)
    assert_bits(y, O.binary_connect(w), w, "binary_connect")
    y, (dx,) = run(fq.binary_tanh, w, dy)
    assert_bits(y, O.binary_tanh(w), w, "binary_tanh")
    assert_bits(dx, O.binary_tanh_grad(w, dy), w, "binary_tanh grad")


# --------------------------------------------------------------------------- errors

_A, _B = torch.tensor(-1.0), torch.tensor(1.0)
CALLS = {
    "binary_connect": (lambda t: fq.binary_connect(t), "w"),
    "binary_connect_stochastic": (lambda t: fq.binary_connect(t, stochastic=True), "w"),
    "binary_tanh": (lambda t: fq.binary_tanh(t), "x"),
    "binary_sigmoid": (lambda t: fq.binary_sigmoid(t), "x"),
    "binary_weight": (lambda t: fq.binary_weight(t.reshape(3, 1)), "w"),
    "fixed_point_quantize": (lambda t: fq.fixed_point_quantize(t), "x"),
    "pow2_quantize": (lambda t: fq.pow2_quantize(t), "x"),
    "inq_quantize": (lambda t: fq.inq_quantize(t), "w"),
    "min_max_quantize": (lambda t: fq.min_max_quantize(t, _A, _B), "x"),
}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(CALLS))
def test_non_finite_input_raises(name, bad):
    call, arg = CALLS[name]
    t = torch.tensor([0.5, bad, -0.25])
    with pytest.raises(ValueError) as info:
        call(t)
    msg = str(info.value)
    fn_name = name.removesuffix("_stochastic")
    assert fn_name in msg, f"message does not name the function: {msg!r}"
    assert any(f"{q}{arg}{q}" in msg for q in ("'", "`", '"')) or f" {arg} " in f" {msg} ", (
        f"message does not name the argument {arg!r}: {msg!r}"
    )


@pytest.mark.parametrize("which", ["qr_min", "qr_max"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_min_max_non_finite_range_raises(which, bad):
    kw = {"qr_min": torch.tensor(-1.0), "qr_max": torch.tensor(1.0)}
    kw[which] = torch.tensor(bad)
    with pytest.raises(ValueError, match=which):
        fq.min_max_quantize(torch.zeros(3), kw["qr_min"], kw["qr_max"])


_X = torch.linspace(-1, 1, 5)
INVALID = {
    "fixed n=0": lambda: fq.fixed_point_quantize(_X, n=0),
    "fixed n=33": lambda: fq.fixed_point_quantize(_X, n=33),
    "fixed delta=0": lambda: fq.fixed_point_quantize(_X, delta=0.0),
    "fixed delta<0": lambda: fq.fixed_point_quantize(_X, delta=-0.1),
    "fixed delta=nan": lambda: fq.fixed_point_quantize(_X, delta=math.nan),
    "fixed signed n=1": lambda: fq.fixed_point_quantize(_X, sign=True, n=1),
    "pow2 n=0": lambda: fq.pow2_quantize(_X, n=0),
    "pow2 n=33": lambda: fq.pow2_quantize(_X, n=33),
    "pow2 m=1.5": lambda: fq.pow2_quantize(_X, m=1.5),
    "pow2 nb<0": lambda: fq.pow2_quantize(_X, sign=True, with_zero=True, n=1),
    "inq num_bits=1": lambda: fq.inq_quantize(_X, num_bits=1),
    "inq num_bits=0": lambda: fq.inq_quantize(_X, num_bits=0),
    "minmax ql equal": lambda: fq.min_max_quantize(_X, _A, _B, ql_min=5, ql_max=5),
    "minmax ql reversed": lambda: fq.min_max_quantize(_X, _A, _B, ql_min=10, ql_max=0),
    "minmax eps=0": lambda: fq.min_max_quantize(_X, _A, _B, eps=0.0),
    "minmax channel mismatch": lambda: fq.min_max_quantize(
        torch.zeros(4, 2), torch.full((3,), -1.0), torch.full((3,), 1.0)
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_arguments_raise(case):
    with pytest.raises(ValueError):
        INVALID[case]()


@pytest.mark.parametrize(
    "call",
    [
        lambda: fq.pow2_quantize(_X, sign=True, with_zero=False, n=2),
        lambda: fq.pow2_quantize(_X, sign=True, with_zero=True, n=3),
        lambda: fq.pow2_quantize(_X, sign=False, with_zero=False, n=1),
        lambda: fq.pow2_quantize(_X, sign=True, with_zero=True, n=32, m=-3),
        lambda: fq.fixed_point_quantize(_X, sign=False, n=1),
        lambda: fq.fixed_point_quantize(_X, sign=True, n=2),
        lambda: fq.fixed_point_quantize(_X, sign=False, n=32),
        lambda: fq.inq_quantize(_X, num_bits=2),
        lambda: fq.min_max_quantize(_X, _A, _B, ql_min=-1, ql_max=0),
    ],
)
def test_smallest_valid_configs_do_not_raise(call):
    assert call().shape == _X.shape


# --------------------------------------------------------------------------- dtype / device

ELEMENTWISE = {
    "binary_connect": (fq.binary_connect, O.binary_connect, {}),
    "binary_tanh": (fq.binary_tanh, O.binary_tanh, {}),
    "binary_sigmoid": (fq.binary_sigmoid, O.binary_sigmoid, {}),
    "fixed_point_quantize": (fq.fixed_point_quantize, O.fixed_point_quantize, {}),
    "pow2_quantize": (fq.pow2_quantize, O.pow2_quantize, {}),
    "inq_quantize": (fq.inq_quantize, O.inq_quantize, {}),
}


@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 3, 4, 5)])
@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_dtype_and_shape(name, shape):
    fn, ref, kw = ELEMENTWISE[name]
    x = (np.random.default_rng(20).standard_normal(shape) * 2).astype(np.float32)
    y, (dx,) = run(fn, x, np.ones(shape, F32), **kw)
    assert y.dtype == np.float32 and dx.dtype == np.float32 and y.shape == shape
    assert_bits(y, ref(x), x, name)


def test_dtype_and_shape_weight_and_min_max():
    x = (np.random.default_rng(21).standard_normal((3, 2, 2)) * 4).astype(np.float32)
    y, _ = run(fq.binary_weight, x, np.ones_like(x))
    assert y.dtype == np.float32 and y.shape == x.shape
    y, (dx, da, db) = run(fq.min_max_quantize, x, np.ones_like(x), np.array(-6, F32),
                          np.array(6, F32))
    assert y.shape == x.shape and dx.dtype == np.float32 and da.shape == () and db.shape == ()


@pytest.mark.skipif(not CUDA, reason="CUDA part of the dtype/device checks; no GPU here")
@pytest.mark.parametrize("name", ["fixed", "pow2", "inq", "min_max", "binary_weight"])
def test_cuda_matches_oracle(name):
    if name == "fixed":
        x = _fixed_edge(True, 8, 0.1)
        dy = _dy(x.shape, 22)
        y, (dx,) = run(fq.fixed_point_quantize, x, dy, device="cuda", delta=0.1)
        assert_bits(y, O.fixed_point_quantize(x, True, 8, 0.1), x)
        assert_bits(dx, O.fixed_point_quantize_grad(x, dy, True, 8, 0.1), x)
    elif name == "pow2":
        x = _pow2_edge(True, False, 8, 1)
        dy = _dy(x.shape, 23)
        y, (dx,) = run(fq.pow2_quantize, x, dy, device="cuda", with_zero=False)
        assert_bits(y, O.pow2_quantize(x, True, False, 8, 1), x)
        assert_bits(dx, O.pow2_quantize_grad(x, dy, True, False, 8, 1), x)
    elif name == "inq":
        w = _inq_case(0.75, 4, 1)
        y, _ = run(fq.inq_quantize, w, np.ones_like(w), device="cuda", num_bits=4)
        assert_bits(y, O.inq_quantize(w, 4), w)
    elif name == "min_max":
        x = _mm_edge(-7.84375, 8.09375, -128, 127, 0.01)
        a, b = np.array(-7.84375, F32), np.array(8.09375, F32)
        dy = _dyadic_dy(x.shape, 24)
        kw = dict(ql_min=-128, ql_max=127)
        y, (dx, da, db) = run(fq.min_max_quantize, x, dy, a, b, device="cuda", **kw)
        assert_bits(y, O.min_max_quantize(x, a, b, **kw), x)
        ex, ea, eb = O.min_max_quantize_grad(x, a, b, dy, **kw)
        assert_bits(dx, ex, x)
        assert_bits(da, ea)
        assert_bits(db, eb)
    else:
        w = np.random.default_rng(25).standard_normal((8, 3, 3, 3)).astype(np.float32)
        y, _ = run(fq.binary_weight, w, np.ones_like(w), device="cuda")
        assert_bits(y, O.binary_weight(w), w)
