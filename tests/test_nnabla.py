"""fewbits.nnabla / ``fewbits import-nnabla``: NNabla's parameter files of all ten networks of its
quantization example load with the logits of an independent NumPy model of NNabla's kernels
(tests/nnabla_ref.py), export and run packed, resume as runs; every mismatch is an error."""

from __future__ import annotations

import zipfile

import h5py
import nnabla_ref as ref
import numpy as np
import pytest
import torch
from torch import nn

from fewbits.cli import main
from fewbits.export import load_packed
from fewbits.models import create_model
from fewbits.models.nets import NNablaBatchNorm2d
from fewbits.nnabla import (
    NNablaImportError,
    decode_parameter_protobuf,
    expected_parameters,
    load_parameters,
    read_parameters,
)

BATCH = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def _images(family: str, seed: int = 1) -> np.ndarray:
    """Real-size uint8 images. Nets that quantize activations get images of 0 and 255 only, so
    that the stem's sums are exact in float32 whatever their order (a sum that differs in the
    last bit could cross a grid boundary in one implementation and not the other)."""
    rng = np.random.default_rng(seed)
    if family in ("fp_net", "pow2_net", "min_max", "binary_net"):
        return (rng.integers(0, 2, (BATCH, 3, 32, 32)) * 255).astype(np.uint8)
    return rng.integers(0, 256, (BATCH, 3, 32, 32)).astype(np.uint8)


_CACHE: dict[str, tuple] = {}


def _net(family: str):
    """(params, float images, oracle logits) of ``family``, built once."""
    if family not in _CACHE:
        x = _images(family).astype(np.float32) / np.float32(255.0)
        p = ref.make_params(family, x, seed=sum(map(ord, family)))
        _CACHE[family] = (p, x, ref.forward(family, x, p))
    return _CACHE[family]


def _model(family: str, **kw) -> nn.Module:
    return create_model(ref.net_name(family), nnabla=True, **kw).eval()


def _logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """Identical top-1; logits within float32 rounding of summation order (22 layers)."""
    assert (got.argmax(1) == want.argmax(1)).all()
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("family", ref.FAMILIES)
def test_each_network_loads_with_nnabla_logits(family, tmp_path):
    p, x, want = _net(family)
    assert np.isfinite(want).all() and np.abs(want).max() > 0.1
    path = tmp_path / "params_004000.h5"
    ref.write_h5(path, p)
    model = _model(family)
    report = load_parameters(path, model)
    assert report.parameters == len(p.p) and report.family == family
    _close(_logits(model, x), want)
    # the .nnp forms hold the same parameters
    for form in ("h5", "protobuf"):
        (tmp_path / form).mkdir()
        nnp = tmp_path / form / "params_004000.nnp"
        ref.write_nnp(nnp, p, form)
        other = _model(family)
        load_parameters(nnp, other)
        for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, k


def test_file_names_shapes_and_order_are_nnablas():
    """The importer's table agrees with the names written from models.py, in creation order."""
    for family in ref.FAMILIES:
        p, _, _ = _net(family)
        want = {k: a.shape for k, (a, _) in p.p.items()}
        assert expected_parameters(_model(family)) == want
        assert list(expected_parameters(_model(family))) == list(want)


def test_derived_copies_are_checked_and_notes_say_what_nnabla_computed(tmp_path):
    p, _, _ = _net("fp_net")
    report = load_parameters(p.arrays(), _model("fp_net"))
    assert "fp_quantized_affine/b_q" in report.checked
    assert sum(k.endswith("/W_q") for k in report.checked) == 23
    assert any("batch norm follows NNabla" in n for n in report.notes)
    inq = load_parameters(_net("inq")[0].arrays(), _model("inq"))
    assert any("INQ: 4 bits" in n for n in inq.notes)
    mm = load_parameters(_net("min_max")[0].arrays(), _model("min_max"))
    assert any("no bias" in n for n in mm.notes)


