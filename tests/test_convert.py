"""quantize_, calibrate, from_float, to_float on a model outside the registry, every family."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbits
from fewbits import QuantConv2d, QuantLinear, calibrate, create_model, family_config, quantize_
from fewbits import functional as qf
from fewbits.export import FormatError, export_packed, load_packed
from fewbits.layers import quant_layers
from fewbits.models import FAMILIES
from fewbits.quantizers import MinMax, get

NINE = [f for f in FAMILIES if f != "float"]
ACT_FAMILIES = {"binary_net", "fp_net", "pow2_net", "min_max", "lsq"}
LAYERS = ("conv1", "conv2", "down", "fc")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class TinyNet(nn.Module):
    """Not in the registry: a residual conv net using bias, dilation, groups and stride."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        h = self.down(h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def _config(fam):
    # INQ must reach its all-fixed state for the export: fix everything on the first forward.
    return family_config("inq", inq_iterations=[0]) if fam == "inq" else fam


def _trained(fam, steps=2, seed=0):
    torch.manual_seed(seed)
    m = quantize_(TinyNet(), _config(fam))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, y = torch.rand(16, 3, 8, 8), torch.arange(16) % 5
    m.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def _fitted(spec, t):
    """The spec with the grid quantize_ fits to ``t`` (smallest power-of-two step / largest
    level that holds max |t|), computed here from the definition."""
    amax = float(t.detach().abs().max())
    if spec and spec["name"] == "fixed_point":
        assert "delta" not in spec
        kmax = 2 ** (spec["n"] - 1) - 1
        delta = 2.0 ** -30
        while delta * kmax < amax:
            delta *= 2
        return {**spec, "delta": delta}
    if spec and spec["name"] == "pow2":
        assert "m" not in spec
        m = -30
        while 2.0**m < amax:
            m += 1
        return {**spec, "m": m}
    return spec


def _apply(spec, t):
    q = get(spec)
    if q is None:
        return t
    q.setup(t)
    return q.eval()(t)


@pytest.mark.parametrize("fam", NINE)
def test_converted_layers_compute_the_family_quantizer_of_the_original_weights(fam):
    torch.manual_seed(0)
    ref = TinyNet().eval()
    m = quantize_(copy.deepcopy(ref), fam).eval()
    specs = family_config(fam)
    g = torch.Generator().manual_seed(1)
    for name in LAYERS:
        orig, layer = getattr(ref, name), getattr(m, name)
        assert type(layer) is (QuantLinear if name == "fc" else QuantConv2d)
        w, b = orig.weight.detach(), orig.bias
        if fam == "min_max":  # ranges start from the weights being converted
            assert float(layer.weight_quantizer.qr_min.detach()) == float(w.min())
            assert float(layer.weight_quantizer.qr_max.detach()) == float(w.max())
            wq = qf.min_max_quantize(w, w.min(), w.max())
            bq = None if b is None else qf.min_max_quantize(b.detach(), b.min(), b.max())
        else:  # fixed point / pow2 grids fit each tensor's largest magnitude
            wq = _apply(_fitted(specs["weight"], w), w)
            bq = None if b is None else _apply(_fitted(specs["bias"], b), b.detach())
        shape = (3, 16) if name == "fc" else (3, orig.in_channels, 7, 7)
        x = torch.randn(*shape, generator=g) * 2
        # the raw model input (read by conv1) is not quantized; every other layer's input is
        # (evaluation mode, as the layer's: an LSQ step starts from data in training only)
        spec = specs["input"]
        if isinstance(spec, dict) and spec["name"] == "lsq":  # unsigned where a ReLU is read
            spec = {**spec, "signed": name not in ("conv2", "down")}
        act = None if name == "conv1" else get(spec)
        act = act and act.eval()
        xq = x if act is None else act(x)
        if fam in ACT_FAMILIES and name != "conv1":
            assert act is not None
        want = F.linear(xq, wq, bq) if name == "fc" else orig._conv_forward(xq, wq, bq)
        with torch.no_grad():
            assert torch.equal(layer(x), want), name


@pytest.mark.parametrize("fam", NINE)
def test_a_converted_model_trains_every_quantized_parameter(fam):
    torch.manual_seed(0)
    m = quantize_(TinyNet(), fam).train()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    F.cross_entropy(m(torch.rand(8, 3, 8, 8)), torch.arange(8) % 5).backward()
    for lname, layer in quant_layers(m):
        for pname, p in layer.named_parameters():
            assert p.grad is not None, f"{lname}.{pname} got no gradient"
        assert layer.weight.grad.abs().sum() > 0, lname
    opt.step()
    assert not torch.equal(before["conv2.weight"], m.conv2.weight)


