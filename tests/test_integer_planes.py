"""1x1 layers on a float stream run on the map's integer planes
(fewbits.runtime.integer_planes, ``_integer_engine.c`` "float streams as planes"): the
conversion of the map and the rounding of the sums against NumPy oracles written from the
description, on every CPU path here; the layer against a float64 reference within the proven
bound (and a planted wrong byte order caught by it); the fall back to the float layer image by
image; all paths bit-identical on a min-max ResNet-23; the engine and planner paths."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from torch import nn
from trained import trained_looking

from fewbits.layers import QuantAct, QuantConv2d
from fewbits.models import create_model
from fewbits.quantizers import FixedPoint, MinMax
from fewbits.runtime import compile_for_cpu
from fewbits.runtime.integer import (
    INT_ISAS,
    IntegerEngine,
    _lib,
    _ptr,
    _Step,
    supported_int_isas,
)
from fewbits.runtime.integer_planes import error_bound, nonneg_values, upper_bounds
from fewbits.runtime.integer_walk import compile_program
from fewbits.runtime.planner import QUANTIZED_RTOL

ISAS_HERE = supported_int_isas()
F32 = np.float32
_P = ctypes.c_void_p


def _c():
    lib = _lib()
    lib.fbi_plane_codes.argtypes = [ctypes.c_int32, _P, ctypes.c_int64, ctypes.c_int32,
                                    ctypes.c_int32, ctypes.c_int32, _P]
    lib.fbi_plane_sum.argtypes = [ctypes.c_int32, ctypes.c_int64, _P, _P, _P, _P]
    return lib


# ----------------------------------------------------------------- oracles

def _m_oracle(x: np.ndarray, e: int) -> tuple[np.ndarray, bool]:
    """m = RNE(x / 2^e) (float64: exact) and whether every m lies in [0, 2^24)."""
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.rint(x.astype(np.float64) / 2.0**e)  # rint: half to even
    ok = bool(np.all(np.isfinite(q) & (q >= 0) & (q < 2**24)))
    return np.where(np.isfinite(q), q, -1).astype(np.int64), ok


def _layout(isa: str, m: np.ndarray, cin: int) -> tuple[np.ndarray, int]:
    """The planes the description says path ``isa`` writes for rows of ``m`` (and its width):
    VNNI per quad of 4 channels 16 bytes, bytes 0, 1, 2, 3 of the 4 m's in turn; AVX2 per pixel
    int16 m >> 12 (kp values) then m & 4095; generic the int32 m."""
    rows = m.shape[0]
    if isa == "avx512_vnni":
        w = -(-cin // 4) * 4
        mm = np.zeros((rows, w), np.int64)
        mm[:, :cin] = m
        b = np.stack([(mm >> (8 * j)) & 0xFF for j in range(4)], -1)  # rows, w, byte
        return b.reshape(rows, w // 4, 4, 4).transpose(0, 1, 3, 2).astype(np.uint8), w
    if isa == "avx2":
        w = cin + cin % 2
        mm = np.zeros((rows, w), np.int64)
        mm[:, :cin] = m
        return np.stack([mm >> 12, mm & 0xFFF], 1).astype(np.int16), w
    return m.astype(np.int32), cin


def _codes(isa: str, x: np.ndarray, e: int) -> tuple[np.ndarray, int]:
    """(the planes path ``isa`` writes for x (rows, cin), its flag: 1 every m fits)."""
    rows, cin = x.shape
    want, width = _layout(isa, np.zeros_like(x, np.int64), cin)
    out = np.zeros(want.nbytes + 64, np.uint8)
    x = np.ascontiguousarray(x, F32)
    rc = _c().fbi_plane_codes(INT_ISAS.index(isa), _ptr(x), rows, cin, width, e, _ptr(out))
    return out[:want.nbytes].view(want.dtype).reshape(want.shape), rc


def _rn32(s: int) -> np.float32:
    """An integer rounded to float32, to nearest, ties to even (exactly, with integers)."""
    mag, sign = abs(s), -1 if s < 0 else 1
    if mag.bit_length() > 24:
        sh = mag.bit_length() - 24
        q, r = divmod(mag, 1 << sh)
        half = 1 << (sh - 1)
        q += r > half or (r == half and q % 2 == 1)
        mag = q << sh
    return F32(sign * float(mag))


# ----------------------------------------------------------------- conversion

def _cases(e: int) -> list[np.ndarray]:
    d = 2.0**e
    top = 2.0 ** (e + 24)
    tiny = [0.0, -0.0, 1e-45, 2.0**-126, d / 4, d / 2, d / 2 * (1 + 2.0**-23), d * 0.75]
    ties = [(k + 0.5) * d for k in (0, 1, 2, 3, 254, 255, 256, 65535, 2**23 - 1)]
    pow2 = [2.0 ** (e + 23), 2.0 ** (e + 16), 2.0 ** (e + 8), top - d, top - 1.5 * d,
            np.nextafter(F32(top), F32(0))]
    rng = np.random.default_rng(e + 200)
    rnd = list(rng.uniform(0, top, 40)) + list(rng.uniform(0, top, 20) * 2.0**-12)
    vals = np.array(tiny + ties + pow2 + rnd, F32)
    out = []
    for cin in (64, 20, 5, 1):  # whole vectors, a 16-lane tail, quad tails, one channel
        n = -(-len(vals) // cin) * cin
        x = np.resize(vals, n).reshape(-1, cin)
        out += [x, np.zeros_like(x)]  # and a map whose max is 0
    return out


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("e", [-20, 0, 7, -126 + 1])
def test_conversion_to_planes_matches_the_oracle(isa: str, e: int) -> None:
    for x in _cases(e):
        m, ok = _m_oracle(x, e)
        assert ok
        got, rc = _codes(isa, x, e)
        want, _ = _layout(isa, m, x.shape[1])
        assert rc == 1 and np.array_equal(got, want), (isa, e, x.shape)


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_values_that_do_not_fit_the_planes_are_reported(isa: str) -> None:
    # NaN, inf, anything rounding below 0 or to 2^24 and beyond: the image runs the float
    # layer; -delta / 2 exactly rounds to -0 (even), which fits (m = 0, error delta / 2)
    e, d = -20, 2.0**-20
    for bad in (np.nan, np.inf, -np.inf, -d, -0.75 * d, 2.0**4 - d / 2, 2.0**4, 3e38):
        for at in (0, 17, 63):
            x = np.full((2, 64), 0.5, F32)
            x[1, at] = bad
            assert not _m_oracle(x, e)[1]
            assert _codes(isa, x, e)[1] == 0, (bad, at)
    x = np.full((1, 64), 0.5, F32)
    x[0, 3] = -d / 2
    m, ok = _m_oracle(x, e)
    got, rc = _codes(isa, x, e)
    assert ok and rc == 1 and np.array_equal(got, _layout(isa, m, 64)[0])


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_rounding_of_the_sums_is_one_round_to_nearest_even(isa: str) -> None:
    # S_f = RN(S) whatever the split of S into the planes' sums (VNNI 65536 a + 256 b + c, AVX2
    # 4096 a + b, generic the int64 sum), at the extremes the engine allows (sum|k| <= 32768)
    rng = np.random.default_rng(3)
    lim = 32768 * (2**24 - 1)
    ss = [0, 1, -1, 2**24, 2**24 + 1, 2**24 + 2, 2**24 + 3, -(2**24 + 1), 2**25 + 2,
          2**25 + 6, lim, -lim, (2**24 - 1) * 2**15 + 2**14, 3 * 2**30 + 2**6]
    ss += [int(v) for v in rng.integers(-lim, lim, 300)]
    ss += [(2 * int(q) + 1) << int(sh) for q, sh in zip(rng.integers(2**23, 2**24, 60),
                                                       rng.integers(1, 14, 60), strict=True)]
    ss = [s for s in ss if abs(s) <= lim]
    i = INT_ISAS.index(isa)
    for split in range(3):  # the low part in [0, 2^16) (or 2^12), then well past 2^24
        j = rng.integers(-32767, 32768, len(ss)) if split else np.zeros(len(ss), np.int64)
        a, b, c = [], [], []
        for s, t in zip(ss, j.tolist(), strict=True):
            if isa == "avx2":  # 4096 a + b, |a| and |b| <= 4095 sum|k|
                lo = s % 4096 + 4096 * t
                a.append((s - lo) // 4096), b.append(lo), c.append(0)
            else:  # 65536 a + 256 b + c, |256 b + c| <= 65535 sum|k| < 2^31
                lo = s % 65536 + 65536 * t
                a.append((s - lo) // 65536), b.append(lo // 256), c.append(lo % 256)
        arrs = [np.array(v, np.int32) for v in (a, b, c)]
        for v, s in zip(zip(*arrs, strict=True), ss, strict=True):
            k = (4096 * int(v[0]) + int(v[1])) if isa == "avx2" else \
                65536 * int(v[0]) + 256 * int(v[1]) + int(v[2])
            assert k == s
        out = np.zeros(len(ss), F32)
        assert _c().fbi_plane_sum(i, len(ss), *(_ptr(v) for v in arrs), _ptr(out)) == 0
        want = np.array([_rn32(s) for s in ss], F32)
        assert np.array_equal(out.view(np.int32), want.view(np.int32)), isa


# ----------------------------------------------------------------- the layer

class _PlaneNet(nn.Module):
    """Two quantized branches with unrelated min-max scales summed and ReLU'd (a float stream
    proven >= 0), then a 1x1 layer on it with 8-bit weights: its float output (``head``
    ``"float"``) or codes (``"codes"``: batch norm, ReLU, quantizer; ``relu=False``: the sum
    without its ReLU, not proven >= 0)."""

    def __init__(self, cin: int, cout: int, head: str = "float", relu: bool = True) -> None:
        super().__init__()
        self.head, self.relu = head, relu
        fp = lambda n=8, d=2**-6: FixedPoint(n=n, delta=d)  # noqa: E731
        self.ca = QuantConv2d(3, cin, 3, padding=1, weight_quantizer=fp())
        self.ba, self.qa = nn.BatchNorm2d(cin), QuantAct(MinMax())
        self.cb = QuantConv2d(3, cin, 1, weight_quantizer=fp())
        self.bb, self.qb = nn.BatchNorm2d(cin), QuantAct(MinMax())
        self.c1 = QuantConv2d(cin, cout, 1, bias=False, weight_quantizer=fp(8, 2**-7))
        self.b1, self.q1 = nn.BatchNorm2d(cout), QuantAct(MinMax())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.qa(self.ba(self.ca(x))) + self.qb(self.bb(self.cb(x)))
        y = self.c1(torch.relu(s) if self.relu else s)
        return y if self.head == "float" else self.q1(torch.relu(self.b1(y)))


def _net(cin: int, cout: int, head: str = "float", relu: bool = True) -> nn.Module:
    torch.manual_seed(cin + cout)
    m = _PlaneNet(cin, cout, head, relu)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.3)
            if isinstance(mod, MinMax):
                mod.qr_min.fill_(-float(torch.rand((), generator=g)) * 2 - 0.1)
                mod.qr_max.fill_(float(torch.rand((), generator=g)) * 3 + 1.3)
        m.c1.weight.copy_(torch.randn(m.c1.weight.shape, generator=g) * 0.6)
    return m.eval()


class _Layer:
    """The plane layer's two native steps of an engine (kind 9 and the float layer) on their
    own: ``run(x, planes)`` writes the map ``x`` (pixels, cin) into the layer's input, runs
    the layer on its planes (or, ``planes=False``, the float layer alone) and returns its
    output (pixels, cout)."""

    def __init__(self, prog, isa: str) -> None:
        self.eng = IntegerEngine(prog, isa, planes=True)
        self.vals, segments = self.eng._build(1)
        arr, n = segments[0]
        self.at = next(i for i in range(n) if arr[i].kind == 9)
        self.arr, conv = arr, arr[self.at + 1].conv[0]
        steps = [s for s in prog.steps if getattr(s, "dst", None) in prog.planes]
        self.src, self.dst = steps[0].src, steps[0].dst
        self.twin = prog.planes[self.dst]
        self.cin, self.cout = conv.cin, conv.cout

    def run(self, x: np.ndarray, planes: bool = True) -> np.ndarray:
        np.copyto(self.vals[self.src], x.reshape(self.vals[self.src].shape))
        i = self.at if planes else self.at + 1
        p = ctypes.cast(ctypes.addressof(self.arr[i]), ctypes.POINTER(_Step))
        assert self.eng._lib.fbi_run(p, 2 if planes else 1, self.eng._isa_id) >= 0
        return self.vals[self.dst].reshape(-1, self.cout).copy()


def _weights(m: nn.Module, layer: _Layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PyTorch's float weights, the twin's integer weights and their scales) of c1."""
    t = layer.twin
    w = m.c1.quantized_weight().detach().numpy().reshape(layer.cout, -1)
    kp = t.geom["kp"]
    k = t.wpack[0].transpose(0, 2, 1, 3).reshape(-1, kp)[:layer.cout, :layer.cin]
    sw = t.sacc[:layer.cout].astype(np.float64) / 2.0**t.e
    return w, k.astype(np.int64), sw


