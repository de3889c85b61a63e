"""The integer engine's requantising epilogue on every code: one 1x1 layer run over the whole
int16 code range (every 7th code) and all int8 codes, with scales powers of two (the VNNI
epilogue's fold) or not (division, reciprocal multiply), signed and unsigned grids, code
offsets, ``sub``, clamps at and between levels, batch-norm factors 0 / -0 / huge / tiny, a ReLU
before the batch norm, float outputs; every CPU path must give the generic path's integers (VNNI
with its certified epilogue where integer_cert proves it)."""

from __future__ import annotations

import ctypes
import math
import random

import numpy as np
import pytest

from fewbits.runtime.integer import INT_ISAS, _conv_args, _lib, supported_int_isas
from fewbits.runtime.integer_cert import attach_cert, certify
from fewbits.runtime.integer_plan import Conv, QuantParams, _pack_int, pack_u8

F32 = np.float32
ISAS = [i for i in supported_int_isas() if i != "generic"]


def _run(s: Conv, isa: str, x: np.ndarray) -> tuple[int, np.ndarray]:
    keep: list = []
    a = _conv_args(s, INT_ISAS.index(isa), keep)
    attach_cert(s, a, keep, _lib())  # VNNI: the certified epilogue where it is proven
    y = np.full((x.shape[0], s.geom["cout"]), -7777,
                np.int16 if s.quant is not None else np.float32)
    scratch = np.zeros(1 << 20, np.uint8)
    a.n, a.x, a.y, a.scratch = x.shape[0], x.ctypes.data, y.ctypes.data, scratch.ctypes.data
    return _lib().fbi_conv_run(ctypes.byref(a)), y


def _layer(seed: int, u8: bool) -> tuple[Conv, np.ndarray]:
    rng, nr = random.Random(seed), np.random.default_rng(seed)
    cout, cin = rng.choice([1, 5, 16, 17, 33, 64, 65]), 4
    lo, hi = (-128, 127) if u8 else (-32768, 32767)
    codes = np.arange(lo, hi + 1, 1 if u8 else 7, dtype=np.int16)
    x = np.zeros((len(codes), cin), np.int16)
    x[:, 0], x[:, 2] = codes, np.roll(codes, 3)
    x[:, 1], x[:, 3] = nr.integers(lo, hi + 1, len(codes)), nr.integers(lo, hi + 1, len(codes))
    wmax = 127 if u8 else 1000
    k = nr.integers(-wmax, wmax + 1, (cout, cin, 1, 1))
    k[:, 1:] = np.where(nr.random((cout, cin - 1, 1, 1)) < 0.6, 0, k[:, 1:])
    k[0, 0], k[-1, 0] = wmax, -wmax - int(u8)
    pack, kp = _pack_int(k, 1)
    geom = dict(n=0, h=1, w=1, cin=cin, oh=1, ow=1, cout=cout, kh=1, kw=1, sh=1, sw=1, ph=0,
                pw=0, dh=1, dw=1, groups=1, kp=kp, kf=0)
    pow2 = rng.random() < 0.7
    sacc = F32(2.0) ** nr.integers(-40, 10, cout).astype(F32) if pow2 else \
        nr.uniform(1e-6, 1e-2, cout).astype(F32)
    bias = np.zeros(cout, F32) if rng.random() < 0.7 else nr.standard_normal(cout).astype(F32)
    alpha = (nr.standard_normal(cout) * 10 ** nr.uniform(-3, 3, cout)).astype(F32)
    beta = (nr.standard_normal(cout) * 10 ** nr.uniform(-3, 3, cout)).astype(F32)
    if rng.random() < 0.3:
        alpha = nr.choice(F32([0, -0.0, 1, -1, 0.5, 2**-30, 2**30]), cout)
    if rng.random() < 0.3:
        beta = nr.choice(F32([0, -0.0, 0.5, -0.5, 2**-20, 1.5]), cout)
    sc = float(F32(2.0 ** rng.randint(-12, 6))) if rng.random() < 0.7 else \
        float(F32(rng.uniform(1e-3, 3)))
    kb = rng.choice([2, 4, 8, 12, 16])
    klo, khi = (-(2 ** (kb - 1)), 2 ** (kb - 1) - 1) if rng.random() < 0.5 else \
        (0, 2 ** min(kb, 15) - 1)
    kofs = rng.choice([0, 0, 3, -5])
    sub = rng.choice([0.0, 0.0, 0.375, -1.25, float(F32(rng.uniform(-3, 3)))])
    clo = rng.choice([-math.inf, float(F32((klo - kofs) * sc + sub)),
                      float(F32((klo - kofs - 0.5) * sc + sub)), 0.0, -1e30])
    chi = rng.choice([math.inf, float(F32((khi - kofs) * sc + sub)),
                      float(F32((khi - kofs + 0.5) * sc + sub)), 1e30])
    clo, chi = min(clo, chi), max(clo, chi)
    s = Conv(0, 1, geom, pack, sacc, bias, alpha, beta, False, pre_relu=rng.random() < 0.3,
             quant=QuantParams(clo, chi, sub, sc, kofs, klo, khi, sc))
    if rng.random() < 0.15:  # float output: the clamps only
        s.quant, s.fclamp = None, (rng.choice([-math.inf, 0.0]), rng.choice([math.inf, 6.0]))
    kk = k.reshape(cout, -1)[:, :, None] * np.array([lo, hi])  # the feasible sums
    s.acc_range = np.stack([kk.min(2).sum(1), kk.max(2).sum(1)], 1)
    if u8:  # signed codes shifted into bytes, the sums corrected
        s.wpack8, s.kq4, s.kchunk = pack_u8(k, 1, 255)
        s.ushift, s.corr = -128, (-128 * k.reshape(cout, -1).sum(1)).astype(np.int32)
    return s, x


@pytest.mark.skipif(not ISAS, reason="only the generic path runs here: nothing to compare")
@pytest.mark.parametrize("u8", [False, True])
def test_every_isa_gives_the_generic_codes_on_every_code(u8: bool) -> None:
    folds = certs = 0
    for seed in range(40):
        s, x = _layer(seed, u8)
        rc, want = _run(s, "generic", x)
        for isa in ISAS:
            got_rc, got = _run(s, isa, x)
            assert got_rc == rc, (seed, isa)
            assert np.array_equal(got.view(np.uint8), want.view(np.uint8)) if got.dtype == \
                np.int16 else np.array_equal(got, want, equal_nan=True), (seed, isa)
        if "avx512_vnni" in ISAS:
            a = _conv_args(s, INT_ISAS.index("avx512_vnni"), [])
            folds += a.fold
            certs += certify(s, a, _lib()) is not None
    assert (folds and certs) or "avx512_vnni" not in ISAS  # the fold, the certified epilogue
