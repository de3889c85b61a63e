"""Real architectures nobody here wrote, times the nine families (issue 21).

Models: HuggingFace ``transformers`` ViT, BERT (masked LM, tied decoder), GPT-2 (tied head,
HF ``Conv1D``), Llama (tied head) from tiny random configs (offline, no download); PyTorch's
``nn.TransformerEncoder`` (its fused fast path); a MobileNet-like CNN with depthwise convs; a
CNN using ``x.view``; a ``Conv1d`` net; a net using one layer twice. For each: every weight
matrix is quantized or named in the report; the eval forward is identical under grad,
``no_grad`` and ``inference_mode`` (and ``torch.compile`` on a subset, see ``COMPILED``);
``state_dict`` and packed round trips give identical logits.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch
from torch import nn

from fewbits import family_config, quantize_
from fewbits.convert import quantization_report
from fewbits.export import export_packed, load_packed, packed_info
from fewbits.layers import QuantLinear as QuantLinear_
from fewbits.layers import quant_layers
from fewbits.models import FAMILIES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

NINE = [f for f in FAMILIES if f != "float"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class HF(nn.Module):
    """A transformers model as a logits function of one input tensor."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.key: x}).logits


def _vit():
    c = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                               num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, num_labels=3)
    return HF(transformers.ViTForImageClassification(c), "pixel_values")


def _bert():
    c = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=16)
    return HF(transformers.BertForMaskedLM(c), "input_ids")


def _gpt2():
    c = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                bos_token_id=0, eos_token_id=0)
    return HF(transformers.GPT2LMHeadModel(c), "input_ids")


def _llama():
    c = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=16,
                                 tie_word_embeddings=True)
    return HF(transformers.LlamaForCausalLM(c), "input_ids")


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class MobileNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                                nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.pw(self.dw(self.stem(x))).mean((2, 3)))


class ViewNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(4, 8, 3, padding=1), nn.Conv1d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean(2))


def _shared():
    lin = nn.Linear(8, 8)
    return nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(8, 3))


def _ids(shape):
    return lambda g: torch.randint(0, 40, shape, generator=g)


def _floats(shape):
    return lambda g: torch.rand(shape, generator=g) * 2 - 1


#: name -> (constructor, input maker, weight matrices that stay float with embeddings=True)
MODELS = {
    "vit": (_vit, _floats((2, 3, 8, 8)), {"model.vit.embeddings.cls_token",
                                          "model.vit.embeddings.position_embeddings"}),
    "bert": (_bert, _ids((2, 6)), set()),
    "gpt2": (_gpt2, _ids((2, 6)), set()),
    "llama": (_llama, _ids((2, 6)), set()),
    "encoder": (Encoder, _floats((2, 5, 16)), set()),
    "mobilenet": (MobileNetish, _floats((2, 3, 8, 8)), set()),
    "view": (ViewNet, _floats((2, 3, 8, 8)), set()),
    "conv1d": (Conv1dNet, _floats((2, 4, 9)), set()),
    "shared": (_shared, _floats((2, 8)), set()),
}
#: model x family cells also run through torch.compile (compiling all 81 takes minutes): the
#: graph capture (aot_eager) on these, inductor's code generation on the first
COMPILED = [("conv1d", "binary_weight"), ("encoder", "binary_connect"), ("mobilenet", "pow2_net"),
            ("shared", "inq"), ("view", "min_max")]


def _config(fam):
    # INQ fixes every weight on the first forward, so that the export has codes to write
    return family_config("inq", inq_iterations=[0]) if fam == "inq" else fam