def _maps(layer: _Layer, seed: int) -> list[np.ndarray]:
    """Maps up to the proven bound: random, of powers of two, of exact ties of the rounding,
    tiny values (one near the bound's top: a map whose m are all below 2^16 runs the float
    layer), a bright one at the bound's top, all zeros (the float layer)."""
    rng = np.random.default_rng(seed)
    d, rows, cin = 2.0**layer.twin.e, 64, layer.cin
    top = 2.0 ** (layer.twin.e + 24)
    tiny = rng.uniform(0, 8 * d, (rows, cin))
    tiny[5, 3] = top * 0.75
    out = [rng.uniform(0, top * 0.9, (rows, cin)),
           2.0 ** rng.integers(layer.twin.e, layer.twin.e + 24, (rows, cin)),
           (rng.integers(0, 2**23, (rows, cin)) + 0.5) * d,
           tiny,
           np.maximum(rng.uniform(-top, top - d, (rows, cin)), 0),
           np.zeros((rows, cin))]
    return [x.astype(F32) for x in out]


@pytest.mark.parametrize(("cin", "cout"), [(64, 36), (20, 20)])  # 36: 2 + 1 blocks, a tail
def test_layer_is_within_the_proven_bound_and_a_wrong_byte_order_is_not(cin: int,
                                                                        cout: int) -> None:
    m = _net(cin, cout)
    prog = compile_program(m, (3, 8, 8))
    assert len(prog.planes) == 1
    layers = {isa: _Layer(prog, isa) for isa in ISAS_HERE}
    ref_layer = layers[ISAS_HERE[0]]
    w, k, sw = _weights(m, ref_layer)
    assert np.array_equal(w.astype(np.float64), sw[:, None] * k)  # fixed point: W = sw k
    fault = ctypes.c_int.in_dll(_lib(), "fbi_plane_fault")
    for seed, x in enumerate(_maps(ref_layer, cin)):
        want = x.astype(np.float64) @ w.astype(np.float64).T
        bound = error_bound(x, w, k, sw, 2.0**ref_layer.twin.e)
        outs = {isa: layer.run(x) for isa, layer in layers.items()}
        for isa, got in outs.items():
            assert np.all(np.abs(got - want) <= bound), (isa, seed)
            assert np.array_equal(got.view(np.int32), outs["generic"].view(np.int32)), isa
        if not x.any():  # a map of zeros: exact zero sums, the float layer's outputs
            assert np.array_equal(outs["generic"], ref_layer.run(x, planes=False))
        # the bound is tight enough to catch a planted fault: bytes 0 and 1 swapped
        if seed == 0:
            fault.value = 1
            try:
                for isa, layer in layers.items():
                    assert np.any(np.abs(layer.run(x) - want) > bound), isa
            finally:
                fault.value = 0
    for layer in layers.values():  # the map of zeros alone on the float layer
        assert layer.eng.plane_counts[1] == 1 and layer.eng.plane_counts[0] > 0


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_maps_that_do_not_fit_run_the_float_layer(isa: str) -> None:
    # values the planes cannot hold (only a bug could make them: they are checked as they are
    # converted): the image runs the float layer, whose outputs it then has bit for bit
    m = _net(64, 32, head="codes")
    prog = compile_program(m, (3, 8, 8))
    layer = _Layer(prog, isa)
    top, d = 2.0 ** (layer.twin.e + 24), 2.0**layer.twin.e
    base = np.random.default_rng(1).uniform(0, top / 2, (64, 64)).astype(F32)
    for bad in (np.nan, np.inf, -2 * d, top, 1e30):
        x = base.copy()
        x[37, 5] = bad
        before = layer.eng.plane_counts.copy()
        got = layer.run(x)
        assert np.array_equal(got, layer.run(x, planes=False)), bad
        assert list(layer.eng.plane_counts - before) == [0, 1]
    layer.run(base)
    assert layer.eng.plane_counts[0] == 1


