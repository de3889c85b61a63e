"""fewbits.checkpoint: atomic files, load_model, and clear errors for unusable files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from fewbits import create_model
from fewbits.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    load_model,
    model_file_payload,
    resolve_model_path,
    save_file,
)
from fewbits.train import TrainConfig, train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One tiny finished run (checkpoint.pt, model_best.pt, model_final.pt)."""
    path = tmp_path_factory.mktemp("run")
    train(TrainConfig(net="mnist_binary_connect_mlp", model_args={"width": 16, "depth": 1},
                      dataset="synthetic", synthetic_size=32, batch_size=8, max_iter=4,
                      val_interval=2, monitor_path=str(path), progress=False, plot=False))
    return path


def test_load_model_from_each_kind_of_file(run):
    x = torch.rand(3, 1, 28, 28)
    outs = []
    for src in (run, run / "model_best.pt", run / "model_final.pt", run / "checkpoint.pt"):
        model = load_model(src)
        assert not model.training
        assert model.fewbits_spec["name"] == "mnist_binary_connect_mlp"
        with torch.no_grad():
            outs.append(model(x))
    # final and checkpoint hold the same (last) parameters
    assert torch.equal(outs[2], outs[3])
    assert resolve_model_path(run) == run / "model_best.pt"


def test_run_folder_falls_back_to_final_then_checkpoint(run, tmp_path):
    for name in ("model_final.pt", "checkpoint.pt"):
        (tmp_path / name).write_bytes((run / name).read_bytes())
    assert resolve_model_path(tmp_path) == tmp_path / "model_final.pt"
    (tmp_path / "model_final.pt").unlink()
    assert resolve_model_path(tmp_path) == tmp_path / "checkpoint.pt"
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(CheckpointError, match="run folder without"):
        resolve_model_path(tmp_path)


def test_unfinished_run_folder_warns_that_its_checkpoint_is_newer(run, tmp_path):
    # an interrupted run: model_best.pt from its last validation (iteration 0 here, say),
    # checkpoint.pt written at the interrupt, no model_final.pt
    for name in ("model_best.pt", "checkpoint.pt"):
        (tmp_path / name).write_bytes((run / name).read_bytes())
    os.utime(tmp_path / "model_best.pt", (1_000_000, 1_000_000))
    with pytest.warns(UserWarning, match="checkpoint.pt is newer"):
        assert resolve_model_path(tmp_path) == tmp_path / "model_best.pt"
    (tmp_path / "model_final.pt").write_bytes((run / "model_final.pt").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finished: model_best.pt is the run's answer
        assert resolve_model_path(tmp_path) == tmp_path / "model_best.pt"


def test_checkpoint_contents(run):
    c = load_checkpoint(run / "checkpoint.pt")
    assert c["format"] == "fewbits.checkpoint" and c["format_version"] == 1
    assert c["iteration"] == 4 and c["config"]["net"] == "mnist_binary_connect_mlp"
    assert set(c["rng"]) >= {"torch", "augment"}
    assert c["data_iterator"]["position"] >= 1
    assert "loss" in c["monitor"] and c["best"]["iteration"] in (0, 2, 4)
    assert not any(k.startswith("module.") for k in c["state_dict"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_files_raise_checkpoint_error_naming_the_file(run, tmp_path, damage):
    data = (run / "checkpoint.pt").read_bytes()
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096),
                     "empty": b""}[damage])
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*(truncated|corrupt)"):
            load(bad)


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "weights.pt"
    torch.save(create_model("mnist_float_mlp", width=8).state_dict(), plain)
    with pytest.raises(CheckpointError, match=r"weights\.pt: not a fewbits file"):
        load_model(plain)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not a fewbits file"):
        load_model(tensor)
    # A pickle of an arbitrary object is not even unpickled (weights_only).
    evil = tmp_path / "evil.pt"
    torch.save({"format": "fewbits.model", "x": Path("/")}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a fewbits file.*for safety") as e:
        load_model(evil)
    assert "weights_only" not in str(e.value)  # no advice to load it unsafely


def test_newer_format_and_model_file_as_checkpoint(run, tmp_path):
    payload = torch.load(run / "model_final.pt", weights_only=True)
    payload["format_version"] = 99
    save_file(tmp_path / "new.pt", payload)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model(tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="expected one of"):
        load_checkpoint(run / "model_final.pt")


def test_weights_that_do_not_fit_the_spec(run, tmp_path):
    payload = torch.load(run / "model_final.pt", weights_only=True)
    payload["model_spec"]["kwargs"]["width"] = 32
    save_file(tmp_path / "m.pt", payload)
    with pytest.raises(CheckpointError, match=r"m\.pt: the weights do not fit"):
        load_model(tmp_path / "m.pt")
    payload["model_spec"]["name"] = "no_such_net"
    save_file(tmp_path / "m.pt", payload)
    with pytest.raises(CheckpointError, match="cannot rebuild model 'no_such_net'"):
        load_model(tmp_path / "m.pt")


def test_resume_with_another_net_or_batch_is_refused(run, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes((run / "checkpoint.pt").read_bytes())
    base = dict(model_args={"width": 16, "depth": 1}, dataset="synthetic", synthetic_size=32,
                batch_size=8, max_iter=6, val_interval=2, monitor_path=str(tmp_path),
                progress=False, plot=False, resume="auto")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: cannot resume.*net: "
                       r"checkpoint 'mnist_binary_connect_mlp', this run 'mnist_float_mlp'"):
        train(TrainConfig(net="mnist_float_mlp", **base))
    with pytest.raises(CheckpointError, match="batch_size: checkpoint 8, this run 4"):
        train(TrainConfig(net="mnist_binary_connect_mlp", **{**base, "batch_size": 4}))
    with pytest.raises(CheckpointError, match="model option width: checkpoint 16, this run 8"):
        train(TrainConfig(net="mnist_binary_connect_mlp",
                          **{**base, "model_args": {"width": 8, "depth": 1}}))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "f.pt"
    atomic_write_bytes(p, b"old")
    with pytest.raises(Exception):  # noqa: B017 - any pickling error
        save_file(p, {"f": lambda: 0})
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.pt"]  # no temp file left behind


def test_model_file_payload_needs_a_spec():
    with pytest.raises(ValueError, match="fewbits_spec"):
        model_file_payload(torch.nn.Linear(2, 2))


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_bytes(p, b"{}")
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def _flip_tensor_byte(path, out):
    """Copy ``path`` to ``out`` with one byte of the first tensor's data flipped."""
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 8)
    start = info.header_offset + 30 + len(info.filename.encode())
    extra = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[start + extra + 5] ^= 0x10
    out.write_bytes(bytes(data))
    return out


