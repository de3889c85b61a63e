"""The binary_net engine: exact batch-norm folding, equality with PyTorch on every CPU path this
machine can run, the folded file and its size."""

from __future__ import annotations

import copy
import functools
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from fewbits.export import FormatError, export_packed, load_packed, packed_info
from fewbits.export.container import dumps, read_container
from fewbits.functional import finite_checks
from fewbits.models import create_model
from fewbits.runtime import binary
from fewbits.runtime.binary import ISA_ENV, ISAS, BinaryEngine, supported_isas
from fewbits.runtime.binary_file import load_engine
from fewbits.runtime.binary_fold import float_thresholds, integer_thresholds

# The engine's logits are exact up to the order in which PyTorch adds the head's bias to the
# (exact) sum of +-1 products: a few float32 rounding steps of the largest logit.
RTOL, ATOL = 1e-6, 1e-5
SMALL = {
    "mnist_binary_net_mlp": ({"width": 96, "depth": 2}, (1, 28, 28)),
    "mnist_binary_net_lenet": ({"width": 40}, (1, 28, 28)),
    "cifar10_binary_net_resnet23_prediction": ({}, (3, 32, 32)),
}


def _random_bn(bn: nn.Module, g: torch.Generator, scale: float = 3.0) -> None:
    """Statistics that put the thresholds inside the integer range, with negative, zero and
    exact-tie channels."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * scale)
        bn.running_var.copy_(torch.rand(c, generator=g) * scale**2 + 0.05)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.weight[0] = 0.0  # constant channel
        bn.weight[1] = -abs(float(bn.weight[1]))  # flipped channel
        bn.running_mean[2] = 2.0  # BN(2) == 0 exactly: the tie binary_tanh sends to -1
        bn.bias[2] = 0.0
        if c > 3:  # residual tie: BN(s) = s - 0.5 + 0.5 -> BN(1) + (-1) == 0
            bn.running_mean[3], bn.bias[3], bn.weight[3] = 0.5, 0.5, 1.0
            bn.running_var[3] = 1.0 - bn.eps


def _model(name: str, seed: int = 0) -> nn.Module:
    kwargs, _ = SMALL[name]
    torch.manual_seed(seed)
    m = create_model(name, **kwargs).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            _random_bn(mod, g)
    return m


def _dyadic(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Images k/256: every stem sum of +-x is exact in float32, whatever the order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float() / 256


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("fan_in", [32, 288])
def test_integer_thresholds_exact_over_whole_range(residual: bool, fan_in: int) -> None:
    g = torch.Generator().manual_seed(fan_in + residual)
    bn = nn.BatchNorm2d(24).eval()
    _random_bn(bn, g, scale=fan_in**0.5)
    t, flip = integer_thresholds(bn, -fan_in, fan_in, residual=residual)
    s = torch.arange(-fan_in, fan_in + 1, dtype=torch.float32)
    # The model's own layout: NCHW with each value on a 3x3 map, and 1-D batch norm.
    with torch.no_grad():
        y4 = bn(s.view(-1, 1, 1, 1).expand(-1, 24, 3, 3).contiguous())[:, :, 1, 2]
        bn1 = nn.BatchNorm1d(24).eval()
        bn1.load_state_dict(bn.state_dict())
        y1 = bn1(s.view(-1, 1).expand(-1, 24).contiguous())
    assert torch.equal(y4, y1)
    rows = [(0, -1.0), (1, 1.0)] if residual else [(0, None)]
    tt = np.atleast_2d(t)
    for row, x in rows:
        ref = (y4 if x is None else y4 + x) > 0  # [R, C]: binary_tanh's +1
        got = (s.numpy()[:, None] >= tt[row][None, :]) != flip[None, :]
        assert np.array_equal(got, ref.numpy())
    assert flip[1] and not flip[0]
    assert ((tt >= -fan_in) & (tt <= fan_in + 1)).all()


def test_integer_thresholds_tie_and_non_monotone() -> None:
    bn = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([2.0, 0.0]))
    t, flip = integer_thresholds(bn, -5, 5)
    assert t[0] == 3 and not flip[0]  # BN(2) == 0 -> -1 (binary_tanh(0) = -1)
    with torch.no_grad():
        bn.weight[1] = float("nan")
    t, flip = integer_thresholds(bn, -5, 5)  # NaN everywhere: constant -1
    assert t[1] == 6 and not flip[1]
    with torch.no_grad():
        bn.weight[1], bn.running_var[1] = float("inf"), 1.0
        bn.bias[1] = float("-inf")  # inf * s - inf: NaN for s > 0, -inf for s <= 0 ... and +1?
        bn.running_mean[1] = -10.0  # s * inf + (-inf - (-10) * inf) = s*inf + nan -> all NaN
    t, _ = integer_thresholds(bn, -5, 5)
    assert t[1] == 6


def test_float_thresholds_exact_near_step_and_nonfinite() -> None:
    g = torch.Generator().manual_seed(5)
    bn = nn.BatchNorm2d(16).eval()
    _random_bn(bn, g, scale=2.0)
    t, flip, nonfinite = float_thresholds(bn)
    t = torch.from_numpy(t)
    vals = [torch.randn(4000, generator=g) * 8,
            torch.tensor([0.0, -0.0, 3.4e38, -3.4e38, 1e-45, -1e-45])]
    for k in (1, 2, 3, 50):  # k ulps around every channel's threshold
        fin = torch.where(t.isfinite(), t, torch.zeros(()))
        up, down = fin.clone(), fin.clone()
        for _ in range(k):
            up = torch.nextafter(up, torch.tensor(math.inf))
            down = torch.nextafter(down, torch.tensor(-math.inf))
        vals += [fin, up, down]
    v = torch.cat(vals)
    with torch.no_grad():
        y = bn(v.view(1, 1, -1, 1).expand(2, 16, -1, 1).contiguous())[1, :, :, 0]  # [C, R]
    f = torch.from_numpy(flip)[:, None]
    got = torch.where(f, v[None, :] < t[:, None], v[None, :] >= t[:, None])
    assert torch.equal(got, y > 0)
    special = torch.tensor([-math.inf, math.inf, math.nan])
    with torch.no_grad():
        ys = bn(special.view(1, 1, -1, 1).expand(1, 16, -1, 1).contiguous())[0, :, :, 0] > 0
    assert np.array_equal(nonfinite, ys[:, :2].T.numpy())
    assert not ys[:, 2].any()  # NaN: -1, which the engine gives without a table


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each CPU path, forced through the environment variable; skipped only where this CPU
    lacks it (the portable path always runs)."""
    if request.param not in supported_isas():
        assert request.param != "generic"
        pytest.skip(f"this CPU cannot run the {request.param} path")
    monkeypatch.setenv(ISA_ENV, request.param)
    return request.param


