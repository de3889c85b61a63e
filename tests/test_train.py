"""fewbits.train: every registered net trains; monitor files; config.json; exact resume."""

from __future__ import annotations

import io
import json
import re
import signal
from pathlib import Path

import pytest
import torch

from fewbits import create_model, list_models
from fewbits.checkpoint import load_model
from fewbits.models import model_info
from fewbits.monitor import (
    LOSS_FILE,
    SERIES_FILES,
    TEST_ERROR_FILE,
    TIMER_FILE,
    TRAIN_ERROR_FILE,
    Monitor,
    Progress,
    read_series,
)
from fewbits.train import (
    ConfigError,
    TrainConfig,
    TrainingInterrupted,
    build_model,
    count_parameters,
    train,
)

LINE = re.compile(r"^\d+ -?\d+(\.\d+)?([eE][-+]?\d+)?$")


def tiny(net: str, path: Path, **kw) -> TrainConfig:
    """A few iterations of ``net`` on a tiny synthetic dataset, MNIST nets made narrow."""
    small = {}
    defaults = model_info(net).defaults
    if "depth" in defaults:
        small = {"width": 16, "depth": 1}
    elif "width" in defaults:
        small = {"width": 16}
    opts = dict(net=net, dataset="synthetic", synthetic_size=16, batch_size=8, max_iter=2,
                val_interval=2, monitor_path=str(path), progress=False, plot=False,
                model_args=small)
    if model_info(net).family == "inq":
        opts["inq_iterations"] = (0, 1)  # reach the all-fixed state within the run
    opts.update(kw)
    return TrainConfig(**opts)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.parametrize("net", list_models())
def test_every_registered_net_trains(net, tmp_path):
    res = train(tiny(net, tmp_path))
    assert res.iterations == 2
    for name in (*SERIES_FILES, "config.json", "checkpoint.pt", "model_best.pt",
                 "model_final.pt"):
        assert (tmp_path / name).is_file(), name
    # Validations before iteration 0 (i % 2 == 0) and after the last one (2).
    its, errs = read_series(tmp_path / TEST_ERROR_FILE)
    assert its == [0, 2]
    assert all(0.0 <= e <= 1.0 for e in errs)
    assert all(LINE.match(ln) for ln in lines(tmp_path / TEST_ERROR_FILE))
    assert res.final_error == errs[-1]
    # The saved model rebuilds from its spec and computes what the trained one computes.
    model = load_model(tmp_path / "model_final.pt")
    x = torch.rand(2, *json.loads((tmp_path / "config.json").read_text())["data"]
                   ["image_shape"])
    res.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), res.model(x))
    if model_info(net).family == "inq":
        from fewbits.quantizers import INQ

        inq = [m for m in model.modules() if isinstance(m, INQ)]
        assert inq and all(bool(q.mask.all()) for q in inq)


