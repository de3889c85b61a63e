"""The integer engine (fewbits.runtime.integer): equality with PyTorch on every CPU path this
machine runs, for the zoo's fixed-point and min-max ResNet-23 and for users' own models, and a
clear refusal (then the planner's fallback) for an operation it does not cover."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import oracle as O
import pytest
import torch
from torch import nn
from trained import trained_looking

from fewbits import quantize_
from fewbits.functional import finite_checks
from fewbits.layers import QuantAct, QuantConv2d, QuantLinear
from fewbits.models import create_model
from fewbits.quantizers import FixedPoint, MinMax
from fewbits.runtime import compile_for_cpu
from fewbits.runtime.integer import (
    INT_ISA_ENV,
    INT_ISAS,
    IntegerEngine,
    _lib,
    _ptr,
    supported_int_isas,
)
from fewbits.runtime.integer_plan import Add, Concat, Conv, FAdd, pack_u8
from fewbits.runtime.integer_walk import compile_program
from fewbits.runtime.planner import QUANTIZED_RTOL

ISAS_HERE = supported_int_isas()


def _images(n: int, shape: tuple[int, ...] = (3, 32, 32), seed: int = 0,
            denom: int = 255) -> torch.Tensor:
    """Images as decoded files give them (k / 255), or k / 256, whose first-layer sums are
    exact in any order (then every code equals PyTorch's, not only the logits' tolerance)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float() / denom


def _check(engine: IntegerEngine, model: nn.Module, x: torch.Tensor, exact: bool) -> None:
    with torch.no_grad():
        ref = model(x)
    got = engine(x)
    assert got.shape == ref.shape
    if exact:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    else:
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < QUANTIZED_RTOL / 2, err  # the planner allows QUANTIZED_RTOL
    assert torch.equal(got.argmax(1), ref.argmax(1))


@pytest.fixture(scope="module")
def fp_resnet() -> nn.Module:
    torch.manual_seed(0)
    return trained_looking(create_model("cifar10_fp_net_resnet23_prediction"), 1)


def test_fp_net_resnet23_equals_pytorch_on_every_isa(fp_resnet: nn.Module) -> None:
    # power-of-two grids: every code equals PyTorch's, residual sums exact in int16
    prog = compile_program(fp_resnet, (3, 8, 8))  # small images: the generic path is slow
    assert sum(s.wpack8 is not None for s in prog.steps if isinstance(s, Conv)) > 8
    for isa in ISAS_HERE:  # avx2: u8 x s8 on the layers where no pair sum can saturate
        eng = IntegerEngine(prog, isa)
        assert eng.isa == isa and eng.exact
        if isa == "avx512_vnni":  # bytes into the 3x3 (padded) and the 1x1 layers
            read_by = {s.src: s.geom["kh"] for s in prog.steps if isinstance(s, Conv)}
            assert {read_by[v] for v in eng.u8_maps} == {1, 3}
        _check(eng, fp_resnet, _images(3, (3, 8, 8), denom=256), exact=True)
        _check(eng, fp_resnet, _images(3, (3, 8, 8)), exact=False)


def _span(a: np.ndarray) -> tuple[int, int]:
    return _ptr(a), _ptr(a) + a.nbytes


@pytest.mark.parametrize("batch", [1, 3])
def test_buffers_are_reused_only_after_their_last_read(fp_resnet: nn.Module, batch: int) -> None:
    # one image's maps are reused by liveness (1.2 MB -> 0.4 MB for ResNet-23 at 32 x 32);
    # no step may write where a value still to be read lives, except an elementwise sum
    # writing over an operand it reads for the last time
    prog = compile_program(fp_resnet, (3, 8, 8))
    eng = IntegerEngine(prog, ISAS_HERE[0])
    vals, _ = eng._build(batch)
    made = {1: -1} | {s.dst: k for k, s in enumerate(prog.steps)}
    last = dict(made)
    for k, s in enumerate(prog.steps):
        for v in ([s.a, s.b] if isinstance(s, Add) else s.srcs if isinstance(s, Concat)
                  else [s.src]):
            last[v] = k
    last[prog.out.id] = len(prog.steps)
    for u in vals:
        for v in vals:
            if made[u] < made[v] <= last[u]:
                a, b = _span(vals[u]), _span(vals[v])
                if a[0] < b[1] and b[0] < a[1]:
                    step = prog.steps[made[v]]
                    assert made[v] == last[u] and isinstance(step, Add), (u, v, step)
    bases = {id(a.base if a.base is not None else a) for a in vals.values()}
    assert len(bases) < len(vals) / 3
    _check(eng, fp_resnet, _images(batch, (3, 8, 8), denom=256), exact=True)


def test_u8_avx2_chunks_only_where_int16_pair_sums_cannot_saturate() -> None:
    k = np.zeros((16, 4, 1, 1), np.int64)
    k[0, :2, 0, 0] = [127, -127]
    assert pack_u8(k, 1, 129)[2] >= 1  # 129 * 254 = 32766
    assert pack_u8(k, 1, 130)[2] == 0  # 130 * 254 > 32767: vpmaddubsw would saturate
    k[0, 0, 0, 0] = -129
    assert pack_u8(k, 1, 1) is None  # not int8


def test_u8_int16_lane_sums_are_widened_before_they_could_wrap() -> None:
    # taps 0, 1 and 4 share int16 lane 0 (the first pair of quads 0 and 1)
    k = np.zeros((16, 16, 1, 1), np.int64)
    k[3, :2, 0, 0] = [64, -64]  # lane 0 of quad 0: 128 * 255 = 32640, within int16
    assert pack_u8(k, 1, 255)[2] == 4  # every chunk of the 4 quads stays within int16
    k[3, 4, 0, 0] = 1  # quad 1 adds 255 to that lane: 32895 would wrap
    assert pack_u8(k, 1, 255)[2] == 1
    k[3, 4, 0, 0], k[3, 5, 0, 0] = 0, 0
    k[5, 2, 0, 0] = 1  # lane 1 of quad 0: a different lane, chunks of 4 stay exact
    assert pack_u8(k, 1, 255)[2] == 4


