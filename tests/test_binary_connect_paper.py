"""BinaryConnect's own training of the latent weights (Courbariaux et al. 2015, the authors'
code with H = 1): uniform initialisation in [-1, 1], clipping to [-1, 1] and updates scaled by
1/H per layer (Glorot), which stochastic binarization needs to train at all; on with
--stochastic, off (the seed's spec, key for key) otherwise."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fewbits.layers import QuantConv2d, QuantLinear, apply_weight_constraints
from fewbits.models import create_model
from fewbits.quantizers import BinaryConnect
from fewbits.quantizers.optim import scale_updates
from fewbits.train import TrainConfig, train

PAPER = {"name": "binary_connect", "clip_weights": True, "uniform_init": True,
         "glorot_lr_scale": True}


def _glorot_scale(fan_in: int, fan_out: int) -> float:
    # the authors' W_LR_scale = 1 / H, H = sqrt(6 / (fan_in + fan_out)) / 2
    return 2.0 / math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize("make, fans", [
    (lambda: QuantLinear(300, 200, bias=False, weight_quantizer=PAPER), (300, 200)),
    (lambda: QuantConv2d(4, 8, 3, weight_quantizer=PAPER), (4 * 9, 8 * 9)),
])
def test_glorot_scale_multiplies_every_optimizer_update(make, fans):
    """SGD's update ``-lr * g`` becomes ``-lr * g / H`` (the paper's per-layer learning-rate
    scale), in a plain loop, for a copy of the layer too; clipping comes after it."""
    torch.manual_seed(0)
    layer = make()
    w = layer.weight
    assert w.abs().max() <= 1 and w.abs().max() > 0.9  # uniform in [-1, 1], not PyTorch's
    s = _glorot_scale(*fans)
    assert layer.weight_quantizer.update_scale(w) == pytest.approx(s, rel=1e-12)
    for lay in (layer, copy.deepcopy(layer)):  # the copy registers at its training forward
        opt = torch.optim.SGD(lay.parameters(), lr=1e-3)
        x = torch.randn(2, *((300,) if isinstance(lay, nn.Linear) else (4, 5, 5)))
        lay(x).square().sum().backward()
        before, g = lay.weight.detach().clone(), lay.weight.grad.clone()
        opt.step()
        torch.testing.assert_close(lay.weight.detach(), before - 1e-3 * s * g)
        apply_weight_constraints(lay)
        assert lay.weight.abs().max() <= 1


def test_uniform_init_only_in_a_fresh_layer_and_glorot_needs_an_output_axis():
    fc = nn.Linear(6, 3)
    kept = fc.weight.detach().clone()
    q = QuantLinear.from_float(fc, weight_quantizer=PAPER)  # converted: weights kept
    assert torch.equal(q.weight.detach(), kept)
    with pytest.raises(ValueError, match="finite and > 0"):
        scale_updates(q.weight, 0.0)
    scale_updates(q.weight, 2.0)
    scale_updates(q.weight, 1.0)  # removed: a plain step again
    q.weight.grad = torch.ones_like(q.weight)
    torch.optim.SGD([q.weight], lr=0.5).step()
    assert torch.equal(q.weight.detach(), kept - 0.5)
    with pytest.raises(ValueError, match="glorot_lr_scale needs a weight with an output"):
        QuantLinear(6, 3, weight_quantizer=None, bias_quantizer=PAPER)
    assert BinaryConnect(**{k: v for k, v in PAPER.items() if k != "name"}).config() == PAPER \
        | {"stochastic": False}


def test_paper_options_follow_stochastic_and_leave_the_seed_spec_alone(tmp_path):
    from fewbits.cli import main

    det = create_model("mnist_binary_connect_mlp_bc")
    assert det.fc.weight_quantizer.config() == {"name": "binary_connect", "stochastic": False,
                                                "clip_weights": False}
    st = create_model("mnist_binary_connect_mlp_bc", stochastic=True).fc.weight_quantizer
    assert (st.clip_weights, st.uniform_init, st.glorot_lr_scale) == (True, True, True)
    off = create_model("mnist_binary_net_mlp_bc", stochastic=True, clip_weights=False,
                       glorot_lr_scale=False).fc.weight_quantizer
    assert (off.clip_weights, off.uniform_init, off.glorot_lr_scale) == (False, True, False)
    det_on = create_model("mnist_binary_connect_lenet", uniform_init=True).fc2.weight_quantizer
    assert det_on.uniform_init and not det_on.stochastic and not det_on.glorot_lr_scale
    # refused, not ignored, by a family without binary weights
    assert main(["train", "--net", "mnist_float_lenet", "--glorot-lr-scale", "--dataset",
                 "synthetic", "-i", "1", "-m", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def _cfg(path: Path, **kw) -> TrainConfig:
    return TrainConfig(net="mnist_binary_connect_mlp_bc", model_args={"width": 64},
                       dataset="synthetic", synthetic_size=500, batch_size=50, max_iter=60,
                       val_interval=30, learning_rate=3e-3, stochastic=True, threads=1,
                       monitor_path=str(path), progress=False, plot=False,
                       validate_first=False, **kw)


def _run(path: Path, **kw) -> tuple[float, float]:
    """(training error of the last 10 iterations, final test error)."""
    r = train(_cfg(path, **kw))
    last = Path(path, "Training-error.series.txt").read_text().split()[-1]
    return float(last), r.final_error


class _Stop(Exception):
    pass


def test_stochastic_binary_connect_trains_and_resumes(tmp_path, monkeypatch):
    """Stochastic binary connect on the paper's MLP (narrowed) falls far below chance in 60
    steps with the paper's latent training, and stays at chance without it (PyTorch's initial
    weights make every draw a fair coin); a run stopped and resumed ends where the
    uninterrupted one does (the stream, the scaled updates and the clip all resume); batch
    norm is re-estimated at the end (:func:`_check_batch_norm_re_estimated_once`)."""
    train_err, test_err = _run(tmp_path / "paper")
    assert train_err < 0.45 and test_err < 0.45, (train_err, test_err)
    before = _run(tmp_path / "before", clip_weights=False, uniform_init=False,
                  glorot_lr_scale=False)
    assert min(before) > 0.75, before  # 10 classes: chance is 0.9

    def stop(i):
        if i == 40:  # after the checkpoint at 30
            raise _Stop

    with pytest.raises(_Stop):
        train(_cfg(tmp_path / "resumed"), on_step=stop)
    train(_cfg(tmp_path / "resumed", resume="auto"))
    from fewbits.checkpoint import load_model

    a, b = (load_model(tmp_path / d / "model_final.pt").state_dict()
            for d in ("paper", "resumed"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    _check_batch_norm_re_estimated_once(tmp_path, test_err, a, monkeypatch)


def _check_batch_norm_re_estimated_once(tmp_path, with_bn, a, monkeypatch):
    """--bn-recalibrate (on with --stochastic: all 500 images here) after the last iteration:
    the 1-bit network's test error falls, only batch norm's running statistics change (the
    same training without it, recalibration draws no random number), config.json records the
    count, and a run stopped after its last step and resumed re-estimates once, a finished
    one never again (the "paper" run of the test above is the run with it)."""
    import json

    import fewbits.train.run as run_mod
    from fewbits.checkpoint import load_model

    _, without = _run(tmp_path / "off", bn_recalibrate=0)
    assert with_bn < without, (with_bn, without)
    assert json.loads((tmp_path / "paper" / "config.json").read_text())["bn_recalibrate"] == 500
    b = load_model(tmp_path / "off" / "model_final.pt").state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var",
                                                    "num_batches_tracked") for k in changed)
    calls, real = [], run_mod.recalibrate_bn

    def once(*args):
        calls.append(1)
        if len(calls) == 1:  # dies after the checkpoint at the last iteration
            raise _Stop
        return real(*args)

    monkeypatch.setattr(run_mod, "recalibrate_bn", once)
    with pytest.raises(_Stop):
        train(_cfg(tmp_path / "r"))
    train(_cfg(tmp_path / "r", resume="auto"))
    train(_cfg(tmp_path / "r", resume="auto"))  # finished: validated again, not re-estimated
    assert len(calls) == 2
    c = load_model(tmp_path / "r" / "model_final.pt").state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="--bn-recalibrate 501: give 2 to 500 images"):
        train(_cfg(tmp_path / "x", bn_recalibrate=501))