@pytest.mark.parametrize("fam", NINE)
def test_round_trips_state_dict_packed_file_and_onnx(fam, tmp_path):
    from fewbits.export.onnx import compare_onnx, export_onnx

    m = _trained(fam)
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(x)
    # state_dict into another converted instance
    other = quantize_(TinyNet(), _config(fam)).eval()
    other.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), ref)
    # packed file into a float instance (converted from the file) and a converted one
    report = export_packed(m, tmp_path / "m.fewbits")
    assert report.model == "test_convert.TinyNet" or report.model.endswith(".TinyNet")
    for target in (TinyNet(), quantize_(TinyNet(), _config(fam))):
        back = load_packed(tmp_path / "m.fewbits", model=target)
        assert back is target
        with torch.no_grad():
            assert torch.equal(back(x), ref)
    # ONNX
    export_onnx(m, tmp_path / "m.onnx", input_shape=(3, 8, 8))
    r = compare_onnx(m, tmp_path / "m.onnx", x)
    if fam in ACT_FAMILIES:
        assert r["top1_agreement"] >= 0.9 and r["max_rel"] <= 0.1
    else:
        assert r["top1_agreement"] == 1.0 and r["max_rel"] <= 1e-5


def test_load_packed_names_what_does_not_fit(tmp_path):
    m = _trained("fp_connect")
    export_packed(m, tmp_path / "m.fewbits")
    with pytest.raises(FormatError, match="not registered.*model="):
        load_packed(tmp_path / "m.fewbits")
    wide = TinyNet()
    wide.fc = nn.Linear(16, 7)
    with pytest.raises(FormatError, match=r"'fc\.weight' has shape \(5, 16\) in the file but "
                       r"\(7, 16\)"):
        load_packed(tmp_path / "m.fewbits", model=wide)
    lacking = TinyNet()
    del lacking.down
    with pytest.raises(FormatError, match="quantized layer 'down', which the model lacks"):
        load_packed(tmp_path / "m.fewbits", model=lacking)
    with pytest.raises(FormatError, match="layer 'conv1' is quantized differently"):
        load_packed(tmp_path / "m.fewbits", model=quantize_(TinyNet(), "binary_connect"))


# --------------------------------------------------------------------------- quantize_ options


def test_config_forms_skip_and_callable():
    m = quantize_(TinyNet(), "binary_weight", skip=["conv1", "f*"])
    assert type(m.conv1) is nn.Conv2d and type(m.fc) is nn.Linear
    assert isinstance(m.conv2, QuantConv2d) and m.conv2.weight_quantizer.name == "binary_weight"
    fp8 = {"weight": {"name": "fixed_point", "n": 8, "delta": 2**-7}}
    m = quantize_(TinyNet(), lambda n, mod: fp8 if n in ("conv1", "fc") else "binary_connect")
    assert m.conv1.weight_quantizer.config()["delta"] == 2**-7
    assert m.down.weight_quantizer.name == "binary_connect" and m.down.input_quantizer is None
    m = quantize_(TinyNet(), lambda n, mod: None if n == "down" else fp8)
    assert type(m.down) is nn.Conv2d and m.fc.bias_quantizer is None
    q = MinMax()
    m = quantize_(TinyNet(), {"weight": q})  # an instance is copied per layer
    assert m.conv1.weight_quantizer is not m.conv2.weight_quantizer
    assert quantize_(TinyNet(), "fp_net", skip="conv1").conv2.input_quantizer.name == \
        "fixed_point"