def test_rounding_half_away_on_ties_and_their_neighbours_on_every_isa() -> None:
    # the AVX2 paths round |t| as trunc(t + 0.49999997f): exact ties (k + 0.5), the floats
    # next to them, large and negative values, against the oracle (a float sum step rounds)
    codes = np.arange(-32768, 32768, dtype=np.int16)
    nudge = np.tile(np.array([-1, 0, 1], np.int16), len(codes) // 3 + 1)[:len(codes)]
    half = np.float32(0.5)
    for f0, f1 in ((half, 0.0), (np.nextafter(half, 0), 0.0), (np.nextafter(half, 1), 0.0),
                   (half, 2.0**-22), (1.5, 2.0**-12), (0.1, 0.0), (0.3, 0.7)):
        f0, f1 = np.float32(f0), np.float32(f1)
        v = codes.astype(np.float32) * f0 + nudge.astype(np.float32) * f1
        want = np.clip(O.round_half_away(v), -32768, 32767).astype(np.int16)
        for isa in ISAS_HERE:
            y = np.empty_like(codes)
            _lib().fbi_add(INT_ISAS.index(isa), codes.size, _ptr(codes), _ptr(nudge), f0, f1,
                           -32768, 32767, _ptr(y))
            assert np.array_equal(y, want), (isa, f0, f1)


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_min_max_resnet23_fresh_andtrained_looking(isa: str) -> None:
    # the residual sums have no common grid: a float32 stream of PyTorch's own values (was
    # rounded to 15 bits and marked inexact); every path gives the same numbers
    torch.manual_seed(0)
    m = create_model("cifar10_min_max_resnet23_prediction").eval()
    x = _images(3, (3, 8, 8), seed=2)
    prog = compile_program(m, (3, 8, 8))
    eng = IntegerEngine(prog, isa)
    _check(eng, m, x, exact=False)
    assert torch.equal(eng(x), IntegerEngine(prog, "generic")(x))
    trained_looking(m, 3)
    x = _images(3, (3, 16, 16), seed=2)
    prog = compile_program(m, (3, 16, 16))
    eng = IntegerEngine(prog, isa)
    assert eng.exact and not eng.notes
    assert sum(isinstance(s, FAdd) for s in prog.steps) == 7
    _check(eng, m, x, exact=False)
    assert torch.equal(eng(x), IntegerEngine(prog, "generic")(x))


class _StreamNet(nn.Module):
    """Two quantized branches with unrelated min-max scales summed (no common grid: a float
    stream), ReLU, max pool, a second sum with codes; then layers reading the stream (3x3
    grouped, strided: im2col rows; 1x1: the map itself), a third sum, global average, linear.
    Weights fixed point and images k / 256: the codes before the stream are PyTorch's exactly.
    ``out``: ``"stream"`` returns the second sum (bit for bit PyTorch's), ``"logits"`` the
    logits, ``"clamp_shared"`` / ``"quantize"`` / ``"flat"`` an operation on a float map that
    is refused."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        fp = lambda: FixedPoint(n=6, delta=2**-4)  # noqa: E731
        self.ca = QuantConv2d(3, 16, 3, padding=1, weight_quantizer=fp())
        self.ba, self.qa = nn.BatchNorm2d(16), QuantAct(MinMax())
        self.cb = QuantConv2d(3, 16, 1, weight_quantizer=fp())
        self.qb = QuantAct(MinMax())
        self.cd = QuantConv2d(3, 16, 2, stride=2, weight_quantizer=fp())
        self.qd = QuantAct(MinMax())
        self.ce = QuantConv2d(16, 16, 3, padding=1, stride=2, groups=2,
                              weight_quantizer=fp())
        self.be, self.qe = nn.BatchNorm2d(16), QuantAct(MinMax())
        self.cf = QuantConv2d(16, 16, 1, weight_quantizer=fp())
        self.bf, self.qf = nn.BatchNorm2d(16), QuantAct(MinMax())
        self.q = QuantAct(MinMax())
        self.fc = QuantLinear(16, 5, weight_quantizer=fp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.qa(self.ba(self.ca(x))) + self.qb(self.cb(x)))
        s = torch.relu(self.qd(self.cd(x)) + nn.functional.max_pool2d(s, 2))  # float + int
        if self.out == "stream":
            return s
        if self.out == "clamp_shared":
            return s + torch.relu(s)
        if self.out == "quantize":
            return self.q(s)
        if self.out == "flat":
            return self.fc(torch.flatten(s, 1) + torch.flatten(s, 1))
        if self.out == "gap":  # PyTorch's (N, C, 1, 1)
            return nn.functional.adaptive_avg_pool2d(s, 1)
        if self.out == "alias":  # c and s are one tensor: s += t updates both
            c = s
            s += self.qd(self.cd(x))
            return s + c
        t = torch.relu(self.qe(self.be(self.ce(s))))  # 4 x 4
        t = torch.relu(self.qf(self.bf(self.cf(t))) + t)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(t, 1), 1))


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_float_stream_is_pytorch_bit_for_bit_and_read_natively(isa: str) -> None:
    torch.manual_seed(2)
    x = _images(4, (3, 16, 16), seed=3, denom=256)
    m = trained_looking(_StreamNet("stream"), 4)
    eng = IntegerEngine.from_model(m, (3, 16, 16), isa=isa)
    assert eng.exact and sum(isinstance(s, FAdd) for s in eng.prog.steps) == 2
    with torch.no_grad():
        ref = m(x)
    assert torch.equal(eng(x), ref)  # the float stream: PyTorch's values, bit for bit
    assert torch.equal(eng(x[:1]), ref[:1])
    m.out = "logits"
    eng = IntegerEngine.from_model(m, (3, 16, 16), isa=isa)
    assert eng.exact
    _check(eng, m, x, exact=False)
    assert len(eng._single[1]) == 1  # one native run: no step through Python
    assert torch.equal(eng(x), IntegerEngine(eng.prog, "generic")(x))


def test_quantizing_a_float_map_equals_pytorch() -> None:
    # a quantizer on a float NHWC map (here the float stream, PyTorch's values bit for bit):
    # elementwise, so the codes are PyTorch's
    torch.manual_seed(2)
    x = _images(4, (3, 16, 16), seed=3, denom=256)
    m = trained_looking(_StreamNet("quantize"), 4)
    for isa in ISAS_HERE:
        eng = IntegerEngine.from_model(m, (3, 16, 16), isa=isa)
        with torch.no_grad():
            assert torch.equal(eng(x), m(x))


class _UserBlock(nn.Module):
    """A user's ResNet block: the ReLU's float output feeds both the conv and the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.stem(x)))
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(h)))))
        h = torch.relu(y + h)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.mark.parametrize("family", ["fp_net", "min_max"])
