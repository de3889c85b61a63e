"""HuggingFace transformers round trip (issue 21, item 7): a model quantized with fewbits saves
with save_pretrained and comes back from from_pretrained quantized, with identical logits and
quantizer state, for all nine families (tiny random configs, offline)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from fewbits.convert import family_config  # noqa: E402
from fewbits.hf import FewbitsConfig, quantize_hf  # noqa: E402
from fewbits.layers import QuantLayer, quant_layers  # noqa: E402
from fewbits.models import FAMILIES  # noqa: E402


def bert():
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=24,
                                  max_position_embeddings=16)
    return transformers.BertForSequenceClassification(cfg), torch.randint(0, 40, (2, 7))


def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=24, num_labels=3)
    return transformers.ViTForImageClassification(cfg), torch.randn(2, 3, 8, 8)


def gpt2():
    # lm_head.weight is transformer.wte.weight (tied): the tie must survive the round trip
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1,
                                  n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), torch.randint(0, 40, (2, 7))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _two_steps_then_logits(model, x):
    """Two SGD steps (learned ranges and INQ state move away from their start), then the eval
    logits."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).logits.square().sum().backward()
        opt.step()
    return _logits(model.eval(), x)


def _config(family):
    # INQ fixes weights at iterations 1 and 2, so that the saved model holds fixed weights
    return family_config(family, inq_iterations=[1, 2]) if family == "inq" else family


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("make", [bert, vit, gpt2], ids=["bert", "vit", "gpt2"])
def test_save_pretrained_from_pretrained_round_trip(make, family, tmp_path):
    torch.manual_seed(0)
    model, x = make()
    quantize_hf(model, _config(family))
    want = _two_steps_then_logits(model, x)
    model.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()
    assert isinstance(back.config.quantization_config, FewbitsConfig)
    layers = dict(quant_layers(back))
    assert layers.keys() == dict(quant_layers(model)).keys() and layers
    assert all(isinstance(m, QuantLayer) for m in layers.values())
    torch.testing.assert_close(_logits(back, x), want, rtol=0, atol=0)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    if make is gpt2:
        assert back.lm_head.weight is back.transformer.wte.weight
    if family == "inq":
        q = dict(quant_layers(back))["lm_head" if make is gpt2 else "classifier"].weight_quantizer
        assert q.counter == 2 and 0 < q.fixed_fraction  # the schedule comes back too


def test_quantize_hf_refuses_what_config_json_cannot_hold():
    model, _ = bert()
    with pytest.raises(TypeError, match="JSON-able"):
        quantize_hf(model, lambda name, m: "binary_connect")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        quantize_hf(torch.nn.Linear(2, 2), "binary_connect")


@pytest.mark.parametrize("family", ["inq", "fp_net", "lsq"])
def test_plain_quantize_on_a_transformers_model_saves_quantized(family, tmp_path):
    # a user's habit: fewbits.quantize_ (not quantize_hf), then save_pretrained. Before, the
    # model came back float from from_pretrained (quantizer state dropped as unexpected keys,
    # INQ's counter not even written: safetensors holds tensors only)
    from fewbits import quantize_

    torch.manual_seed(0)
    model, x = bert()
    quantize_(model, _config(family))
    assert model.config.quantization_config == {"quant_method": "fewbits",
                                                "config": _config(family), "skip": []}
    want = _two_steps_then_logits(model, x)
    model.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()
    assert dict(quant_layers(back)).keys() == dict(quant_layers(model)).keys()
    torch.testing.assert_close(_logits(back, x), want, rtol=0, atol=0)
    if family == "inq":
        assert dict(quant_layers(back))["classifier"].weight_quantizer.counter == 2


def test_plain_quantize_with_a_callable_config_warns_that_config_json_cannot_hold_it():
    from fewbits import quantize_

    model, _ = bert()
    with pytest.warns(UserWarning, match="callable config cannot be written to config.json"):
        quantize_(model, lambda name, m: "binary_connect")
    assert getattr(model.config, "quantization_config", None) is None


def _two_calls(model):
    from fewbits import quantize_

    quantize_(model, "binary_net", skip=["classifier"])
    quantize_(model, "ternary")  # the classifier only: the rest is binary_net already


def _hf_then_plain(model):
    from fewbits import quantize_

    quantize_hf(model, "binary_net", skip=["classifier"])
    quantize_(model, "ternary")


def _plain_then_hf(model):
    from fewbits import quantize_

    quantize_(model, "binary_net", skip=["classifier"])
    quantize_hf(model, "ternary")


def _embeddings(model):
    from fewbits import quantize_

    quantize_(model, "binary_net", embeddings=True)


@pytest.mark.parametrize("convert", [_embeddings, _two_calls, _hf_then_plain, _plain_then_hf])
def test_what_quantize_did_comes_back_from_pretrained(convert, tmp_path):
    # before, the record held the last call's config and skip only, and no embeddings=True:
    # from_pretrained rebuilt the embeddings float, or every layer with the last family
    torch.manual_seed(0)
    model, x = bert()
    convert(model)
    model.eval()
    model.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()

    def families(m):
        return {n: type(q.weight_quantizer).__name__ for n, q in quant_layers(m)}
    assert families(back) == families(model)
    torch.testing.assert_close(_logits(back, x), _logits(model, x), rtol=0, atol=0)

    def record(m):  # a dict or a FewbitsConfig, as transformers or fewbits left it
        rec = m.config.quantization_config
        rec = rec if isinstance(rec, dict) else rec.to_dict()
        return FewbitsConfig(**{k: v for k, v in rec.items() if k != "quant_method"}).to_dict()
    assert record(back) == record(model)
    assert ("then" in record(model)) == (convert is not _embeddings)
