"""The weights-stationary VNNI kernel of short layers (``ws_body`` in _integer_engine.c):
on 1x1 layers with maps of any size (tiles of 6 pixels and a partial last one), 4 to 68 input
channels (up to 16 quads kept in registers; more take the tiled kernel), 3x3 layers on 4 or 8
channels with and without zero padding (taps; tiles per output row), output channels not a
multiple of 16, int16 and byte outputs, signed inputs (the zero-point correction) and code
clamps, its codes equal the tiled kernel's and the generic path's bit for bit; a planted error
in it (``fbi_ws_fault``) shows, so these layers do run it."""

from __future__ import annotations

import ctypes
import random

import numpy as np
import pytest

from fewbits.runtime.integer import INT_ISAS, _conv_args, _lib, supported_int_isas
from fewbits.runtime.integer_cert import attach_cert
from fewbits.runtime.integer_plan import Conv, QuantParams, _pack_int, pack_u8

F32 = np.float32
pytestmark = pytest.mark.skipif("avx512_vnni" not in supported_int_isas(),
                                reason="the weights-stationary kernel is the VNNI path's")


def _layer(seed: int) -> tuple[Conv, np.ndarray, bool]:
    """A 1x1 layer on a map of int8 codes (signed or shifted to bytes), its input and whether
    its output is bytes."""
    rng, nr = random.Random(seed), np.random.default_rng(seed)
    h, w = rng.choice([(1, 1), (1, 5), (5, 7), (6, 6), (32, 32)])
    kh = rng.choice([1, 1, 3])  # 3 x 3: taps, zero padding or none
    pad = rng.choice([0, 1]) if kh == 3 and min(h, w) >= 3 else 0
    cin = rng.choice([4, 8, 32, 36, 64, 68] if kh == 1 else [4, 4, 8])
    cout = rng.choice([5, 16, 17, 33, 64])
    signed = rng.random() < 0.5
    lo, hi = (-128, 127) if signed else (0, 255)
    x = nr.integers(lo, hi + 1, (1, h, w, cin)).astype(np.int16)
    if kh == 3 and pad == 0 and min(h, w) < 3:
        kh = 1
    k = nr.integers(-127, 128, (cout, cin, kh, kh))
    pack, kp = _pack_int(k, 1)
    oh, ow = h + 2 * pad - kh + 1, w + 2 * pad - kh + 1
    geom = dict(n=0, h=h, w=w, cin=cin, oh=oh, ow=ow, cout=cout, kh=kh, kw=kh, sh=1, sw=1,
                ph=pad, pw=pad, dh=1, dw=1, groups=1, kp=kp, kf=0)
    sacc = nr.uniform(1e-5, 1e-3, cout).astype(F32)
    alpha = (nr.standard_normal(cout) * 10 ** nr.uniform(-1, 1, cout)).astype(F32)
    beta = nr.standard_normal(cout).astype(F32)
    u8out = rng.random() < 0.5
    kb = 8 if u8out else rng.choice([4, 8, 12])
    klo, khi = (-(2 ** (kb - 1)), 2 ** (kb - 1) - 1) if rng.random() < 0.5 else (0, 2**kb - 1)
    sc = float(F32(rng.uniform(1e-2, 0.5)))
    clo, chi = float(F32(klo * sc)), float(F32(khi * sc))
    if rng.random() < 0.3:  # a value clamp between levels: the codes' own clamp (cclamp)
        clo, chi = float(F32((klo + 0.3) * sc)), float(F32((khi - 0.3) * sc))
    s = Conv(0, 1, geom, pack, sacc, np.zeros(cout, F32), alpha, beta, False,
             pre_relu=rng.random() < 0.3, quant=QuantParams(clo, chi, 0.0, sc, 0, klo, khi, sc))
    kk = k.reshape(cout, -1)[:, :, None] * np.array([lo, hi])
    s.acc_range = np.stack([kk.min(2).sum(1), kk.max(2).sum(1)], 1)
    s.wpack8, s.kq4, s.kchunk = pack_u8(k, 1, 255)
    if signed:  # the bytes code + 128, the sums corrected
        s.ushift, s.corr = -128, (-128 * k.reshape(cout, -1).sum(1)).astype(np.int32)
    return s, x, u8out


def _run(s: Conv, x: np.ndarray, u8out: bool, isa: str, off: int = 0, fault: int = 0
         ) -> tuple[np.ndarray, bool]:
    """The layer's codes on path ``isa`` (the ws kernel off / faulty as asked) and whether its
    epilogue is certified with no check (the ws kernel's layers)."""
    lib, keep = _lib(), []
    a = _conv_args(s, INT_ISAS.index(isa), keep)
    if u8out and isa == "avx512_vnni":
        a.out_u8, a.u8shift = 1, s.quant.klo
    attach_cert(s, a, keep, lib)
    nocheck = bool(a.cert) and bool(np.ctypeslib.as_array(
        ctypes.cast(a.cert, ctypes.POINTER(ctypes.c_int32)), (5 * a.cert_stride + 4,))[-1])
    g = s.geom
    y = np.full((1, g["oh"], g["ow"], g["cout"]), 99, np.uint8 if a.out_u8 else np.int16)
    scratch = np.zeros(1 << 20, np.uint8)
    a.n, a.x, a.y, a.scratch = 1, x.ctypes.data, y.ctypes.data, scratch.ctypes.data
    flags = [ctypes.c_int.in_dll(lib, n) for n in ("fbi_ws_off", "fbi_ws_fault")]
    flags[0].value, flags[1].value = off, fault
    try:
        assert lib.fbi_conv_run(ctypes.byref(a)) == 0
    finally:
        flags[0].value = flags[1].value = 0
    codes = y.astype(np.int32) + (s.quant.klo if a.out_u8 else 0)
    return codes, nocheck


def test_the_ws_kernel_gives_the_tiled_kernels_and_the_generic_codes() -> None:
    ran = taps = 0
    for seed in range(80):
        s, x, u8out = _layer(seed)
        want, _ = _run(s, x, u8out, "generic")
        tiled, _ = _run(s, x, u8out, "avx512_vnni", off=1)
        got, nocheck = _run(s, x, u8out, "avx512_vnni")
        assert np.array_equal(tiled, want), seed
        assert np.array_equal(got, want), seed
        faulty, _ = _run(s, x, u8out, "avx512_vnni", fault=1)
        if nocheck and s.kq4 <= 64:  # its layers: the planted error shows
            assert not np.array_equal(faulty, want), seed
            ran, taps = ran + 1, taps + (s.geom["kh"] > 1)
        else:  # not its layers: nothing changes
            assert np.array_equal(faulty, want), seed
    assert ran >= 10 and taps >= 3, (ran, taps)  # the sweep exercised the kernel, taps too
