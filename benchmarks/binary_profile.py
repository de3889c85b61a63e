"""Per-layer CPU time of the binary engine (AVX2 or the given path), one thread.

    PYTHONPATH=. python benchmarks/binary_profile.py --net resnet23 --batch 1
    PYTHONPATH=. python benchmarks/binary_profile.py --net resnet18 --batch 1

Builds ``fewbits/runtime/_binary_engine.c`` with ``-DFBB_PROFILE`` (a per-layer CPU clock
around each step) into a temporary library and runs an engine's program on it; the numbers
say where an engine call's time goes (random weights and batch-norm statistics: the time
does not depend on them).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=("resnet23", "resnet18"), default="resnet23")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--isa", default=None)
    args = p.parse_args(argv)
    from fewbits.runtime.binary import _RUN_ARGS, BinaryEngine

    torch.manual_seed(0)
    if args.net == "resnet18":
        sys.path.insert(0, str(ROOT))
        from examples.resnet18_binary import binary_net_resnet18

        engine = BinaryEngine.from_model(binary_net_resnet18(10).eval(),
                                         input_shape=(3, 32, 32), isa=args.isa)
    else:
        from fewbits.models import create_model

        engine = BinaryEngine.from_model(
            create_model("cifar10_binary_net_resnet23_prediction").eval(), isa=args.isa)
    with tempfile.TemporaryDirectory() as d:
        so = os.path.join(d, "prof.so")
        subprocess.run(["gcc", "-O3", "-ffp-contract=off", "-shared", "-fPIC", "-DFBB_PROFILE",
                        "-o", so, str(ROOT / "fewbits/runtime/_binary_engine.c")], check=True)
        lib = ctypes.CDLL(so)
        f = lib.fbb_run
        f.argtypes = _RUN_ARGS
        f.restype = ctypes.c_int
        engine._run = f
        x = torch.rand(args.batch, *engine.in_shape)
        engine(x)
        prof = (ctypes.c_double * 256).in_dll(lib, "fbb_prof_ns")
        ctypes.memset(prof, 0, ctypes.sizeof(prof))
        calls, t0 = 0, time.process_time()
        while time.process_time() - t0 < args.seconds:
            engine(x)
            calls += 1
        total = (time.process_time() - t0) / calls * 1e3
    print(f"{args.net}, batch {args.batch}, {engine.isa}: {total:.3f} ms per call "
          f"(load average {', '.join(f'{v:.2f}' for v in os.getloadavg())})")
    layers = sum(prof[i] for i in range(len(engine.plan))) / calls / 1e6
    print("| step | layer | cin -> cout | map | k/s | ms | share |\n|---|---|---|---|---|---|---|")
    for i, s in enumerate(engine.plan):
        ms = prof[i] / calls / 1e6
        print(f"| {i} {s.op}{' +float' if s.float_out else ''} | {s.weight or '-'} | "
              f"{s.cin} -> {s.cout} | {s.h}x{s.w} | {s.k}/{s.stride} | {ms:.4f} | "
              f"{100 * ms / total:.1f} % |")
    print(f"layers {layers:.3f} ms; outside them (Python call, input check) "
          f"{total - layers:.3f} ms")


if __name__ == "__main__":
    main()
