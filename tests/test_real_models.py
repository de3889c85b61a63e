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
import os
import warnings

import pytest
import torch
from torch import nn

from fewbits import family_config, quantize_
from fewbits.convert import quantization_report
from fewbits.export import export_packed, load_packed, packed_info
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
    c = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
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
COMPILED = [("encoder", "binary_connect"), ("mobilenet", "pow2_net"), ("shared", "inq"),
            ("conv1d", "binary_weight"), ("view", "min_max")]


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
