"""The command line: seed flags, fewbits train|eval|list, classification.py, error messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import fewbits.train
from fewbits.cli import SUBCOMMANDS, build_parser, config_from_args, main, str2bool
from fewbits.models import list_models
from fewbits.monitor import read_series

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--synthetic-size", "16", "-b", "8", "--no-progress",
        "--no-plot", "--model-arg", "width=16", "--model-arg", "depth=1"]


def cfg_of(*argv: str):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_seed_flags_and_defaults():
    c = cfg_of()
    assert (c.context, c.device_id, c.type_config, c.batch_size, c.learning_rate) == (
        "cpu", 0, "float", 64, 1e-3)
    assert (c.max_iter, c.val_interval, c.weight_decay) == (234375, 1000, 0.0)
    assert c.net == "cifar10_resnet23_prediction" and c.bit_width is None
    assert (c.delta, c.upper_bound, c.ql_min, c.ql_max) == (None, 1, 0, 255)  # None: net's
    assert not (c.p_min_max or c.a_min_max or c.a_ema) and c.ste_fine_grained is True
    assert (c.dataset, c.optimizer, c.lr_schedule, c.accum_steps) == (
        "cifar10", "adam", "constant", 1)
    c = cfg_of("-c", "cudnn", "-d", "1", "-t", "half", "-b", "32", "-l", "0.01", "-i", "7",
               "-v", "3", "-w", "1e-4", "-m", "mon", "-o", "save", "-n", "mnist_inq_lenet",
               "--bit-width", "5", "--delta", "2**-3", "--upper-bound", "2", "--ql-min", "1",
               "--ql-max", "15", "--p-min-max", "--a-min-max", "--a-ema")
    assert (c.context, c.device_id, c.type_config, c.batch_size, c.learning_rate) == (
        "cudnn", 1, "half", 32, 0.01)
    assert (c.max_iter, c.val_interval, c.weight_decay, c.monitor_path) == (7, 3, 1e-4, "mon")
    assert (c.model_save_path, c.net, c.bit_width, c.delta) == ("save", "mnist_inq_lenet", 5,
                                                                0.125)
    assert (c.upper_bound, c.ql_min, c.ql_max) == (2, 1, 15)
    assert c.p_min_max and c.a_min_max and c.a_ema


@pytest.mark.parametrize("text,want", [("false", False), ("False", False), ("0", False),
                                       ("true", True), ("True", True), ("1", True)])
def test_ste_fine_grained_parses_booleans(text, want):
    # The seed's type=bool made "False" True; here it means False.
    assert cfg_of("--ste-fine-grained", text).ste_fine_grained is want
    assert str2bool(text) is want


def test_ste_fine_grained_bare_flag_and_bad_value(capsys):
    assert cfg_of("--ste-fine-grained").ste_fine_grained is True
    with pytest.raises(SystemExit) as e:
        cfg_of("--ste-fine-grained", "maybe")
    assert e.value.code == 2 and "expected true or false" in capsys.readouterr().err


def test_beyond_seed_flags():
    c = cfg_of("--dataset", "mnist", "--data-dir", "d", "--epochs", "2", "--optimizer", "sgd",
               "--momentum", "0.5", "--lr-schedule", "cosine", "--seed", "3",
               "--channels-last", "--compile", "--inq-iterations", "10,20,30",
               "--inq-selection", "random", "--clip-weights", "--resume",
               "--checkpoint-interval", "50", "--no-progress", "--accum-steps", "2",
               "--no-augment", "--threads", "1", "--model-arg", "width=64")
    assert (c.dataset, c.data_dir, c.epochs, c.optimizer, c.momentum) == (
        "mnist", "d", 2.0, "sgd", 0.5)
    assert (c.lr_schedule, c.seed, c.channels_last, c.compile) == ("cosine", 3, True, True)
    assert c.inq_iterations == (10, 20, 30) and c.inq_selection == "random" and c.clip_weights
    assert (c.resume, c.checkpoint_interval, c.progress, c.accum_steps) == ("auto", 50, False, 2)
    assert c.augment is False and c.threads == 1 and c.model_args == {"width": 64}
    assert cfg_of("--resume", "runs/x").resume == "runs/x"
    assert cfg_of("--augment").augment is True and cfg_of().augment is None


def test_help_shows_the_argument_groups(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"], prog="classification.py")
    out = capsys.readouterr().out
    assert out.startswith("usage: classification.py")
    for group in ("seed flags", "data:", "optimisation:", "quantization:", "run control:"):
        assert group in out


def test_subcommand_table_is_extensible():
    assert {"train", "eval", "list"} <= set(SUBCOMMANDS)
    assert all(callable(c.add_arguments) and callable(c.run) for c in SUBCOMMANDS.values())


def test_iterations_and_epochs_are_exclusive(capsys):
    assert main(["train", "-i", "5", "--epochs", "1"]) == 2
    assert "either -i/--max-iter or --epochs" in capsys.readouterr().err


def test_unknown_net_lists_the_nets(capsys, tmp_path):
    assert main(["train", "-n", "cifar10_nope", "-m", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'cifar10_nope'" in err
    assert all(name in err for name in list_models())


def test_cudnn_without_gpu_says_use_cpu(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["-c", "cudnn", "--net", "cifar10_fp_connect_resnet23_prediction",
            "--monitor-path", str(tmp_path), "--model-save-path", str(tmp_path), "-d", "0"]
    assert main(["train", *argv], prog="classification.py") == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "-c cpu" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_seed_command_on_cpu_without_data_says_where_to_put_cifar10(capsys, monkeypatch,
                                                                    tmp_path):
    def offline(url, timeout):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr("fewbits.data.download._urlopen", offline)
    monkeypatch.setenv("FEWBITS_DATA", str(tmp_path / "data"))
    argv = ["-c", "cpu", "--net", "cifar10_fp_connect_resnet23_prediction",
            "--monitor-path", str(tmp_path / "m"), "--model-save-path", str(tmp_path / "m"),
            "-d", "0"]
    assert main(["train", *argv], prog="classification.py") == 1
    err = capsys.readouterr().err
    assert "download failed" in err and "cifar-10-python.tar.gz" in err
    assert str(tmp_path / "data") in err


def test_net_on_data_of_another_shape(capsys, tmp_path):
    rc = main(["train", "-n", "cifar10_binary_connect_resnet23_prediction", "--dataset",
               "digits", "-m", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "expects 32x32" in err and "mnist_binary_connect_lenet" in err


def test_train_then_eval_then_list(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "-n", "mnist_pow2_connect_mlp", "-i", "4", "-v", "2", "-m", str(run),
                 *TINY]) == 0
    assert "done: mnist_pow2_connect_mlp" in capsys.readouterr().out
    assert main(["eval", str(run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    _, errs = read_series(run / "Test-error.series.txt")
    assert r["net"] == "mnist_pow2_connect_mlp" and r["dataset"] == "synthetic"
    assert r["total"] == 3 and r["error"] == pytest.approx(min(errs))
    assert main(["eval", str(run / "model_final.pt")]) == 0
    out = capsys.readouterr().out
    assert "error" in out and "accuracy" in out and "images/s" in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "cifar10_binary_net_resnet23" in ln).split()
    assert row[1:] == ["binary_net", "1", "1"]
    row = next(ln for ln in out.splitlines() if "mnist_fp_net_lenet" in ln).split()
    assert row[1:] == ["fp_net", "8", "8"]
    row = next(ln for ln in out.splitlines() if "cifar10_inq_resnet23" in ln).split()
    assert row[1:] == ["inq", "4", "32"]
    for word in ("datasets:", "imagefolder", "quantizers:", "fixed_point"):
        assert word in out


def test_eval_of_a_missing_run(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "nothing")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    # named like a packed file: before, a FileNotFoundError / IsADirectoryError traceback
    assert main(["eval", str(tmp_path / "nothing.fewbits")]) == 1
    assert "nothing.fewbits: no such file or folder" in capsys.readouterr().err
    (tmp_path / "run.fewbits").mkdir()
    assert main(["eval", str(tmp_path / "run.fewbits")]) == 1
    assert "run folder without any of" in capsys.readouterr().err


def test_interrupt_exits_non_zero_with_resume_hint(capsys, monkeypatch, tmp_path):
    real = fewbits.train.train

    def interrupted(cfg):
        return real(cfg, on_step=lambda i: i == 2 and signal.raise_signal(signal.SIGTERM))

    monkeypatch.setattr(fewbits.train, "train", interrupted)
    rc = main(["train", "-n", "mnist_float_mlp", "-i", "6", "-v", "100", "-m", str(tmp_path),
               *TINY])
    assert rc == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM after iteration 2" in err and "--resume" in err
    monkeypatch.setattr(fewbits.train, "train", real)
    assert main(["train", "-n", "mnist_float_mlp", "-i", "6", "-v", "100", "-m", str(tmp_path),
                 "--resume", *TINY]) == 0
    assert "resuming from" in capsys.readouterr().out


def test_classification_py_runs_as_a_script(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "classification.py"), "-n", "nope", "-m",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "classification.py: error: -n/--net: unknown model" in p.stderr


def test_delta_defaults_to_the_nets_own():
    from fewbits.train import build_model

    cifar = build_model(cfg_of("-n", "cifar10_fp_connect_resnet23_prediction"), (3, 32, 32), 10)
    mnist = build_model(cfg_of("-n", "mnist_fp_connect_lenet"), (1, 28, 28), 10)
    given = build_model(cfg_of("-n", "mnist_fp_connect_lenet", "--delta", "2**-3"),
                        (1, 28, 28), 10)
    assert cifar.stem.weight_quantizer.delta == 2**-4
    assert mnist.fc1.weight_quantizer.delta == 2**-7
    assert given.fc1.weight_quantizer.delta == 2**-3


def test_first_validation_flag():
    assert cfg_of().validate_first is True
    assert cfg_of("--no-first-validation").validate_first is False


def test_export_info_and_eval_from_the_packed_file(tmp_path, capsys):
    from fewbits.cli import main

    run = tmp_path / "run"
    assert main(["train", "-n", "mnist_binary_connect_mlp", "--dataset", "digits", "-i", "4",
                 "-v", "4", "-b", "16", "-m", str(run), "--no-progress", "--no-plot",
                 "--model-arg", "width=16", "--model-arg", "depth=1"]) == 0
    packed = tmp_path / "m.fewbits"
    assert main(["export", str(run), "-o", str(packed)]) == 0
    assert main(["info", str(packed)]) == 0
    assert "1.000 bits per quantized weight" in capsys.readouterr().out
    assert main(["eval", str(run), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["eval", str(packed), "--dataset", "digits", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert from_file["wrong"] == from_run["wrong"] and from_file["total"] == 300
    assert from_file.keys() == from_run.keys()  # one format for both kinds of file
    assert from_file["fast_path"] is from_run["fast_path"] is None
    assert from_file["net"] == from_run["net"] == "mnist_binary_connect_mlp"
    for path in (run, packed):  # the one-line report, alike
        assert main(["eval", str(path), "--dataset", "digits"]) == 0
        out = capsys.readouterr().out
        expect = f"on digits test, 300 images: error {100 * from_run['error']:.2f}% (accuracy"
        assert out.startswith(f"mnist_binary_connect_mlp ({path}") and expect in out, out
    bad = tmp_path / "bad.fewbits"
    bad.write_bytes(packed.read_bytes()[:-9])
    assert main(["eval", str(bad), "--dataset", "digits"]) == 1
    assert "bad.fewbits" in capsys.readouterr().err