def test_parameters_device_and_rng_are_kept():
    net = TinyNet()
    w = net.conv2.weight
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    state = torch.get_rng_state()
    quantize_(net, "fp_connect")
    assert torch.equal(torch.get_rng_state(), state)
    assert net.conv2.weight is w  # the optimizer built before conversion still trains it
    assert (net.conv2.stride, net.conv2.padding, net.conv2.dilation, net.conv2.groups) == \
        ((1, 1), (2, 2), (2, 2), 2)
    net(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert not torch.equal(w, net.conv2.weight.detach() + 1)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown family 'binary'; known: float, binary_conn"):
        quantize_(TinyNet(), "binary")
    with pytest.raises(ValueError, match=r"skip pattern\(s\) \['classifier'\] match no .* "
                       r"conv1, conv2, down, fc"):
        quantize_(TinyNet(), "fp_connect", skip=["fc", "classifier"])
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['name'\].*under a role"):
        quantize_(TinyNet(), {"name": "fixed_point"})
    with pytest.raises(ValueError, match="no layer of a kind fewbits quantizes"):
        quantize_(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "fp_connect")

    class WSConv(nn.Conv2d):  # a subclass computes differently: never converted silently
        pass

    net = nn.Sequential(WSConv(3, 4, 1), nn.Conv3d(4, 4, 1), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"(?s)0: .*WSConv has no fewbits form.*\n  1: "
                       r".*Conv3d"):
        quantize_(net, "fp_connect")
    assert type(net[2]) is nn.Linear  # all or nothing: the model is left as it was
    quantize_(net, "fp_connect", skip=["0", "1"])
    assert isinstance(net[2], QuantLinear)


def test_already_quantized_layers_are_left_as_they_are():
    m = quantize_(TinyNet(), "binary_connect", skip=["conv1", "fc"])
    conv2 = m.conv2
    quantize_(m, "fp_connect")  # converts only what is still float
    assert m.conv2 is conv2 and m.conv2.weight_quantizer.name == "binary_connect"
    assert m.conv1.weight_quantizer.name == "fixed_point"
    sd = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    assert quantize_(m, "min_max") is m  # idempotent: nothing left to convert
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


def test_shared_module_is_converted_once():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    quantize_(net, "binary_connect")
    assert net[0] is net[2] and isinstance(net[0], QuantLinear)


# --------------------------------------------------------------------------- layers


def test_from_float_with_no_quantizer_equals_the_torch_layer_and_to_float_inverts():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
    q = QuantConv2d.from_float(conv)
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(q(x), conv(x))
    q = QuantConv2d.from_float(conv, weight_quantizer="binary_weight")
    back = q.to_float()
    assert type(back) is nn.Conv2d and back.padding_mode == "reflect"
    assert torch.equal(back(x), q(x)) and torch.equal(back.weight, qf.binary_weight(conv.weight))
    fc = QuantLinear.from_float(nn.Linear(3, 2), input_quantizer="binary_tanh")
    with pytest.raises(ValueError, match="quantizes its input"):
        fc.to_float()
    assert type(fc.to_float(drop_activation_quantizers=True)) is nn.Linear
    with pytest.raises(TypeError, match="exactly a torch.nn.*Linear"):
        QuantLinear.from_float(QuantLinear(2, 2, weight_quantizer="binary_connect"))
    plain = QuantLinear(2, 2)  # a fewbits layer without quantizers (a zoo float net) converts
    assert QuantLinear.from_float(plain, weight_quantizer="binary_connect").weight is plain.weight
    with pytest.raises(ValueError, match="lazy"):
        QuantLinear.from_float(_lazy_as_linear())


def _lazy_as_linear():
    m = nn.LazyLinear(2)
    m.__class__ = nn.Linear  # an uninitialised parameter in a plain Linear
    return m


@pytest.mark.parametrize("per_channel", [False, True])
def test_min_max_weight_ranges_start_from_the_weights(per_channel):
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3)  # kaiming init: |w| < 0.042
    spec = {"name": "min_max", "ql_min": 0, "ql_max": 15, "init_min": -2.0, "init_max": 2.0,
            "per_channel": per_channel}
    q = QuantConv2d.from_float(conv, weight_quantizer=spec)
    w = conv.weight.detach()
    lo, hi = (torch.aminmax(w.flatten(1), dim=1) if per_channel else torch.aminmax(w))
    assert torch.equal(q.weight_quantizer.qr_min.detach(), lo)
    assert torch.equal(q.weight_quantizer.qr_max.detach(), hi)
    zero = float((q.quantized_weight() == 0).float().mean())
    fixed = QuantConv2d.from_float(conv, weight_quantizer=spec, init_ranges=False)
    zero_fixed = float((fixed.quantized_weight() == 0).float().mean())
    assert zero < 0.15 and zero_fixed > 0.95  # the fixed -2..2 grid zeroes nearly all


# --------------------------------------------------------------------------- calibrate


def test_calibrate_sets_activation_ranges_and_nothing_else():
    torch.manual_seed(0)
    m = quantize_(TinyNet(), "min_max", quantize_input=True).train()  # conv1's input too
    m(torch.rand(4, 3, 8, 8))  # move BN statistics away from their initial values
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batches = [(torch.rand(4, 3, 8, 8) * 3, torch.zeros(4)) for _ in range(3)]
    ranges = calibrate(m, batches)
    assert m.training
    assert set(ranges) == {f"{n}.input_quantizer" for n in LAYERS}
    hi = max(float(x.max()) for x, _ in batches)
    assert ranges["conv1.input_quantizer"] == (0.0, hi)  # all positive: the range holds 0
    assert float(m.conv1.input_quantizer.qr_max.detach()) == hi
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= {f"{n}.input_quantizer.{r}" for n in LAYERS for r in ("qr_min", "qr_max")}
    assert "conv1.input_quantizer.qr_max" in changed
    assert calibrate(quantize_(TinyNet(), "fp_connect"), batches) == {}
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(m, [])


