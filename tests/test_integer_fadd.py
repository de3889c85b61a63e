"""The integer engine's float residual sums (fbi_run step kinds 4 and 7: ``clamp(va + vb, lo,
hi)``, then a max pooling for kind 7) on every ISA path against a NumPy oracle, bit for bit:
tails of 1..17 elements (the masked 16-lane loop), 2 x 2 / stride 2 windows on whole vectors
of 16 channels (faddp2_512) and the windows the other loop takes, NaN / inf / signed zeros in
the float operand, codes at the int16 extremes."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from fewbits.runtime.integer import INT_ISAS, _lib, _ptr, _Step, supported_int_isas

ISAS_HERE = supported_int_isas()
F32 = np.float32


def _operand(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if kind == "int":
        k = rng.integers(-300, 300, shape).astype(np.int16)
        k.flat[: min(k.size, 2)] = [32767, -32768][: min(k.size, 2)]
        return k
    v = (rng.standard_normal(shape) * 4).astype(F32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, -1e-40], F32)
    idx = rng.choice(v.size, min(v.size, len(special)), replace=False)
    v.flat[idx] = special[: len(idx)]
    return v


def _value(x: np.ndarray, kofs: int, scale: F32, sub: F32) -> np.ndarray:
    """An operand's float32 value: codes fl(fl((k - kofs) * scale) + sub), floats as they are."""
    if x.dtype == np.int16:
        with np.errstate(over="ignore", invalid="ignore"):
            return (x.astype(np.int32) - kofs).astype(F32) * scale + sub
    return x


def _sum_oracle(a, b, ka, kb, p) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        v = _value(a, ka, p[0], p[1]) + _value(b, kb, p[2], p[3])
    v = np.where(v < p[4], p[4], v)  # v < lo ? lo : v (NaN stays NaN)
    return np.where(v > p[5], p[5], v).astype(F32)


def _pool_oracle(v: np.ndarray, k: int, s: int, pad: int) -> np.ndarray:
    n, h, w, c = v.shape
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    y = np.full((n, oh, ow, c), -np.inf, F32)
    for oy in range(oh):
        for ox in range(ow):
            for ky in range(k):
                for kx in range(k):
                    iy, ix = oy * s - pad + ky, ox * s - pad + kx
                    if 0 <= iy < h and 0 <= ix < w:
                        t = v[:, iy, ix]
                        q = y[:, oy, ox]
                        y[:, oy, ox] = np.where(t > q, t, q)  # v > q ? v : q: NaN never wins
    return y


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    nan = np.isnan(want)
    return bool(np.array_equal(np.isnan(got), nan) and
                np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)))


def _step(kind: int, a: np.ndarray, b: np.ndarray, ka: int, kb: int, p: np.ndarray,
          y: np.ndarray) -> _Step:
    st = _Step(kind=kind, count=a.size, x0=_ptr(a), x1=_ptr(b), y=_ptr(y), work=_ptr(p))
    st.i[0], st.i[1] = int(a.dtype != np.int16), ka
    st.i[2], st.i[3] = int(b.dtype != np.int16), kb
    return st


def _params(rng: np.random.Generator, relu: bool) -> np.ndarray:
    return np.array([rng.uniform(0.01, 0.1), rng.uniform(-6, 0), rng.uniform(0.01, 0.1),
                     rng.uniform(-6, 0), 0.0 if relu else -np.inf, 7.5 if relu else np.inf],
                    F32)


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("kinds", [("int", "int"), ("int", "float"), ("float", "int"),
                                   ("float", "float")])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000])
def test_sum_is_the_oracle_bit_for_bit(isa: str, kinds: tuple[str, str], n: int) -> None:
    rng = np.random.default_rng(n)
    a, b = (_operand(k, (n,), rng) for k in kinds)
    for relu in (False, True):
        p = _params(rng, relu)
        y = np.full(n + 16, 12345.0, F32)  # past the end: untouched by the masked tail
        st = _step(4, a, b, -128, -127, p, y)
        assert _lib().fbi_run(ctypes.byref(st), 1, INT_ISAS.index(isa)) == 0
        assert _same(y[:n], _sum_oracle(a, b, -128, -127, p))
        assert (y[n:] == 12345.0).all()


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("kinds", [("int", "int"), ("int", "float"), ("float", "float")])
@pytest.mark.parametrize("geom", [(4, 4, 16, 2, 2, 0), (5, 7, 32, 2, 2, 0), (6, 6, 48, 2, 2, 0),
                                  (4, 4, 8, 2, 2, 0), (5, 5, 16, 3, 2, 1), (3, 3, 16, 2, 1, 0)])
def test_pooled_sum_is_the_oracle_bit_for_bit(isa: str, kinds: tuple[str, str],
                                              geom: tuple[int, ...]) -> None:
    # 2 x 2 / stride 2 on whole vectors of 16 channels: faddp2_512 on VNNI; 8 channels, 3 x 3
    # padded and stride-1 windows: the general loop
    h, w, c, k, s, pad = geom
    rng = np.random.default_rng(h * w * c + k)
    shape = (2, h, w, c)
    a, b = (_operand(kd, shape, rng) for kd in kinds)
    p = _params(rng, relu=True)
    want = _pool_oracle(_sum_oracle(a, b, -130, 3, p), k, s, pad)
    y = np.full(want.size + 16, 12345.0, F32)
    st = _step(7, a, b, -130, 3, p, y)
    st.i[4:16] = [2, h, w, c, want.shape[1], want.shape[2], k, k, s, s, pad, pad]
    assert _lib().fbi_run(ctypes.byref(st), 1, INT_ISAS.index(isa)) == 0
    assert _same(y[: want.size].reshape(want.shape), want)
    assert (y[want.size:] == 12345.0).all()