def _build(name, fam, seed=0):
    torch.manual_seed(seed)
    make, inputs, _ = MODELS[name]
    m = make().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float tensors are checked from the report
        quantize_(m, _config(fam), embeddings=True)
    m.train()
    x = inputs(torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        m(x)  # one training forward: INQ fixes its weights, batch ranges move
    return m.eval(), x


@pytest.mark.parametrize("fam", NINE)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_weight_is_quantized_or_reported_and_round_trips_exactly(name, fam, tmp_path):
    m, x = _build(name, fam)
    rep = quantization_report(m)
    assert {n for n, *_ in rep.float_tensors} == MODELS[name][2]
    with torch.no_grad():
        ref = m(x)
    # eval is the same network under grad, no_grad and inference_mode (no fused fast path)
    assert torch.equal(m(x).detach(), ref)
    with torch.inference_mode():
        assert torch.equal(m(x), ref)
    # state_dict into another converted instance (built from other random weights)
    other, _ = _build(name, fam, seed=5)
    other.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), ref)
    # packed file into a fresh float instance
    path = tmp_path / "m.fewbits"
    report = export_packed(m, path)
    torch.manual_seed(9)
    back = load_packed(path, model=MODELS[name][0]())
    with torch.no_grad():
        assert torch.equal(back(x), ref)
    # a tied or shared tensor is stored and counted once
    first, aliases = {}, set()
    for k, t in m.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            (aliases.add(k) if id(t) in first else first.setdefault(id(t), k))
    assert not aliases & {e.name for e in packed_info(path).entries}
    assert report.fp32_bytes == sum(4 * t.numel() for k, t in m.state_dict().items()
                                    if k in first.values() and t.is_floating_point()
                                    and "_quantizer." not in k)
    assert len(quant_layers(back)) == len(quant_layers(m))


@pytest.mark.parametrize(("name", "fam"), COMPILED)
def test_compiled_eval_equals_eager(name, fam):
    """The captured graph is the eager network (aot_eager: the same kernels, the same bits);
    inductor's generated kernels round differently, so they agree to float32 rounding, far
    closer than the float network (what a fast path around the quantizers would compute)."""
    m, x = _build(name, fam)
    torch.manual_seed(0)
    plain = MODELS[name][0]().eval()
    plain.load_state_dict(m.state_dict(), strict=False)
    with torch.no_grad():
        ref, unquantized = m(x), plain(x)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(m, backend="aot_eager")(x), ref)
        if (name, fam) == COMPILED[0]:
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(m)(x), ref, rtol=1e-4, atol=1e-4)
    assert (unquantized - ref).abs().max() > 1e-3


# --------------------------------------------------------------------------- the items


def _tokens(seed=1):
    return torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(seed))


def test_a_head_tied_to_a_float_embedding_round_trips_and_is_counted_once(tmp_path):
    """GPT-2's lm_head is transformer.wte's tensor: quantized in the head, float in the
    lookup. Loading must not decode the head's codes into the embedding (logits were off by
    up to 74), and the size report must count the tensor once."""
    torch.manual_seed(0)
    m = _gpt2().eval()
    with pytest.warns(UserWarning, match=r"transformer\.wte\.weight 40x16 \(Embedding reads it "
                      r"in float; it is quantized elsewhere \(tied\)\)"):
        quantize_(m, "binary_connect")
    g = m.model
    assert g.lm_head.weight is g.transformer.wte.weight
    assert type(g.transformer.h[0].attn.c_attn).__name__ == "QuantHFConv1D"
    x = _tokens()
    with torch.no_grad():
        ref = m(x)
    report = export_packed(m, tmp_path / "g.fewbits")
    torch.manual_seed(3)
    back = load_packed(tmp_path / "g.fewbits", model=_gpt2())
    assert back.model.lm_head.weight is back.model.transformer.wte.weight
    assert torch.equal(back.model.transformer.wte.weight, g.transformer.wte.weight)  # float
    with torch.no_grad():
        assert torch.equal(back(x), ref)
    names = [e.name for e in report.entries]
    assert "model.transformer.wte.weight" in names and "model.lm_head.weight" not in names
    assert report.fp32_bytes == 4 * sum(p.numel() for p in m.parameters()) + 4 * sum(
        b.numel() for k, b in m.named_buffers() if b.is_floating_point()
        and "_quantizer." not in k)


def test_two_quantizers_on_one_tensor_are_refused_with_the_names():
    m = _gpt2()
    with pytest.raises(ValueError, match=r"model\.lm_head: its weight is the tensor of "
                       r"model\.transformer\.wte \(tied\), which gets \{'name': 'binary_conn"
                       r".*but this layer would get \{'name': 'binary_weight'\}"):
        quantize_(m, lambda n, mod: "binary_weight" if n.endswith("lm_head")
                  else "binary_connect", embeddings=True)
    assert type(m.model.lm_head) is nn.Linear  # all or nothing
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    net = quantize_(nn.Sequential(a, b), "binary_connect")
    assert net[0].weight_quantizer is net[1].weight_quantizer  # one quantizer on one tensor
    from fewbits.quantizers import get

    net[1].weight_quantizer = get("binary_weight")
    with pytest.raises(ValueError, match=r"2 different quantizers \(0\.weight: .*binary_conn"
                       r".*1\.weight: .*binary_weight"):
        export_packed(net, os.devnull)


