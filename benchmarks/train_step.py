"""Training-step cost of every seed network relative to float training, and against Brevitas.

For each device (CPU, and CUDA when present) one process builds the ten
``cifar10_*resnet23_prediction`` networks (float + nine quantization families), the Brevitas
twins of the same ResNet-23 (``--brevitas``) and the data pipeline of ``fewbits.data``
(``--data``), then times one training step (zero grad, forward, cross entropy, backward, Adam,
weight constraints) of each candidate ROUND-ROBIN for ``--rounds`` rounds. Reported per net:
the median step time, the median over rounds of the ratio to the float net's step of the same
round (with its interquartile range), and the peak memory of a step as a ratio to float's.

    PYTHONPATH=. python benchmarks/train_step.py                 # table, CPU (+ CUDA if present)
    PYTHONPATH=. python benchmarks/train_step.py --json          # machine-readable
    PYTHONPATH=. python benchmarks/train_step.py --profile 8     # top operators per net
    PYTHONPATH=. python benchmarks/train_step.py --compile --nets '*fp_net*'

Targets (CPU, batch 64): weight-only families <= 1.15 x float step time, weight+activation
families <= 1.5 x, peak memory <= 1.3 x.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

__all__ = ["TARGETS", "main", "run"]

#: (step-time ratio, peak-memory ratio) targets by kind of family.
TARGETS: dict[str, tuple[float, float]] = {"weight": (1.15, 1.3), "weight+act": (1.5, 1.3)}


def _kind(net: str) -> str:
    from fewbits.models import FAMILIES

    fam = _short(net)
    if fam == "float":
        return "float"
    return "weight" if FAMILIES[fam].weight_only else "weight+act"


def _short(net: str) -> str:
    from fewbits.models import model_info

    return model_info(net).family or net


def _select(pattern: str | None) -> list[str]:
    nets = C.seed_nets()
    if not pattern:
        return nets
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    chosen = [n for n in nets if any(fnmatch.fnmatch(n, p) or p in (n, _short(n)) for p in pats)]
    if not chosen:
        raise SystemExit(f"--nets {pattern!r} matches none of: {', '.join(map(_short, nets))}")
    if C.FLOAT_NET not in chosen:  # the reference is always measured
        chosen.insert(0, C.FLOAT_NET)
    return chosen


def _data_fns(batch: int, device: torch.device) -> dict[str, Callable[[], Any]] | str:
    """Loading (batch gather), to_float and augmentation of ``fewbits.data``, one batch each."""
    try:
        from fewbits import data as D
    except ImportError as e:
        return f"fewbits.data not importable ({e}); data pipeline not measured"
    ds = D.synthetic_dataset(max(8 * batch, 2048), shape=(3, 32, 32), num_classes=10, seed=0)
    it = iter(D.BatchIterator(ds, batch, shuffle=True, seed=0))
    gen = torch.Generator().manual_seed(0)
    xb, _ = next(it)
    xf = D.to_float(xb, device)
    angles, flips = D.random_augment_params(batch, gen)

    def pipeline() -> None:
        xb, yb = next(it)
        x = D.to_float(xb, device)
        yb = yb.to(device, non_blocking=True)
        a, f = D.random_augment_params(x.shape[0], gen)
        D.augment(x, a.to(device), f.to(device))

    return {
        "data:load": lambda: next(it),
        "data:to_float": lambda: D.to_float(xb, device),
        "data:params": lambda: D.random_augment_params(batch, gen),
        "data:augment": lambda: D.augment(xf, angles.to(device), flips.to(device)),
        "data:pipeline": pipeline,
    }


def run(device: torch.device, nets: Sequence[str], batch: int, rounds: int, warmup: int,
        brevitas: bool, data: bool, memory: bool, compile_nets: bool,
        log: Callable[[str], None], clock: str = "wall") -> dict[str, Any]:
    """All measurements of one device; see the module docstring."""
    from fewbits.models import create_model

    torch.manual_seed(0)
    steps: dict[str, C.Step] = {}
    for n in nets:
        steps[n] = C.Step.build(create_model(n), batch, device)
        if compile_nets:
            steps[n + "+compile"] = C.Step.build(create_model(n), batch, device,
                                                 compile_model=True)
    notes: list[str] = []
    bre: dict[str, str] = {}
    if brevitas:
        try:
            for kind, (ours, _) in C.BREVITAS_PAIRS.items():
                if ours in nets:
                    bre[kind] = "brevitas:" + kind
                    steps[bre[kind]] = C.Step.build(C.brevitas_twin(kind), batch, device)
        except ImportError as e:
            notes.append(f"Brevitas not installed ({e}); `pip install brevitas` to compare")
            bre = {}
    fns: dict[str, Callable[[], Any]] = dict(steps)
    if data:
        d = _data_fns(batch, device)
        if isinstance(d, str):
            notes.append(d)
        else:
            fns.update(d)
    log(f"[{device.type}] warming up {len(fns)} candidates ...")
    with _quiet_brevitas():
        tm = C.interleave(fns, rounds=rounds, warmup=warmup, device=device, clock=clock,
                          ref=C.FLOAT_NET)
    times, ratios = tm.times, tm.ratios()

    out: dict[str, Any] = {"train": {}, "brevitas": {}, "data": {}, "notes": notes}
    peak_ref = None
    for n in [*nets, *(m + "+compile" for m in nets if compile_nets)]:
        base = n.removesuffix("+compile")
        kind = _kind(base)
        r: dict[str, Any] = {
            "kind": kind, "compiled": n.endswith("+compile"),
            "ms": 1e3 * C.median(times[n]),
            "ms_iqr": [1e3 * q for q in C.quartiles(times[n])],
            "ratio": C.median(ratios[n]), "ratio_iqr": list(C.quartiles(ratios[n])),
            "times_s": times[n],
        }
        if memory:
            log(f"[{device.type}] peak memory of {n} ...")
            with _quiet_brevitas():
                r["peak_bytes"] = C.peak_memory(steps[n], device, steps[n].state_bytes())
            if n == C.FLOAT_NET:
                peak_ref = r["peak_bytes"]
            r["mem_ratio"] = r["peak_bytes"] / peak_ref if peak_ref else None
        if kind in TARGETS:
            t_time, t_mem = TARGETS[kind]
            r["time_target"], r["mem_target"] = t_time, t_mem
            r["time_ok"] = r["ratio"] <= t_time
            if r.get("mem_ratio") is not None:
                r["mem_ok"] = r["mem_ratio"] <= t_mem
        out["train"][n] = r
    for kind, key in bre.items():
        ours = C.BREVITAS_PAIRS[kind][0]
        # both normalised by their adjacent float steps, so the load of the moment cancels
        rr = [a / b for a, b in zip(ratios[ours], ratios[key], strict=True)]
        out["brevitas"][kind] = {
            "fewbits_net": ours, "what": C.BREVITAS_PAIRS[kind][1],
            "fewbits_ms": 1e3 * C.median(times[ours]), "brevitas_ms": 1e3 * C.median(times[key]),
            "ratio": C.median(rr), "ratio_iqr": list(C.quartiles(rr)),
            "brevitas_vs_float": C.median(ratios[key]),
        }
    if data and any(k.startswith("data:") for k in times):
        d_out: dict[str, Any] = {k.removeprefix("data:") + "_ms": 1e3 * C.median(v)
                                 for k, v in times.items() if k.startswith("data:")}
        # pipeline time / (pipeline + step), the step being the float step measured next to the
        # pipeline times the net's ratio to float in that round
        pr = ratios["data:pipeline"]
        d_out["share_of_float_step"] = C.median(p / (p + 1.0) for p in pr)
        d_out["share_by_net"] = {
            n: C.median(p / (p + q) for p, q in zip(pr, ratios[n], strict=True)) for n in nets
        }
        out["data"] = d_out
    return out


@contextlib.contextmanager
def _quiet_brevitas():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"brevitas.*")
        warnings.filterwarnings("ignore", message=r".*(Brevitas|brevitas|TracerWarning).*")
        yield


def _profiles(device: torch.device, nets: Sequence[str], batch: int, top: int,
              brevitas: bool) -> dict[str, list[dict[str, Any]]]:
    from fewbits.models import create_model

    res = {}
    for n in nets:
        res[n] = C.profile_top(C.Step.build(create_model(n), batch, device), top=top,
                               device=device)
    if brevitas:
        with contextlib.suppress(ImportError), _quiet_brevitas():
            for kind in C.BREVITAS_PAIRS:
                res["brevitas:" + kind] = C.profile_top(
                    C.Step.build(C.brevitas_twin(kind), batch, device), top=top,
                    device=device)
    return res


# --------------------------------------------------------------------------- report


def _fmt_ratio(r: dict[str, Any], key: str = "ratio") -> str:
    q1, q3 = r[key + "_iqr"]
    return f"{r[key]:5.2f} [{q1:4.2f}-{q3:4.2f}]"


def format_report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    a = res["args"]
    for dev, d in res["devices"].items():
        lines.append(
            f"\n== {dev}: batch {a['batch']}, {res['env']['threads']} threads, {a['clock']} clock, "
            f"{a['rounds']} interleaved rounds; ratio = median over rounds of (net / the float "
            "steps just before and after it) [IQR]"
        )
        lines.append(f"{'net':24s} {'kind':10s} {'step ms':>8s} {'x float [IQR]':>17s} "
                     f"{'target':>7s} {'peak MB':>8s} {'x float':>7s} {'target':>7s}")
        for n, r in d["train"].items():
            name = _short(n.removesuffix("+compile")) + (" +compile" if r["compiled"] else "")
            tt = f"<={r['time_target']:.2f}{'' if r['time_ok'] else '!'}" if "time_ok" in r else ""
            mem = f"{r['peak_bytes'] / 2**20:8.1f}" if "peak_bytes" in r else f"{'-':>8s}"
            mr = f"{r['mem_ratio']:7.2f}" if r.get("mem_ratio") is not None else f"{'-':>7s}"
            mt = f"<={r['mem_target']:.2f}{'' if r['mem_ok'] else '!'}" if "mem_ok" in r else ""
            lines.append(f"{name:24s} {r['kind']:10s} {r['ms']:8.1f} {_fmt_ratio(r):>17s} "
                         f"{tt:>7s} {mem} {mr} {mt:>7s}")
        if d["brevitas"]:
            lines.append("\nfewbits vs Brevitas (same ResNet-23, same round): ratio = fewbits / "
                         "Brevitas step time; < 1 means fewbits is faster")
            lines.append(f"{'configuration':20s} {'fewbits net':16s} {'fewbits ms':>10s} "
                         f"{'Brevitas ms':>11s} {'ratio [IQR]':>17s} {'Brev/float':>10s}")
            for kind, b in d["brevitas"].items():
                lines.append(f"{kind:20s} {_short(b['fewbits_net']):16s} {b['fewbits_ms']:10.1f} "
                             f"{b['brevitas_ms']:11.1f} {_fmt_ratio(b):>17s} "
                             f"{b['brevitas_vs_float']:10.2f}")
            for kind, b in d["brevitas"].items():
                lines.append(f"  {kind}: {b['what']}")
        if d["data"]:
            dd = d["data"]
            parts = ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in dd.items()
                              if k.endswith("_ms"))
            lines.append(f"\ndata pipeline per batch: {parts}")
            lines.append(f"share of (data + step) spent on data: float "
                         f"{100 * dd['share_of_float_step']:.1f}%; by net: " + ", ".join(
                             f"{_short(n)} {100 * s:.1f}%" for n, s in dd["share_by_net"].items()))
        for note in d["notes"]:
            lines.append(f"note: {note}")
        for n, rows in d.get("profile", {}).items():
            lines.append(f"\nprofile {n} (self time per step):")
            for row in rows:
                lines.append(f"  {row['ms_per_step']:8.2f} ms {100 * row['share']:5.1f}% "
                             f"{row['calls_per_step']:6.0f}x  {row['op']}")
    e = res["env"]
    lines.append(f"\n{e['date']} commit {e['commit']} torch {e['torch']} brevitas {e['brevitas']} "
                 f"cpu '{e['cpu']}' x{e['cpu_count']} cuda {e['cuda']} "
                 f"loadavg start {e['loadavg']} end {res.get('loadavg_end')}")
    return "\n".join(lines)


def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64, the seed's)")
    p.add_argument("--rounds", type=int, default=9, help="timed interleaved rounds (default 9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads in this process (default 2)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, or auto = cpu and cuda when present (default)")
    p.add_argument("--nets", default=None,
                   help="comma list of names/short names/globs (float is always included)")
    p.add_argument("--clock", choices=sorted(C.CLOCKS), default="wall",
                   help="wall time (default), or this process's CPU time (robust to other "
                   "processes' load with --threads 1; with 2 threads it counts spin-waits)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd copies of the nets (NaN checks off in them; "
                   "compiling takes minutes per net on a small CPU)")
    p.add_argument("--no-brevitas", dest="brevitas", action="store_false",
                   help="skip the Brevitas comparison")
    p.add_argument("--no-data", dest="data", action="store_false",
                   help="skip the data-pipeline measurement")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print the top N operators (self time) of each net")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--save", metavar="PATH", help="also write the JSON result to PATH")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints the table (or JSON) and returns the result dict."""
    args = _parser().parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        raise SystemExit("--batch, --rounds and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device in ("cpu", "cuda"):
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        devices = [args.device]
    else:
        raise SystemExit(f"--device must be cpu, cuda or auto, got {args.device!r}")
    nets = _select(args.nets)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res: dict[str, Any] = {"env": C.environment(), "args": vars(args), "devices": {}}
    for dev in devices:
        device = torch.device(dev)
        d = run(device, nets, args.batch, args.rounds, args.warmup, args.brevitas, args.data,
                args.memory, args.compile, log, clock=args.clock)
        if args.profile:
            d["profile"] = _profiles(device, nets, args.batch, args.profile, args.brevitas)
        res["devices"][dev] = d
    res["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    text = json.dumps(res, indent=1)
    if args.save:
        _write_atomic(args.save, text)
    print(text if args.json else format_report(res))
    return res


if __name__ == "__main__":
    main()
