"""Packed export: every family round-trips to identical logits; sizes follow the bit widths;
damaged files are refused with the file's name."""

from __future__ import annotations

import math

import pytest
import torch

from fewbits.export import FormatError, export_packed, load_packed, packed_info
from fewbits.models import FAMILIES, create_model

FAMILY_BITS = {"binary_connect": 1, "binary_net": 1, "binary_weight": 1, "fp_connect": 8,
               "fp_net": 8, "pow2_connect": 8, "pow2_net": 8, "inq": 4, "min_max": 8,
               "ternary": 2, "lsq": 4}


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_every_family_round_trips_to_identical_logits(fam, tmp_path, trained):
    m = trained(f"mnist_{fam}_lenet", batch=8, steps=3, width=32)
    report = export_packed(m, tmp_path / "m.fewbits")
    back = load_packed(tmp_path / "m.fewbits")
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    if fam == "float":
        assert report.quantized == []
        return
    bits = FAMILY_BITS[fam]
    for e in report.quantized:
        assert e.bits == bits
        # packed codes take ceil(count * bits / 8) bytes; side parameters (a float32 scale per
        # output channel at most, here <= 64 channels, plus a few scalars) come on top
        # ternary codes 0..2 go five to a byte (1.6 bits) instead of four
        side = e.nbytes - (math.ceil(e.count / 5) if fam == "ternary" else
                           math.ceil(e.count * bits / 8))
        assert 0 <= side <= 4 * 64 + 24
    assert report.ratio > 1.0
    # the info read from the file agrees with the export report
    info = packed_info(tmp_path / "m.fewbits")
    assert info.file_bytes == report.file_bytes
    assert [(e.name, e.nbytes) for e in info.quantized] == [
        (e.name, e.nbytes) for e in report.quantized]


def test_binary_resnet_weights_take_one_bit(tmp_path):
    m = create_model("cifar10_binary_connect_resnet23_prediction").eval()
    r = export_packed(m, tmp_path / "b.fewbits")
    assert r.bits_per_weight == 1.0
    n = sum(e.count for e in r.quantized)
    assert n == 97_482 - 2 * (64 + 7 * 128) - 10  # every conv/fc weight, not BN, not fc bias
    assert r.ratio > 10


def test_entropy_coding_goes_below_the_fixed_width(tmp_path, trained):
    m = trained("mnist_fp_connect_lenet", batch=8, steps=3, width=32)
    fixed = export_packed(m, tmp_path / "a.fewbits")
    huff = export_packed(m, tmp_path / "b.fewbits", entropy=True)
    assert huff.bits_per_weight < fixed.bits_per_weight == 8.0
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(load_packed(tmp_path / "b.fewbits")(x), m(x))


def test_float16_batch_norm_is_smaller_and_keeps_predictions(tmp_path, trained):
    m = trained("mnist_binary_weight_lenet", batch=8, steps=3, width=32)
    a = export_packed(m, tmp_path / "a.fewbits")
    b = export_packed(m, tmp_path / "b.fewbits", bn="float16")
    assert b.file_bytes < a.file_bytes
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        ref, got = m(x), load_packed(tmp_path / "b.fewbits")(x)
    assert (ref.argmax(1) == got.argmax(1)).float().mean() >= 0.95
    assert torch.allclose(ref, got, atol=0.05, rtol=0.05)


def test_unfinished_inq_schedule_is_refused(tmp_path):
    m = create_model("mnist_inq_lenet", width=8)
    with pytest.raises(ValueError, match="still learnable"):
        export_packed(m, tmp_path / "x.fewbits")


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:-100], "truncated"),
    (lambda b: b[:200] + bytes([b[200] ^ 0x40]) + b[201:], "checksum"),
    (lambda b: b"NOTFEWBI" + b[8:], "not a .fewbits file"),
    (lambda b: b[:8] + b"\x07\x00" + b[10:], "version 7"),
])
def test_damaged_files_are_refused_naming_the_file(tmp_path, damage, match):
    path = tmp_path / "m.fewbits"
    export_packed(create_model("mnist_binary_connect_mlp", width=8), path)
    bad = tmp_path / "bad.fewbits"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(FormatError, match=match) as err:
        load_packed(bad)
    assert "bad.fewbits" in str(err.value)