def test_user_resnet_block_quantized_by_quantize_runs_on_the_engine(family: str) -> None:
    torch.manual_seed(5)
    m = trained_looking(_UserBlock(), 6)
    quantize_(m, family)
    m.eval()
    x = _images(6, (3, 8, 8), seed=7)
    for isa in ISAS_HERE:
        _check(IntegerEngine.from_model(m, (3, 8, 8), isa=isa), m, x, exact=False)


@pytest.mark.parametrize("out", ["clamp_shared", "flat"])
def test_float_stream_operations_not_covered_are_named(out: str) -> None:
    m = trained_looking(_StreamNet(out), 4)
    with pytest.raises(ValueError, match="float"):
        IntegerEngine.from_model(m, (3, 16, 16))


class _DoubledConv(QuantConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize("case", ["alias", "layer_hook", "pre_hook", "root_hook", "subclass"])
def test_hooks_and_inplace_updates_of_a_tensor_another_name_holds_are_refused(
        case: str) -> None:
    # fx traces s += t as s + t (the engine summed the old s into the output: logits 40 % off,
    # no error) and runs no hook (a hook doubling a layer's output was left out: 59 of 65 top-1
    # flipped), nor a fewbits layer's subclass's own forward (left out too); the traced graph
    # is now checked against the forward, hooks and unknown forwards refused
    m = trained_looking(_StreamNet("alias" if case == "alias" else "logits"), 4)
    if case == "layer_hook":
        m.cb.register_forward_hook(lambda mod, i, o: o * 2)
    elif case == "pre_hook":
        m.qb.register_forward_pre_hook(lambda mod, i: (i[0] * 0.5,))
    elif case == "root_hook":
        m.register_forward_hook(lambda mod, i, o: o * 3)
    elif case == "subclass":  # a fewbits layer is a leaf of the trace: its forward unseen
        m.cb.__class__ = _DoubledConv
    match = {"alias": "in-place update", "subclass": "_DoubledConv \\(a subclass"}
    with pytest.raises(ValueError, match=match.get(case, "hook")):
        IntegerEngine.from_model(m, (3, 16, 16))


def test_output_shape_empty_batch_and_two_threads_at_once() -> None:
    # a global average returned (N, C), not PyTorch's (N, C, 1, 1); an empty batch raised
    # IndexError; two threads calling one engine shared its buffers (wrong logits, no error)
    import threading

    torch.manual_seed(2)
    m = trained_looking(_StreamNet("gap"), 4)
    eng = IntegerEngine.from_model(m, (3, 16, 16))
    x = _images(8, (3, 16, 16), seed=3, denom=256)
    with torch.no_grad():
        ref = m(x)
    torch.testing.assert_close(eng(x), ref, rtol=1e-6, atol=1e-6)  # sums in its own order
    assert eng(x[:0]).shape == m(x[:0]).shape == (0, 16, 1, 1)
    m.out = "logits"
    eng = IntegerEngine.from_model(m, (3, 16, 16))
    with torch.no_grad():
        ref = m(x)
    want = {n: eng(x[:n]) for n in (1, 8)}
    assert eng(x[:0]).shape == (0, 5)
    bad: list[int] = []

    def work(n: int) -> None:
        for _ in range(100):
            bad.append(int(not torch.equal(eng(x[:n]), want[n])))

    threads = [threading.Thread(target=work, args=(n,)) for n in (1, 8, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(bad) == 300 and sum(bad) == 0  # a thread that raised appends less


def test_a_model_returning_its_images_or_a_flat_map_and_adaptive_pool_to_none() -> None:
    # the images (NCHW) were read back as an NHWC map: permuted values, no error; an adaptive
    # pool to (None, None) raised TypeError (the planner warned of a failure)
    x = torch.randn(2, 3, 4, 5)
    for m in (nn.Identity(), nn.Sequential(nn.Dropout(), nn.Identity())):
        eng = IntegerEngine.from_model(m, (3, 4, 5))
        assert torch.equal(eng(x), x) and torch.equal(eng(x[:1]), x[:1])
    # a flattened quantized map as the output came back in NHWC order (wrong, no error)
    fp = lambda: FixedPoint(n=6, delta=2**-4)  # noqa: E731
    m = nn.Sequential(QuantConv2d(3, 5, 3, weight_quantizer=fp()), QuantAct(fp()),
                      nn.Flatten()).eval()
    x = _images(3, (3, 4, 5), denom=256)
    _check(IntegerEngine.from_model(m, (3, 4, 5)), m, x, exact=True)
    with pytest.raises(ValueError, match="adaptive average pooling to \\(None, None\\)"):
        IntegerEngine.from_model(nn.Sequential(nn.AdaptiveAvgPool2d((None, None))), (3, 4, 4))


class _UserNet(nn.Module):
    """Grouped, strided, dilated convs, clamps, both poolings, a residual sum, a concatenation
    and a linear layer on a flattened 2 x 2 map, with fewbits layers placed by hand."""

    def __init__(self) -> None:
        super().__init__()
        fp = lambda: FixedPoint(n=6, delta=2**-4)  # noqa: E731
        self.c1 = QuantConv2d(3, 8, 3, padding=1, bias=True, weight_quantizer=fp())
        self.b1, self.q1 = nn.BatchNorm2d(8), QuantAct(fp())
        self.c2 = QuantConv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2,
                              weight_quantizer=fp())
        self.q2 = QuantAct(FixedPoint(n=8, delta=2**-5))
        self.c3 = QuantConv2d(8, 8, 1, weight_quantizer=fp())
        self.q3 = QuantAct(fp())
        self.pool = nn.AvgPool2d(2)
        self.fc = QuantLinear(64, 5, weight_quantizer=fp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.q1(self.b1(self.c1(x))))
        y = nn.functional.max_pool2d(y, 2)  # 8 x 8
        a = nn.functional.relu6(self.q2(self.c2(y)))  # 4 x 4 on a finer grid
        b = self.q3(self.c3(a))
        s = torch.cat([a + b, b], 1)  # residual sum, then concatenation
        return self.fc(torch.flatten(self.pool(s), 1))


def test_user_model_with_every_covered_operation() -> None:
    torch.manual_seed(4)
    m = trained_looking(_UserNet(), 5)
    x = _images(4, (3, 16, 16), seed=6, denom=256)
    for isa in ISAS_HERE:
        eng = IntegerEngine.from_model(m, (3, 16, 16), isa=isa)
        assert eng.exact
        _check(eng, m, x, exact=True)


def test_mlp_on_flattened_images() -> None:
    torch.manual_seed(5)
    m = trained_looking(create_model("mnist_fp_net_mlp", width=32, depth=2), 6)
    eng = IntegerEngine.from_model(m, (1, 28, 28))
    _check(eng, m, _images(4, (1, 28, 28), denom=256), exact=True)


def test_quantize_fp_net_user_cnn_runs_through_the_planner() -> None:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    quantize_(net, "fp_net")
    net = trained_looking(net, 8)
    eng = IntegerEngine.from_model(net, (3, 16, 16))
    _check(eng, net, _images(6, (3, 16, 16), seed=9), exact=False)
    d = compile_for_cpu(net, backend="int", input_shape=(3, 16, 16), batch_size=4)
    assert d.backend == "int"


def test_uncovered_operation_is_named_and_the_planner_falls_back() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    quantize_(net, "fp_net")
    with pytest.raises(ValueError, match="1 \\(Sigmoid\\).*does not cover Sigmoid"):
        IntegerEngine.from_model(net, (3, 8, 8))
    d = compile_for_cpu(net, input_shape=(3, 8, 8), batch_size=2, candidates=("int", "torch"))
    assert d.backend == "torch"
    assert any(n.startswith("int: operation not covered") and "Sigmoid" in n for n in d.notes)


def test_isa_forcing_and_bad_inputs(fp_resnet: nn.Module, monkeypatch) -> None:
    assert "generic" in ISAS_HERE and set(ISAS_HERE) <= set(INT_ISAS)
    if "avx512_vnni" in ISAS_HERE:  # every extension its code is compiled for is here
        flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() \
            else set()
        assert not flags or {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                             "avx2", "fma"} <= flags
    with pytest.raises(RuntimeError, match="code -4: out of memory"):  # a failed step says why
        IntegerEngine._check_rc(-4)
    prog = compile_program(fp_resnet, (3, 32, 32))
    monkeypatch.setenv(INT_ISA_ENV, "generic")
    eng = IntegerEngine(prog)
    assert eng.isa == "generic"
    monkeypatch.setenv(INT_ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="unknown integer-engine ISA 'sse9'"):
        IntegerEngine(prog)
    x = _images(1)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        eng(x)
    for bad in (float("inf"), -float("inf"), float("nan")):  # the last image, the last value
        x = _images(3)
        x[2, 2, 31, 31] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            eng(x)
    with pytest.raises(ValueError, match="compiled for images"):
        eng(torch.zeros(1, 3, 16, 16))
    # other dtypes were converted silently: uint8 pixels 0..255 gave wrong logits where
    # PyTorch's float32 layers refuse them
    with pytest.raises(TypeError, match=r"float32 images, got torch.uint8 \(uint8 pixels"):
        eng(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=f"got {dt}"):
            eng(_images(1).to(dt))


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("name", ["mnist_fp_net_lenet", "mnist_min_max_lenet"])
def test_first_layer_sums_overflowing_raise_as_pytorch(name: str, isa: str) -> None:
    """Finite images near float32's largest: the first layer's float sums overflow to inf,
    which PyTorch's quantizer refuses under its finite checks; the engine raises too, and runs
    inside finite_checks(False)."""
    torch.manual_seed(11)
    m = create_model(name, width=8).eval()
    x = (_images(2, (1, 28, 28), seed=11, denom=256) * 2 - 1) * 3e38
    with pytest.raises(ValueError, match="contains (NaN|inf)") as ref, torch.no_grad():
        m(x)  # what the engine must match
    eng = IntegerEngine.from_model(m, (1, 28, 28), isa=isa)
    for batch in (x, x[:1]):  # image by image, and one image
        with pytest.raises(ValueError, match="overflow to NaN/inf.*finite_checks") as got:
            eng(batch)
        assert type(got.value) is type(ref.value)  # NonFiniteError, as PyTorch's quantizer
    with finite_checks(False):
        out = eng(x)
    assert out.shape == (2, 10) and bool(out.isfinite().all())


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_overflow_a_relu_zeroes_before_the_quantizer_is_not_an_error(isa: str) -> None:
    """Sums of -inf that a ReLU turns into 0 before the quantizer: PyTorch's quantizer sees 0
    and does not raise, nor does the engine (it checks what the quantizer would see)."""
    torch.manual_seed(12)
    # stride 2: the AVX2 path's im2col GEMM (the test above: its direct convolution)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    with torch.no_grad():
        net[0].weight.copy_(-torch.rand_like(net[0].weight) - 0.5)  # all sums -inf
    quantize_(net, "fp_net")
    net.eval()
    x = torch.full((2, 3, 6, 6), 3e38)
    with torch.no_grad():
        ref = net(x)  # no error: the ReLU made the quantizer's input 0
    eng = IntegerEngine.from_model(net, (3, 6, 6), isa=isa)
    torch.testing.assert_close(eng(x), ref)
    with pytest.raises(ValueError, match="overflow to NaN/inf"), torch.no_grad():
        eng(-x)  # +inf passes the ReLU: the quantizer would see it
    with pytest.raises(ValueError, match="contains inf"), torch.no_grad():
        net(-x)


def test_planner_warns_when_the_engine_cannot_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C compiler: the next candidate runs and the warning says why (a build failure is
    not an operation the engine does not cover)."""
    from fewbits.runtime import integer

    monkeypatch.setattr(integer._LIB, "get", lambda: None)
    monkeypatch.setattr(integer._LIB, "error", "gcc: not found")
    torch.manual_seed(0)
    m = create_model("mnist_fp_net_lenet").eval()
    with pytest.warns(RuntimeWarning, match="'int' failed: RuntimeError: the integer engine "
                      "cannot be built here: gcc: not found"):
        fast = compile_for_cpu(m, batch_size=2, candidates=("int", "torch"))
    assert fast.backend == "torch"
    assert not any("not covered" in n for n in fast.notes), fast.notes


class _SharedNet(nn.Module):
    """A quantized map used twice: through a flatten (NHWC order in the engine), an in-place
    ReLU (which PyTorch applies to the shared tensor too) or an nn.Identity."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        fp = lambda: FixedPoint(n=6, delta=2**-4)  # noqa: E731
        self.kind = kind
        self.c1 = QuantConv2d(3, 4, 3, padding=1, weight_quantizer=fp())
        self.q1 = QuantAct(fp())
        self.c2 = QuantConv2d(4, 4, 3, padding=1, weight_quantizer=fp())
        self.q2 = QuantAct(fp())
        self.relu, self.ident = nn.ReLU(inplace=True), nn.Identity()
        self.fc = QuantLinear(4 * 6 * 6, 5, weight_quantizer=fp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.q1(self.c1(x))
        if self.kind == "flatten_add":
            b = self.q2(self.c2(a))
            return self.fc(torch.flatten(a, 1) + torch.flatten(b, 1))
        if self.kind == "flatten_relu":
            f = torch.flatten(a, 1)
            return self.fc(f + torch.relu(f))
        b = self.relu(a) if self.kind == "inplace_relu" else torch.relu(self.ident(a))
        return self.fc(torch.flatten(a + b, 1))


@pytest.mark.parametrize("kind", ["flatten_add", "flatten_relu", "inplace_relu", "identity"])
def test_shared_and_flattened_maps_equal_pytorch_or_are_refused(kind: str) -> None:
    # each was silently wrong: a sum / clamp of flattened maps lost their NHWC order, a ReLU
    # through nn.Identity clamped the shared producer, an in-place ReLU left it unclamped
    torch.manual_seed(0)
    m = trained_looking(_SharedNet(kind), 1)
    x = _images(3, (3, 6, 6), seed=1, denom=256) - 0.5
    try:
        eng = IntegerEngine.from_model(m, (3, 6, 6), isa="generic")
    except ValueError as e:
        assert kind == "inplace_relu" and "in-place" in str(e)
        return
    _check(eng, m, x, exact=True)


def test_planner_check_counts_nan_as_a_mismatch() -> None:
    # max() over a NaN difference gave 0: a backend writing NaN passed the logit check (and the
    # top-1 check too, where the NaN sat on the winning class or the output had one column)
    from fewbits.runtime.planner import check_outputs, leaf_error

    ref = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    got = ref.clone()
    got[0, 2] = got[1, 0] = float("nan")
    assert leaf_error(got, ref) == float("inf") and check_outputs(got, ref, 0.08) is not None
    assert leaf_error(got[:, :1], ref[:, :1]) == float("inf")
    assert leaf_error(got, got.clone()) == 0.0  # the model's own NaN, reproduced, is fine


def test_planner_checks_a_lone_candidate_on_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # with one candidate the timing-batch check was skipped: an engine wrong only past the
    # probe's 32 rows (a batch-size-dependent fault) was deployed unseen
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 5))
    quantize_(net, "fp_net")
    call = IntegerEngine.__call__
    monkeypatch.setattr(IntegerEngine, "__call__",
                        lambda self, x: (lambda o: o if len(o) <= 32 else -o)(call(self, x)))
    d = compile_for_cpu(net, input_shape=(3, 6, 6), batch_size=32, candidates=("int",))
    assert d.backend == "int"  # the probe's own rows: nothing more to check
    with pytest.raises(RuntimeError, match="int: tolerance exceeded on the timing batch"):
        compile_for_cpu(net, input_shape=(3, 6, 6), batch_size=33, candidates=("int",))
    with pytest.raises(RuntimeError, match="'int' cannot run this model: tolerance exceeded"):
        compile_for_cpu(net, backend="int", input_shape=(3, 6, 6), batch_size=64)


def test_top1_bar_is_a_rate_over_every_row_checked() -> None:
    # judged batch by batch, 99.5 % of 64 rows allowed no flip: a backend agreeing on 99.9 %
    # of a trained net's images failed on one flip among the timing batch's 64 rows, while one
    # agreeing on 99.2 % passed where its flips fell outside them
    from fewbits.runtime.agreement import check_outputs

    ref = torch.linspace(0, 10, 10).repeat(1000, 1)
    ref[:, 4] = 9.95  # every row a near tie of classes 9 and 4 (0.005 of the range)

    def flipped(rows: list[int]) -> torch.Tensor:
        got = ref.clone()
        got[rows, 9], got[rows, 4] = 9.95, 10.0
        return got

    def probe(rows: list[int]) -> torch.Tensor:  # top1_flips of an earlier check
        f = torch.zeros(1000, dtype=torch.bool)
        f[rows] = True
        return f

    first = torch.arange(64)  # the timing batch repeats the probe's first rows
    assert check_outputs(flipped([3])[:64], ref[:64], 0.08) is not None
    assert check_outputs(flipped([3])[:64], ref[:64], 0.08,
                         repeats=(probe([3]), first)) is None
    eight = flipped(list(range(0, 800, 100)))
    assert check_outputs(eight, ref, 0.08) is not None  # 99.2 %
    assert check_outputs(eight[:64], ref[:64], 0.08,
                         repeats=(probe(list(range(0, 800, 100))), first)) is not None
    five, six = flipped(list(range(5))), flipped(list(range(6)))
    assert check_outputs(five, ref, 0.08) is None  # exactly 99.5 %
    assert check_outputs(six, ref, 0.08) is not None
    assert check_outputs(five[:10], ref[:10], 0.0,
                         repeats=(probe([]), first[:10])) is not None  # exact: none


@pytest.mark.parametrize("n_real", [64, 200, 400])
def test_planner_judges_top1_on_the_probe_and_timing_batch_together(
        monkeypatch: pytest.MonkeyPatch, n_real: int) -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(108, 16), nn.ReLU(), nn.Linear(16, 5))
    quantize_(net, "fp_net")
    real = torch.rand(n_real, 3, 6, 6)
    with torch.no_grad():
        ref = net(real)
    top2 = ref.topk(2, 1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    row = int(margin[:64].argmin())  # a near tie in the timing batch: flips within tolerance
    assert float(margin[row]) < 0.04 * float(ref.abs().max())
    special, (a, b) = real[row], top2.indices[row].tolist()
    call = IntegerEngine.__call__

    def one_flip(self: IntegerEngine, x: torch.Tensor) -> torch.Tensor:
        out = call(self, x)
        hit = (x == special).flatten(1).all(1)
        out[hit, a], out[hit, b] = out[hit, b], out[hit, a]
        return out

    monkeypatch.setattr(IntegerEngine, "__call__", one_flip)
    args = dict(input_shape=(3, 6, 6), batch_size=64, candidates=("int", "torch"),
                probe_inputs=real)
    d = compile_for_cpu(net, **args)
    if n_real == 64:  # 1 flip of 96 probe rows: under 99.5 %
        assert d.backend == "torch" and any("int: tolerance exceeded on the probe" in n
                                            for n in d.notes), d.notes
    else:  # 1 flip of 232 / 432 probe rows (99.6 %, 99.8 %), the batch repeating its row:
        # it was counted twice (2 of 296 rows, with 200 images: refused)
        assert d.backend in ("int", "torch") and not any("int: tolerance" in n
                                                         for n in d.notes), d.notes


@pytest.mark.parametrize("threads", [1, None])
def test_planner_times_one_thread_candidates_by_cpu_time(monkeypatch: pytest.MonkeyPatch,
                                                         threads: int | None) -> None:
    # by wall time a loaded machine decided: OpenVINO's 66 ms of CPU beat the engine's 49
    import fewbits.runtime.planner as P

    calls = []
    real = P.time.process_time
    monkeypatch.setattr(P.time, "process_time", lambda: calls.append(1) or real())
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    quantize_(net, "fp_net")
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = compile_for_cpu(net, input_shape=(3, 2, 2), threads=threads,
                            candidates=("int", "torch"))
    finally:
        torch.set_num_threads(was)
    assert set(d.timings) == {"int", "torch"}
    assert (len(calls) >= 2 * 2 * P.TIMING_ROUNDS) == (threads == 1), len(calls)


def _edge_net(family: str, relu_after: bool) -> nn.Module:
    """Layers at the AVX2 kernels' edges: output channels not a multiple of 16 (20, 12, 36),
    maps whose pixel count is not a multiple of the kernels' rows (7 x 9), 1x1 and 3x3 convs on
    the direct path, a stride-2 conv (im2col), a ReLU before the batch norm, signed and
    unsigned codes, int16 lane sums widened every quad (several chunks: fixed-point weight
    codes at the grid's ends) and once (one chunk), or not at all (fixed point's signed codes:
    int16 pair sums could saturate, AVX2 multiplies in int16, AVX-512 VNNI in u8 x s8); a
    grouped 1x1 conv whose two groups of 24 channels make a pair of 16-channel blocks and a
    single one each (VNNI's kernels); layers with and without a conv bias (VNNI's epilogue
    folds fixed point's power-of-two scales where there is none)."""
    act = nn.ReLU if relu_after else nn.Identity
    net = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1, bias=False), nn.BatchNorm2d(20), act(),
                        nn.Conv2d(20, 12, 1), nn.ReLU(), nn.BatchNorm2d(12), nn.ReLU(),
                        nn.Conv2d(12, 36, 3, padding=1, bias=False), nn.BatchNorm2d(36), nn.ReLU(),
                        nn.Conv2d(36, 16, 3, padding=1), nn.BatchNorm2d(16), act(),
                        nn.Conv2d(16, 20, 3, stride=2, padding=1), nn.BatchNorm2d(20), act(),
                        nn.Conv2d(20, 48, 1, groups=2, bias=False), nn.BatchNorm2d(48), act(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 5))
    with torch.no_grad():  # fixed point: all weight codes but one small (one chunk)
        net[10].weight[0, 0, 0, 0] = 100 * net[10].weight.abs().max()
    quantize_(net, family)
    return net


