"""Forward + backward time of each quantizer function on one activation-sized tensor.

The per-function view behind ``train_step.py``: each quantizer of ``fewbits.functional`` is run
on a ``(64, 64, 32, 32)`` float32 tensor (the largest activation of the seed ResNet-23 at batch
64) and back-propagated, interleaved with a ReLU forward/backward of the same tensor as the unit.
``--ref REV`` also times the functions as of a git revision in the same rounds (see
``equivalence.py``), to measure a speed change.

    PYTHONPATH=. python benchmarks/quantizer_ops.py
    PYTHONPATH=. python benchmarks/quantizer_ops.py --ref main --rounds 15
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

__all__ = ["main"]


def _cases(F: Any) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    lo, hi = torch.tensor(-2.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    return {
        "binary_tanh": F.binary_tanh,
        "binary_sigmoid": F.binary_sigmoid,
        "fixed_point": F.fixed_point_quantize,
        "fixed_point(delta=0.1)": lambda x: F.fixed_point_quantize(x, delta=0.1),
        "pow2(with_zero)": lambda x: F.pow2_quantize(x, with_zero=True),
        "pow2(no zero)": lambda x: F.pow2_quantize(x, with_zero=False),
        "min_max(learnable)": lambda x: F.min_max_quantize(x, lo, hi),
        "min_max(fixed range)": lambda x: F.min_max_quantize(x, lo.detach(), hi.detach()),
        "binary_connect": F.binary_connect,
        "binary_weight": F.binary_weight,
        "inq": F.inq_quantize,
    }


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        xx = x.detach().requires_grad_(True)
        fn(xx).backward(dy)

    return step


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="64,64,32,32", help="tensor shape (default 64,64,32,32)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ref", default=None, help="also time this git revision's functions")
    p.add_argument("--only", default=None, help="comma list of case names")
    p.add_argument("--clock", choices=sorted(C.CLOCKS), default="wall",
                   help="wall time, or this process's CPU time (robust to other load)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import fewbits.functional as F_new

    shape = tuple(int(s) for s in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    dy = torch.randn(shape, generator=g)
    impls = {"new": F_new}
    if args.ref:
        from equivalence import load_reference

        impls["ref"] = load_reference(args.ref).functional
    fns: dict[str, Callable[[], None]] = {"relu": _fwd_bwd(torch.relu, x, dy)}
    only = set(args.only.split(",")) if args.only else None
    for tag, F in impls.items():
        for name, fn in _cases(F).items():
            if only is None or name in only:
                fns[f"{tag}:{name}"] = _fwd_bwd(fn, x, dy)
    tm = C.interleave(fns, rounds=args.rounds, warmup=1, clock=args.clock)
    times, rel = tm.times, tm.ratios("relu")
    res = {k: {"ms": 1e3 * C.median(v), "ms_min": 1e3 * min(v), "x_relu": C.median(rel[k])}
           for k, v in times.items()}
    if args.ref:
        for k in list(res):
            if k.startswith("new:") and "ref:" + k[4:] in res:
                r = [a / b for a, b in zip(times[k], times["ref:" + k[4:]], strict=True)]
                res[k]["x_ref"] = C.median(r)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"shape {shape}, {args.threads} threads, {args.rounds} rounds, {args.clock} clock "
              "(median; min)")
        for k, r in res.items():
            extra = f"  new/ref {r['x_ref']:5.2f}" if "x_ref" in r else ""
            print(f"{k:34s} {r['ms']:8.2f} ms  min {r['ms_min']:7.2f}  x relu "
                  f"{r['x_relu']:6.2f}{extra}")
    return res


if __name__ == "__main__":
    main()