def test_a_flipped_byte_in_a_weight_is_refused(run, tmp_path):
    """Issue 13, item 4: eval, export and --resume refused nothing."""
    from fewbits.checkpoint import CHECKSUM_KEY

    for name, load in (("model_final.pt", load_model), ("checkpoint.pt", load_checkpoint)):
        assert CHECKSUM_KEY in torch.load(run / name, weights_only=True)
        bad = _flip_tensor_byte(run / name, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"{name}: the file is damaged"):
            load(bad)
    from fewbits.export import export_packed

    with pytest.raises(CheckpointError, match="damaged"):
        export_packed(tmp_path / "model_final.pt", tmp_path / "x.fewbits")


def test_files_without_a_checksum_still_load(run, tmp_path):
    from fewbits.checkpoint import CHECKSUM_KEY

    payload = torch.load(run / "model_final.pt", weights_only=True)
    del payload[CHECKSUM_KEY]
    torch.save(payload, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt") is not None


@pytest.mark.parametrize("option", [{"depth": 10**6}, {"width": 10**9}])
def test_model_options_from_a_file_are_bounded_before_building(run, tmp_path, option):
    """Issue 13, item 2: options read from a file built layers for minutes or failed
    allocating; they are bounded by the weights the file holds."""
    import time

    payload = torch.load(run / "model_final.pt", weights_only=True)
    payload["model_spec"]["kwargs"].update(option)
    save_file(tmp_path / "m.pt", payload)
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"m\.pt: cannot rebuild .*file can describe"):
        load_model(tmp_path / "m.pt")
    assert time.perf_counter() - t < 5