@pytest.mark.filterwarnings("ignore:.*of its quantized weights are 0")  # the small codes
def _every_map(eng: IntegerEngine, x: torch.Tensor) -> list[np.ndarray]:
    """Each step's output, as bytes, taken right after the step ran (buffers are reused once a
    value is dead, so the maps left at the end are not every map; and a float view of a reused
    buffer may hold NaN bit patterns, which compare unequal to themselves)."""
    import ctypes

    from fewbits.runtime.integer import _Step

    vals, segments = eng._build(x.shape[0])
    np.copyto(vals[1], x.numpy())
    out = []
    for seg in segments:
        if isinstance(seg, tuple):
            arr, k = seg
            i = 0
            while i < k:  # the images' codes step runs one of the two first layers after it
                many = 3 if arr[i].kind == 8 else 1
                assert eng._lib.fbi_run(ctypes.cast(ctypes.addressof(arr[i]),
                                                    ctypes.POINTER(_Step)), many,
                                        eng._isa_id) == 0
                i += many
                dst = eng.prog.steps[len(out)].dst
                v = vals[dst]
                if dst in eng.u8_maps:  # bytes code - shift between VNNI layers: the codes
                    assert v.dtype == np.uint8
                    v = v.astype(np.int16) + np.int16(eng.u8_maps[dst])
                out.append(v.copy().view(np.uint8))
        else:
            eng._python_step(seg, vals, x.shape[0])
            out.append(vals[seg.dst].copy().view(np.uint8))
    return out