@functools.cache
def _reference(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, inputs, PyTorch logits), computed once per model (eager binary nets are slow)."""
    m = _model(name)
    x = _dyadic(8, SMALL[name][1])
    x[0, 0, :2, :3] = 1.0  # saturated corner: padding correction at a border
    with torch.no_grad():
        return m, x, m(x)


@pytest.mark.parametrize("name", list(SMALL))
def test_engine_equals_pytorch(name: str, isa: str) -> None:
    m, x, ref = _reference(name)
    engine = BinaryEngine.from_model(m)
    assert engine.isa == isa
    # the program never writes a buffer it reads (its input or its residual)
    assert all(s.dst not in (s.src, s.res) for s in engine.plan if s.op != "head")
    out = engine(x)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    # All paths are bit-identical to the portable one.
    assert torch.equal(out, BinaryEngine.from_model(m, isa="generic")(x))


def test_engine_nonfinite_inputs_match_pytorch() -> None:
    m = _model("mnist_binary_net_lenet", seed=3)
    x = _dyadic(4, (1, 28, 28), seed=3)
    x[0, 0, 5, 5], x[1, 0, 0, 0], x[2, 0, 10, 11] = math.inf, -math.inf, math.nan
    engine = BinaryEngine.from_model(m)
    with pytest.raises(ValueError, match="NaN or inf"):  # as the model's binary_tanh
        engine(x)
    with finite_checks(False), torch.no_grad():
        ref = m(x)
        for isa in supported_isas():
            out = BinaryEngine.from_model(m, isa=isa)(x)
            torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["mnist_binary_net_lenet", "mnist_binary_net_mlp"])
def test_engine_stem_sums_overflowing_raise_as_pytorch(name: str, isa: str) -> None:
    """Finite images near float32's largest: the stem sums overflow to inf, which PyTorch's
    binary_tanh refuses under its finite checks; the engine raises too (both ISA paths), and
    runs inside finite_checks(False)."""
    m = _model(name, seed=5)
    x = (_dyadic(2, SMALL[name][1], seed=5) * 2 - 1) * 3e38
    assert bool(x.isfinite().all())
    with pytest.raises(ValueError, match="contains (NaN|inf)") as ref, torch.no_grad():
        m(x)  # what the engine must match
    engine = BinaryEngine.from_model(m)
    assert engine.isa == isa
    with pytest.raises(ValueError, match="overflow to NaN/inf.*finite_checks\\(False\\)") as got:
        engine(x)
    assert type(got.value) is type(ref.value)  # NonFiniteError: training's divergence type
    with finite_checks(False):
        out = engine(x)
    assert out.shape == (2, 10) and bool(out.isfinite().all())


def test_engine_real_image_tolerance() -> None:
    """Images k/255: the stem's float sums may round differently from PyTorch's convolution,
    so the claim is: every image whose stem pre-activations all lie off their thresholds by
    more than float32 rounding gets PyTorch's logits (within the tolerance) and top-1."""
    m = _model("cifar10_binary_net_resnet23_prediction", seed=7)
    g = torch.Generator().manual_seed(7)
    stem_bn = m.stem_post[0]
    with torch.no_grad():  # plain statistics here: no constructed ties in the float stem
        stem_bn.running_mean.copy_(torch.randn(64, generator=g) * 3)
        stem_bn.weight.copy_(torch.randn(64, generator=g))
    x = torch.randint(0, 256, (40, 3, 8, 8), generator=g).float() / 255  # small: fewer near
    with torch.no_grad():
        ref = m(x)
        s = m.stem(x)  # PyTorch's stem sums
    t = torch.from_numpy(float_thresholds(stem_bn)[0]).view(1, -1, 1, 1)
    # Any order of summing 27 terms of |x| <= 1 is within 27 * 27 * 2**-24 of the exact sum.
    near = ((s - t).abs() <= 27 * 27 * 2**-24).flatten(1).any(1)
    assert (~near).sum() >= 24  # the check below is not vacuous
    out = BinaryEngine.from_model(m, input_size=(8, 8))(x)
    assert torch.equal(out.argmax(1)[~near], ref.argmax(1)[~near])
    torch.testing.assert_close(out[~near], ref[~near], rtol=RTOL, atol=ATOL)


