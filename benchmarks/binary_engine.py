"""The binary_net engine against ONNX Runtime running the FLOAT ResNet-23, 1 thread.

Rows (one process, interleaved call by call with the ONNX Runtime float reference before and
after each candidate, ratio = reference time / candidate time, so > 1 is faster than ONNX
Runtime float):

* ``ort_float``: ONNX Runtime (CPU EP, 1 intra-op thread) on fewbits' ONNX export of the float
  ``cifar10_resnet23_prediction`` -- the baseline;
* ``torch_binary``: the binary_net ResNet-23 in PyTorch eager (what the engine must match);
* ``engine_<isa>``: :class:`fewbits.runtime.binary.BinaryEngine` on each CPU path this machine
  can run.

Both nets get ``--train-steps`` Adam steps on CIFAR-10 (JPEG) training images first (so batch
norm holds real statistics; speed does not depend on the weights). Inputs are CIFAR-10 (JPEG)
test images when ``--data`` exists (else uniform noise, said in the output). Also printed: the
engine's top-1 agreement with PyTorch and its largest logit difference on ``--check`` images,
and the machine load (``os.getloadavg``) before and after. The garbage collector is off while
timing (as ``timeit``), for every row alike.

    PYTHONPATH=. python benchmarks/binary_engine.py --rounds 40
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment, interleave, median

from fewbits.export.onnx import export_onnx, onnx_session
from fewbits.models import create_model
from fewbits.runtime.binary import BinaryEngine, supported_isas

DATA = "/work/shared/data/cifar10-jpeg.tar.gz"


def _images(path: str, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if os.path.exists(path):
        from fewbits.data.imagefolder import load_imagefolder

        ds = load_imagefolder(path, split)
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(ds.images), generator=g)[:n]
        return ds.images[idx].float() / 255.0, ds.labels[idx], "CIFAR-10 (JPEG)"
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), \
        "uniform noise (no data found)"


def _trained(name: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model(name)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m.train()
    for i in range(steps):
        b = slice((i * 64) % len(x), (i * 64) % len(x) + 64)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[b]), y[b]).backward()
        opt.step()
    return m.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 64])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--check", type=int, default=1000, help="images for the top-1 check")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU time (time spent descheduled by other "
                    "processes is not counted: steadier on a loaded machine)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    xtr, ytr, src = _images(args.data, "train", 64 * max(1, args.train_steps))
    xte, _, _ = _images(args.data, "test", max(args.check, max(args.batch)))
    fnet = _trained("cifar10_resnet23_prediction", xtr, ytr, args.train_steps)
    bnet = _trained("cifar10_binary_net_resnet23_prediction", xtr, ytr, args.train_steps)
    onnx_path = os.path.join(tempfile.mkdtemp(prefix="fewbits-bin-"), "float.onnx")
    export_onnx(fnet, onnx_path)
    sess = onnx_session(onnx_path, threads=1)
    engines = {isa: BinaryEngine.from_model(bnet, isa=isa) for isa in supported_isas()}
    with torch.inference_mode():
        ref = bnet(xte[:args.check])
    check = {}
    for isa, e in engines.items():
        out = e(xte[:args.check])
        check[isa] = {"top1_agree": float((out.argmax(1) == ref.argmax(1)).float().mean()),
                      "max_logit_diff": float((out - ref).abs().max())}
    load0 = os.getloadavg()
    rows = {}
    for b in args.batch:
        x = xte[:b].contiguous()
        xn = x.numpy()
        fns = {"ort_float": lambda xn=xn: sess.run(None, {"images": xn}),
               "torch_binary": lambda x=x: bnet(x)}
        fns.update({f"engine_{isa}": (lambda e=e, x=x: e(x)) for isa, e in engines.items()})
        gc.disable()  # as timeit: a collection inside one timed call is not that call's cost
        with torch.inference_mode():
            t = interleave(fns, rounds=args.rounds, warmup=2, ref="ort_float", clock=args.clock)
        gc.enable()
        ratios = t.ratios()
        # speed-up = reference time / candidate time, per round (adjacent reference calls)
        rows[b] = {n: {"ms": 1e3 * median(t.times[n]),
                       "ratio": 1.0 if n == "ort_float" else median(1 / r for r in ratios[n])}
                   for n in fns}
    load1 = os.getloadavg()
    print(f"inputs: {src}; 1 thread; {args.clock} clock; {args.rounds} interleaved rounds; "
          f"speed-up over ONNX Runtime float (median of per-round ratios), median time; "
          f"load average before "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} "
          f"{load1[2]:.2f} ({os.cpu_count()} CPUs)")
    print("| path | " + " | ".join(f"batch {b}" for b in args.batch) + " |")
    print("|---|" + "---|" * len(args.batch))
    for n in rows[args.batch[0]]:
        cells = [f"{rows[b][n]['ratio']:.2f}x ({rows[b][n]['ms']:.3f} ms)" for b in args.batch]
        print(f"| {n} | " + " | ".join(cells) + " |")
    for isa, c in check.items():
        print(f"engine {isa}: top-1 equal to PyTorch on {100 * c['top1_agree']:.2f}% of "
              f"{args.check} images, max |logit diff| {c['max_logit_diff']:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "clock": args.clock, "load": [load0, load1],
                       "rows": rows,
                       "check": check, "inputs": src}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