def test_calibrate_starts_lsq_activation_steps_from_the_data():
    """calibrate on an LSQ model returned {} and left every activation step at 1.0 (it knew
    only min-max): a post-training LSQ model evaluated on an unstarted grid, silently."""
    torch.manual_seed(0)
    m = quantize_(TinyNet(), "lsq", quantize_input=True)
    batches = [torch.rand(4, 3, 8, 8) * 3 for _ in range(2)]
    weights = {k: v.clone() for k, v in m.state_dict().items() if k.endswith("weight")}
    ranges = calibrate(m, batches)
    q = m.conv1.input_quantizer
    assert bool(q.initialized) and set(ranges) == {f"{n}.input_quantizer" for n in LAYERS}
    # the paper's start from the first batch, as the first training forward would
    want = 2 * float(batches[0].double().abs().mean()) / math.sqrt(q.qp)
    s = float(q.step.detach())
    assert math.isclose(s, want, rel_tol=1e-6)
    assert ranges["conv1.input_quantizer"] == (-q.qn * s, q.qp * s)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in weights.items())


class _PoolNet(nn.Module):
    """Module ReLU, then max pool and flatten (sign kept), then a layer on a linear's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(4 * 3 * 3, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(self.fc1(self.flat(F.max_pool2d(self.act(self.conv(x)), 2))))


def test_lsq_activations_are_unsigned_where_the_layer_reads_a_relu():
    """Issue 25: quantize_(model, "lsq") quantized every activation signed, so after a ReLU
    half of LSQ's levels (all the negative ones) were never used; Esser et al. quantize a
    layer's input unsigned after the ReLU. Inputs not known to be >= 0 stay signed."""
    m = quantize_(TinyNet(), "lsq", quantize_input=True)
    signed = {n: m.get_submodule(n).input_quantizer.signed for n in LAYERS}
    # conv1: the image; conv2, down: torch.relu(...); fc: pooled conv output, no ReLU
    assert signed == {"conv1": True, "conv2": False, "down": False, "fc": True}
    assert m.conv2.input_quantizer.qn == 0 and m.conv1.input_quantizer.qn > 0
    p = quantize_(_PoolNet(), "lsq", quantize_input=True)
    assert (p.conv.input_quantizer.signed, p.fc1.input_quantizer.signed,
            p.fc2.input_quantizer.signed) == (True, False, True)
    with torch.no_grad():  # an unsigned quantizer on a ReLU's output is exactly its grid
        x = torch.relu(torch.randn(64))
        q = p.fc1.input_quantizer
        q(x)  # the first training call starts the step from the data
        assert torch.equal(q(x), (x / q.step).round().clamp(0, q.qp) * q.step)
    # a spec that says signed is kept, and a model fx cannot trace stays signed
    kept = quantize_(TinyNet(), {"weight": "lsq", "input": {"name": "lsq", "signed": True}})
    assert kept.conv2.input_quantizer.signed

    class Branchy(TinyNet):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else super().forward(-x)
    assert quantize_(Branchy(), "lsq").conv2.input_quantizer.signed


class _Rectified(nn.Module):
    """fc2 reads torch.relu(fc1(x)) in the fx graph; ``how`` makes it signed at run time."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.fc1, self.r, self.fc2 = how, nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)
        self.mha = nn.MultiheadAttention(4, 1, batch_first=True)
        if how == "hook":  # fx does not trace hooks
            self.r.register_forward_hook(lambda m, i, o: o - 1)
        if how == "pre_hook":
            self.fc2.register_forward_pre_hook(lambda m, a: (a[0] - 1,))
        self.t = nn.Threshold(0.5, -1.0, inplace=True)

    def forward(self, x):
        y = self.r(self.fc1(x))
        if self.how == "sub_":
            y.sub_(1)
        elif self.how == "view_mul_":
            y.view(-1).mul_(-1)
        elif self.how == "iadd_alias":  # fx records z += b as z + b
            z = y
            z += -5.0
        elif self.how == "inplace_module":
            self.t(y)
        elif self.how == "input_of_inplace_relu":  # y is h's memory
            h = self.fc1(x)
            y = torch.relu_(h)
            h.sub_(1)
        elif self.how == "inplace_dropout":  # in place, but keeps the sign: still unsigned
            y = F.dropout(y, 0.5, self.training, True)
        elif self.how == "negative_divisor":  # average pooling that flips the sign
            y = F.avg_pool2d(y.view(-1, 1, 2, 2), 1, divisor_override=-1).flatten(1)
        elif self.how == "eval_branch" and not self.training:
            y = y - 1
        if self.how == "attention":  # query rectified, key and value not
            return self.mha(y, x, x)[0]
        return self.fc2(y)


@pytest.mark.parametrize("how", ["sub_", "view_mul_", "iadd_alias", "inplace_module",
                                 "input_of_inplace_relu", "negative_divisor", "eval_branch",
                                 "hook", "pre_hook", "attention"])
def test_lsq_inputs_stay_signed_where_the_relu_output_is_changed_unseen(how):
    """An unsigned quantizer clips negatives to 0 without a word: a ReLU output written in
    place (directly, through a view or an alias, by an inplace module), changed by a hook,
    in eval mode only, or one of attention's inputs unrectified, must leave the layer signed."""
    m = quantize_(_Rectified(how), "lsq")
    layer = m.mha if how == "attention" else m.fc2
    assert layer.input_quantizer.signed
    for kept in ("plain", "inplace_dropout"):
        assert not quantize_(_Rectified(kept), "lsq").fc2.input_quantizer.signed