def test_a_layer_used_twice_is_stored_once_and_runs_quantized_after_loading(tmp_path):
    torch.manual_seed(0)
    m = quantize_(_shared(), "binary_connect").eval()
    x = torch.rand(3, 8)
    with torch.no_grad():
        ref = m(x)
    export_packed(m, tmp_path / "s.fewbits")
    names = {e.name for e in packed_info(tmp_path / "s.fewbits").entries}
    assert "0.weight" in names and "2.weight" not in names  # not again in float
    back = load_packed(tmp_path / "s.fewbits", model=_shared())
    assert back[0] is back[2]
    with torch.no_grad():
        assert torch.equal(back(x), ref)
        assert set(back[0].weight.detach().abs().unique().tolist()) == {1.0}


def test_every_weight_bearing_kind_is_converted_and_what_stays_float_is_reported():
    m = _gpt2()
    with pytest.raises(ValueError, match=r"strict=True.*model\.transformer\.wpe\.weight 16x16"):
        quantize_(m, "binary_connect", strict=True)
    assert type(m.model.lm_head) is nn.Linear  # strict leaves the model as it was
    quantize_(m, "binary_connect", strict=True, embeddings=True)
    assert quantization_report(m).float_tensors == []
    quantize_(m2 := _gpt2(), "binary_connect", skip=["model.transformer.wpe",
                                                     "model.transformer.wte"], strict=True)
    assert type(m2.model.transformer.wpe) is nn.Embedding
    # attention: every projection, in_proj_weight included; Conv1d
    enc = Encoder()
    quantize_(enc, "binary_connect", strict=True)
    attn = enc.enc.layers[0].self_attn
    assert type(attn).__name__ == "QuantMultiheadAttention"
    assert type(attn.out_proj) is QuantLinear_ and attn.weight_quantizer is not None
    net = quantize_(Conv1dNet(), "binary_connect", strict=True)
    assert type(net.c1).__name__ == "QuantConv1d"


def test_quantized_attention_computes_torch_attention_on_the_quantized_projections():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True).eval()
    q = quantize_(nn.Sequential(copy.deepcopy(ref)), "binary_weight", strict=True)[0]
    with torch.no_grad():  # the independent form: torch's layer holding quantized weights
        for w in (ref.in_proj_weight, ref.out_proj.weight):
            w.copy_(w.sign() * w.abs().mean(1, keepdim=True))
    x, kv = torch.rand(2, 5, 8), torch.rand(2, 3, 8)
    mask = torch.tensor([[False, False, True], [False, False, False]])
    for args in ((x, x, x), (x, kv, kv)):
        want = ref(*args, key_padding_mask=mask if args[1] is kv else None)
        got = q(*args, key_padding_mask=mask if args[1] is kv else None)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("skip", [[], ["self_attn"]])