@pytest.mark.parametrize("family", ["fp_net", "min_max"])
@pytest.mark.parametrize("relu_after", [False, True])
def test_avx2_kernels_edges_give_the_generic_codes(family: str, relu_after: bool) -> None:
    # every map of the program (codes of every layer), not only the logits, equal on all ISAs
    if len(ISAS_HERE) < 2:
        pytest.skip("one CPU path here: nothing to compare")
    torch.manual_seed(13)
    m = trained_looking(_edge_net(family, relu_after), 14)
    x = _images(2, (3, 7, 9), seed=15) - 0.3
    prog = compile_program(m, (3, 7, 9))
    convs = [s for s in prog.steps if isinstance(s, Conv)]
    assert any(s.wpack8 is not None and 0 < s.kchunk and s.kchunk * 4 < s.kq4
               for s in convs)  # several chunks
    assert any(s.wpack8 is not None and s.kchunk * 4 >= s.kq4 for s in convs)  # one chunk
    # pair sums that would saturate: u8 on VNNI only (fixed point's signed codes, 254 apart)
    assert family != "fp_net" or any(s.wpack8 is not None and s.kchunk == 0 for s in convs)
    maps = [(IntegerEngine(prog, isa)(x), _every_map(IntegerEngine(prog, isa), x))
            for isa in ISAS_HERE]
    if "avx512_vnni" in ISAS_HERE:
        vnni = IntegerEngine(prog, "avx512_vnni")
        assert vnni.u8_maps  # some maps go between layers as bytes
        if family == "fp_net":  # its epilogue's exact fold runs
            assert any(a.fold for a in vnni._args.values())
    for out, steps in maps[1:]:
        assert torch.equal(out, maps[0][0])
        for k, v in enumerate(steps):
            assert np.array_equal(v, maps[0][1][k]), (k, prog.steps[k])