def test_nnabla_batch_norm_is_nnablas_order_bit_for_bit():
    """NNabla's test-mode order differs from the folded nn.BatchNorm2d in the last bit; the
    imported nets' module computes NNabla's exactly."""
    rng = np.random.default_rng(3)
    c = 16
    x = rng.standard_normal((8, c, 8, 8)).astype(np.float32) * 3
    beta, gamma = rng.standard_normal(c).astype(np.float32), rng.uniform(0.3, 2, c).astype(
        np.float32)
    mean, var = rng.standard_normal(c).astype(np.float32), rng.uniform(0.1, 3, c).astype(
        np.float32)
    want = ref.batch_norm(x, *(a.reshape(1, c, 1, 1) for a in (beta, gamma, mean, var)))
    outs = []
    for cls in (NNablaBatchNorm2d, nn.BatchNorm2d):
        bn = cls(c).eval()
        with torch.no_grad():
            bn.bias.copy_(torch.from_numpy(beta))
            bn.weight.copy_(torch.from_numpy(gamma))
            bn.running_mean.copy_(torch.from_numpy(mean))
            bn.running_var.copy_(torch.from_numpy(var))
            outs.append(bn(torch.from_numpy(x)).numpy())
    assert np.array_equal(outs[0], want)
    assert not np.array_equal(outs[1], want)  # the folded form: what the fix is for


def test_imported_min_max_has_no_final_bias_and_plain_models_are_refused():
    assert _model("min_max").fc.bias is None
    assert create_model("cifar10_min_max_resnet23_prediction").fewbits_spec["kwargs"][
        "nnabla"] is False
    assert _model("min_max").fewbits_spec["kwargs"]["nnabla"] is True
    assert create_model("cifar10_min_max_resnet23_prediction").fc.bias is not None
    with pytest.raises(NNablaImportError, match="nnabla=True"):
        load_parameters(_net("float")[0].arrays(),
                        create_model("cifar10_resnet23_prediction"))


# ----------------------------------------------------------------------------- errors

def _edit(family, fn):
    p, _, _ = _net(family)
    d = {k: a.copy() for k, a in p.arrays().items()}
    fn(d)
    return d


@pytest.mark.parametrize("family, edit, match", [
    ("float", lambda d: d.pop("conv3/conv2/bn/var"), "missing conv3/conv2/bn/var"),
    ("float", lambda d: d.update({"conv9/conv/W": np.zeros(3, np.float32)}),
     "not in the network: conv9/conv/W"),
    ("float", lambda d: d.update({"affine/W": np.zeros((10, 64), np.float32)}),
     "'affine/W' has shape \\(10, 64\\), the network needs \\(64, 10\\)"),
    ("fp_connect", lambda d: d["conv2/conv1/fp_quantized_conv/W"].reshape(-1).__setitem__(
        5, np.nan), "'conv2/conv1/fp_quantized_conv/W' holds 1 NaN"),
    ("fp_connect", lambda d: d["conv4/conv3/fp_quantized_conv/W_q"].reshape(-1).__setitem__(
        0, 1.0 + d["conv4/conv3/fp_quantized_conv/W_q"].reshape(-1)[0]),
     "stored 'conv4/conv3/fp_quantized_conv/W_q' differs"),
    ("pow2_net", lambda d: d["pow2_quantized_affine/b_q"].__setitem__(0, 3.0),
     "pow2_quantized_affine/b_q' differs"),
    ("binary_connect", lambda d: d["bicon_affine/Wb"].__setitem__((0, 0), -d[
        "bicon_affine/Wb"][0, 0]), "bicon_affine/Wb' differs"),
    ("binary_weight", lambda d: d["conv1/bwn_conv/alpha"].__setitem__(0, 2.0),
     "conv1/bwn_conv/alpha' differs"),
    ("inq", lambda d: d["conv2/conv2/inq_conv/I"].reshape(-1).__setitem__(0, 0.5),
     "'conv2/conv2/inq_conv/I' holds values other than 0 and 1"),
    ("min_max", lambda d: d["conv1/min_max_quantize/ql_max"].fill(127),
     "'conv1/min_max_quantize/ql_max' is 127 .* pass --ql-max 127"),
    ("float", lambda d: d["conv1/bn/var"].reshape(-1).__setitem__(0, -1.0),
     "'conv1/bn/var' has negative"),
])
def test_mismatches_are_errors_naming_the_parameter(family, edit, match):
    with pytest.raises(NNablaImportError, match=match):
        load_parameters(_edit(family, edit), _model(family))


def test_a_file_of_another_family_names_it():
    with pytest.raises(NNablaImportError, match="holds a binary_weight network .*"
                       "cifar10_binary_weight_resnet23_prediction"):
        load_parameters(_net("binary_weight")[0].arrays(), _model("binary_connect"))


