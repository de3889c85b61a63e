"""Everyday friction (issue 13, item 8): each one a clear message or the right behaviour."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import ENV, tiny

from fewbits import cli, monitor
from fewbits.data import CorruptDataError, load_dataset
from fewbits.export import export_packed, read_container
from fewbits.train import ConfigError, TrainConfig, evaluate_file, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(tiny(path))
    return path


def _folder(root: Path, classes: dict[str, int], mode: str = "RGB", size: int = 28) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    root / split / c / f"{i}.png")
    return root


def test_list_into_a_closed_pipe_is_quiet():
    proc = subprocess.Popen([sys.executable, "-m", "fewbits.cli", "list"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_piped_progress_prints_loss_lines_and_skips_validation_time(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(monitor.time, "perf_counter", clock)
    out = io.StringIO()  # not a TTY, as when piped
    p = monitor.Progress(92, stream=out, log_seconds=30)
    for i in range(92):
        clock.t += 0.1
        if i == 50:
            clock.t += 100.0  # a validation
            p.exclude(100.0)
        p.step(i, 10, (1.0, 0.5) if (i + 1) % 10 == 0 else None)
    lines = out.getvalue().splitlines()
    # every 30 s of training (not 100 iterations: there are only 92) and at the end
    assert lines[-1].startswith("iter 92/92  loss 1.0000")
    assert len(lines) >= 2
    rates = [float(ln.split()[-2]) for ln in lines]
    assert all(abs(r - 100.0) < 1e-6 for r in rates), rates  # 10 images / 0.1 s


def test_rerun_into_a_run_folder_needs_resume_or_overwrite(run, tmp_path):
    before = (run / "model_best.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a training run.*--overwrite"):
        train(tiny(run))
    assert (run / "model_best.pt").read_bytes() == before
    train(tiny(tmp_path))
    train(tiny(tmp_path, overwrite=True))  # asked for: replaced
    ns = cli.build_parser().parse_args(["train", "--overwrite", "-m", str(tmp_path)])
    assert cli.config_from_args(ns).overwrite is True
    assert cli.main(["train", "--net", "mnist_float_mlp", "--dataset", "synthetic",
                     "-m", str(tmp_path), "-i", "1"]) == 2


def test_export_names_its_checkpoint_and_eval_uses_the_recorded_dataset(run, tmp_path, capsys):
    out = tmp_path / "m.fewbits"
    assert cli.main(["export", str(run), "-o", str(out)]) == 0
    assert f"exporting {run / 'model_best.pt'}" in capsys.readouterr().out
    header, _ = read_container(out)
    assert header["data"]["dataset"] == "synthetic"
    assert cli.main(["eval", str(out), "--json"]) == 0  # no --dataset: no MNIST download
    assert json.loads(capsys.readouterr().out)["dataset"] == "synthetic"
    # a file without the record (older fewbits) asks for --dataset instead of guessing
    from fewbits.checkpoint import load_model

    model = load_model(run)
    del model.fewbits_source
    export_packed(model, tmp_path / "old.fewbits")
    assert cli.main(["eval", str(tmp_path / "old.fewbits")]) == 2
    assert "give --dataset" in capsys.readouterr().err


def test_gray_model_on_rgb_images_and_batch_zero(run, tmp_path, capsys):
    rgb = _folder(tmp_path / "rgb", {"a": 2, "b": 2})
    with pytest.raises(ConfigError, match="trained on 1-channel images .* 3-channel"):
        evaluate_file(str(run), dataset="imagefolder", data_dir=str(rgb))
    export_packed(run, tmp_path / "m.fewbits")
    assert cli.main(["eval", str(tmp_path / "m.fewbits"), "--dataset", "imagefolder",
                     "--data-dir", str(rgb)]) == 2
    assert "1-channel" in capsys.readouterr().err
    for target in (str(run), str(tmp_path / "m.fewbits")):
        assert cli.main(["eval", target, "-b", "0"]) == 2
        assert "-b/--batch-size must be an integer >= 1" in capsys.readouterr().err


def test_archives_that_are_not_gzip_are_named(tmp_path):
    fake = tmp_path / "data.tar.gz"
    fake.write_text("not an archive")
    with pytest.raises(CorruptDataError, match="not gzip-compressed"):
        load_dataset("imagefolder", "train", fake, cache=False)
    src = _folder(tmp_path / "f", {"a": 1, "b": 1})
    with tarfile.open(tmp_path / "plain.tar.gz", "w") as tf:  # a plain tar, gzip name
        tf.add(src, arcname=".")
    with pytest.raises(CorruptDataError, match="not gzip-compressed"):
        load_dataset("imagefolder", "train", tmp_path / "plain.tar.gz", cache=False)


def test_empty_class_folder_warns_and_one_class_is_refused(tmp_path):
    root = _folder(tmp_path / "f", {"a": 2, "b": 2}, mode="L")
    (root / "train" / "empty").mkdir()
    with pytest.warns(UserWarning, match=r"empty holds no images.*left out"):
        ds = load_dataset("imagefolder", "train", root, cache=False)
    assert list(ds.classes) == ["a", "b"]
    one = _folder(tmp_path / "one", {"a": 3}, mode="L")
    with pytest.raises(ConfigError, match="at least two classes"):
        train(tiny(tmp_path / "run", dataset="imagefolder", data_dir=str(one)))


def test_workers_zero_and_channels_last_on_cpu(tmp_path):
    assert TrainConfig(workers=0).workers == 0
    with pytest.raises(ConfigError, match="--workers"):
        TrainConfig(workers=-1)
    res = train(tiny(tmp_path, channels_last=True))
    w = res.model.conv2.weight  # (50, 20, 5, 5): the two layouts differ
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_paths_that_are_files_or_folders_are_named(run, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.write_text("")
    assert cli.main(["train", "--net", "mnist_float_mlp", "--dataset", "synthetic",
                     "-m", str(plain), "-i", "1"]) == 2
    assert f"-m/--monitor-path {plain} is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["export", str(run), "-o", str(tmp_path)]) == 1
    assert f"cannot write {tmp_path}: it is a folder" in capsys.readouterr().err
    assert cli.main(["export", str(run), "-o", str(tmp_path / "no" / "m.fewbits")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and ".fewbits-tmp" not in err


def test_eval_of_a_packed_file_refuses_device_options_and_bounds_recorded_sizes(run, tmp_path,
                                                                                capsys):
    from fewbits.export.container import write_container  # recomputes the checksum

    out = tmp_path / "m.fewbits"
    export_packed(run, out)
    # -c/-d/-t would be silently ignored for a packed file: refused, naming the options
    assert cli.main(["eval", str(out), "-t", "half"]) == 2
    assert "-t/--type-config" in capsys.readouterr().err
    # a header asking for a huge synthetic dataset (checksum recomputed) is refused, not built
    header, blobs = read_container(out)
    header["data"] = {"dataset": "synthetic", "synthetic_size": 10**12}
    write_container(tmp_path / "bomb.fewbits", header, blobs, compress_header=True)
    assert cli.main(["eval", str(tmp_path / "bomb.fewbits")]) == 2
    assert "synthetic_size" in capsys.readouterr().err
