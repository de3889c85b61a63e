"""The certified VNNI epilogue (fewbits/runtime/integer_cert.py): on random epilogues (batch
norm gains of both signs and 0, ties exactly at x.5, value clamps at and between levels, a ReLU
before the batch norm, code offsets, ``sub``, int16 and u8 outputs, bias) every sum in windows
around many rounding boundaries, around the clamp points and at the feasible sums' ends gets the
generic path's code, byte for byte; with the proven bound set to 0, or the check skipped, the
same sweep finds wrong codes (the certificate is what makes it exact)."""

from __future__ import annotations

import ctypes
import math
import random

import numpy as np
import pytest

import fewbits.runtime.integer_cert as cert
from fewbits.runtime.integer import INT_ISAS, _conv_args, _lib, supported_int_isas
from fewbits.runtime.integer_plan import Conv, QuantParams, _pack_int

F32 = np.float32
VNNI = INT_ISAS.index("avx512_vnni")
pytestmark = pytest.mark.skipif("avx512_vnni" not in supported_int_isas(),
                                reason="the certified epilogue is the VNNI path's")


def _conv(cout: int, sacc, bias, alpha, beta, relu: bool, q: QuantParams,
          acc_range: np.ndarray) -> Conv:
    pack, kp = _pack_int(np.zeros((cout, 4, 1, 1), np.int64), 1)
    geom = dict(n=0, h=1, w=1, cin=4, oh=1, ow=1, cout=cout, kh=1, kw=1, sh=1, sw=1, ph=0,
                pw=0, dh=1, dw=1, groups=1, kp=kp, kf=0)
    s = Conv(0, 1, geom, pack, F32(sacc), F32(bias), F32(alpha), F32(beta), False,
             pre_relu=relu, quant=q)
    s.acc_range = acc_range
    return s


def _args(s: Conv, keep: list, u8: bool = False):
    a = _conv_args(s, VNNI, keep)
    if u8:  # the bytes code - klo (a u8 map read by a direct u8 layer)
        a.out_u8, a.u8shift = 1, s.quant.klo
    cert.attach_cert(s, a, keep, _lib())
    return a


def _random(seed: int) -> tuple[Conv, bool]:
    rng, nr = random.Random(seed), np.random.default_rng(seed)
    cout = rng.choice([1, 5, 16, 17, 33])
    u8 = rng.random() < 0.5
    kb = 8 if u8 else rng.choice([4, 8, 12, 16])
    klo, khi = (-(2 ** (kb - 1)), 2 ** (kb - 1) - 1) if rng.random() < 0.5 else \
        (0, 2 ** min(kb, 15) - 1)
    kofs = rng.choice([0, 0, 3, -5, klo])
    sc = float(F32(rng.uniform(1e-3, 3))) if rng.random() < 0.8 else \
        float(F32(2.0 ** rng.randint(-8, 3)))
    sub = rng.choice([0.0, 0.375, -1.25, float(F32(rng.uniform(-3, 3)))])
    clo = rng.choice([float(F32((klo - kofs + d) * sc + sub)) for d in (0, 0, 0.5, 7.3)])
    chi = rng.choice([float(F32((khi - kofs - d) * sc + sub)) for d in (0, 0, 0.5, 5.6)])
    clo, chi = (-1e30, 1e30) if rng.random() < 0.05 else (clo, chi)  # unbounded: not certified
    clo, chi = min(clo, chi), max(clo, chi)
    q = QuantParams(clo, chi, sub, sc, kofs, klo, khi, sc)
    if rng.random() < 0.25:  # ties: every value k * sc / 2 exactly (odd sums at x.5)
        sacc = np.full(cout, sc * 2.0 ** -rng.randint(1, 6))
        alpha = nr.choice([1.0, -1.0, 2.0, -0.5], cout)
        beta = nr.choice([0.0, sub, sub + sc / 2], cout)
    else:
        sacc = nr.uniform(1e-5, 1e-2, cout)
        alpha = nr.standard_normal(cout) * 10 ** nr.uniform(-2, 1.5, cout)
        beta = nr.standard_normal(cout) * 10 ** nr.uniform(-2, 0.5, cout)
        if rng.random() < 0.2:
            alpha[nr.random(cout) < 0.3] = 0.0
    relu = rng.random() < 0.4
    bias = nr.standard_normal(cout) if not relu and rng.random() < 0.3 else np.zeros(cout)
    span = 2 ** rng.randint(8, 23)
    x0 = -nr.integers(0, span, cout)
    acc = np.stack([x0, x0 + nr.integers(1, 2 * span, cout)], 1)
    return _conv(cout, sacc, bias, alpha, beta, relu, q, acc), u8


