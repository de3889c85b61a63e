"""Deployment speed of the seed ResNet-23: fewbits' CPU paths against well-kept runtimes.

In one process, interleaved call by call (``_common.interleave`` with ONNX Runtime float as the
reference run next to every candidate), at each batch size and thread count:

* ``torch float``      -- PyTorch eager, the float ResNet-23;
* ``ort float``        -- ONNX Runtime on the float net: the baseline every ratio divides;
* ``ort int8 ptq``     -- ONNX Runtime static post-training quantization of the float net (QDQ,
  per-channel int8 weights, calibrated on the benchmark images; approximate by design);
* ``ov float`` / ``ov int8 ptq`` -- OpenVINO (``f32`` precision) on the float net and on that
  PTQ model, when ``openvino`` is importable (``pip install '.[bench]'``);
* ``fewbits <family> <backend>`` -- every backend of :mod:`fewbits.runtime` that runs the
  family's net within its tolerance (``ort`` / ``openvino``: the fused export), and
  ``fewbits <family> auto``'s pick is named in the table.

ratio = time of ONNX Runtime float / time of the row (> 1 is faster than the baseline); median of
per-round ratios against the adjacent baseline calls. Networks: random initialisation moved by a
few Adam steps on the benchmark images (``--steps``; batch-norm statistics and min-max ranges
that move, but not a trained net), or the trained model of a ``fewbits train`` run folder or
model file (``--run FAMILY=PATH``, resolved by :func:`fewbits.checkpoint.load_model`: the
folder's ``model_best.pt``, else ``model_final.pt``, else ``checkpoint.pt``); the top-1 agreement
is meaningful on trained nets only (a barely moved net has near-tied logits). Images: CIFAR-10
(JPEG) test images through ``fewbits.data.imagefolder`` when the archive exists, else uniform
noise (said in the output).
The machine load (``uptime``) is printed before, between and after the configurations.

    PYTHONPATH=. python benchmarks/deploy.py --rounds 20 --json deploy.json
    PYTHONPATH=. python benchmarks/deploy.py --nets fp_net --run fp_net=runs/fp_net_resnet23
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

from fewbits.export.onnx import ResolvedSource, onnx_session, resolve_source, to_onnx_forms
from fewbits.models import create_model
from fewbits.runtime import CANDIDATES, compile_for_cpu
from fewbits.runtime.binary import supported_isas
from fewbits.runtime.integer import supported_int_isas
from fewbits.runtime.ort import openvino_runner

DATA = "/work/shared/data/cifar10-jpeg.tar.gz"
DEFAULT_NETS = ["fp_net", "min_max", "binary_net"]
BASE = "ort float"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def load_images(n: int, data: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(images float (n, 3, 32, 32) in [0, 1], labels, source description)``."""
    if data and os.path.exists(data):
        from fewbits.data.imagefolder import load_imagefolder

        ds = load_imagefolder(data, "test")
        idx = torch.linspace(0, ds.images.shape[0] - 1, n).long()  # every class
        return ds.images[idx].float() / 255, ds.labels[idx].long(), "CIFAR-10 (JPEG) test images"
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
            "synthetic uniform noise (CIFAR-10 archive not found)")


def seeded(name: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"inq_iterations": [0, 1]} if "_inq_" in name else {}
    m = create_model(name, **kw)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.train()
    for i in range(max(steps, 2 if kw else 0)):
        j = torch.arange(i * 32, i * 32 + 32) % x.shape[0]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[j]), y[j]).backward()
        opt.step()
    return m.eval()


def parse_runs(items: list[str], fams: list[str]) -> dict[str, str]:
    """``["fp_net=PATH", ...]`` -> ``{family: PATH}``; each family once and among ``fams``."""
    out: dict[str, str] = {}
    for item in items:
        fam, sep, path = item.partition("=")
        if not sep or not fam or not path:
            raise SystemExit(f"--run {item!r}: expected FAMILY=PATH, e.g. fp_net=runs/fp23")
        if fam not in fams:
            raise SystemExit(f"--run {item!r}: {fam!r} is not among --nets ({' '.join(fams)})")
        if fam in out:
            raise SystemExit(f"--run names {fam!r} twice")
        out[fam] = path
    return out