def test_monitor_files_have_the_seed_format(tmp_path):
    cfg = tiny("mnist_float_mlp", tmp_path, batch_size=4, max_iter=30, val_interval=20,
               model_args={"width": 8, "depth": 1}, plot=True)
    train(cfg)
    for name in (LOSS_FILE, TRAIN_ERROR_FILE, TEST_ERROR_FILE):
        content = lines(tmp_path / name)
        assert content and all(LINE.match(ln) for ln in content), (name, content[:3])
    # Means over 10 iterations at i = 9, 19, 29; the timer writes every 100 iterations and
    # its partial last window at the end (issue 13: it stayed empty in short runs).
    assert read_series(tmp_path / LOSS_FILE)[0] == [9, 19, 29]
    assert read_series(tmp_path / TRAIN_ERROR_FILE)[0] == [9, 19, 29]
    its, secs = read_series(tmp_path / TIMER_FILE)
    assert its == [29] and secs[0] > 0
    assert read_series(tmp_path / TEST_ERROR_FILE)[0] == [0, 20, 30]
    png = (tmp_path / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_monitor_windows_timer_and_resume_truncation(tmp_path):
    mon = Monitor(tmp_path, interval=10, time_interval=5)
    mon.start()
    out = [mon.add_train(i, torch.tensor([float(i), i / 16])) for i in range(13)]
    assert out[9] == (4.5, 4.5 / 16) and out.count(None) == 12
    assert mon.state_dict() == {"loss": [10.0, 11.0, 12.0], "error": [0.625, 0.6875, 0.75]}
    its, secs = read_series(tmp_path / TIMER_FILE)
    assert its == [4, 9] and all(s >= 0 for s in secs)
    assert all(LINE.match(ln) for ln in lines(tmp_path / TIMER_FILE))
    mon.add_test(0, 0.5)
    mon.add_test(10, 0.25)
    # A run resumed at iteration 10 drops what the old run wrote from iteration 10 on.
    again = Monitor(tmp_path, interval=10, time_interval=5)
    again.start(10, {"loss": [1.0], "error": [0.0]})
    assert read_series(tmp_path / TEST_ERROR_FILE) == ([0], [0.5])
    assert read_series(tmp_path / TIMER_FILE)[0] == [4, 9]
    assert read_series(tmp_path / LOSS_FILE) == ([9], [4.5])
    assert again.state_dict() == {"loss": [1.0], "error": [0.0]}
    quiet = Monitor(tmp_path / "other_rank", enabled=False)
    quiet.start()
    assert quiet.add_train(9, torch.zeros(2)) is None and not (tmp_path / "other_rank").exists()


def test_first_validation_can_be_skipped(tmp_path):
    train(tiny("mnist_float_mlp", tmp_path, validate_first=False, max_iter=3))
    assert read_series(tmp_path / TEST_ERROR_FILE)[0] == [2, 3]


def test_config_json_is_the_resolved_config(tmp_path):
    cfg = tiny("cifar10_fp_connect_resnet23_prediction", tmp_path, bit_width=4,
               ste_fine_grained=False, max_iter=2, epochs=None)
    train(cfg)
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["net"] == "cifar10_fp_connect_resnet23_prediction"
    assert c["max_iter"] == 2 and c["batch_size"] == 8 and c["dataset"] == "synthetic"
    assert c["model_save_path"] == str(tmp_path)  # defaults to the monitor path
    assert c["checkpoint_interval"] == 2 and c["augment"] is False
    spec = c["model"]["fewbits_spec"]
    assert spec["name"] == c["net"]
    assert spec["kwargs"]["bit_width"] == 4 and spec["kwargs"]["ste_fine_grained"] is False
    assert spec["kwargs"]["num_classes"] == 10 and spec["kwargs"]["in_channels"] == 3
    rebuilt = create_model(spec["name"], **spec["kwargs"])
    assert count_parameters(rebuilt) == c["model"]["num_parameters"]
    assert c["data"]["image_shape"] == [3, 32, 32] and c["world_size"] == 1


def test_epochs_set_max_iter(tmp_path):
    res = train(tiny("mnist_float_mlp", tmp_path, epochs=1.5, val_interval=100))
    assert res.iterations == 3  # 16 images / batch 8 = 2 steps per epoch
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["max_iter"] == 3 and c["epochs"] == 1.5


def test_seed_resnet_has_97482_parameters():
    model = build_model(TrainConfig(), (3, 32, 32), 10)
    assert count_parameters(model) == 97482


def test_model_gets_classes_and_channels_from_the_data():
    m = build_model(TrainConfig(net="cifar10_resnet23_prediction"), (1, 32, 32), 7)
    assert m.fewbits_spec["kwargs"]["in_channels"] == 1
    assert m(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    mlp = build_model(TrainConfig(net="mnist_float_mlp", model_args={"width": 8}), (1, 28, 28),
                      3)
    assert mlp.fewbits_spec["kwargs"]["in_features"] == 784
    with pytest.raises(ConfigError, match="no such option"):
        build_model(TrainConfig(net="mnist_float_mlp", model_args={"widht": 8}), (1, 28, 28), 3)


def test_net_that_does_not_fit_the_images(tmp_path):
    with pytest.raises(ConfigError, match=r"expects 32x32 .*mnist_binary_connect_lenet"):
        train(tiny("cifar10_resnet23_prediction", tmp_path, dataset="digits"))


def test_loss_decreases_on_synthetic_data(tmp_path):
    cfg = tiny("mnist_float_lenet", tmp_path, synthetic_size=240, batch_size=16, max_iter=30,
               val_interval=100)
    res = train(cfg)
    _, losses = read_series(tmp_path / LOSS_FILE)
    _, errors = read_series(tmp_path / "Training-error.series.txt")
    assert len(losses) == 3
    assert losses[2] < losses[1] < losses[0] and losses[2] < 0.8 * losses[0], losses
    assert errors[-1] < errors[0]
    assert res.final_error < 0.5  # 10 classes: chance is 0.9


def _params(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_model(path).state_dict())


RESUME_CASES = {
    # augmentation (CPU generator), INQ fixing (counter in the state dict), BN statistics
    "mnist_inq_lenet": dict(augment=True, inq_iterations=(3, 7, 11)),
    # min-max activations with EMA ranges (buffers), learnt weight ranges (parameters)
    "mnist_min_max_mlp": dict(a_min_max=True, a_ema=True, optimizer="sgd"),
}


@pytest.mark.parametrize("net", sorted(RESUME_CASES))
def test_resume_reproduces_the_uninterrupted_run(net, tmp_path):
    opts = dict(synthetic_size=48, batch_size=8, max_iter=20, val_interval=5,
                checkpoint_interval=100, **RESUME_CASES[net])
    train(tiny(net, tmp_path / "straight", **opts))

    # Interrupted by SIGINT after iteration 7 (mid 10-iteration window), then resumed.
    run = tmp_path / "resumed"

    def interrupt(done: int) -> None:
        if done == 7:
            signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started as a background job
    with pytest.raises(TrainingInterrupted, match="--resume") as ei:
        train(tiny(net, run, **opts), on_step=interrupt)
    assert ei.value.iteration == 7 and ei.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored
    train(tiny(net, run, resume="auto", **opts))

    # Stopped at -i 10 (a finished shorter run), then extended to 20.
    run2 = tmp_path / "extended"
    train(tiny(net, run2, **{**opts, "max_iter": 10}))
    train(tiny(net, run2, resume=str(run2), **opts))

    want = (tmp_path / "straight" / LOSS_FILE).read_text()
    assert want.count("\n") == 2
    for r in (run, run2):
        assert (r / LOSS_FILE).read_text() == want
        assert (r / TEST_ERROR_FILE).read_text() == (
            tmp_path / "straight" / TEST_ERROR_FILE).read_text()
        a, b = _params(tmp_path / "straight" / "model_final.pt"), _params(r / "model_final.pt")
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k


def test_resume_without_checkpoint_says_so(tmp_path):
    from fewbits.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(tiny("mnist_float_mlp", tmp_path, resume="auto"))


def test_mixed_precision_on_cpu_runs_bf16(tmp_path):
    res = train(tiny("mnist_fp_net_lenet", tmp_path, type_config="half", max_iter=2))
    assert 0.0 <= res.final_error <= 1.0
    assert all(p.dtype == torch.float32 for p in res.model.parameters())


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="batch-size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="context"):
        TrainConfig(context="tpu")
    with pytest.raises(ConfigError, match="ql_min"):
        TrainConfig(ql_min=3, ql_max=3)
    with pytest.raises(ConfigError, match="a_ema"):
        TrainConfig(a_ema=True)


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bar_on_a_terminal_and_log_lines_otherwise():
    bar = _Stream(tty=True)
    p = Progress(20, enabled=True, bar=True, stream=bar)
    for i in range(20):
        p.step(i, 8, (1.5, 0.25) if (i + 1) % 10 == 0 else None)
    p.close()
    out = bar.getvalue()
    assert "20/20" in out and "loss=1.5000" in out and "err=25.0%" in out and "img_s=" in out

    for tty, flag in ((False, True), (True, False)):  # not a terminal, or --no-progress
        log = _Stream(tty=tty)
        p = Progress(200, enabled=True, bar=flag, stream=log, log_every=100)
        for i in range(200):
            p.step(i, 8, (1.0, 0.5) if (i + 1) % 10 == 0 else None)
        lines_ = log.getvalue().splitlines()
        assert len(lines_) == 2 and lines_[0].startswith("iter 100/200  loss 1.0000")
        assert "error 50.00%" in lines_[1] and "images/s" in lines_[1]
    silent = _Stream(tty=True)
    Progress(5, enabled=False, stream=silent).write("x")
    assert silent.getvalue() == ""


def test_dead_start_raises_instead_of_sitting_at_chance(tmp_path):
    # min_max's seed ranges ([-2, 2] weights) at 2 bits (--ql-max 3): step 4/3, every weight
    # rounds to 0, the logits are the same for every image and every gradient but the last
    # bias's is 0 (the MNIST LeNet sat at 90.20 % for 300 iterations). Raise at iteration 0.
    with pytest.raises(ConfigError, match=r"same output for every image.*conv1\.weight_quantizer"
                       r" \(MinMax\) maps .* to 0.*--p-min-max"):
        train(tiny("mnist_min_max_lenet", tmp_path / "dead", ql_max=3))
    assert not (tmp_path / "dead" / "model_final.pt").exists()
    # Ranges from each batch cover the weights: the same 2-bit net trains.
    assert train(tiny("mnist_min_max_lenet", tmp_path / "batch", ql_max=3,
                      p_min_max=True)).iterations == 2
