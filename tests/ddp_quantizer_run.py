"""Tiny training runs of stateful quantizers, under DDP or in one process (for test_ddp.py).

``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_quantizer_run.py OUT`` trains
every kind of :data:`KINDS` with 2 ranks and writes each rank's per-step states to
``OUT/rank<r>.pt``; the test runs the same steps in one process accumulating 2 micro-batches
(:func:`run` with ``world=1, accum=2``) and compares.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from fewbits import distributed as fdist
from fewbits.layers import QuantLinear, apply_weight_constraints, count_optimizer_steps

STEPS, BATCH = 4, 4


def _mm(mode: str, **kw) -> dict:
    return {"name": "min_max", "mode": mode, "decay": 0.5, **kw}


KINDS = {
    "batch": dict(w1=_mm("batch", per_channel=True, init_min=-2, init_max=2),
                  a1=_mm("batch"), w2=_mm("batch", init_min=-2, init_max=2), a2=_mm("batch")),
    "ema": dict(w1=None, a1=_mm("ema"), w2=None, a2=_mm("ema", init_min=-1.0, init_max=1.0)),
    "learned": dict(w1=_mm("learnable", init_min=-2, init_max=2),
                    a1=_mm("learnable", init_min=0.5, init_max=1.0), w2=None,
                    a2=_mm("learnable", init_min=-3.0, init_max=3.0)),
    "lsq": dict(w1={"name": "lsq", "bits": 3}, a1={"name": "lsq", "bits": 4},
                w2=None, a2={"name": "lsq", "bits": 2, "signed": False, "offset": True}),
    "inq": dict(w1={"name": "inq", "inq_iterations": [1, 2, 3]}, a1=None,
                w2={"name": "inq", "inq_iterations": [0, 2], "selection": "random"}, a2=None),
}


def make(kind: str) -> nn.Module:
    k = KINDS[kind]
    torch.manual_seed(0)
    return nn.Sequential(QuantLinear(6, 8, weight_quantizer=k["w1"], output_quantizer=k["a1"]),
                         nn.ReLU(),
                         QuantLinear(8, 3, weight_quantizer=k["w2"], input_quantizer=k["a2"]))


def data(world: int, accum: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = world * accum * BATCH
    return (torch.randn(STEPS, n, 6, generator=g) * 2,
            torch.randint(0, 3, (STEPS, n), generator=g))


def state(model: nn.Module) -> dict:
    out = {k: v.detach().clone() for k, v in model.state_dict().items()
           if not k.endswith("_extra_state")}
    out.update({k: dict(v) for k, v in model.state_dict().items() if k.endswith("_extra_state")})
    return out


def run(kind: str, world: int = 1, rank: int = 0, accum: int = 1,
        info: fdist.DistInfo | None = None, user: bool = False
        ) -> tuple[list[list[float]], list[dict]]:
    """Per step: the losses of this process's micro-batches, and the state after the step.
    ``user``: a user's own loop, which calls no fewbits function (no sync_quantizers,
    count_optimizer_steps or apply_weight_constraints)."""
    model = make(kind)
    if not user:
        count_optimizer_steps(model)
    net: nn.Module = model
    if info is not None and info.distributed:
        if not user:
            fdist.sync_quantizers(model, info)
        net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x, t = data(world, accum)
    losses, states = [], []
    for s in range(STEPS):
        step = []
        for j in range(accum):
            g = (j * world + rank) * BATCH
            sync = (net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel)
                    and j < accum - 1 else contextlib.nullcontext())
            with sync:
                loss = nn.functional.cross_entropy(net(x[s, g:g + BATCH]), t[s, g:g + BATCH])
                (loss / accum if accum > 1 else loss).backward()
            step.append(float(loss.detach()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not user:
            apply_weight_constraints(model)
        losses.append(step)
        states.append(state(model))
    return losses, states


def main(out: str, user: bool = False) -> None:
    info = fdist.init_from_env("cpu")
    try:
        if user:  # tests/test_loop_habits.py: a user's DDP loop
            result = {kind: run(kind, info.world_size, info.rank, 1, info, user=True)
                      for kind in KINDS}
            torch.save(result, f"{out}/rank{info.rank}.pt")
            return
        result = {kind: run(kind, info.world_size, info.rank, 1, info) for kind in KINDS}
        # with accumulation: micro-batch j of rank r is number j * N + r of the step
        result.update({f"{kind}@2": run(kind, info.world_size, info.rank, 2, info)
                       for kind in ("ema", "inq")})
        torch.save(result, f"{out}/rank{info.rank}.pt")
    finally:
        fdist.cleanup(info)


if __name__ == "__main__":
    main(sys.argv[1], user=sys.argv[2:] == ["user"])