def trained(fam: str, path: str) -> torch.nn.Module:
    """The trained ResNet-23 of ``fam`` from a run folder or model file, in eval mode."""
    from fewbits.checkpoint import CheckpointError, load_model

    want = f"cifar10_{fam}_resnet23_prediction"
    try:
        m = load_model(path)
    except CheckpointError as e:
        raise SystemExit(f"--run {fam}={path}: {e}") from e
    got = (getattr(m, "fewbits_spec", None) or {}).get("name")
    if got != want:
        raise SystemExit(f"--run {fam}={path}: holds model {got!r}, not {want!r}")
    return m.eval()


def ptq_int8(float_proto: Any, calib: torch.Tensor) -> Any:
    """ONNX Runtime static post-training quantization of the float net (QDQ, per channel)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": calib[i:i + 16].numpy()}
                                 for i in range(0, calib.shape[0], 16)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process: done above
    try:
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
            onnx.save(float_proto, src)
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            return onnx.load(dst)
    finally:
        logging.getLogger().setLevel(level)


def _ort(proto: Any, threads: int):
    sess = onnx_session(proto, threads=threads)
    return lambda x: torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])


def runners(nets: dict[str, ResolvedSource], float_net: torch.nn.Module, protos: dict[str, Any],
            threads: int, notes: list[str]) -> dict[str, Any]:
    """Every candidate at ``threads`` intra-op threads: name -> callable(images) -> logits."""
    out: dict[str, Any] = {}

    def torch_float(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return float_net(x)

    out["torch float"] = torch_float
    out[BASE] = _ort(protos["float"], threads)
    out["ort int8 ptq"] = _ort(protos["ptq"], threads)
    for label, key in (("ov float", "float"), ("ov int8 ptq", "ptq")):
        try:
            out[label] = openvino_runner(protos[key], threads)
        except (ImportError, RuntimeError) as e:
            notes.append(f"{label}: {e}")
    for fam, model in nets.items():
        for backend in CANDIDATES:
            if backend == "torch":
                continue  # PyTorch eager runs at the float net's speed or slower (see notes)
            try:
                out[f"fewbits {fam} {backend}"] = compile_for_cpu(
                    model, backend=backend, threads=threads, batch_size=2).run
            except (RuntimeError, ImportError) as e:
                notes.append(f"fewbits {fam} {backend}: {e}")
    return out


def agreement(nets: dict[str, torch.nn.Module], run: dict[str, Any], x: torch.Tensor
              ) -> dict[str, dict[str, float]]:
    """Per fewbits row: top-1 agreement with its PyTorch model and max logit difference / range."""
    res = {}
    with torch.inference_mode():
        refs = {fam: m(x) for fam, m in nets.items()}
    for name, f in run.items():
        parts = name.split()
        if parts[0] != "fewbits":
            continue
        ref = refs[parts[1]]
        got = torch.cat([f(x[i:i + 64]) for i in range(0, x.shape[0], 64)])
        res[name] = {"top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
                     "max_rel_logit_diff": float((got - ref).abs().max() / ref.abs().max())}
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", nargs="*", default=DEFAULT_NETS, help="families (default: "
                    + " ".join(DEFAULT_NETS) + "; 'all' for the nine)")
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 64])
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--images", type=int, default=512, help="test images (agreement, calibration)")
    ap.add_argument("--steps", type=int, default=3, help="Adam steps seeding each net")
    ap.add_argument("--run", action="append", default=[], metavar="FAMILY=PATH",
                    help="use the trained net of a `fewbits train` run folder or model file "
                    "for FAMILY instead of a seeded one (repeatable)")
    ap.add_argument("--data", default=DATA, help="CIFAR-10 (JPEG) archive; missing -> noise")
    ap.add_argument("--clock", choices=sorted(C.CLOCKS), default="wall",
                    help="wall time, or CPU time of this process (a busy shared machine)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    from fewbits.models import FAMILIES

    fams = [f for f in FAMILIES if f != "float"] if args.nets == ["all"] else args.nets
    runs = parse_runs(args.run, fams)
    env = C.environment()
    print("command: PYTHONPATH=. python benchmarks/deploy.py " + " ".join(sys.argv[1:]))
    print(f"CPU: {env['cpu']}; ISA paths: integer engine {supported_int_isas()}, binary engine "
          f"{supported_isas()}; thread counts measured {args.threads} (each table says its own)")
    print("load before:", uptime(), flush=True)
    x, y, source = load_images(args.images, args.data)
    float_net = seeded(C.FLOAT_NET, x, y, args.steps)
    nets = {f: trained(f, runs[f]) if f in runs
            else seeded(f"cifar10_{f}_resnet23_prediction", x, y, args.steps) for f in fams}
    origin = {f: (f"trained: {nets[f].fewbits_source['path']}" if f in runs
                  else f"seeded by {args.steps} Adam steps") for f in fams}
    with torch.inference_mode():
        acc = {f: float((torch.cat([nets[f](x[i:i + 250]) for i in range(0, x.shape[0], 250)])
                         .argmax(1) == y).float().mean()) for f in fams}
    for f in fams:
        print(f"net {f}: {origin[f]}; PyTorch top-1 accuracy on the {x.shape[0]} images "
              f"{acc[f]:.4f}", flush=True)
    # PTQ input: batch norm folded into the float convs (what quantize_static's pre-processing
    # does), so that it quantizes Conv -> Relu, not batch norm on its own; both graphs from one
    # export by PyTorch
    (plain, _), (folded, _) = to_onnx_forms(float_net, [(False, False), (True, False)],
                                           check=True)
    protos = {"float": plain, "ptq": ptq_int8(folded, x[:64])}
    # each net resolved once: its exports are built once and shared by every compile_for_cpu
    sources = {f: resolve_source(m) for f, m in nets.items()}
    isa = {"int": supported_int_isas(), "binary": supported_isas()}
    result: dict[str, Any] = {"env": env, "command": sys.argv, "isa": isa, "images": source,
                              "nets": origin, "accuracy": acc, "args": vars(args), "configs": [],
                              "load": [uptime()]}
    for threads in args.threads:
        torch.set_num_threads(threads)
        notes: list[str] = []
        run = runners(sources, float_net, protos, threads, notes)
        picks = {f: compile_for_cpu(m, threads=threads, batch_size=64,
                                    candidates=tuple(CANDIDATES), probe_inputs=x).backend
                 for f, m in sources.items()}
        agree = agreement(nets, run, x)
        for b in args.batch:
            xb = x[:b] if b <= x.shape[0] else x.repeat(b // x.shape[0] + 1, 1, 1, 1)[:b]
            t = C.interleave({k: (lambda f=f, xb=xb: f(xb)) for k, f in run.items()},
                             rounds=args.rounds, warmup=1, ref=BASE, clock=args.clock)
            ratios = t.ratios()
            rows = {k: {"ms": 1e3 * statistics.median(v),
                        "ratio": 1.0 / statistics.median(ratios[k])}
                    for k, v in t.times.items()}
            load = uptime()
            result["load"].append(load)
            result["configs"].append({"threads": threads, "batch": b, "rows": rows,
                                      "agreement": agree, "auto": picks, "notes": notes,
                                      "load": load})
            print(format_config(result["configs"][-1]), flush=True)
    print("load after:", uptime(), flush=True)
    print("images:", source)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def format_config(c: dict[str, Any]) -> str:
    lines = [f"\n{c['threads']} thread(s), batch {c['batch']}  ({c['load']})",
             f"| path | ms | ratio to {BASE} | top-1 agreement | max logit diff / range |",
             "|---|---|---|---|---|"]
    for k, r in c["rows"].items():
        a = c["agreement"].get(k)
        fam = k.split()[1] if k.startswith("fewbits") else None
        tag = " (auto)" if fam and c["auto"].get(fam) == k.split()[2] else ""
        extra = (f"{a['top1_agreement']:.4f} | {a['max_rel_logit_diff']:.2g}" if a
                 else "- | -")
        lines.append(f"| {k}{tag} | {r['ms']:.2f} | {r['ratio']:.2f}x | {extra} |")
    lines += [f"note: {n}" for n in c["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    sys.exit(0)