def test_engine_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="binary_net models only.*'fp_net'"):
        BinaryEngine.from_model(create_model("mnist_fp_net_mlp", width=8, depth=1))
    m = _model("mnist_binary_net_mlp")
    with pytest.raises(ValueError, match="unknown binary-engine ISA 'sse9'.*generic"):
        BinaryEngine.from_model(m, isa="sse9")
    monkeypatch.setattr(binary, "supported_isas", lambda: ["generic"])
    monkeypatch.setenv(ISA_ENV, "avx2")
    with pytest.raises(ValueError, match="cannot run the 'avx2' path.*it can run: generic"):
        BinaryEngine.from_model(m)
    monkeypatch.delenv(ISA_ENV)
    engine = BinaryEngine.from_model(m)
    assert engine.isa == "generic"
    with pytest.raises(ValueError, match=r"shape \(N, 784\)"):
        engine(torch.zeros(2, 3, 28, 28))
    with pytest.raises(TypeError, match="float32"):
        engine(torch.zeros(2, 784, dtype=torch.float64))
    assert engine(torch.zeros(0, 784)).shape == (0, 10)
    with pytest.raises(TypeError, match="got numpy.ndarray .torch.from_numpy"):
        engine(np.zeros((2, 784), np.float32))
    with pytest.raises(ValueError, match="meta tensor"):
        engine(torch.zeros(2, 784, device="meta"))
    for copy_of in (copy.deepcopy, lambda e: pickle.loads(pickle.dumps(e))):
        with pytest.raises(TypeError, match="cannot be pickled.*load_engine"):
            copy_of(engine)
    assert torch.equal(copy.copy(engine)(x := _dyadic(3, (784,))), engine(x))
    # the C program reads the memory in order: a strided view is copied, not misread
    x = _dyadic(3, (784,))
    want = engine(x)
    assert torch.equal(engine(x.t().contiguous().t()), want)
    assert torch.equal(engine(x.clone().requires_grad_()), want)
    r = _model("cifar10_binary_net_resnet23_prediction")
    r.units[0].conv2.dilation = (2, 2)
    with pytest.raises(ValueError, match=r"not covered.*units.0.conv2 with dilation \(2, 2\)"):
        BinaryEngine.from_model(r)


