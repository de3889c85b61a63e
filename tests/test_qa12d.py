"""QA 12d: a GPT-2 whose tied embedding / lm_head is quantized (``embeddings=True``) with a
family whose weight quantizer has state (min_max ranges, LSQ step, INQ masks) came back from
``from_pretrained`` with lm_head's quantizer freshly initialised: save_pretrained stores the
shared quantizer once (under the embedding), and the reload built two. Logits were silently
wrong (INQ: NaN). The reloaded tied layers must share the one loaded quantizer again."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import fewbits  # noqa: E402
import fewbits.hf  # noqa: E402  (registers the quantizer with transformers)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1,
                                  n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("family", ["min_max", "lsq", "inq"])
def test_tied_quantized_embedding_round_trips(tmp_path, family):
    model = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fewbits.quantize_(model, family, embeddings=True)
    x = torch.randint(0, 40, (3, 7))
    model.train()
    with torch.no_grad():
        model(input_ids=x)  # LSQ initialises its step on the first batch
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight is back.transformer.wte.weight
    assert back.lm_head.weight_quantizer is back.transformer.wte.weight_quantizer
    with torch.no_grad():
        out = back(input_ids=x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_the_load_report_does_not_call_the_tied_quantizer_missing(tmp_path):
    # transformers' load report listed lm_head.weight_quantizer.* as MISSING ("newly
    # initialized") although share_tied_quantizers gives lm_head the loaded one
    model = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fewbits.quantize_(model, "min_max", embeddings=True)
    model.save_pretrained(tmp_path)
    _, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not [k for k in info["missing_keys"] if "quantizer" in k]
    # a quantizer state really missing from the file is still reported
    from safetensors.torch import load_file, save_file
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    gone = [k for k in sd if k.startswith("transformer.wte.weight_quantizer.")]
    assert gone
    save_file({k: v for k, v in sd.items() if k not in gone}, f, metadata={"format": "pt"})
    _, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert set(gone) <= set(info["missing_keys"])