def _sweep_sums(s: Conv, a, nr: np.random.Generator) -> np.ndarray:
    """int32 sums [m, cout]: per channel windows of 25 sums around up to 40 rounding
    boundaries, the clamp points and the certificate's clamp ends, the feasible ends, and
    random sums, all within the feasible sums."""
    q, cols = s.quant, []
    for c in range(len(s.sacc)):
        x0, x1 = (int(v) for v in s.acc_range[c])
        a_ = float(s.alpha[c]) * float(s.sacc[c]) / q.scale
        b0 = (float(s.alpha[c]) * float(s.bias[c]) + float(s.beta[c]) - q.sub) / q.scale + q.kofs
        centers = [x0, x1, 0]
        if a_ != 0:
            ks = np.linspace(q.klo - q.kofs - 1, q.khi - q.kofs + 1, 40).round()
            centers += [int(v) for v in np.clip((ks + q.kofs + 0.5 - b0) / a_, -2**31, 2**31)]
            centers += [int(np.clip(((c_ - q.sub) / q.scale + q.kofs - b0) / a_, -2**31, 2**31))
                        for c_ in (q.clo, q.chi)]
        if a.cert:
            ints = np.ctypeslib.as_array(ctypes.cast(a.cert, ctypes.POINTER(ctypes.c_int32)),
                                         (5 * a.cert_stride,))
            centers += [int(ints[c]), int(ints[a.cert_stride + c])]
        xs = np.concatenate([np.arange(v - 12, v + 13) for v in centers] +
                            [nr.integers(x0, x1 + 1, 200)])
        cols.append(np.clip(xs, x0, x1))
    m = max(len(v) for v in cols)
    return np.stack([np.resize(v, m) for v in cols], 1).astype(np.int32)


def _codes(a, acc: np.ndarray, mode: int) -> tuple[int, np.ndarray]:
    y = np.full(acc.shape, 77, np.uint8 if a.out_u8 else np.int16)
    falls = _lib().fbi_epi_sums(ctypes.byref(a), acc.shape[0], acc.ctypes.data, y.ctypes.data,
                                mode)
    return falls, y


def _nocheck(a) -> bool:
    s = a.cert_stride
    return bool(np.ctypeslib.as_array(ctypes.cast(a.cert, ctypes.POINTER(ctypes.c_int32)),
                                      (5 * s + 4,))[-1])


def _mismatches(seeds, mode: int = 1) -> tuple[int, int, int]:
    """(layers certified, tiles that fell back, sums whose certified code differs)."""
    certified = falls = bad = 0
    for seed in seeds:
        s, u8 = _random(seed)
        keep: list = []
        a = _args(s, keep, u8)
        acc = _sweep_sums(s, a, np.random.default_rng(seed))
        _, want = _codes(a, acc, 3)
        f0, exact = _codes(a, acc, 0)
        assert f0 == 0 and np.array_equal(exact, want), seed
        if not a.cert:
            continue
        certified += 1
        f, got = _codes(a, acc, mode)
        falls += f
        bad += int((got != want).sum())
    return certified, falls, bad


def test_certified_codes_equal_the_exact_epilogue_around_every_boundary() -> None:
    certified, falls, bad = _mismatches(range(120))
    assert bad == 0
    assert certified >= 80 and falls > 0  # most layers certified; near-ties fell back


def test_unchecked_layers_give_the_exact_code_on_every_feasible_sum() -> None:
    # feasible sums few enough to run them all: the layers whose check integer_cert dropped
    # (every sum near a boundary verified, the others by the bound) on every one of them
    rng, unchecked = np.random.default_rng(5), 0
    for seed in range(200, 260):
        s, u8 = _random(seed)
        s.acc_range = np.stack([-rng.integers(0, 3000, len(s.sacc)),
                                rng.integers(1, 3000, len(s.sacc))], 1)
        keep: list = []
        a = _args(s, keep, u8)
        if not a.cert or not _nocheck(a):
            continue
        unchecked += 1
        acc = np.clip(np.arange(-3000, 3001)[:, None], s.acc_range[:, 0],
                      s.acc_range[:, 1]).astype(np.int32)
        falls, got = _codes(a, acc, 1)
        assert falls == 0 and np.array_equal(got, _codes(a, acc, 3)[1]), seed
    assert unchecked >= 15


def test_a_zero_bound_or_no_check_gives_wrong_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    # the same sweep with the check skipped, then with the bound's rounding terms set to 0
    # (the margin then covers only the constants' own rounding)
    assert _mismatches(range(120), mode=2)[2] > 0
    monkeypatch.setattr(cert, "_U", 0)
    monkeypatch.setattr(cert, "_ETA", 0)
    assert _mismatches(range(120))[2] > 0