def test_folded_file_size_and_engine(tmp_path) -> None:
    m = _model("cifar10_binary_net_resnet23_prediction", seed=2)
    path = tmp_path / "r.fewbits"
    report = export_packed(m, path, fold_bn=True)
    assert report.ratio >= 25, report.table()  # 13.8x with batch norm stored as float32
    info = packed_info(path)
    assert info.file_bytes == report.file_bytes and info.ratio == pytest.approx(report.ratio)
    kinds = {e.name: e for e in info.entries}
    assert kinds["units.0.post2.0.threshold"].encoding == "raw-int16"  # 3x3: +-288
    assert kinds["units.0.post1.0.threshold"].encoding == "raw-int8"  # 1x1: +-64
    assert kinds["units.0.post3.0.flip"].bits == 1
    assert not any(n.endswith("running_mean") for n in kinds)
    x = _dyadic(8, (3, 32, 32))
    assert torch.equal(load_engine(path)(x), BinaryEngine.from_model(m)(x))
    with pytest.raises(FormatError, match="folded.*load_engine"):
        load_packed(path)
    plain = tmp_path / "plain.fewbits"
    export_packed(m, plain)
    with pytest.raises(FormatError, match="not folded"):
        load_engine(plain)
    with pytest.raises(ValueError, match="binary_net models only"):
        export_packed(create_model("mnist_fp_net_mlp", width=8, depth=1), tmp_path / "f",
                      fold_bn=True)


@pytest.mark.parametrize("edit", ["range", "shape", "encoding", "width"])
def test_folded_file_hostile_fields(tmp_path, edit: str) -> None:
    m = _model("mnist_binary_net_mlp")
    path = tmp_path / "m.fewbits"
    export_packed(m, path, fold_bn=True)
    header, blobs = read_container(path)
    t = next(t for t in header["tensors"] if t["name"] == "body.4.0.threshold")
    if edit == "range":  # fan-in 96: thresholds within [-96, 97]
        blobs[t["name"]] = np.full(t["shape"], 120, np.int8).tobytes()
    elif edit == "shape":
        t["shape"] = [10**9]
    elif edit == "width":  # the network is built on the meta device: nothing is allocated
        header["model"]["kwargs"]["width"] = 10**7
    else:
        t["encoding"] = "raw-int64"
    # dumps: write_container itself refuses to write a file that the reader would refuse
    path.write_bytes(dumps({k: v for k, v in header.items() if k != "fewbits_version"}, blobs))
    # format 2 derives each blob's place from the entries: an entry that misdescribes its blob
    # shifts every later one, and the table no longer fits the payload
    message = {"width": "larger than the file can hold",
               "encoding": r"beyond the \d+-byte payload|after its last tensor"}
    with pytest.raises(FormatError, match=message.get(edit, "body.4.0.threshold")):
        load_engine(path)


