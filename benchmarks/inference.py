"""Size and CPU inference speed of the ten seed networks in their packed form.

For each CIFAR-10 ResNet-23 family: the ``.fewbits`` size, bits per weight and ratio to the fp32
state dict; and the time of one forward of

* ``float``  -- the float ResNet-23 in PyTorch (the reference every ratio is against),
* ``float_cl`` -- the same with a channels-last input (the fast path runs channels-last: this
  column separates what the memory layout alone gives),
* ``packed`` -- the network rebuilt from its ``.fewbits`` file (PyTorch, eager),
* ``ort``    -- its ONNX export in ONNX Runtime (CPU),
* ``fast``   -- :func:`fewbits.export.runtime.compile_for_cpu` where an integer path exists
  (int8 for fixed-point / min-max nets, XNOR for binary net),

all on the same batch, interleaved call by call in one process (so machine load hits every
column alike), with ``torch.set_num_threads(THREADS)`` and ONNX Runtime on as many threads.
Weights are random (speed and size do not depend on training), moved by a few Adam steps on
random data so that batch-norm statistics, min-max ranges and the INQ schedule (run to the end)
are those of a trained net. The table reports medians; ``--json`` writes every sample.

    PYTHONPATH=. python benchmarks/inference.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fewbits.export import export_packed, load_packed
from fewbits.export.onnx import export_onnx, onnx_session
from fewbits.export.runtime import compile_for_cpu, xnor_backend
from fewbits.models import FAMILIES, create_model, model_info

SEED_NETS = ["cifar10_resnet23_prediction"] + [
    f"cifar10_{f}_resnet23_prediction" for f in FAMILIES if f != "float"]


def _prepared(name: str, steps: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"inq_iterations": [0, 1]} if model_info(name).family == "inq" else {}
    m = create_model(name, **kw)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    m.train()
    for _ in range(steps):
        x = torch.rand(32, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def _ort_runner(path: str, threads: int) -> Any:
    sess = onnx_session(path, threads=threads)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])

    return run


def _time(runners: dict[str, Any], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for f in runners.values():  # warm up (allocations, oneDNN primitive caches)
            f(x)
            f(x)
        for _ in range(repeats):
            for k, f in runners.items():
                t = time.perf_counter()
                f(x)
                out[k].append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=SEED_NETS, help="zoo names (default: the ten "
                    "CIFAR-10 seed nets)")
    ap.add_argument("--batch", nargs="*", type=int, default=[64, 1])
    ap.add_argument("--repeats", type=int, default=0,
                    help="timed calls per runner (default: 12 at batch >= 16, 60 below)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime column")
    ap.add_argument("--json", metavar="PATH", help="write all numbers and samples here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="fewbits-bench-")
    g = torch.Generator().manual_seed(123)
    batches = {b: torch.rand(b, 3, 32, 32, generator=g) for b in args.batch}
    float_model = _prepared("cifar10_resnet23_prediction")
    rows: list[dict[str, Any]] = []
    for name in args.models:
        model = _prepared(name)
        path = os.path.join(tmp, name + ".fewbits")
        rep = export_packed(model, path)
        packed = load_packed(path)
        runners: dict[str, Any] = {
            "float": float_model,
            "float_cl": lambda x: float_model(x.contiguous(memory_format=torch.channels_last)),
            "packed": packed}
        if not args.no_ort:
            export_onnx(path, os.path.join(tmp, name + ".onnx"))
            runners["ort"] = _ort_runner(os.path.join(tmp, name + ".onnx"), args.threads)
        fast = compile_for_cpu(path)
        if fast.kind is not None:
            runners["fast"] = fast
        row: dict[str, Any] = {
            "model": name, "file_bytes": rep.file_bytes, "fp32_bytes": rep.fp32_bytes,
            # no quantized tensor: the weights are stored as raw float32
            "bits_per_weight": rep.bits_per_weight or 32.0, "ratio_to_fp32": rep.ratio,
            "fast_path": fast.kind, "timings": {}}
        with torch.inference_mode():
            x0 = batches[max(batches)]
            ref = packed(x0)
            for k in ("ort", "fast"):
                if k in runners:
                    y = runners[k](x0)
                    row[f"{k}_top1_agreement"] = float((y.argmax(1) == ref.argmax(1)).float()
                                                       .mean())
                    row[f"{k}_max_abs_diff"] = float((y - ref).abs().max())
        for b, x in batches.items():
            reps = args.repeats or (12 if b >= 16 else 60)
            samples = _time(runners, x, reps)
            med = {k: statistics.median(v) for k, v in samples.items()}
            row["timings"][str(b)] = {
                "median_s": med, "min_s": {k: min(v) for k, v in samples.items()},
                "speedup_vs_float": {k: med["float"] / v for k, v in med.items()},
                "samples_s": samples}
        rows.append(row)
        print(_line(row, args.batch), flush=True)
    print()
    print(_table(rows, args.batch, args.threads))
    if args.json:
        meta = {"threads": args.threads, "torch": torch.__version__, "machine":
                platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "xnor_backend": xnor_backend(), "load_avg": os.getloadavg(),
                "command": " ".join(sys.argv)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


def _short(name: str) -> str:
    return model_info(name).family or name


def _line(row: dict[str, Any], batches: list[int]) -> str:
    parts = [f"{_short(row['model'])}: {row['file_bytes']:,} B"]
    for b in batches:
        t = row["timings"][str(b)]
        parts.append(f"b{b} " + " ".join(f"{k} {1e3 * v:.1f}ms" for k, v in
                                          t["median_s"].items()))
    return "; ".join(parts)


def _table(rows: list[dict[str, Any]], batches: list[int], threads: int) -> str:
    cols = ["float_cl", "packed", "ort", "fast"]
    head = f"{'network':15s} {'bytes':>9s} {'bits/w':>6s} {'x fp32':>6s} {'fast path':>9s}"
    for b in batches:
        head += f" | b={b:<3d} {'float ms':>9s} " + " ".join(f"{c:>14s}" for c in cols)
    lines = [f"median time per batch, {threads} threads; (x) = speed vs float PyTorch "
             "(>1 is faster)", head, "-" * len(head)]
    for r in rows:
        s = (f"{_short(r['model']):15s} {r['file_bytes']:9,d} {r['bits_per_weight']:6.2f} "
             f"{r['ratio_to_fp32']:6.1f} {r['fast_path'] or '-':>9s}")
        for b in batches:
            t = r["timings"][str(b)]
            med, sp = t["median_s"], t["speedup_vs_float"]
            s += f" | {'':5s} {1e3 * med['float']:9.2f} "
            s += " ".join(f"{1e3 * med[c]:7.2f} ({sp[c]:4.2f})" if c in med else f"{'-':>14s}"
                          for c in cols)
        lines.append(s)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