def test_a_model_outside_the_registry_exports_and_loads_into_an_instance(tmp_path):
    # Before issue 10 this was refused ("register your model"); any model exports now, and
    # loading it needs the instance, since the file names a class it never imports.
    m = torch.nn.Linear(2, 2)
    export_packed(m, tmp_path / "x.fewbits")
    with pytest.raises(FormatError, match=r"torch\.nn\.modules\.linear\.Linear.*model="):
        load_packed(tmp_path / "x.fewbits")
    back = load_packed(tmp_path / "x.fewbits", model=torch.nn.Linear(2, 2))
    x = torch.rand(3, 2)
    assert torch.equal(back(x), m(x))


def _ternary_resnet_with_bn_stats() -> torch.nn.Module:
    """The zoo's ternary ResNet-23 with batch norms that fold visibly: random gammas (about
    half negative: their channels' trits are negated), biases and running statistics."""
    torch.manual_seed(0)
    m = create_model("cifar10_ternary_resnet23_prediction")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.copy_(torch.randn_like(mod.weight))
                mod.bias.copy_(0.1 * torch.randn_like(mod.bias))
                mod.running_mean.copy_(0.1 * torch.randn_like(mod.running_mean))
                mod.running_var.copy_(torch.rand_like(mod.running_var) + 0.05)
    return m.eval()


def test_ternary_resnet_folds_batch_norm_into_its_scales(tmp_path):
    """bn='folded': each batch norm goes into the ternary per-channel scale before it (trits
    negated for a negative gamma) and only its bias is stored; the zoo's ternary ResNet-23
    file shrinks from 10.0x to 14.1x smaller than fp32 (measured: 39824 -> 28152 bytes; 13.9x
    in format version 1, whose stored offsets and 8-byte alignment cost 488 bytes), and the
    logits agree to float32 rounding (FOLD_RTOL of their size)."""
    from fewbits.export.container import read_container, write_container
    from fewbits.export.fold import FOLD_RTOL

    m = _ternary_resnet_with_bn_stats()
    plain = export_packed(m, tmp_path / "a.fewbits")
    folded = export_packed(m, tmp_path / "b.fewbits", bn="folded")
    assert folded.fp32_bytes == plain.fp32_bytes
    # per folded channel 8 bytes (scale, bias) instead of 20 (scale, 4 batch-norm values)
    assert plain.file_bytes - folded.file_bytes >= 12 * (64 + 7 * 128) - 300
    assert folded.ratio >= 14 and plain.ratio < 10  # issue 25: at least 14x
    assert packed_info(tmp_path / "b.fewbits").ratio == pytest.approx(folded.ratio)
    # the float32 file's network computes m's logits bit for bit (the round-trip test above)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        ref, got = load_packed(tmp_path / "a.fewbits")(x), load_packed(tmp_path / "b.fewbits")(x)
    assert torch.equal(ref.argmax(1), got.argmax(1))
    assert (ref - got).abs().max() <= 50 * FOLD_RTOL * ref.abs().max()
    # a file folding a module that is no batch norm is refused, not run as something else
    header, blobs = read_container(tmp_path / "b.fewbits")
    header["options"]["folded_bn"][0] = "units.0.conv1"
    write_container(tmp_path / "c.fewbits", header, blobs, compress_header=True)
    with pytest.raises(FormatError, match="not an affine batch norm"):
        load_packed(tmp_path / "c.fewbits")


def test_batch_norm_folding_is_refused_where_the_family_cannot_hold_it(tmp_path):
    # LSQ's one step per tensor cannot take a factor per channel: nothing to fold
    with pytest.raises(ValueError, match="folded"):
        export_packed(create_model("mnist_lsq_lenet", width=8).eval(), tmp_path / "x.fewbits",
                      bn="folded")