def test_engine_builds_without_numpy2_popcount(monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy 1.x (pyproject allows >= 1.24) has no ``np.bitwise_count``: the padding
    correction's popcounts must not need it."""
    m, x, _ = _reference("mnist_binary_net_lenet")
    want = BinaryEngine.from_model(m)(x)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert not hasattr(np, "bitwise_count")
    words = np.array([[0xFFFFFFFF, 1], [0x80000001, 0]], np.uint32)
    assert binary._popcount(words).tolist() == [33, 2]
    assert torch.equal(BinaryEngine.from_model(m)(x), want)


class _UserNet(nn.Module):
    """A user's plain-torch CNN (torchvision-style names, no fewbits attribute names); ``act``:
    its activation module (``nn.ReLU``, or fewbits' binary_tanh as BinaryNet puts it)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = act
        self.conv2 = nn.Conv2d(16, 40, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(40)
        self.maxpool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(40, 40, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(40)
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.maxpool(self.act(self.bn2(self.conv2(h))))
        h = self.act(self.bn3(self.conv3(h)) + h)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def _converted(m: nn.Module) -> nn.Module:
    """``m`` with random batch-norm statistics, converted to binary_net inside and 8-bit fixed
    point in its first conv and classifier (``conv1``, ``fc``), in eval mode."""
    from fewbits.convert import family_config, quantize_

    g = torch.Generator().manual_seed(5)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            _random_bn(mod, g)
    fixed = family_config("fp_connect", bit_width=8)
    quantize_(m, lambda n, _: fixed if n in ("conv1", "fc") else "binary_net")
    return m.eval()


def _user_model(act: nn.Module) -> nn.Module:
    torch.manual_seed(4)
    return _converted(_UserNet(act))


@pytest.mark.parametrize("act", ["binary_tanh", "relu"])
def test_engine_runs_a_users_quantized_model(isa: str, act: str) -> None:
    from fewbits.layers import QuantAct

    # ReLU: quantize_ binarizes what each layer reads, so the pooled map, the residual stream
    # and the head's input stay float: float maps in the engine
    m = _user_model(QuantAct("binary_tanh") if act == "binary_tanh" else nn.ReLU())
    x = _dyadic(6, (3, 16, 16), seed=4)  # k/256 times 8-bit weights: exact stem sums
    with torch.no_grad():
        ref = m(x)
    engine = BinaryEngine.from_model(m, input_shape=(3, 16, 16))
    assert engine.isa == isa
    want = [("stem", False, False, False), ("bconv", True, False, False),
            ("bconv", False, True, False), ("head", False, False, False)] \
        if act == "binary_tanh" else \
        [("stem", False, False, False), ("bconv", True, False, False),  # conv3 reads bits,
         ("bconv", False, False, True), ("poolf", False, False, False),  # the sum floats
         ("bconv", False, False, True), ("headm", False, False, False)]
    assert [(s.op, s.pool, s.residual, s.float_out) for s in engine.plan] == want
    out = engine(x)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class _OneByOne(nn.Module):
    """1x1 convolutions of ``c`` channels: strided, then with a binary residual (the AVX2
    byte-lane kernel for ``c <= 127``, the general one above)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        from fewbits.layers import QuantAct

        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 1, stride=2, bias=False)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(c) for _ in range(3))
        self.act = QuantAct("binary_tanh")
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))
        h = self.act(self.bn3(self.conv3(h)) + h)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.mark.parametrize("c", [100, 128])
def test_engine_1x1_layers_equal_pytorch(isa: str, c: int) -> None:
    """Odd output width (7), stride 2, a residual, 4 input words (100: the kernel's general
    byte count) and 128 channels (past the byte-lane kernel's 127): PyTorch's logits on every
    path, bit-identical to the portable path."""
    torch.manual_seed(6)
    m = _converted(_OneByOne(c))
    x = _dyadic(3, (3, 14, 14), seed=6)
    with torch.no_grad():
        ref = m(x)
    engine = BinaryEngine.from_model(m, input_shape=(3, 14, 14))
    assert [(s.op, s.k, s.stride, s.residual) for s in engine.plan] == [
        ("stem", 3, 1, False), ("bconv", 1, 2, False), ("bconv", 1, 1, True),
        ("head", 1, 1, False)]
    assert [bool(engine._layers[i].wbb) for i in (1, 2)] == [c <= 127] * 2
    out = engine(x)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, BinaryEngine.from_model(m, input_shape=(3, 14, 14),
                                                    isa="generic")(x))
    # the C side refuses the optional tables without what they go with
    for field in ("di1",) + (("dt1",) if c <= 127 else ()):
        keep = getattr(engine._layers[2], field)
        setattr(engine._layers[2], field, None)
        with pytest.raises(RuntimeError, match="malformed program"):
            engine(x)
        setattr(engine._layers[2], field, keep)
    assert torch.equal(engine(x), out)