def test_division_by_a_scale_as_an_exact_reciprocal_multiply() -> None:
    # min-max's epilogue divides by the scale; on AVX2 it multiplies by the reciprocal with one
    # exact correction (Markstein) where every significand was checked for that scale:
    # against NumPy's float32 division at exact ties, their neighbours and all magnitudes
    from fewbits.runtime.integer import _rcp_exact

    lib = _lib()
    if "avx2" not in ISAS_HERE:
        assert _rcp_exact(0.1) == 0
        return
    for bad in (0.0, -1.0, float("nan"), float("inf"), 2.0 ** -61, 2.0 ** 61):
        assert _rcp_exact(bad) == 0, bad
    rng = np.random.default_rng(0)
    scales = np.concatenate([np.float32([0.1, 1.9999999, 0.0470348, 0.000376671, 3.0]),
                             rng.uniform(1e-4, 4, 12).astype(np.float32)])
    for s in scales:
        assert _rcp_exact(float(s)) == 1, s
        k = np.arange(-300, 300, dtype=np.float32)
        ties = (k + np.float32(0.5)) * s
        v = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)),
                            np.nextafter(ties, np.float32(-np.inf)), k * s,
                            rng.standard_normal(4000).astype(np.float32) * 100 * s,
                            np.float32([0.0, -0.0, 1e-30, 3e30]) * s])
        y = np.empty_like(v)
        assert lib.fbi_rcp_div(float(s), v.size, _ptr(v), _ptr(y)) == 0
        # equal as floats: bit for bit except the sign of a zero quotient (-0 / s gives +0),
        # which no code sees (rounded half away, both are code 0)
        np.testing.assert_array_equal(y, v / s)
    # the engine uses it on AVX2 (and gives the generic path's codes: the edge test above)
    m = create_model("mnist_min_max_lenet").eval()
    eng = IntegerEngine.from_model(m, (1, 28, 28), isa="avx2")
    assert any(a.rcp_ok for a in eng._args.values())
    assert not any(a.rcp_ok for a in IntegerEngine.from_model(m, (1, 28, 28),
                                                              isa="generic")._args.values())