def test_other_numerics_show_in_the_derived_copies():
    """A file trained with --delta 2**-4 imported as --delta 2**-5: W_q disagrees."""
    with pytest.raises(NNablaImportError, match="W_q' differs .* --delta"):
        load_parameters(_net("fp_connect")[0].arrays(), _model("fp_connect", delta=2 ** -5))
    r = load_parameters(_net("fp_connect")[0].arrays(), _model("fp_connect", delta=2 ** -5),
                        check_derived=False)
    assert any("differs" in n for n in r.notes)


def test_inq_other_bit_width_is_refused():
    with pytest.raises(NNablaImportError, match="always used 4"):
        load_parameters(_net("inq")[0].arrays(), _model("inq", bit_width=5))


def test_hostile_protobuf_is_refused_before_allocating(tmp_path):
    good = ref.protobuf_bytes(_net("float")[0])
    (tmp_path / "params_000000.protobuf").write_bytes(good)
    got = read_parameters(tmp_path / "params_000000.protobuf")
    want = _net("float")[0].arrays()
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)
    for bad, match in [
        (good[:-3], "truncated"),
        (ref._ld(200, ref._ld(1, b"x") + ref._varint(100 << 3 | 2) + ref._varint(1 << 40)),
         "truncated"),
        (b"\xff" * 11, "longer than 64 bits"),
        (ref._varint(200 << 3 | 3), "wire type 3"),
        (ref._ld(200, ref._ld(1, b"w") + ref._ld(20, ref._ld(1, ref._varint(3)))
                 + ref._ld(100, b"\0" * 8)), "needs 3 values, the file has 2"),
        (ref._ld(200, ref._ld(20, ref._ld(1, ref._varint(1)))), "without variable_name"),
        (ref._ld(200, ref._ld(1, b"w") + ref._ld(20, ref._ld(1, b"".join(
            ref._varint(1) for _ in range(9))))), "more than 8 dimensions"),
        (ref._ld(200, ref._ld(1, b"w") + ref._ld(20, ref._ld(1, ref._varint(1 << 30) * 2))),
         "more than"),
        (ref._ld(200, ref._ld(1, b"w") + ref._ld(20, ref._ld(1, ref._varint(-2)))),
         "negative"),
        (ref._ld(200, ref._ld(1, b"w") + ref._ld(20, ref._ld(1, ref._varint(0)))) * 2,
         "appears twice"),
    ]:
        with pytest.raises(NNablaImportError, match=match):
            decode_parameter_protobuf(bad, "f.protobuf")


def test_hostile_h5_and_nnp_are_refused(tmp_path):
    ext = tmp_path / "other.h5"
    with h5py.File(ext, "w") as f:
        f["x"] = np.ones(3, np.float32)
    p = tmp_path / "links.h5"
    with h5py.File(p, "w") as f:
        f["affine/W"] = np.ones((64, 10), np.float32)
        f["affine/b"] = h5py.ExternalLink(str(ext), "x")
    with pytest.raises(NNablaImportError, match="ExternalLink"):
        read_parameters(p)
    with h5py.File(p, "w") as f:
        f["a"] = np.array([b"text"])
    with pytest.raises(NNablaImportError, match="dtype"):
        read_parameters(p)
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\nnot really")
    with pytest.raises(NNablaImportError, match="not a readable HDF5"):
        read_parameters(tmp_path / "junk.h5")
    nnp = tmp_path / "m.nnp"
    with zipfile.ZipFile(nnp, "w") as z:
        z.writestr("network.nntxt", "")
    with pytest.raises(NNablaImportError, match="no parameter file"):
        read_parameters(nnp)
    with pytest.raises(NNablaImportError, match="cannot read"):
        read_parameters(tmp_path / "absent.h5")


# ----------------------------------------------------------------------------- CLI