def _tie_layer(relu: bool = False, u8: bool = False) -> Conv:
    """value x * 0.375 / 0.75 = x / 2: every odd sum a tie, below 0 too."""
    lo = 0 if u8 else -100
    q = QuantParams(lo * 0.75, 100 * 0.75, 0.0, 0.75, 0, lo, 100, 0.75)
    return _conv(3, [0.375] * 3, [0.0] * 3, [1.0, -1.0, 2.0], [0.0, 0.0, 0.375], relu, q,
                 np.array([[-300, 300]] * 3))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("u8", [False, True])
@pytest.mark.parametrize("check", [False, True])
def test_exact_ties_keep_their_codes(relu: bool, u8: bool, check: bool,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # checked: the ties fall back. Unchecked: floor(A2 x + B2) with A2 a step steeper than
    # 1/2 rounds the ties away from zero (every one verified by _no_check)
    if check:
        monkeypatch.setattr(cert, "_no_check", lambda *args: False)
    s, keep = _tie_layer(relu, u8), []
    a = _args(s, keep, u8)
    assert a.cert and _nocheck(a) != check
    acc = np.repeat(np.arange(-300, 301, dtype=np.int32)[:, None], 3, 1)
    _, want = _codes(a, acc, 3)
    falls, got = _codes(a, acc, 1)
    assert np.array_equal(got, want) and (falls > 0) == check
    if check:
        assert np.any(_codes(a, acc, 2)[1] != want)  # unchecked: the ties come out wrong


def test_code_steps_wider_than_a_sum_clamp_the_codes() -> None:
    # a gain of 5 codes per unit of the sum: no sum's value lies inside the end codes' cells
    q = QuantParams(-6.0, 6.0, -6.0, 0.047, -128, -128, 127, 0.047)
    s, keep = _conv(2, [7.4e-4] * 2, [0.0] * 2, [313.3, -250.0], [-0.0074, 0.3], True, q,
                    np.array([[-9000, 9000]] * 2)), []
    a = _args(s, keep)
    assert a.cert
    ints = np.ctypeslib.as_array(ctypes.cast(a.cert, ctypes.POINTER(ctypes.c_int32)),
                                 (5 * a.cert_stride + 3,))
    assert ints[-1] == 1  # cclamp
    acc = np.repeat(np.arange(-9000, 9001, dtype=np.int32)[:, None], 2, 1)
    assert np.array_equal(_codes(a, acc, 1)[1], _codes(a, acc, 3)[1])


def test_no_check_needs_both_epilogues_run_here() -> None:
    class NoVnni:  # the library of a CPU where the fast epilogue cannot run
        def __getattr__(self, name: str):
            return getattr(_lib(), name)

        @staticmethod
        def fbi_epi_sums(a, m, acc, y, mode):
            return _lib().fbi_epi_sums(a, m, acc, y, mode) if mode == 3 else -1

    s, keep = _tie_layer(False, True), []
    a = _conv_args(s, VNNI, keep)
    a.out_u8, a.u8shift = 1, s.quant.klo
    out = cert.certify(s, a, NoVnni())
    stride = (len(out) - 16) // 5
    assert out.view(np.int32)[5 * stride + 3] == 0  # the check stays


def test_layers_the_proof_does_not_cover_keep_the_exact_epilogue() -> None:
    q = QuantParams(-1.0, 1.0, 0.0, 0.01, 0, -128, 127, 0.01)
    acc = np.array([[-1000, 1000]])
    keep: list = []

    def certified(**kw) -> bool:
        args = dict(cout=1, sacc=[1e-3], bias=[0.0], alpha=[1.0], beta=[0.0], relu=False, q=q,
                    acc_range=acc) | kw
        return bool(_args(_conv(**args), keep).cert)

    assert certified()
    assert not certified(relu=True, bias=[0.5])  # a ReLU after a bias: not on the integers
    assert not certified(acc_range=None)  # the feasible sums unknown
    assert not certified(q=QuantParams(-math.inf, 1.0, 0.0, 0.01, 0, -128, 127, 0.01))
    assert not certified(sacc=[-1e-3])
    assert not certified(acc_range=np.array([[-2**30, 2**30]]), sacc=[1e-12])  # |sum| >= 2^24
    wide = QuantParams(0.0, 32.767, 0.0, 1e-3, 0, 0, 32767, 1e-3)  # codes up to 2^15:
    assert not certified(q=wide, sacc=[1e-4], acc_range=np.array([[0, 400000]]))  # too loose
    pow2 = QuantParams(-1.0, 1.0, 0.0, 2.0**-7, 0, -128, 127, 2.0**-7)
    assert not certified(sacc=[2.0**-10], q=pow2)  # the fold: one FMA already
    s = _conv(1, [1e-3], [0.0], [1.0], [0.0], False, q, acc)
    s.quant, s.fclamp = None, (0.0, 6.0)  # a float output
    assert not _args(s, keep).cert
