"""DDP: 2 CPU processes under torchrun (gloo, loopback) == 1 process accumulating 2 micro-batches.

Both see the same global batch of 2 x 4 images per step (rank r / micro-batch r gets rows
[4r, 4r + 4) of it, with the same augmentation parameters), and both normalise each group of 4
with its own batch statistics, so losses and parameters agree up to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewbits.checkpoint import load_checkpoint, load_model
from fewbits.monitor import LOSS_FILE, read_series

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["-c", "cpu", "--model-arg", "width=32", "--model-arg",
          "depth=2", "--dataset", "synthetic", "--synthetic-size", "64", "-b", "4", "-i", "20",
          "-v", "10", "--augment", "--seed", "1", "--no-progress", "--no-plot",
          # SGD, not Adam: the MLP's hidden biases feed batch norm, so their true gradient is 0
          # and Adam would blow the rounding noise of either run up to +-lr steps.
          "--optimizer", "sgd", "-l", "0.05"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("net", [
    ["-n", "mnist_float_mlp"],
    # the reproduction: EMA activation ranges differed per rank (losses 2.0306 vs 2.0285)
    ["-n", "mnist_min_max_mlp", "--a-min-max", "--a-ema"]], ids=["float", "min_max_ema"])
def test_two_ranks_match_one_process_with_accumulation(net, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "classification.py"), *net, *COMMON, "-m", str(ddp)],
        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("done:") == 1  # one writer: rank 0
    # The reference in a process of its own, with the ranks' thread count: a different count
    # changes float summation order, which batch norm on 4 images amplifies past 1e-5.
    p = subprocess.run([sys.executable, str(ROOT / "classification.py"), *net, *COMMON,
                        "--accum-steps", "2", "-m", str(single)],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    c_ddp = json.loads((ddp / "config.json").read_text())
    c_one = json.loads((single / "config.json").read_text())
    assert (c_ddp["world_size"], c_one["world_size"]) == (2, 1)
    assert c_ddp["global_batch_size"] == c_one["global_batch_size"] == 8

    its_d, loss_d = read_series(ddp / LOSS_FILE)
    its_s, loss_s = read_series(single / LOSS_FILE)
    assert its_d == its_s == [9, 19]
    torch.testing.assert_close(torch.tensor(loss_d), torch.tensor(loss_s), rtol=1e-5, atol=0)

    a, b = load_model(ddp / "model_final.pt"), load_model(single / "model_final.pt")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-7, msg=k)
    ranges = [k for k in a.state_dict() if k.endswith(("qr_min", "qr_max"))]
    assert bool(ranges) == (net[1] == "mnist_min_max_mlp")
    for k in ranges:  # the activation ranges of the last micro-batch, not rank 0's
        torch.testing.assert_close(a.state_dict()[k], b.state_dict()[k], rtol=1e-5, atol=1e-7,
                                   msg=k)
    state = load_checkpoint(ddp / "checkpoint.pt")
    assert state["world_size"] == 2 and state["iteration"] == 20
    assert not any(k.startswith("module.") for k in state["state_dict"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_quantizer_state_under_ddp_equals_one_process_accumulating(tmp_path):
    # Min-max batch / EMA / learned ranges and INQ: after every step both ranks hold the same
    # state, equal bit for bit to one process running the two micro-batches in rank order
    # (fewbits.distributed.sync_quantizers); each rank's loss is that micro-batch's loss.
    import ddp_quantizer_run as R

    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "ddp_quantizer_run.py"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind in R.KINDS:
            ref_losses, ref_states = R.run(kind, world=1, rank=0, accum=2)
            for r in (0, 1):
                losses, states = ranks[r][kind]
                assert [s[0] for s in losses] == [s[r] for s in ref_losses], (kind, r)
                for step, (a, b) in enumerate(zip(states, ref_states, strict=True)):
                    assert a.keys() == b.keys()
                    for k in a:
                        ok = a[k] == b[k] if isinstance(a[k], dict) else torch.equal(a[k], b[k])
                        assert ok, (kind, r, step, k, a[k], b[k])
        for kind in ("ema", "inq"):  # 2 ranks x 2 micro-batches == 1 process x 4
            ref_losses, ref_states = R.run(kind, world=1, rank=0, accum=4)
            for r in (0, 1):
                losses, states = ranks[r][f"{kind}@2"]
                # gradients are summed in another order: equal up to float rounding
                torch.testing.assert_close(torch.tensor([s for s in losses]),
                                           torch.tensor([[s[r], s[2 + r]] for s in ref_losses]),
                                           rtol=1e-5, atol=1e-6)
                for a, b in zip(states, ref_states, strict=True):
                    for k in a:
                        if isinstance(a[k], dict):
                            assert a[k] == b[k], (kind, k)
                        else:
                            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)
    inq = ranks[1]["inq"][1][-1]
    assert [v["counter"] for k, v in inq.items() if k.endswith("_extra_state")] == [4, 4]
    assert bool(inq["0.weight_quantizer.mask"].all())