def test_resume_of_a_checkpoint_older_than_a_model_option(run, tmp_path):
    """A model option that a later fewbits added to the spec (ResNet23's ``nnabla``) is absent
    from older checkpoints: the run was built with its registered default and resumes; an
    absent option whose default differs from this run is still refused."""
    from fewbits.checkpoint import CHECKSUM_KEY

    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    payload.pop(CHECKSUM_KEY, None)
    del payload["model_spec"]["kwargs"]["num_classes"]  # default 10, as this run
    save_file(tmp_path / "checkpoint.pt", payload)
    base = dict(net="mnist_binary_connect_mlp", dataset="synthetic", synthetic_size=32,
                batch_size=8, max_iter=6, val_interval=2, monitor_path=str(tmp_path),
                progress=False, plot=False, resume="auto")
    train(TrainConfig(model_args={"width": 16, "depth": 1}, **base))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 6
    del payload["model_spec"]["kwargs"]["width"]  # default 1024, this run 16
    save_file(tmp_path / "checkpoint.pt", payload)
    with pytest.raises(CheckpointError, match="model option width: checkpoint 1024, this run 16"):
        train(TrainConfig(model_args={"width": 16, "depth": 1}, **{**base, "max_iter": 8}))


def test_lsq_checkpoint_from_before_the_step_group_resumes_exactly(tmp_path):
    """Issue 25: LSQ checkpoints written before the steps got their own optimizer group (one
    Adam group of every parameter) failed to resume ("different number of parameter groups").
    Their state is now mapped parameter by parameter: resuming the old layout gives the same
    run as resuming the new one; a layout that cannot be mapped names both."""
    from fewbits.checkpoint import CHECKSUM_KEY
    from fewbits.quantizers.optim import param_groups

    base = dict(net="mnist_lsq_mlp", model_args={"width": 16, "depth": 1}, dataset="synthetic",
                synthetic_size=32, batch_size=8, val_interval=2, progress=False, plot=False)
    new, old = tmp_path / "new", tmp_path / "old"
    train(TrainConfig(max_iter=2, monitor_path=str(new), **base))
    payload = torch.load(new / "checkpoint.pt", weights_only=True)
    payload.pop(CHECKSUM_KEY, None)
    saved = payload["optimizer"]
    assert len(saved["param_groups"]) == 2  # weights; LSQ steps at 0.01 x lr
    # the same state in the old layout: one group, ids in model.parameters() order
    params = list(create_model("mnist_lsq_mlp", width=16, depth=1).parameters())
    order = [id(p) for g in param_groups(params, 1.0) for p in g["params"]]
    at = [order.index(id(p)) for p in params]  # new id of each parameter
    group = {k: v for k, v in saved["param_groups"][0].items() if k != "lr_scale"}
    payload["optimizer"] = {"state": {k: saved["state"][i] for k, i in enumerate(at)
                                      if i in saved["state"]},
                            "param_groups": [{**group, "params": list(range(len(params)))}]}
    old.mkdir()
    save_file(old / "checkpoint.pt", payload)
    for d in (new, old):
        if d is old:
            with pytest.warns(UserWarning, match="predates LSQ's own parameter group"):
                train(TrainConfig(max_iter=4, monitor_path=str(d), resume="auto", **base))
        else:
            train(TrainConfig(max_iter=4, monitor_path=str(d), resume="auto", **base))
    a, b = (load_checkpoint(d / "checkpoint.pt") for d in (new, old))
    assert a["iteration"] == b["iteration"] == 4
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    payload["optimizer"]["param_groups"][0]["params"].pop()  # one parameter short
    save_file(old / "checkpoint.pt", payload)
    with pytest.raises(CheckpointError, match=r"optimizer holds parameter groups of \[\d+\] "
                       r"parameters, this run's \[\d+, \d+\]"):
        train(TrainConfig(max_iter=6, monitor_path=str(old), resume="auto", **base))


@pytest.mark.parametrize("value", [float("nan"), -1.0])
def test_batch_norm_statistics_that_no_training_makes_are_refused(run, tmp_path, value):
    """A checkpoint whose running variance is NaN or negative loaded; its first forward then
    blamed a diverging run. Training never saves such a state: the file is damaged."""
    payload = torch.load(run / "model_final.pt", weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith("running_var"))
    payload["state_dict"][key][0] = value
    save_file(tmp_path / "bn.pt", payload)
    with pytest.raises(CheckpointError, match=r"bn\.pt: batch norm .* running_var holds"):
        load_model(tmp_path / "bn.pt")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["state_dict"][key][0] = value
    save_file(tmp_path / "checkpoint.pt", ck)
    with pytest.raises(CheckpointError, match="cannot resume: batch norm .* running_var holds"):
        train(TrainConfig(net="mnist_binary_connect_mlp", model_args={"width": 16, "depth": 1},
                          dataset="synthetic", synthetic_size=32, batch_size=8, max_iter=6,
                          val_interval=2, monitor_path=str(tmp_path), progress=False,
                          plot=False, resume="auto"))
