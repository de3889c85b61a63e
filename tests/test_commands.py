"""CLI glue: ``fewbits export`` / ``fewbits info`` argument handling, messages and files, and the
evaluation of a ``.fewbits`` file on uint8 images."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fewbits.checkpoint import model_file_payload, save_file
from fewbits.export import export_packed, load_packed
from fewbits.export.commands import (
    add_export_arguments,
    add_info_arguments,
    evaluate_packed,
    run_export,
    run_info,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_dir(tmp_path, trained):
    """A run folder holding a trained model file, as training writes it."""
    model = trained("mnist_fp_net_lenet", width=16)
    run = tmp_path / "run"
    run.mkdir()
    save_file(run / "model_final.pt", model_file_payload(model))
    return run, model


def _export(*argv):
    return add_export_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


def test_export_writes_packed_and_onnx_and_prints_the_report(run_dir, tmp_path, capsys):
    run, model = run_dir
    rc = run_export(_export(run, "-o", tmp_path / "m.fewbits", "--entropy",
                            "--onnx", tmp_path / "m.onnx"))
    out = capsys.readouterr().out
    assert rc == 0
    assert (tmp_path / "m.fewbits").is_file() and (tmp_path / "m.onnx").is_file()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "m.fewbits")(x), model(x))
    assert "bits per quantized weight" in out and "smaller" in out
    assert "QuantizeLinear" in out
    assert "top-1 agreement" in out


def test_export_onnx_from_a_packed_file_but_not_a_new_packed_file(run_dir, tmp_path, capsys):
    _, model = run_dir
    export_packed(model, tmp_path / "m.fewbits")
    assert run_export(_export(tmp_path / "m.fewbits", "--onnx", tmp_path / "m.onnx",
                              "--no-check")) == 0
    assert (tmp_path / "m.onnx").is_file()
    rc = run_export(_export(tmp_path / "m.fewbits", "-o", tmp_path / "again.fewbits"))
    assert rc == 1 and "already a packed model" in capsys.readouterr().err


def test_export_refuses_missing_inputs_and_empty_requests(run_dir, tmp_path, capsys):
    run, _ = run_dir
    assert run_export(_export(run)) == 1
    assert "nothing to write" in capsys.readouterr().err
    assert run_export(_export(tmp_path / "nope", "-o", tmp_path / "m.fewbits")) == 1
    assert "nope: no such run folder" in capsys.readouterr().err
    (run / "model_final.pt").write_bytes(b"garbage")  # a damaged model file: named, no trace
    assert run_export(_export(run, "-o", tmp_path / "m.fewbits")) == 1
    assert "model_final.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects an unknown batch-norm storage
        _export(run, "-o", "x.fewbits", "--bn", "int8")


def test_info_prints_table_and_json(run_dir, tmp_path, capsys):
    _, model = run_dir
    rep = export_packed(model, tmp_path / "m.fewbits")
    parser = add_info_arguments(argparse.ArgumentParser())
    assert run_info(parser.parse_args([str(tmp_path / "m.fewbits")])) == 0
    out = capsys.readouterr().out
    assert "conv1.weight" in out and f"{rep.file_bytes:,} bytes" in out
    assert run_info(parser.parse_args([str(tmp_path / "m.fewbits"), "--json"])) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file_bytes"] == rep.file_bytes
    assert info["bits_per_weight"] == pytest.approx(8.0)
    assert {t["name"] for t in info["tensors"]} >= {"conv1.weight", "fc2.bias"}


def test_info_refuses_damaged_and_missing_files(tmp_path, capsys):
    bad = tmp_path / "bad.fewbits"
    bad.write_bytes(b"not a fewbits file at all")
    parser = add_info_arguments(argparse.ArgumentParser())
    assert run_info(parser.parse_args([str(bad)])) == 1
    assert "bad.fewbits" in capsys.readouterr().err
    assert run_info(parser.parse_args([str(tmp_path / "none.fewbits")])) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("fam", ["fp_net", "min_max", "binary_connect"])
def test_evaluate_packed_reproduces_the_model(fam, tmp_path, trained):
    model = trained(f"mnist_{fam}_lenet", width=16)
    export_packed(model, tmp_path / "m.fewbits")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        pred = model(images.float() / 255).argmax(1)
    labels = torch.where(torch.arange(100) < 70, pred, (pred + 1) % 10)  # 70% right
    res = evaluate_packed(tmp_path / "m.fewbits", images, labels, batch_size=32)
    assert res["top1"] == pytest.approx(0.70) and res["error"] == pytest.approx(0.30)
    assert res["n"] == res["total"] == 100 and res["images_per_s"] > 0
    assert res["fast_path"] is None and res["accuracy"] == res["top1"]
    fast = evaluate_packed(tmp_path / "m.fewbits", images, labels, batch_size=32, fast=True)
    # the fastest backend within tolerance; the integer nets never stay in PyTorch
    assert fast["fast_path"] in (("ort", "torch") if fam == "binary_connect"
                                 else ("ort", "ort-checked"))
    assert abs(fast["top1"] - 0.70) <= 0.01


def test_evaluate_packed_checks_its_inputs(run_dir, tmp_path):
    _, model = run_dir
    export_packed(model, tmp_path / "m.fewbits")
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        evaluate_packed(tmp_path / "m.fewbits", x.float(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        evaluate_packed(tmp_path / "m.fewbits", x, torch.zeros(3, dtype=torch.long))


def test_export_fold_bn_writes_an_engine_file(tmp_path, capsys, trained):
    from fewbits.runtime.binary_file import load_engine

    model = trained("mnist_binary_net_mlp", width=32, depth=1)
    run = tmp_path / "run"
    run.mkdir()
    save_file(run / "model_final.pt", model_file_payload(model))
    assert run_export(_export(run, "-o", tmp_path / "b.fewbits", "--fold-bn")) == 0
    assert "folded" in capsys.readouterr().out
    x = torch.randint(0, 256, (4, 1, 28, 28)).float() / 256  # exact stem sums in any order
    with torch.no_grad():
        torch.testing.assert_close(load_engine(tmp_path / "b.fewbits")(x), model(x))


def test_export_fold_bn_refuses_other_families(run_dir, tmp_path, capsys):
    run, _ = run_dir  # an fp_net LeNet
    assert run_export(_export(run, "-o", tmp_path / "m.fewbits", "--fold-bn")) == 1
    assert "binary_net models only" in capsys.readouterr().err