def test_only_maps_proven_nonnegative_and_bounded_take_planes() -> None:
    prog = compile_program(_net(16, 8, "codes", relu=False), (3, 8, 8))
    assert not prog.planes  # the sum without its ReLU can be negative
    prog = compile_program(_net(16, 8, "codes"), (3, 8, 8))
    (dst, twin), = prog.planes.items()
    conv = next(s for s in prog.steps if getattr(s, "dst", None) == dst)
    assert conv.src in nonneg_values(prog)
    assert 2.0 ** (twin.e + 23) <= upper_bounds(prog)[conv.src] < 2.0 ** (twin.e + 24)


# ----------------------------------------------------------------- the engine

def test_min_max_resnet23_takes_planes_on_every_path_bit_for_bit() -> None:
    torch.manual_seed(0)
    m = trained_looking(create_model("cifar10_min_max_resnet23_prediction"), 3)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (3, 3, 16, 16), generator=g).float() / 255
    prog = compile_program(m, (3, 16, 16))
    assert len(prog.planes) == 6  # every bottleneck's first layer after the stem's unit
    outs = {}
    for isa in ISAS_HERE:
        eng = IntegerEngine(prog, isa, planes=True)
        outs[isa] = eng(x)
        assert list(eng.plane_counts) == [6 * 3, 0] and eng.exact
    with torch.no_grad():
        ref = m(x)
    for isa, out in outs.items():
        assert torch.equal(out, outs["generic"]), isa
        err = float((out - ref).abs().max() / ref.abs().max())
        assert err < QUANTIZED_RTOL / 2 and torch.equal(out.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_batches_through_python_steps_and_the_planner_take_planes(isa: str) -> None:
    # a batch run step by step (a quantizer of the images is a Python step): each image of the
    # batch on its planes, as when the engine runs it image by image
    m = _net(32, 16, head="codes")
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 1024, (5, 3, 8, 8), generator=g).float() / 1024  # on q's grid
    eng = IntegerEngine(compile_program(m, (3, 8, 8)), isa, planes=True)
    one = eng(x)
    assert len(eng._single[1]) == 1 and list(eng.plane_counts) == [5, 0]

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.net = QuantAct(FixedPoint(n=12, delta=2**-10)), m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(self.q(x))

    w = Wrapped().eval()
    eng = IntegerEngine.from_model(w, (3, 8, 8), isa=isa, planes=True)
    got = eng(x)
    assert len(eng._batch[2]) > 1 and list(eng.plane_counts) == [5, 0]
    assert torch.equal(got, one)
    d = compile_for_cpu(m, backend="int", input_shape=(3, 8, 8), batch_size=4)
    assert d.backend == "int" and isinstance(d.run, IntegerEngine) and d.run.prog.planes
    before = int(d.run.plane_counts[0])
    d(x)  # planes by default on VNNI only, the one path where they pay
    assert d.run.plane_counts[0] - before == (5 if d.run.isa == "avx512_vnni" else 0)


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_planes_run_by_default_on_vnni_only_and_both_forms_match_across_paths(isa: str) -> None:
    # AVX2 has no u8 x s8 sums into int32: its planes ran the whole net ~13 % slower than its
    # float layers, so by default only VNNI takes them; each form is the same on every path
    m = _net(32, 16, head="codes")
    prog = compile_program(m, (3, 8, 8))
    assert prog.planes
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(5)) / 255
    eng = IntegerEngine(prog, isa)
    assert bool(eng.planes) == (isa == "avx512_vnni")
    for planes in (True, False):
        got = IntegerEngine(prog, isa, planes=planes)(x)
        assert torch.equal(got, IntegerEngine(prog, "generic", planes=planes)(x))
        if planes == (isa == "avx512_vnni"):
            assert torch.equal(got, eng(x))
