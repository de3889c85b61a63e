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