def test_compile_for_cpu_gives_a_training_model_its_modes_back() -> None:
    # compile_for_cpu put the user's model in eval mode and left it there: training went on
    # with frozen batch-norm statistics, silently; its torch backend must run in eval mode
    torch.manual_seed(9)
    m = _UserBlock()
    quantize_(m, "fp_net")
    m.train()
    x = _images(4, (3, 8, 8), seed=10)
    d = compile_for_cpu(m, input_shape=(3, 8, 8), candidates=("torch",))
    assert m.training and all(b.training for b in m.modules())
    with torch.no_grad():
        ref = m.eval()(x)
    m.train()
    assert torch.equal(d(x), ref) and m.training
    # resolve_source (compile_for_cpu's reusable source) left the model in eval mode
    from fewbits.export.onnx import resolve_source

    src = resolve_source(m)
    assert all(b.training for b in m.modules())
    assert torch.equal(compile_for_cpu(src, input_shape=(3, 8, 8), candidates=("torch",))(x), ref)
    assert all(b.training for b in m.modules())


class _Gate(nn.Module):
    """Armed, the first call (thread A) starts a second call of the compiled model (thread B)
    and lets it run past the mode switch; B then waits inside its forward until A is done."""

    def __init__(self) -> None:
        super().__init__()
        self.armed, self.call = False, None
        self.b_inside, self.a_done = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed and threading.current_thread() is threading.main_thread():
            self.armed = False
            self.b = threading.Thread(target=self.call)
            self.b.start()
            self.b_inside.wait(0.3)  # with a lock around the call, B waits for A: timeout
        elif threading.current_thread() is not threading.main_thread():
            self.b_inside.set()
            self.a_done.wait(5.0)
        return x


def test_torch_backend_two_threads_on_a_training_model_run_in_eval_mode() -> None:
    # thread A put the model in eval mode; B, starting then, saw eval mode (nothing to give
    # back); A gave the training flags back while B ran: B's batch norm ran in training mode
    # (wrong output, and the user's running statistics updated, every later call wrong)
    torch.manual_seed(11)
    gate = _Gate()
    m = trained_looking(nn.Sequential(gate, nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 4)), 12)
    x = _images(4, (3, 4, 4), seed=13)
    d = compile_for_cpu(m, input_shape=(3, 4, 4), candidates=("torch",))
    with torch.no_grad():
        ref = m(x)
    stats = m[1].running_mean.clone()
    m.train()
    got = []
    gate.call = lambda: got.append(d(x))
    gate.armed = True
    a = d(x)
    gate.a_done.set()
    gate.b.join()
    assert torch.equal(a, ref) and torch.equal(got[0], ref)
    assert torch.equal(m[1].running_mean, stats) and all(b.training for b in m.modules())


def test_fewbits_own_fast_path_hook_is_not_blamed_on_the_user() -> None:
    # quantize_ keeps PyTorch's fused attention path off with a pre-hook that computes nothing;
    # the engine refused such models telling the user to remove "their" hook
    enc = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32,
                                                                        batch_first=True), 1),
                        nn.Flatten(), nn.Linear(80, 4))
    quantize_(enc, "fp_net")
    with pytest.raises(ValueError) as e:
        IntegerEngine.from_model(enc, (5, 16))
    assert "hook" not in str(e.value), e.value
    enc[2].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ValueError, match="forward hook"):
        IntegerEngine.from_model(enc, (5, 16))


def _conv_bn_net(bn: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), bn, nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    quantize_(net, "fp_net")
    return net.eval()


def test_batch_norm_without_running_statistics_is_refused_by_name() -> None:
    # eval mode still normalises by the batch's own statistics: no fold is exact; it crashed
    # with "AttributeError: 'NoneType' object has no attribute 'float'" (qa9c)
    net = _conv_bn_net(nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ValueError, match="4 \\(BatchNorm2d\\).*track_running_stats=False"):
        IntegerEngine.from_model(net, (3, 8, 8))


@pytest.mark.parametrize("family", ["fp_net", "min_max"])
def test_batch_norm_with_a_negative_running_var_is_refused(family: str) -> None:
    # PyTorch's output is NaN (its next quantizer raises); the engine gave finite logits (qa9c)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    quantize_(net, family)
    net.eval()
    with torch.no_grad():
        net[4].running_var[3] = -1.0
    with pytest.raises(ValueError, match="4 \\(BatchNorm2d\\).*NaN or infinite"):
        IntegerEngine.from_model(net, (3, 8, 8))