def test_unsigned_lsq_warns_when_its_first_batch_is_negative():
    """What fx cannot see (a forward that asks whether it is traced) leaves fc2 unsigned on
    signed data: the first training batch says so instead of clipping negatives silently."""
    class Traced(_Rectified):
        def forward(self, x):
            y = torch.relu(self.fc1(x))
            return self.fc2(y if torch.fx._symbolic_trace.is_fx_tracing() else y - 1)

    m = quantize_(Traced("plain"), "lsq").train()
    assert not m.fc2.input_quantizer.signed
    with pytest.warns(UserWarning, match="holds negative values .* clips to 0"):
        m(torch.randn(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(_Rectified("plain"), "lsq").train()(torch.randn(8, 4))  # a ReLU: silent
        # the zoo's unsigned quantizers replace the ReLU (batch norm's output, negatives
        # clipped by design): no warning there either
        create_model("mnist_lsq_lenet").train()(torch.randn(2, 1, 28, 28))


def test_top_level_api():
    for name in ("quantize_", "calibrate", "family_config"):
        assert name in fewbits.__all__ and hasattr(fewbits, name)


def test_a_model_that_is_one_fewbits_layer_round_trips(tmp_path):
    # its tensors are "weight"/"bias", not ".weight": the file once held both codes and floats
    q = QuantLinear(3, 2, weight_quantizer="binary_connect",
                    bias_quantizer={"name": "fixed_point", "n": 8, "delta": 2**-6}).eval()
    report = export_packed(q, tmp_path / "q.fewbits")
    assert [e.name for e in report.entries] == ["weight", "bias"]
    back = load_packed(tmp_path / "q.fewbits", model=QuantLinear(
        3, 2, weight_quantizer="binary_connect",
        bias_quantizer={"name": "fixed_point", "n": 8, "delta": 2**-6}))
    x = torch.rand(4, 3)
    assert torch.equal(back(x), q(x))
    with pytest.raises(FormatError, match="the model itself is a plain layer"):
        load_packed(tmp_path / "q.fewbits", model=nn.Linear(3, 2))


def test_loading_into_a_model_whose_layer_options_differ_is_refused(tmp_path):
    # same names and shapes, another padding mode: the weights would compute another network
    def net(mode):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode, dilation=2),
                             nn.Flatten(), nn.Linear(144, 3))

    m = fewbits.quantize_(net("circular"), "fp_connect").eval()
    export_packed(m, tmp_path / "m.fewbits")
    x = torch.rand(2, 3, 8, 8)
    back = load_packed(tmp_path / "m.fewbits", model=net("circular"))
    assert torch.equal(back(x), m(x))
    with pytest.raises(FormatError, match=r"layer '0' differs from the exported one in "
                                          r"\['padding_mode'\]"):
        load_packed(tmp_path / "m.fewbits", model=net("zeros"))


def test_quantize_runs_no_training_step_of_a_scheduled_quantizer():
    """quantize_'s report checks each layer's quantized weights with ``infer``; INQ's took a
    training forward there (the schedule counted one iteration before any training)."""
    from fewbits.convert import family_config

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    quantize_(net, family_config("inq", inq_iterations=[1, 2]))
    assert net[2].weight_quantizer.counter == 0
    assert net[2].weight_quantizer.fixed_fraction == 0


def test_a_float_config_converts_without_a_float_weights_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(nn.Sequential(nn.Linear(3, 3)), "float")
