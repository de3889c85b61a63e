"""The habits of a training loop that fewbits must survive without being asked (issue 21, 6):
an optimizer built before quantize_, loading a float checkpoint into a converted model,
activation checkpointing, torch.func, calibrate's batches, the learned-range projection, DDP."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fewbits import calibrate, quantize_
from fewbits.layers import QuantLinear
from fewbits.models import FAMILIES


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


# --------------------------------------------------------------------------- calibrate


def test_calibrate_takes_dict_batches_and_keeps_zero_in_the_range():
    class KwNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, pixel_values, labels=None):
            return self.fc(pixel_values)

    net = quantize_(KwNet(), {"input": {"name": "min_max", "mode": "batch"}},
                    quantize_input=True)  # fc reads the raw input: asked for here
    x = 0.5 + 0.5 * torch.rand(8, 4)  # all positive, in [0.5, 1]
    ranges = calibrate(net, [{"pixel_values": x, "labels": torch.zeros(8)}])
    assert ranges == {"fc.input_quantizer": (0.0, float(x.max()))}
    net.eval()
    y = net.fc.input_quantizer(x)
    assert float((y - x).abs().max()) <= float(x.max()) / 255 / 2 + 1e-6  # nothing clipped
    with pytest.raises(TypeError, match="a batch is a tensor"):
        calibrate(net, [3])


# --------------------------------------------------------------------------- float checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_float_checkpoint_loads_strictly_and_restarts_weight_state(family):
    float_net = mlp()
    with torch.no_grad():
        for p in float_net.parameters():
            p.mul_(3.0)  # weights far outside the random init's ranges
    ckpt = float_net.state_dict()
    ref, fresh = quantize_(mlp(), family), quantize_(mlp(), family)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ref.load_state_dict(ckpt, strict=False)  # the old habit: strict=False
        fresh.load_state_dict(ckpt)  # strict: a float checkpoint has no quantizer keys
    # activation ranges have no stored tensor: kept, with a warning naming calibrate
    acts = family in ("min_max",)
    assert any("calibrate" in str(w.message) for w in seen) == acts
    expected = mlp()
    expected.load_state_dict(ckpt)
    expected = quantize_(expected, family)  # convert after loading: the reference
    x = torch.randn(5, 6)
    for net in (ref, fresh, expected):
        net.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected(x), rtol=0, atol=0)
        torch.testing.assert_close(ref(x), expected(x), rtol=0, atol=0)
    assert fresh.state_dict().keys() == expected.state_dict().keys()


def test_fewbits_checkpoint_missing_a_range_still_fails_strict_loading():
    net = quantize_(mlp(), "min_max")
    state = net.state_dict()
    del state["0.weight_quantizer.qr_min"]
    with pytest.raises(RuntimeError, match="0.weight_quantizer.qr_min"):
        quantize_(mlp(), "min_max").load_state_dict(state)


# --------------------------------------------------------------------------- checkpointing


def _stateful_net() -> nn.Module:
    torch.manual_seed(0)
    ema = {"name": "min_max", "mode": "ema", "decay": 0.5}
    return nn.Sequential(
        QuantLinear(6, 16, weight_quantizer={"name": "inq", "inq_iterations": [1, 2]},
                    output_quantizer=ema),
        nn.ReLU(),
        QuantLinear(16, 3, weight_quantizer={"name": "min_max", "mode": "batch"},
                    input_quantizer=dict(ema, init_min=-1.0, init_max=1.0)))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_updates_quantizer_state_once(reentrant):
    from torch.utils.checkpoint import checkpoint

    plain, ckpt = _stateful_net().train(), _stateful_net().train()
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(8, 6, generator=g, requires_grad=reentrant)
        plain(x).square().sum().backward()
        checkpoint(ckpt, x, use_reentrant=reentrant).square().sum().backward()
    ref, got = plain.state_dict(), ckpt.state_dict()
    assert ref["0.weight_quantizer._extra_state"]["counter"] == 3
    for k in ref:
        if k.endswith("_extra_state"):
            assert got[k] == ref[k], k  # the INQ counter counted each step once
        else:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=n)


# --------------------------------------------------------------------------- optimizers


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x, t = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), t).backward()
        opt.step()


def test_an_optimizer_built_before_quantize_is_refused_or_given_the_new_ranges():
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    quantize_(net, "min_max")
    with pytest.raises(RuntimeError, match=r"0\.weight_quantizer\.qr_min.*optimizer=opt"):
        _train(net, opt, 1)
    # passing the optimizer: the ranges train with it, as with an optimizer built after
    a, b = mlp(), mlp()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    quantize_(a, "min_max", optimizer=opt_a)
    quantize_(b, "min_max")
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    start = float(a[0].weight_quantizer.qr_max.detach())
    _train(a, opt_a)
    _train(b, opt_b)
    assert float(a[0].weight_quantizer.qr_max.detach()) != start
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    # ranges kept fixed on purpose: requires_grad_(False), and the old optimizer is fine
    c = mlp()
    opt_c = torch.optim.SGD(c.parameters(), lr=0.1)
    quantize_(c, "min_max")
    for n, p in c.named_parameters():
        if "quantizer" in n:
            p.requires_grad_(False)
    _train(c, opt_c, 1)


def test_learned_ranges_are_projected_without_a_call_and_a_collapsed_range_restarts():
    torch.manual_seed(0)
    layer = QuantLinear(16, 4, output_quantizer={"name": "min_max", "init_min": 0.5,
                                                 "init_max": 1.0})
    q = layer.output_quantizer
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, t = torch.randn(64, 16), torch.randn(64, 4).abs() * 3
    for _ in range(30):  # a user's own loop: no apply_weight_constraints
        opt.zero_grad()
        ((layer(x) - t) ** 2).mean().backward()
        opt.step()
        lo, hi = float(q.qr_min.detach()), float(q.qr_max.detach())
        assert lo <= 0.0 <= hi and hi - lo >= 0.01 * (1 - 2**-20), (lo, hi)
    # a range that is crossed (or starts eps wide) restarts from the data it quantizes
    for start in ((0.3, -0.2), (0.0, 0.0)):
        layer = QuantLinear(16, 4, output_quantizer={"name": "min_max", "init_min": -1.0,
                                                     "init_max": 1.0})
        q = layer.output_quantizer
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        with torch.no_grad():
            q.qr_min.fill_(start[0])
            q.qr_max.fill_(start[1])
        opt.zero_grad()
        opt.step()  # no gradient: only the projection runs
        assert (float(q.qr_min.detach()), float(q.qr_max.detach())) == pytest.approx((0.0, 0.01))
        y = layer(x)  # training forward: restart from this batch
        with torch.no_grad():
            out = nn.functional.linear(x, layer.weight, layer.bias)
        assert float(q.qr_min.detach()) == min(0.0, float(out.min()))
        assert float(q.qr_max.detach()) == max(0.0, float(out.max()))
        assert float((y.detach() - out).abs().max()) < 0.1  # quantized on a grid that covers it


# --------------------------------------------------------------------------- DDP


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_a_users_ddp_loop_keeps_quantizer_statistics_equal_across_ranks(tmp_path):
    # DistributedDataParallel around a fewbits model, and nothing else: no sync_quantizers, no
    # apply_weight_constraints. Batch/EMA ranges must be those of one process running the
    # ranks' micro-batches in rank order (as with sync_quantizers), on both ranks.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    import ddp_quantizer_run as R

    env = {**os.environ, "PYTHONPATH": str(root), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "tests" / "ddp_quantizer_run.py"), str(tmp_path), "user"],
        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind in R.KINDS:
            s0, s1 = ranks[0][kind][1], ranks[1][kind][1]
            for step, (a, b) in enumerate(zip(s0, s1, strict=True)):
                for k in a:  # the ranks agree at every step
                    ok = a[k] == b[k] if isinstance(a[k], dict) else torch.equal(a[k], b[k])
                    assert ok, (kind, step, k, a[k], b[k])
            if kind == "inq":  # counts forwards here: 1 per step, not the reference's 2
                continue
            _, ref = R.run(kind, world=1, rank=0, accum=2)
            for step, (a, b) in enumerate(zip(s0, ref, strict=True)):
                for k in a:
                    assert torch.equal(a[k], b[k]), (kind, step, k, a[k], b[k])
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_func_grad_and_vmap_match_autograd(family):
    torch.manual_seed(0)
    net = quantize_(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), family).eval()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(4, 6) * 2

    def loss(p, x):
        return torch.func.functional_call(net, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params, x)
    loss(dict(net.named_parameters()), x).backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-6, atol=1e-6, msg=k)
    ys = torch.func.vmap(lambda xi: torch.func.functional_call(net, params, (xi[None],)))(x)
    with torch.no_grad():
        torch.testing.assert_close(ys[:, 0], net(x), rtol=0, atol=0)
    # per-sample gradients: vmap over grad, against one backward per sample
    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[:, None])
    for i in range(2):
        net.zero_grad()
        loss(dict(net.named_parameters()), x[i:i + 1]).backward()
        for k, p in net.named_parameters():
            torch.testing.assert_close(per[k][i], p.grad, rtol=1e-6, atol=1e-6, msg=k)


def test_vmap_of_a_batch_statistics_forward_names_what_to_use():
    layer = QuantLinear(4, 2, input_quantizer={"name": "min_max", "mode": "ema"}).train()
    with pytest.raises(RuntimeError, match="model.eval"):
        torch.func.vmap(layer)(torch.randn(3, 4))


def test_a_float_checkpoint_refits_only_a_grid_that_quantize_chose():
    """fixed point's delta / pow2's m chosen from the random init were kept when a float
    checkpoint was loaded (strictly, without a word): 3x larger weights clipped. A grid the
    config gives is the user's and stays."""
    import math

    from fewbits.convert import family_config
    from fewbits.quantizers.base import fitted_step

    def m_for(w):
        return round(math.log2(fitted_step(w, 1)))

    big = mlp()
    with torch.no_grad():
        for p in big.parameters():
            p.mul_(3.0)
    ckpt = big.state_dict()
    fitted = quantize_(mlp(), "pow2_connect")
    fitted.load_state_dict(ckpt)
    assert fitted[0].weight_quantizer.m == m_for(ckpt["0.weight"])
    assert fitted[0].weight_quantizer.m != m_for(mlp()[0].weight)
    given = quantize_(mlp(), family_config("fp_connect", delta=2**-3))
    given.load_state_dict(ckpt)
    assert given[0].weight_quantizer.delta == 2**-3
