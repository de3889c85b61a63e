"""Hostile input, round 3 (issue 20): run folders, checkpoints and training options. Two runs
into one folder, an interrupted ``--overwrite``, checkpoint fields of the wrong type or range,
and options the machine cannot honour: each a clean one-line error (or the documented
behaviour), never lost data or a silent result."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from tiny_runs import ENV, tiny

from fewbits import cli
from fewbits._io import atomic_write, temp_dir
from fewbits.checkpoint import CheckpointError, load_checkpoint, read_file, save_file
from fewbits.export import FormatError, _limits, export_packed, read_container
from fewbits.export.container import (
    _PREFIX,
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    write_container,
)
from fewbits.models import create_model
from fewbits.runs import LOCK_NAME, REPLACED_NAME, run_lock
from fewbits.runtime.binary_file import load_engine
from fewbits.train import ConfigError, TrainingDiverged, evaluate_file, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(tiny(path))
    return path


# --------------------------------------------------------------------------- run lock


def _holder(folder: Path) -> subprocess.Popen:
    """A process holding the run lock of ``folder`` until killed."""
    code = ("import sys, time\nfrom fewbits.runs import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], env=ENV,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_into_a_busy_folder_refuses_naming_the_pid(tmp_path, capsys):
    holder = _holder(tmp_path)
    try:
        for extra in ({}, {"overwrite": True}, {"resume": "auto"}):
            with pytest.raises(ConfigError, match=rf"in use by another fewbits run \(pid "
                                                  rf"{holder.pid} on "):
                train(tiny(tmp_path, **extra))
        # -o elsewhere does not help: the monitor folder is busy too
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            train(tiny(tmp_path, model_save_path=str(tmp_path / "models")))
        assert cli.main(["train", "--net", "mnist_float_mlp", "--dataset", "synthetic",
                         "-m", str(tmp_path), "-i", "1", "--no-progress"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert not (tmp_path / "config.json").exists()  # nothing written by the refused runs
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed (SIGKILL): its lock file stays, the kernel released the lock.
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {holder.pid} ")
    train(tiny(tmp_path))
    assert (tmp_path / "checkpoint.pt").is_file()
    assert not (tmp_path / LOCK_NAME).exists()  # removed by the run that finished


def test_lock_is_one_per_folder_however_it_is_spelt(tmp_path):
    with run_lock(tmp_path, tmp_path / "." , str(tmp_path) + "/"):
        assert (tmp_path / LOCK_NAME).is_file()
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_NAME).exists()


# --------------------------------------------------------------------------- --overwrite


class _Killed(BaseException):
    """Stands in for a kill -9: nothing after it runs."""


def _die_at(n: int):
    def on_step(i: int) -> None:
        if i == n:
            raise _Killed
    return on_step


def test_interrupted_overwrite_keeps_the_old_run_and_eval_refuses(tmp_path, capsys):
    train(tiny(tmp_path, max_iter=4))
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert {"checkpoint.pt", "model_final.pt", "config.json"} <= set(old)
    # killed after its validation at 0 wrote model_best.pt, before its first checkpoint
    with pytest.raises(_Killed):
        train(tiny(tmp_path, overwrite=True, max_iter=40, val_interval=20),
              on_step=_die_at(3))
    aside = tmp_path / REPLACED_NAME
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == old  # whole, byte for byte
    assert not (tmp_path / "checkpoint.pt").exists()  # never new config + old checkpoint
    assert not (tmp_path / "model_final.pt").exists()
    assert (tmp_path / "model_best.pt").is_file()  # the new run's, untrained
    with pytest.raises(CheckpointError, match=r"has not written its first checkpoint.*"
                                              r"\.fewbits-replaced"):
        evaluate_file(str(tmp_path))
    assert cli.main(["eval", str(tmp_path)]) == 1
    assert "mv " in capsys.readouterr().err
    # Another --overwrite: the partial run goes, the earlier one stays until a checkpoint.
    with pytest.raises(_Killed):
        train(tiny(tmp_path, overwrite=True, max_iter=40, val_interval=20),
              on_step=_die_at(1))
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == old
    train(tiny(tmp_path, overwrite=True, max_iter=2))
    assert not aside.exists()  # the new run has its checkpoint: the old one is gone
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 2
    evaluate_file(str(tmp_path))


def test_overwrite_set_aside_goes_after_first_checkpoint_not_at_the_end(tmp_path):
    train(tiny(tmp_path))
    seen = []

    def on_step(i: int) -> None:
        seen.append((i, (tmp_path / REPLACED_NAME).exists()))

    train(tiny(tmp_path, overwrite=True, max_iter=4, val_interval=2), on_step=on_step)
    # checkpoint at 2 (after on_step(2)): the set-aside is there through step 2, gone at 3
    assert seen == [(1, True), (2, True), (3, False), (4, False)]


# --------------------------------------------------------------------------- checkpoint fields


def _edited(run: Path, tmp_path: Path, name: str, edit) -> Path:
    payload = read_file(run / name)
    payload = {k: v for k, v in payload.items() if k != "content_sha256"}
    edit(payload)
    out = tmp_path / name
    save_file(out, payload)  # with a matching SHA-256, as anyone can write one
    return out


def _set(key, value):
    def edit(p):
        p[key] = value
    return edit


def _set_in(key, sub, value):
    def edit(p):
        p[key] = copy.deepcopy(p[key])
        p[key][sub] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set("config", [1, 2]), r"'config' is a list \[1, 2\], not a dict"),
    (_set("config", {1: 2}), r"'config' is a dict .*not a dict of option names"),
    (_set("iteration", "abc"), r"'iteration' is 'abc', not an integer in 0\.\.2\*\*62"),
    (_set("iteration", -1000), r"'iteration' is -1000, not an integer"),
    (_set("iteration", 2 ** 70), r"'iteration' is \d+, not an integer"),
    (_set("iteration", True), r"'iteration' is a bool True"),
    (_set("iteration", 3.0), r"'iteration' is 3\.0"),
    (_set("world_size", 0), r"'world_size' is 0, not a process count"),
    (_set("bn_recalibrated", 1), r"'bn_recalibrated' is 1, not true or false"),
    (_set("optimizer", "x"), r"'optimizer' is 'x', not a dict"),
    (_set("rng", {"torch": 1}), r"'rng' is a dict .*uint8 generator states"),
    (_set_in("best", "error", "low"), r"'best' is a dict"),
    (_set_in("best", "iteration", -5), r"'best' is a dict"),
    (_set("monitor", {"loss": ["x"]}), r"'monitor' is a dict"),
    (_set("monitor", {"loss": [0.0] * 200_000}), r"'monitor' is a dict"),
    (_set("data_iterator", None), r"'data_iterator' is None, not a dict"),
])
def test_checkpoint_fields_are_type_and_range_checked(run, tmp_path, edit, message):
    path = _edited(run, tmp_path, "checkpoint.pt", edit)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    # and through the CLI: --resume from it is one error line, exit 1
    ns_out = tmp_path / "again"
    assert cli.main(["train", "--net", "mnist_float_lenet", "--dataset", "synthetic",
                     "--synthetic-size", "16", "-b", "8", "-i", "2", "-v", "2", "-m",
                     str(ns_out), "--resume", str(path), "--no-progress", "--no-plot",
                     "--model-arg", "width=16"]) == 1


@pytest.mark.parametrize("edit,message", [
    (_set("config", "cifar10"), r"'config' is 'cifar10', not a dict"),
    (_set("iteration", "abc"), r"'iteration' is 'abc'"),
    (_set("test_error", 7.5), r"'test_error' is 7\.5, not an error in \[0, 1\]"),
    (_set_in("config", "batch_size", "x"), r"'config' holds an invalid option \(-b/--batch-size "
                                           r"must be an integer >= 1, got 'x'\)"),
    (_set_in("config", "model_args", [1]), r"'config' holds an invalid option"),
    (_set("model_spec", {"name": "\x1b]0;owned\x07", "kwargs": []}),
     r"invalid model spec \(a dict .*\\x1b\]0;owned\\x07"),
])
def test_model_file_fields_are_checked_and_escaped(run, tmp_path, capsys, edit, message):
    path = _edited(run, tmp_path, "model_best.pt", edit)
    with pytest.raises(CheckpointError, match=message):
        evaluate_file(str(path))
    assert cli.main(["eval", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\x07" not in err


def test_resume_at_negative_iteration_does_not_train_extra(run, tmp_path):
    path = _edited(run, tmp_path, "checkpoint.pt", _set("iteration", -1000))
    steps = []
    with pytest.raises(CheckpointError, match="'iteration' is -1000"):
        train(tiny(tmp_path / "r", resume=str(path)), on_step=steps.append)
    assert steps == []


# --------------------------------------------------------------------------- options


def test_batch_larger_than_the_training_set_is_an_option_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"-b/--batch-size 100 is more than the 16 training "
                                          r"images of --dataset synthetic; give -b 16 or less"):
        train(tiny(tmp_path, batch_size=100))
    assert cli.main(["train", "--net", "mnist_float_mlp", "--dataset", "synthetic",
                     "--synthetic-size", "16", "-b", "2000", "-m", str(tmp_path / "b"),
                     "-i", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-b/--batch-size 2000" in err


@pytest.mark.parametrize("seed", [10 ** 23, 2 ** 62, -(2 ** 62) - 1])
def test_seed_beyond_64_bits_is_an_option_error(tmp_path, capsys, seed):
    with pytest.raises(ConfigError, match=r"--seed must be an integer in \[-2\*\*62, 2\*\*62\)"):
        tiny(tmp_path, seed=seed)
    assert cli.main(["train", "--dataset", "synthetic", "-m", str(tmp_path), "-i", "1",
                     "--seed", str(seed)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_largest_seeds_train(tmp_path):
    for seed in (2 ** 62 - 1, -(2 ** 62)):
        train(tiny(tmp_path / str(seed), seed=seed, max_iter=1, val_interval=1))


def test_threads_above_the_cores_are_lowered_with_a_warning(tmp_path, capsys):
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        train(tiny(tmp_path, threads=1000))
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert f"--threads 1000 is more than the {cores} CPU cores" in err
    assert f'"threads": {cores}' in (tmp_path / "config.json").read_text()


def _all_finite_saved(folder: Path) -> None:
    for name in ("checkpoint.pt", "model_best.pt", "model_final.pt"):
        if (folder / name).exists():  # whatever was saved is finite
            state = read_file(folder / name)["state_dict"]
            assert all(torch.isfinite(t).all() for t in state.values()
                       if isinstance(t, torch.Tensor) and t.is_floating_point())


def test_diverging_run_stops_with_one_line_and_saves_nothing_nan(tmp_path, capsys):
    """A float net at -l 1e30: the loss becomes NaN (82 lines of traceback or a silent 'done'
    before)."""
    with pytest.raises(TrainingDiverged, match=r"training diverged at iteration 10: the "
                       r"training loss is nan\. Lower -l/--learning-rate \(now 1e\+30\)"):
        train(tiny(tmp_path, learning_rate=1e30, max_iter=20, val_interval=15))
    _all_finite_saved(tmp_path)
    capsys.readouterr()
    code = cli.main(["train", "--net", "mnist_float_lenet", "--dataset", "synthetic",
                     "--synthetic-size", "16", "-b", "8", "-i", "20", "-v", "5", "-l", "1e30",
                     "-m", str(tmp_path / "c"), "--no-progress", "--no-plot", "--model-arg",
                     "width=16"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("fewbits: error: training diverged")
    assert "Traceback" not in err and err.count("fewbits: error") == 1


def test_quantizer_meeting_a_diverged_weight_stops_the_run(tmp_path):
    """NaN reaching a quantizer (its own ValueError) is reported as the divergence it is."""
    cfg = tiny(tmp_path, net="mnist_pow2_connect_mlp", max_iter=10, val_interval=5,
               model_args={"width": 16, "depth": 1})
    holder = {}

    def poison(i: int) -> None:
        if i == 3:
            with torch.no_grad():
                next(holder["model"].parameters()).fill_(float("nan"))

    import fewbits.train.run as run_module

    real = run_module._Run.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        holder["model"] = self.model

    run_module._Run.__init__ = spy
    try:
        with pytest.raises(TrainingDiverged, match=r"training diverged at iteration 3: "
                           r"pow2_quantize: x contains NaN\. Lower"):
            train(cfg, on_step=poison)
    finally:
        run_module._Run.__init__ = real
    _all_finite_saved(tmp_path)


# --------------------------------------------------------------------------- export writes


def _forge(text: bytes) -> bytes:
    """A .fewbits file with this (uncompressed) header text, no payload and a correct SHA-256."""
    text += b" " * (-(_PREFIX.size + len(text)) % 8)
    body = _PREFIX.pack(MAGIC, 1, 0, len(text), 0) + text
    return body + hashlib.sha256(body).digest()


def test_header_too_large_never_replaces_a_good_file(tmp_path, monkeypatch, capsys):
    good = tmp_path / "good.fewbits"
    m = create_model("mnist_binary_connect_mlp", width=8, depth=1).eval()
    export_packed(m, good)
    before = good.read_bytes()
    with pytest.raises(ValueError, match=r"cannot write .*good\.fewbits: the compressed header "
                       r"inflates beyond .*nothing was written \(an existing file is kept\)"):
        write_container(good, {"pad": "x" * (MAX_HEADER_BYTES + 1), "tensors": []}, {},
                        compress_header=True)
    assert good.read_bytes() == before
    # the exporter and the CLI: a limit this model's header exceeds
    monkeypatch.setattr(_limits, "MAX_HEADER_BYTES", 200)
    with pytest.raises(ValueError, match=r"beyond the format's limit of 200 bytes"):
        export_packed(m, good)
    assert good.read_bytes() == before
    run = tmp_path / "run"
    train(tiny(run, net="mnist_binary_connect_mlp", model_args={"width": 8, "depth": 1}))
    assert cli.main(["export", str(run), "-o", str(good)]) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert good.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_layout_of_10000_tensors_is_linear(tmp_path):
    n = 10_000
    header = {"tensors": [{"name": f"layer{i}.weight"} for i in range(n)]}
    blobs = {f"layer{i}.weight": b"\1\2" for i in range(n)}
    # CPU time of this process: what a quadratic walk costs, whatever else the machine runs
    t = time.process_time()
    written = write_container(tmp_path / "many.fewbits", header, blobs)
    assert time.process_time() - t < 5.0  # quadratic before: 10**8 set insertions
    assert len(written["tensors"]) == n
    header["tensors"].append({"name": "layer7.weight"})
    with pytest.raises(ValueError, match=r"duplicate tensor names in header: \['layer7.weight'\]"):
        write_container(tmp_path / "dupe.fewbits", header, blobs)


def test_header_of_330000_keys_is_refused_quickly(tmp_path):
    keys = [f"k{i}" for i in range(330_000)] + ["k5"]
    text = ("{" + ",".join(f'"{k}":0' for k in keys) + ',"tensors":[]}').encode()
    assert len(text) < MAX_HEADER_BYTES
    path = tmp_path / "keys.fewbits"
    path.write_bytes(_forge(text))
    t = time.perf_counter()
    with pytest.raises(FormatError, match=r"duplicate keys \['k5'\]"):
        read_container(path)
    elapsed = time.perf_counter() - t
    # 2.5-8 s on a busy 2-core machine (JSON parsing); list.count: about 10**11 comparisons
    assert elapsed < 30.0, elapsed


# --------------------------------------------------------------------------- printed names

EVIL = "\x1b]0;owned\x07\x1b[2J\rfake line\u202e"


def _edit_header(data: bytes, edit) -> bytes:
    _, _, flags, hlen, plen = _PREFIX.unpack_from(data)
    raw = data[_PREFIX.size:_PREFIX.size + hlen]
    header = json.loads(zlib.decompressobj().decompress(raw) if flags & 1 else raw)
    edit(header)
    text = zlib.compress(json.dumps(header, sort_keys=True).encode(), 9)
    text += b"\0" * (-(_PREFIX.size + len(text)) % 8)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, 1, len(text), plen) + text + \
        data[_PREFIX.size + hlen:-32]
    return body + hashlib.sha256(body).digest()


def test_names_from_files_are_printed_escaped(tmp_path, capsys):
    good = tmp_path / "good.fewbits"
    export_packed(create_model("mnist_binary_connect_mlp", width=8, depth=1).eval(), good)

    def rename(h):
        h["model"]["name"] = "mnist" + EVIL
        h["tensors"][-1]["name"] = "fc" + EVIL
    evil = tmp_path / "evil.fewbits"
    evil.write_bytes(_edit_header(good.read_bytes(), rename))
    for argv in (["info", str(evil)], ["info", str(evil), "--json"], ["eval", str(evil)],
                 ["export", str(evil), "--onnx", str(tmp_path / "e.onnx")]):
        cli.main(argv)
        out, err = capsys.readouterr()
        for text in (out, err):
            assert not any(c in text for c in "\x1b\x07\r\u202e"), (argv, text)
    cli.main(["info", str(evil)])
    out = capsys.readouterr().out
    assert "mnist\\x1b]0;owned\\x07\\x1b[2J\\x0dfake line\\u202e" in out
    assert "fc\\x1b]0;owned" in out


def test_legal_240_character_name_is_written(tmp_path):
    name = "m" * 232 + ".fewbits"
    assert len(name) == 240
    export_packed(create_model("mnist_binary_connect_mlp", width=8, depth=1).eval(),
                  tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    read_container(tmp_path / name)
    # multi-byte characters are cut at a character boundary
    name = "ä" * 124 + ".pt"
    assert len(os.fsencode(name)) == 251
    atomic_write(tmp_path / name, b"x")
    assert (tmp_path / name).read_bytes() == b"x"
    with temp_dir(tmp_path, name) as d:
        assert Path(d).is_dir()


# --------------------------------------------------------------------------- folded files


@pytest.mark.parametrize("key,value,message", [
    ("depth", 10 ** 6, r"describes a network larger than the file can hold"),
    ("width", 10 ** 9, r"describes a network larger than the file can hold"),
    ("width", -1, r"field model\.kwargs: .* cannot be built with"),
    ("depth", 1, r"holds 3 tensors that the network of its model\.kwargs does not use "
                 r"\(\['body\.3\.weight', 'body\.4\.0\.flip', 'body\.4\.0\.threshold'\]\)"),
    ("depth", 3, r"lacks the codes tensor 'body\.5\.weight'"),
])
def test_folded_file_options_are_bounded_and_must_match(tmp_path, key, value, message):
    path = tmp_path / "fold.fewbits"
    export_packed(create_model("mnist_binary_net_mlp", width=16, depth=2).eval(), path,
                  fold_bn=True)
    load_engine(path)

    def edit(h):
        h["model"]["kwargs"][key] = value
    path.write_bytes(_edit_header(path.read_bytes(), edit))
    t = time.perf_counter()
    with pytest.raises(FormatError, match=message):
        load_engine(path)
    assert time.perf_counter() - t < 5.0  # depth=10**6: > 200 s and 10.6 GB before


def test_eval_fast_memory_is_bounded_from_the_file_before_building(tmp_path, monkeypatch,
                                                                    capsys):
    from fewbits.cli import eval_cmd

    path = tmp_path / "m.fewbits"
    export_packed(create_model("mnist_binary_connect_mlp", width=64, depth=2).eval(), path)
    values = sum(p.numel() for p in create_model("mnist_binary_connect_mlp", width=64,
                                                 depth=2).state_dict().values())
    built = []
    monkeypatch.setattr(eval_cmd, "compile_for_cpu", lambda *a, **k: built.append(a))
    monkeypatch.setattr(eval_cmd, "_available_memory",
                        lambda: eval_cmd.FAST_COPIES * 4 * values // 2)
    assert cli.main(["eval", str(path), "--dataset", "synthetic", "--fast"]) == 2
    err = capsys.readouterr().err
    assert f"--fast: {path} holds" in err and "evaluate it without --fast" in err
    assert built == []  # refused before anything was built
