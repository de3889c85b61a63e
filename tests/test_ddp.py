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
COMMON = ["-c", "cpu", "-n", "mnist_float_mlp", "--model-arg", "width=32", "--model-arg",
          "depth=2", "--dataset", "synthetic", "--synthetic-size", "64", "-b", "4", "-i", "20",
          "-v", "10", "--augment", "--seed", "1", "--no-progress", "--no-plot",
          # SGD, not Adam: the MLP's hidden biases feed batch norm, so their true gradient is 0
          # and Adam would blow the rounding noise of either run up to +-lr steps.
          "--optimizer", "sgd", "-l", "0.05"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_match_one_process_with_accumulation(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "classification.py"), *COMMON, "-m", str(ddp)],
        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("done:") == 1  # one writer: rank 0
    # The reference in a process of its own, with the ranks' thread count: a different count
    # changes float summation order, which batch norm on 4 images amplifies past 1e-5.
    p = subprocess.run([sys.executable, str(ROOT / "classification.py"), *COMMON,
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
    state = load_checkpoint(ddp / "checkpoint.pt")
    assert state["world_size"] == 2 and state["iteration"] == 20
    assert not any(k.startswith("module.") for k in state["state_dict"])