def test_cli_packed_file_runs_fast_with_the_same_predictions(tmp_path, capsys):
    from fewbits.cli.eval_cmd import evaluate_packed  # what `fewbits eval FILE --fast` runs
    from fewbits.data import ArrayDataset

    family = "fp_net"
    p, x, want = _net(family)
    src = tmp_path / "params_040000.h5"
    ref.write_h5(src, p)
    out = tmp_path / "fpnet.fewbits"
    assert main(["import-nnabla", str(src), "-n", ref.net_name(family), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "note: batch norm follows NNabla" in said and str(out) in said
    packed = load_packed(out)
    _close(_logits(packed, x), want)
    imported = _model(family)
    load_parameters(src, imported)
    assert np.array_equal(_logits(packed, x), _logits(imported, x))
    # labels = the imported network's predictions: the fast path must get every image right
    imgs = np.concatenate([_images(family), np.random.default_rng(5).integers(
        0, 256, (8, 3, 32, 32)).astype(np.uint8)])
    with torch.no_grad():
        labels = imported(torch.from_numpy(imgs).float() / 255).argmax(1)
    ds = ArrayDataset(torch.from_numpy(imgs).contiguous(), labels,
                      tuple(str(i) for i in range(10)), "nnabla-check")
    r = evaluate_packed(out, ds, batch_size=len(imgs), fast=True)
    assert r.fast_path and r.total == len(imgs) and r.wrong == 0


def test_cli_run_folder_resumes_with_fewbits_train(tmp_path, capsys):
    family = "inq"
    p, x, want = _net(family)
    src = tmp_path / "params_000001.h5"
    ref.write_h5(src, p)
    run = tmp_path / "run"
    opts = ["-n", ref.net_name(family), "-m", str(run), "-o", str(run), "--dataset", "synthetic",
            "--synthetic-size", "10", "-b", "4", "-i", "2", "-v", "1", "--inq-iterations",
            "1", "--no-progress", "--no-plot"]
    assert main(["import-nnabla", str(src), *opts]) == 0
    said = capsys.readouterr().out
    assert "at iteration 1" in said and "fewbits train --resume" in said
    from fewbits.checkpoint import load_model

    _close(_logits(load_model(run / "checkpoint.pt").eval(), x), want)
    assert main(["train", "--resume", "--model-arg", "nnabla=true", *opts]) == 0
    said = capsys.readouterr().out
    assert "resuming from" in said and "at iteration 1" in said
    model = load_model(run / "model_final.pt")
    assert all(q.mask.all() for q in model.modules() if hasattr(q, "mask"))  # INQ's last fix
    assert isinstance(model.stem_post[0], NNablaBatchNorm2d)


@pytest.mark.parametrize("argv, code, match", [
    (["-n", "cifar10_fp_net_resnet23_prediction"], 2, "-o/--model-save-path"),
    (["-n", "mnist_fp_net_lenet", "-o", "x.fewbits"], 2, "NNabla's example has the networks"),
    (["-n", "cifar10_inq_resnet23_prediction", "--bit-width", "5", "-o", "x.fewbits"], 2,
     "quantized INQ to 4 bits"),
    (["-n", "cifar10_binary_connect_resnet23_prediction", "-o", "x.fewbits"], 1,
     "holds a fp_connect or fp_net network"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, code, match):
    src = tmp_path / "params_000010.h5"
    ref.write_h5(src, _net("fp_net")[0])
    monkeypatch.chdir(tmp_path)
    assert main(["import-nnabla", str(src), *argv]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(match, err), err


def test_cli_inq_mid_schedule_cannot_be_packed(tmp_path, capsys):
    src = tmp_path / "params_006000.h5"
    ref.write_h5(src, _net("inq")[0])  # 30 % of the weights still learnable (I = 0)
    out = tmp_path / "inq.fewbits"
    assert main(["import-nnabla", str(src), "-n", ref.net_name("inq"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "still learnable" in err and not out.exists()


def test_cli_run_folder_reads_the_parameter_file_before_any_data(tmp_path, capsys, monkeypatch):
    """A bad parameter file is reported as such; CIFAR-10 (absent here) is not looked for,
    let alone downloaded, first."""
    src = tmp_path / "params_000010.h5"
    ref.write_h5(src, _net("fp_net")[0])
    monkeypatch.setenv("FEWBITS_DATA", str(tmp_path / "no-data"))

    def no_data(*a, **k):
        raise AssertionError("data was loaded before the parameter file was checked")

    monkeypatch.setattr("fewbits.cli.nnabla_cmd.load_split", no_data)
    run = tmp_path / "run"
    assert main(["import-nnabla", str(src), "-n", "cifar10_binary_connect_resnet23_prediction",
                 "-m", str(run), "-o", str(run)]) == 1
    assert "holds a fp_connect or fp_net network" in capsys.readouterr().err