@pytest.mark.parametrize("name", ["mnist_fp_net_lenet", "mnist_min_max_lenet"])
def test_a_packed_file_runs_on_the_integer_engine(name: str, tmp_path) -> None:
    # load_packed drops the weight quantizers, so compile_for_cpu(path) / `fewbits eval FILE
    # --fast` refused every fixed-point / min-max file ("conv2: float weights on integer
    # activations") and never ran the integer engine; the file's stored codes now stand in
    from fewbits.export import export_packed
    from fewbits.export.onnx import resolve_source

    torch.manual_seed(3)
    m = trained_looking(create_model(name), 4)
    path = tmp_path / "m.fewbits"
    export_packed(m, path)
    x = _images(4, (1, 28, 28), seed=5)
    src = resolve_source(path)
    eng = IntegerEngine.from_model(src.model, (1, 28, 28), codes=src.codes)
    assert torch.equal(eng(x), IntegerEngine.from_model(m, (1, 28, 28))(x))
    _check(eng, src.model, x, exact=False)
    d = compile_for_cpu(path, backend="int", input_shape=(1, 28, 28), batch_size=2)
    assert d.backend == "int" and torch.equal(d(x), eng(x))


def test_ceil_mode_max_pool_after_a_layer_is_refused_naming_the_pool() -> None:
    # the pool is folded into the conv before it; the refusal named the conv after it (qa9c)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(8, 8, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    quantize_(net, "fp_net")
    with pytest.raises(ValueError, match="^2 \\(MaxPool2d\\): max pooling with ceil_mode"):
        IntegerEngine.from_model(net.eval(), (3, 8, 8))


@pytest.mark.parametrize("family", ["fp_net", "min_max"])
@pytest.mark.parametrize("isa", ISAS_HERE)
def test_quantized_input_images_run_on_the_engine(family: str, isa: str) -> None:
    # quantize_(..., quantize_input=True) puts a quantizer on the images: it was refused
    # ("a layer other than the first reading them", though it was the first)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    quantize_(net, family, quantize_input=True)
    net = trained_looking(net, 2)
    assert net[0].input_quantizer is not None
    prog = compile_program(net, (3, 9, 7))
    assert prog.grid is None  # the first layer reads codes, not the images
    x = torch.rand(5, 3, 9, 7) * 3 - 1  # beyond the quantizer's range both ways
    _check(IntegerEngine(prog, isa), net, x, exact=family == "fp_net")


@pytest.mark.parametrize("family", ["fp_net", "min_max"])
def test_quantized_flattened_images_keep_pytorchs_order(family: str) -> None:
    # an MLP on 3-channel images with quantize_input=True: the quantizer reads the flattened
    # images, which the engine turned NHWC as if they were a map; the linear layer then read
    # its inputs permuted (logits off by 0.6 of their range)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU(),
                        nn.Linear(32, 10))
    quantize_(net, family, quantize_input=True)
    net = trained_looking(net, 2)
    x = torch.rand(5, 3, 8, 8) * 3 - 1
    _check(IntegerEngine.from_model(net, (3, 8, 8)), net, x, exact=family == "fp_net")


@pytest.mark.parametrize("isa", supported_int_isas())
def test_an_unquantized_max_pool_runs_on_the_float_map(isa: str) -> None:
    # refused before ("max pooling of an unquantized feature map is not run"): torchvision's
    # ResNet stem (conv, bn, ReLU, max pool read by a quantized conv and by the residual sum)
    # fell back to ONNX Runtime. The clamps commute with the pool; the pool is exact.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4))
    quantize_(net, "fp_net")
    x = torch.randint(0, 256, (4, 3, 8, 8)) / 255
    _check(IntegerEngine(compile_program(net.eval(), (3, 8, 8)), isa), net, x, exact=True)


def test_two_layers_reading_the_images_and_a_numpy_batch_say_what_is_wrong() -> None:
    # the refusal said "quantizes float tensors, not 'input'"; a NumPy batch of the right
    # shape was told it had the wrong shape (qa9c). The second layer's input quantizer on the
    # images now runs, and so does the concatenation of the two layers' float maps (refused
    # before: "concatenation of quantized maps only")
    class TwoStems(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    torch.manual_seed(0)
    net = TwoStems()
    quantize_(net, "fp_net")
    x = torch.randint(0, 256, (4, 3, 8, 8)) / 255
    _check(IntegerEngine.from_model(net.eval(), (3, 8, 8)), net, x, exact=True)
    torch.manual_seed(0)
    m = create_model("mnist_fp_net_lenet").eval()
    eng = IntegerEngine.from_model(m, (1, 28, 28))
    with pytest.raises(TypeError, match="takes a torch.Tensor.*got ndarray"):
        eng(np.zeros((2, 1, 28, 28), np.float32))


def test_functional_ceil_mode_max_pool_after_a_layer_is_refused_naming_the_pool() -> None:
    # the refusal lives where both the module and the functional pool are read
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.c1 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = nn.functional.max_pool2d(torch.relu(self.c0(x)), 3, 2, ceil_mode=True)
            return torch.relu(self.c1(h))

    m = Net()
    quantize_(m, "fp_net")
    with pytest.raises(ValueError, match="max_pool2d.*: max pooling with ceil_mode"):
        IntegerEngine.from_model(m, (3, 9, 9))


@pytest.mark.parametrize("env, value", [(INT_ISA_ENV, "sse9"), ("FEWBITS_BINARY_ISA", "avx9")])
def test_a_mistyped_isa_variable_warns_under_auto_and_is_not_called_an_operation(
        env: str, value: str, monkeypatch) -> None:
    # a typo in $FEWBITS_*_ISA is the machine's setting, not the model's: the planner used to
    # note "operation not covered" and drop the native engine without a warning
    family = "fp_net" if env == INT_ISA_ENV else "binary_net"
    m = create_model(f"mnist_{family}_mlp", width=16, depth=1).eval()
    monkeypatch.setenv(env, value)
    with pytest.warns(RuntimeWarning, match=f"unknown .*-engine ISA '{value}'"):
        fast = compile_for_cpu(m, batch_size=2, candidates=("binary", "int", "torch"))
    engine = "int" if env == INT_ISA_ENV else "binary"
    note = next(n for n in fast.notes if n.startswith(f"{engine}:"))
    assert "failed: IsaError" in note and "operation not covered" not in note, note