def test_no_fused_fast_path_runs_around_a_quantizer(skip):
    """nn.TransformerEncoderLayer in eval under no_grad / inference_mode ran its fused path
    on the float linear1/linear2 weights."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(enc, "binary_connect", skip=[f"layers.{i}.{s}" for i in (0, 1) for s in skip])
    x = torch.rand(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    want = enc(x, src_key_padding_mask=pad).detach()  # grad enabled: PyTorch's plain path
    with torch.no_grad():
        assert torch.equal(enc(x, src_key_padding_mask=pad), want)
    with torch.inference_mode():
        assert torch.equal(enc(x, src_key_padding_mask=pad), want)


def test_grids_start_from_the_weights_and_the_zoo_keeps_the_seed():
    from fewbits.models import create_model

    torch.manual_seed(0)
    for fam in ("fp_connect", "fp_net", "pow2_connect"):
        net = quantize_(MobileNetish(), fam)
        for lname, layer in quant_layers(net):
            w = layer.quantized_weight().detach()
            assert float((w == 0).float().mean()) < 0.5, (fam, lname)  # was 97 % zeros
    fc = nn.Linear(784, 10)
    q = quantize_(nn.Sequential(fc), "fp_connect")[0].weight_quantizer
    assert q.delta == 2.0 ** math.ceil(math.log2(float(fc.weight.detach().abs().max()) / 127))
    with pytest.warns(UserWarning, match=r"0: 8\d% of its quantized weights are 0"):
        quantize_(nn.Sequential(nn.Linear(784, 10)), family_config("fp_connect", delta=2**-4))
    # the zoo and the seed command keep the seed's grid
    assert create_model("cifar10_fp_connect_resnet23_prediction").stem.weight_quantizer.delta \
        == 2**-4
    assert create_model("mnist_pow2_net_lenet").conv1.weight_quantizer.m == 1
    # a state dict saved before the grid was state still loads (the quantizer keeps its own)
    z = create_model("mnist_fp_connect_lenet")
    sd = {k: v for k, v in z.state_dict().items() if not k.endswith("_extra_state")}
    z.load_state_dict(sd)
    assert z.conv1.weight_quantizer.delta == 2**-7


def test_a_zoo_float_net_converts_like_any_net_and_the_raw_input_stays_float():
    from fewbits.models import create_model

    z = quantize_(create_model("mnist_float_lenet"), "fp_net")
    assert z.conv1.weight_quantizer.name == "fixed_point" and z.conv1.input_quantizer is None
    assert z.conv2.input_quantizer.name == "fixed_point"
    plain = quantize_(ViewNet(), "fp_net")
    assert plain.conv.input_quantizer is None and plain.fc.input_quantizer is not None
    assert quantize_(ViewNet(), "fp_net", quantize_input=True).conv.input_quantizer is not None
    # sequence models start with an embedding: every layer reads activations
    g = quantize_(_gpt2(), "fp_net", embeddings=True)
    assert g.model.transformer.h[0].attn.c_attn.input_quantizer is not None
    assert g.model.transformer.wte.weight_quantizer is not None


def test_each_new_layer_kind_without_quantizers_is_its_torch_layer_and_to_float_inverts():
    from fewbits.layer_kinds import layer_kind

    torch.manual_seed(0)
    hf = transformers.pytorch_utils.Conv1D(5, 3)
    cases = [(nn.Conv1d(3, 4, 3, padding=2, dilation=2, groups=1), (torch.randn(2, 3, 7),)),
             (nn.Embedding(10, 4, padding_idx=0), (torch.tensor([[0, 3, 9]]),)),
             (hf, (torch.randn(2, 4, 3),)),
             (nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True),
              (torch.randn(2, 5, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)))]
    for m, args in cases:
        cls = layer_kind(m).quant_type
        q = cls.from_float(copy.deepcopy(m))
        assert isinstance(q, type(m)) or type(m) is type(hf)
        out, want = q(*args), m(*args)
        for o, w in zip(*(x if isinstance(x, tuple) else (x,) for x in (out, want)),
                        strict=True):
            assert torch.equal(o, w), cls.__name__
        q = cls.from_float(copy.deepcopy(m), weight_quantizer="binary_connect")
        back = q.to_float()
        assert type(back) is type(m)
        got = back(*args)
        assert torch.equal(got[0] if isinstance(got, tuple) else got,
                           q(*args)[0] if isinstance(got, tuple) else q(*args))
        assert set(back.state_dict()) == set(m.state_dict())


class RootWeight(nn.Module):
    """A head kept as the model's own nn.Parameter and applied with F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        return nn.functional.linear(torch.relu(self.fc(x)), self.w)


def test_a_float_tensor_the_report_names_can_be_named_in_skip():
    """The report says of a root nn.Parameter 'name them in skip=', but skip=['w'] was refused
    ('matches no weight-bearing layer'), so strict=True could never pass on such a model."""
    with pytest.raises(ValueError, match=r"w 3x8 \(RootWeight is not converted\)"):
        quantize_(RootWeight(), "binary_connect", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unreported
        m = quantize_(RootWeight(), "binary_connect", skip=["w"], strict=True)
    assert type(m.fc) is QuantLinear_
    with pytest.raises(ValueError, match="match no weight-bearing layer"):
        quantize_(RootWeight(), "binary_connect", skip=["v"])
