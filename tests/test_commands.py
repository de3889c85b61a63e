"""``fewbits export`` / ``fewbits info`` (fewbits.cli.export_cmd): argument handling, messages,
exit codes and files; and the evaluation of a ``.fewbits`` file (fewbits.cli.evaluate_packed)."""

from __future__ import annotations

import builtins
import json
import os

import pytest
import torch

from fewbits.checkpoint import model_file_payload, save_file
from fewbits.cli import evaluate_packed, main
from fewbits.data import ArrayDataset
from fewbits.export import FormatError, export_packed, load_packed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_dir(tmp_path, trained):
    """A run folder holding a trained model file, as training writes it."""
    model = trained("mnist_fp_net_lenet", width=16)
    run = tmp_path / "run"
    run.mkdir()
    save_file(run / "model_final.pt", model_file_payload(model))
    return run, model


def _export(*argv) -> int:
    return main(["export", *(str(a) for a in argv)])


def _info(*argv) -> int:
    return main(["info", *(str(a) for a in argv)])


def _error(capsys) -> str:
    """stderr of the last command, which must be one ``fewbits: error:`` line."""
    err = capsys.readouterr().err
    assert err.startswith("fewbits: error: ") and err.count("\n") == 1, err
    return err


def test_export_writes_packed_and_onnx_and_prints_the_report(run_dir, tmp_path, capsys):
    run, model = run_dir
    rc = _export(run, "-o", tmp_path / "m.fewbits", "--entropy", "--onnx", tmp_path / "m.onnx")
    out = capsys.readouterr().out
    assert rc == 0
    assert (tmp_path / "m.fewbits").is_file() and (tmp_path / "m.onnx").is_file()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "m.fewbits")(x), model(x))
    assert "bits per quantized weight" in out and "smaller" in out
    assert "FixedPoint levels as float constants" in out and "Round" in out  # exact form
    assert "top-1 agreement 100.0%, max |logit difference| 0 " in out
    rc = _export(run, "--onnx", tmp_path / "f.onnx", "--fuse")  # the fused QDQ form
    assert rc == 0 and "QuantizeLinear" in capsys.readouterr().out


def test_export_onnx_from_a_packed_file_but_not_a_new_packed_file(run_dir, tmp_path, capsys):
    _, model = run_dir
    export_packed(model, tmp_path / "m.fewbits")
    assert _export(tmp_path / "m.fewbits", "--onnx", tmp_path / "m.onnx", "--no-check") == 0
    assert (tmp_path / "m.onnx").is_file()
    capsys.readouterr()
    assert _export(tmp_path / "m.fewbits", "-o", tmp_path / "again.fewbits") == 2  # an option
    assert "already a packed model" in _error(capsys)


def test_export_refuses_missing_inputs_and_empty_requests(run_dir, tmp_path, capsys):
    run, _ = run_dir
    assert _export(run) == 2  # a usage error, as argparse's
    assert "nothing to write" in _error(capsys)
    assert _export(tmp_path / "nope", "-o", tmp_path / "m.fewbits") == 1  # an unusable file
    assert "nope: no such run folder" in _error(capsys)
    (run / "model_final.pt").write_bytes(b"garbage")  # a damaged model file: named, no trace
    assert _export(run, "-o", tmp_path / "m.fewbits") == 1
    assert "model_final.pt" in _error(capsys)
    assert _export(run, "-o", tmp_path / "m.fewbits", "--model", "no_such_mod_x:net") == 2
    assert "--model: cannot import module 'no_such_mod_x'" in _error(capsys)
    with pytest.raises(SystemExit):  # argparse rejects an unknown batch-norm storage
        _export(run, "-o", "x.fewbits", "--bn", "int8")