def test_planner_runs_a_users_model_on_the_engine_or_names_the_operation() -> None:
    from fewbits.layers import QuantAct
    from fewbits.runtime import compile_for_cpu

    kw = {"input_shape": (3, 16, 16), "batch_size": 4, "candidates": ("binary", "torch")}
    for act in (QuantAct("binary_tanh"), nn.ReLU()):
        fast = compile_for_cpu(_user_model(act), **kw)
        assert fast.backend == "binary", fast.notes
    # an operation the engine does not cover: the next candidate, and the note names it
    torch.manual_seed(4)
    kw["input_shape"] = (3, 8, 8)
    fast = compile_for_cpu(_converted(_SharedNet("relu_residual")), **kw)
    assert fast.backend == "torch"
    assert any(n.startswith("binary: operation not covered") and "ReLU before a residual sum"
               in n for n in fast.notes), fast.notes


def test_planner_warns_when_the_engine_cannot_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """A binary net whose engine fails to build (no C compiler) falls back, and says so."""
    from fewbits.runtime import compile_for_cpu

    monkeypatch.setattr(binary._LIB, "get", lambda: None)
    monkeypatch.setattr(binary._LIB, "error", "gcc: not found")
    with pytest.warns(RuntimeWarning, match="'binary' failed: RuntimeError: the binary engine "
                      "cannot be built here: gcc: not found"):
        fast = compile_for_cpu(_model("mnist_binary_net_mlp"), batch_size=4,
                               candidates=("binary", "torch"))
    assert fast.backend == "torch"


class _SharedNet(nn.Module):
    """A batch-norm output or binary map read twice, or a ReLU before a residual sum."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.ident, self.relu, self.mp = nn.Identity(), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(8, divisor_override=3)
        self.fc = nn.Linear(16, 10)
        from fewbits.layers import QuantAct

        self.bt = QuantAct("binary_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bt = self.bt
        h = bt(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(h))
        if self.kind == "relu_residual":  # bt(relu(y) + h) != bt(y + h)
            o = bt(torch.relu(y) + h)
        elif self.kind == "bn_twice":  # y binarized alone and in a residual sum
            a = bt(y)
            o = bt(self.bn3(self.conv3(bt(y + h))) + a)
        elif self.kind == "pool_through_identity":  # a pooled copy (unused) of a shared map
            a = bt(y)
            self.mp(self.ident(a))
            o = bt(self.bn3(self.conv3(a)) + a)
        elif self.kind == "pool_padding":  # padding=1 was taken as a no-op argument
            o = bt(nn.functional.max_pool2d(bt(y + h), 2, padding=1))
        elif self.kind == "avg_divisor":  # a global average pool dividing by 3, not 64
            return self.fc(torch.flatten(self.avg(bt(y + h)), 1))
        else:  # an in-place ReLU changes y for the sum too
            self.relu(y)
            o = bt(y + h)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(o, 1), 1))


@pytest.mark.parametrize("kind", ["relu_residual", "bn_twice", "pool_through_identity",
                                  "inplace_relu", "pool_padding", "avg_divisor"])
def test_shared_values_equal_pytorch_or_are_refused(kind: str) -> None:
    # each was silently wrong: the engine dropped the ReLU before the sum, emitted one step
    # twice, pooled a map other layers read, ignored the in-place ReLU or a pool's divisor
    torch.manual_seed(4)
    m = _converted(_SharedNet(kind))
    x = _dyadic(3, (3, 8, 8), 1)
    try:
        eng = BinaryEngine.from_model(m, input_shape=(3, 8, 8), isa="generic")
    except ValueError as e:
        assert "not covered" in str(e), e
        assert any(w in str(e) for w in ("ReLU", "read", "max_pool2d", "AvgPool2d")), e
        return
    with torch.no_grad():
        torch.testing.assert_close(eng(x), m(x), rtol=RTOL, atol=ATOL)


def test_engine_called_from_several_threads_at_once() -> None:
    """ctypes releases the GIL during the call: threads sharing one scratch buffer overwrote
    each other's maps and got wrong logits. Each thread has its own."""
    import threading

    torch.manual_seed(8)
    m = _converted(_OneByOne(33))
    engine = BinaryEngine.from_model(m, input_shape=(3, 14, 14))
    xs = [_dyadic(8, (3, 14, 14), seed=s) for s in range(4)]
    want = [engine(x) for x in xs]  # one thread: PyTorch's (test above)
    start, bad = threading.Barrier(len(xs)), []

    def work(i: int) -> None:
        start.wait()
        bad.extend(i for _ in range(60) if not torch.equal(engine(xs[i]), want[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