def test_info_prints_table_and_json(run_dir, tmp_path, capsys):
    _, model = run_dir
    rep = export_packed(model, tmp_path / "m.fewbits")
    assert _info(tmp_path / "m.fewbits") == 0
    out = capsys.readouterr().out
    assert "conv1.weight" in out and f"{rep.file_bytes:,} bytes" in out
    assert _info(tmp_path / "m.fewbits", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file_bytes"] == rep.file_bytes
    assert info["bits_per_weight"] == pytest.approx(8.0)
    assert {t["name"] for t in info["tensors"]} >= {"conv1.weight", "fc2.bias"}


def test_info_refuses_damaged_and_missing_files(tmp_path, capsys):
    bad = tmp_path / "bad.fewbits"
    bad.write_bytes(b"not a fewbits file at all")
    assert _info(bad) == 1
    assert "bad.fewbits" in _error(capsys)
    assert _info(tmp_path / "none.fewbits") == 1
    assert "no such file" in _error(capsys)


def _digits_like(images: torch.Tensor, labels: torch.Tensor) -> ArrayDataset:
    return ArrayDataset(images, labels, tuple(str(i) for i in range(10)), "random")


@pytest.mark.parametrize("fam", ["fp_net", "min_max", "binary_connect"])
def test_evaluate_packed_reproduces_the_model(fam, tmp_path, trained):
    model = trained(f"mnist_{fam}_lenet", width=16)
    export_packed(model, tmp_path / "m.fewbits")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        pred = model(images.float() / 255).argmax(1)
    labels = torch.where(torch.arange(100) < 70, pred, (pred + 1) % 10)  # 70% right
    ds = _digits_like(images, labels)
    res = evaluate_packed(tmp_path / "m.fewbits", ds, batch_size=32)
    assert (res.wrong, res.total) == (30, 100) and res.error == 0.3 and res.accuracy == 0.7
    assert res.images_per_second > 0 and res.fast_path is None
    assert res.net == f"mnist_{fam}_lenet" and res.file == str(tmp_path / "m.fewbits")
    assert res.dataset == "random"
    opened = []
    real_open = builtins.open

    def counting_open(f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            opened.append(os.fspath(f))
        return real_open(f, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", counting_open)
        fast = evaluate_packed(tmp_path / "m.fewbits", ds, batch_size=32, fast=True)
    # the file is read once, whatever number of backends is tried (13 times before)
    assert opened.count(str(tmp_path / "m.fewbits")) == 1
    # the fastest backend within tolerance; the integer nets never stay in PyTorch
    assert fast.fast_path in (("ort", "ort-plain", "torch") if fam == "binary_connect"
                              else ("ort", "ort-checked", "ort-plain", "int"))
    assert abs(fast.wrong - 30) <= 1


def test_evaluate_packed_checks_its_inputs(run_dir, tmp_path):
    _, model = run_dir
    export_packed(model, tmp_path / "m.fewbits")
    ds = _digits_like(torch.zeros(4, 1, 28, 28, dtype=torch.uint8),
                      torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_packed(tmp_path / "m.fewbits", ds, batch_size=0)
    (tmp_path / "bad.fewbits").write_bytes(b"not a fewbits file at all")
    with pytest.raises(FormatError, match="bad.fewbits"):
        evaluate_packed(tmp_path / "bad.fewbits", ds)


def test_export_fold_bn_writes_an_engine_file(tmp_path, capsys, trained):
    from fewbits.runtime.binary_file import load_engine

    model = trained("mnist_binary_net_mlp", width=32, depth=1)
    run = tmp_path / "run"
    run.mkdir()
    save_file(run / "model_final.pt", model_file_payload(model))
    assert _export(run, "-o", tmp_path / "b.fewbits", "--fold-bn") == 0
    assert "folded" in capsys.readouterr().out
    x = torch.randint(0, 256, (4, 1, 28, 28)).float() / 256  # exact stem sums in any order
    with torch.no_grad():
        torch.testing.assert_close(load_engine(tmp_path / "b.fewbits")(x), model(x))


def test_export_fold_bn_refuses_other_families(run_dir, tmp_path, capsys):
    run, _ = run_dir  # an fp_net LeNet
    capsys.readouterr()
    assert _export(run, "-o", tmp_path / "m.fewbits", "--fold-bn") == 1
    assert "binary_net models only" in _error(capsys)


def test_eval_recognises_a_packed_file_by_content_whatever_its_name(tmp_path, capsys):
    from fewbits.export import export_packed
    from fewbits.models import create_model

    path = tmp_path / "model.bin"  # renamed: no .fewbits suffix
    export_packed(create_model("mnist_binary_connect_mlp", width=16, depth=1), path)
    assert main(["eval", str(path), "--dataset", "synthetic", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["net"] == "mnist_binary_connect_mlp" and out["total"] > 0
