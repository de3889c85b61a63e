"""Accuracy of every quantization family against float, under a fixed budget.

Trains each selected network with the same data, budget and seeds, then records test error,
the gap to the float network, the packed size (``fewbits export``) and bits per weight, and
the training-time ratio to float. Results go to ``<results-dir>/<section>.json``;
``docs/RESULTS.md`` and the plots are rebuilt from every section's JSON, so an MNIST run and a
CIFAR-10 run each add their own table.

Examples (the commands behind docs/RESULTS.md are recorded there)::

    python benchmarks/accuracy.py --section mnist --dataset mnist \\
        --data-dir ../shared/data/mnist --nets 'mnist_*_lenet' --epochs 1
    python benchmarks/accuracy.py --section cifar10 --dataset imagefolder \\
        --data-dir /tmp/cifar10-jpeg --nets 'cifar10_*_resnet23_prediction' -i 1000 -v 250

The papers' own MNIST MLPs (``--nets 'mnist_*_mlp_bc'``, ``'mnist_*_mlp_bnn'``) get a column
with the published error of each family (``benchmarks/_papers.py``). On a GPU, the seed's ten
ResNet-23 train side by side, each in its own process, from data decoded once (augmentation
runs on the device, as in every fewbits run); without a GPU the section records "not run"::

    python benchmarks/accuracy.py --section cifar10_gpu --title 'CIFAR-10 on a GPU' \
        --dataset imagefolder --data-dir cifar10-jpeg.tar.gz --nets 'cifar10_*' \
        --epochs 30 --lr-schedule cosine -c cudnn --parallel 10 -v 782

A stopped benchmark continues where it was with the same command: finished networks are
reused, a part-trained one resumes from its checkpoint (fewbits' exact resume). The same
command with ``--finished-only`` trains nothing: it writes the section from the finished runs
and names the unfinished ones (a ``--parallel`` run writes its section only at the end).

Extra rows show what improves a family beyond the seed's defaults, as
``--extra 'LABEL=NET:key=value,key=value'`` (keys are fewbits.train.TrainConfig fields), e.g.
``--extra 'binary connect + clip=mnist_binary_connect_lenet:clip_weights=true'``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import _common as C  # the benchmarks' shared harness; puts this checkout on sys.path
import torch

ROOT = Path(C.ROOT)

from _papers import FIRST, PAPERS, paper_kind, paper_notes, paper_options, paper_row  # noqa: E402
from _plots import plot_section  # noqa: E402

from fewbits.export import export_packed  # noqa: E402
from fewbits.layers import quant_layers  # noqa: E402
from fewbits.models import FAMILIES, create_model, list_models, model_info  # noqa: E402
from fewbits.train import TrainConfig, train  # noqa: E402

# Published full-budget test errors, for scale (not reproduced here).
LITERATURE = {
    "mnist": "LeNet-5 style nets reach ~0.6-0.9 % float; BinaryConnect (Courbariaux et al. "
             "2015, MLP, 1000 epochs) 1.29 %; BinaryNet 0.96-1.4 %.",
    "cifar10": "The seed's ResNet-23 at 300 epochs: ~7-8 % float; BinaryConnect reports 8.27 % "
               "(VGG-like), XNOR-Net BWN ~9.9 %, INQ ~lossless at 5 bits (ResNets, ImageNet).",
}


def _family_of(net: str) -> str:
    return model_info(net).family or "float"


def _float_net(nets: list[str]) -> str | None:
    floats = [n for n in nets if _family_of(n) == "float"]
    return floats[0] if floats else None


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "," in text or text.startswith("["):
        return [int(v) for v in text.strip("[]").split(",") if v]
    return text


def _parse_extra(spec: str) -> tuple[str, str, dict[str, Any]]:
    label, _, rest = spec.partition("=")
    net, _, opts = rest.partition(":")
    if not label or not net:
        raise SystemExit(f"--extra must be 'LABEL=NET[:key=value,...]', got {spec!r}")
    kw: dict[str, Any] = {}
    for item in filter(None, opts.split(";") if ";" in opts else opts.split(",")):
        k, _, v = item.partition("=")
        kw[k.strip()] = _parse_value(v.strip())
    valid = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(kw) - valid)
    if bad:
        raise SystemExit(f"--extra {label!r}: unknown options {bad}; use TrainConfig fields")
    return label, net, kw


@dataclass
class Run:
    label: str
    net: str
    seed: int
    options: dict[str, Any]


def _inq_schedule(max_iter: int) -> list[int]:
    """The seed's schedule (5000..9000 of 234375 iterations) never starts in a short budget:
    scale it to 50/60/70/80/90 % of the budget instead."""
    return [int(max_iter * f) for f in (0.5, 0.6, 0.7, 0.8, 0.9)]


_HIST_SAMPLES = 4_000


def _weights_snapshot(model: torch.nn.Module) -> dict[str, list[float]] | None:
    layers = quant_layers(model)
    if not layers:
        return None
    name, layer = layers[len(layers) // 2]
    model.eval()
    with torch.no_grad():
        latent = layer.weight.detach().flatten()
        q = layer.quantized_weight().detach().flatten()
    step = max(1, latent.numel() // _HIST_SAMPLES)  # a regular sample keeps the JSON small
    return {"layer": name, "latent": latent[::step].tolist(), "quantized": q[::step].tolist()}


def _options(run: Run, base: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The TrainConfig fields of ``run``."""
    folder = _folder(run, out_dir)
    opts = {**base, **run.options, "net": run.net, "seed": run.seed,
            "monitor_path": str(folder), "model_save_path": str(folder),
            "progress": False}
    if _family_of(run.net) == "inq" and "inq_iterations" not in run.options:
        opts["inq_iterations"] = _inq_schedule(opts["max_iter"])
    return opts


def _run_one(run: Run, base: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    folder = _folder(run, out_dir)
    opts = _options(run, base, out_dir)
    if (folder / "checkpoint.pt").is_file() and not (folder / "model_final.pt").exists():
        # An interrupted benchmark left this run part-trained: continue it where it stopped
        # (fewbits' exact resume; a checkpoint of another configuration is refused there).
        opts["resume"] = str(folder / "checkpoint.pt")
        print(f"    resuming {folder}", flush=True)
    elif any(folder.glob("*.series.txt")) and not (folder / "model_final.pt").exists():
        opts["overwrite"] = True  # stopped before its first checkpoint: nothing to continue
    cfg = TrainConfig(**opts)
    done = _finished(folder, cfg)
    if done is not None:  # an earlier, interrupted benchmark already trained this run
        model, final_error, best_error, wall = done
        iterations, ips = cfg.max_iter, cfg.max_iter * cfg.batch_size / wall
    else:
        t0 = time.perf_counter()
        result = train(cfg)
        # Training time alone (the timer records), as for reused runs; validation excluded.
        timer = sum(v for _, v in _read_series(folder / "Training-time.timer.txt"))
        wall = timer if timer > 0 else time.perf_counter() - t0
        model, final_error, best_error = result.model, result.final_error, result.best_error
        iterations, ips = result.iterations, result.images_per_second
    packed = export_packed(model, folder / "model.fewbits")
    q = create_model(run.net, **model.fewbits_spec["kwargs"])
    fam = FAMILIES[_family_of(run.net)]
    wbits, abits = fam.bits(q.cfg)
    return {
        "label": run.label, "net": run.net, "seed": run.seed, "family": fam.name,
        "options": run.options, "weight_bits": wbits, "act_bits": abits,
        "final_error": final_error, "best_error": best_error,
        "iterations": iterations, "wall_s": wall, "images_per_s": ips,
        "packed_bytes": packed.file_bytes, "fp32_bytes": packed.fp32_bytes,
        "bits_per_weight": packed.bits_per_weight,
        "test_curve": _read_series(folder / "Test-error.series.txt"),
        "loss_curve": _read_series(folder / "Training-loss.series.txt"),
        "weights": _weights_snapshot(model) if run.seed == 0 and not run.options else None,
    }


def _folder(run: Run, out_dir: Path) -> Path:
    return out_dir / f"{run.label.replace(' ', '_').replace('+', 'plus')}-s{run.seed}"


def _train_in_parallel(argv: list[str], runs: list[Run], out_dir: Path, n: int) -> None:
    """Train the unfinished ``runs`` ``n`` at a time, each as ``accuracy.py ARGV --only I``
    (its own process, log in ``<run folder>.log``); a stopped benchmark resumes each from its
    checkpoint as :func:`_run_one` does. Raises ``SystemExit`` naming the logs of failed runs."""
    import subprocess

    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i, r in enumerate(runs) if not (_folder(r, out_dir) / "model_final.pt").exists()]
    procs: list[tuple[subprocess.Popen, Path]] = []
    failed = []
    while todo or procs:
        while todo and len(procs) < n:
            i = todo.pop(0)
            log = _folder(runs[i], out_dir).with_suffix(".log")
            with open(log, "a") as f:
                procs.append((subprocess.Popen([sys.executable, __file__, *argv, "--only",
                                                str(i)], stdout=f, stderr=subprocess.STDOUT),
                              log))
            print(f"started {runs[i].label} ({runs[i].net}); log {log}", flush=True)
        time.sleep(0.2)
        for proc, log in [p for p in procs if p[0].poll() is not None]:
            procs.remove((proc, log))
            if proc.returncode:
                failed.append(str(log))
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed; see {', '.join(failed)}")


def _finished(folder: Path, cfg: TrainConfig) -> tuple[Any, float, float, float] | None:
    """``(model, final error, best error, training seconds)`` of a finished run of the same
    configuration in ``folder``, else None. Training seconds: the sum of the timer records."""
    from fewbits.checkpoint import load_model

    conf = folder / "config.json"
    if not (folder / "model_final.pt").exists() or not conf.exists():
        return None
    saved = json.loads(conf.read_text())
    keys = ("net", "seed", "max_iter", "batch_size", "learning_rate", "dataset",
            "bit_width", "p_min_max", "lr_schedule", "upper_bound", "delta", "optimizer",
            "weight_decay")
    if any(saved.get(k) != getattr(cfg, k) for k in keys) or \
            paper_options(saved) != paper_options(vars(cfg)):
        return None
    errs = [v for _, v in _read_series(folder / "Test-error.series.txt")]
    secs = sum(v for _, v in _read_series(folder / "Training-time.timer.txt"))
    if not errs or secs <= 0:
        return None
    return load_model(folder / "model_final.pt"), errs[-1], min(errs), secs


def _read_series(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        it, val = line.split()[:2]
        out.append((int(it), float(val)))
    return out


def _summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    rows = []
    for label, rs in by_label.items():
        errs = [r["final_error"] for r in rs]
        rows.append({
            "label": label, "net": rs[0]["net"], "family": rs[0]["family"],
            "extra": bool(rs[0]["options"]),
            "weight_bits": rs[0]["weight_bits"], "act_bits": rs[0]["act_bits"],
            "error": statistics.fmean(errs),
            "spread": statistics.stdev(errs) if len(errs) > 1 else None,
            "best_error": statistics.fmean(r["best_error"] for r in rs
                                           if r["best_error"] is not None)
            if any(r["best_error"] is not None for r in rs) else None,
            "n": len(rs), "packed_bytes": rs[0]["packed_bytes"], "fp32_bytes":
            rs[0]["fp32_bytes"], "bits_per_weight": rs[0]["bits_per_weight"],
            "wall_s": statistics.fmean(r["wall_s"] for r in rs),
        })
    return rows


def _table(section: dict[str, Any]) -> str:
    rows = _summarise(section["records"])
    ref = next((r for r in rows if r["family"] == "float" and not r["extra"]), None)
    paper = PAPERS.get(section["kind"], {}).get("rows")
    head = ("| family | net | W/A bits | test error % | gap to float (pt) | packed size | "
            "bits/weight | vs fp32 | train time x float |\n|---|---|---|---|---|---|---|---|---|")
    if paper is not None:
        head = ("| family | net | W/A bits | test error % | paper % | gap to paper (pt) | "
                "gap to float (pt) | packed size | bits/weight | vs fp32 | train time x float |"
                "\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["extra"], list(FAMILIES).index(r["family"]))):
        err = f"{100 * r['error']:.2f}"
        if r["spread"] is not None:
            err += f" ± {100 * r['spread']:.2f} (n={r['n']})"
        gap = "—" if ref is None or r is ref else f"{100 * (r['error'] - ref['error']):+.2f}"
        ttime = "—" if ref is None else f"{r['wall_s'] / ref['wall_s']:.2f}"
        wa = f"{r['weight_bits']}/{r['act_bits']}".replace("32", "fp32")
        bpw = f"{r['bits_per_weight']:.2f}" if r["family"] != "float" else "32"
        if paper is not None:
            text, value, _ = paper_row(section["kind"], r["family"], r["label"])
            vs = "—" if value is None else f"{100 * r['error'] - value:+.2f}"
            err += f" | {text} | {vs}"
        lines.append(
            f"| {r['label']} | `{r['net']}` | {wa} | {err} | {gap} | "
            f"{r['packed_bytes'] / 1024:.1f} KiB | {bpw} | "
            f"{r['fp32_bytes'] / r['packed_bytes']:.1f}x smaller | {ttime} |"
        )
    return "\n".join(lines)


def _reproducing(argv: list[str]) -> list[str]:
    """The command line that reproduces a section: ``argv`` without ``--finished-only`` (it
    only collects), ``--no-plots`` (no number depends on it) and ``--notes`` (text for the
    reader)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--notes":
            skip = True
        elif arg not in ("--finished-only", "--no-plots") and not arg.startswith("--notes="):
            out.append(arg)
    return out


def _section_order(s: dict[str, Any]) -> tuple[int, str]:
    return (FIRST.index(s["section"]) if s["section"] in FIRST else len(FIRST), s["section"])


def write_results(results_dir: Path, doc: Path, plots: bool = True) -> None:
    """Rebuild ``doc`` (docs/RESULTS.md) and plots from every section JSON; the sections of
    :data:`FIRST` (results at a real budget) come first. ``plots=False`` leaves the images
    out (drawing them is most of a tiny run's time)."""
    sections = sorted((json.loads(p.read_text()) for p in results_dir.glob("*.json")),
                      key=_section_order)
    img_dir = doc.parent / "img"
    out = ["# Results: accuracy of every family against float", "",
           "Produced by `benchmarks/accuracy.py` (this file is generated; edit the script). "
           "Test error is the final model's error on the whole test split. Packed size is the "
           "`fewbits export` file (quantized weights at their bit width, batch norm and other "
           "state in float32); bits/weight counts the quantized layers' weights with their "
           "scales. Training time is wall time relative to the float network in the same run "
           "(same machine; indicative only where networks ran in parallel or beside other "
           "jobs).", ""]
    for s in sections:
        if s.get("not_run"):
            out += [f"## {s['title']}", "", f"Not run: {s['not_run']}.", ""]
            continue
        images = plot_section(s, img_dir) if plots else []
        partial = "" if s.get("complete", True) else " (partial: the run was cut short)"
        out += [f"## {s['title']}{partial}", "",
                f"Command (run on {s['machine']}, {s['date']}):", "",
                "```sh", s["command"], "```", "", s["budget"], "", _table(s), ""]
        if s.get("unfinished"):
            out += ["Not finished when the run was stopped, so not in the table (the same "
                    f"command continues them): {', '.join(s['unfinished'])}.", ""]
        if s["kind"] in PAPERS:
            for line in paper_notes(s, _summarise(s["records"])):
                out += [line, ""]
        else:
            out += [f"Literature at full budget, for scale: {LITERATURE.get(s['kind'], '')}",
                    ""]
        if images:
            out += [f"![test error and training loss of every family](img/{images[0]})", "",
                    f"![latent vs quantized weights of one layer per family](img/{images[1]})",
                    ""]
        if s.get("notes"):
            out += [s["notes"], ""]
    doc.write_text("\n".join(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", required=True, help="name of this table (e.g. mnist, cifar10)")
    p.add_argument("--title", default=None)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--nets", default="mnist_*_lenet",
                   help="wildcards over registered names, comma-separated")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; mean and spread if > 1")
    p.add_argument("-i", "--max-iter", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("-v", "--val-interval", type=int, default=None)
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("-l", "--learning-rate", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="constant")
    p.add_argument("-c", "--context", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-first-validation", action="store_true",
                   help="skip the seed's validation at iteration 0 (saves a test-set pass)")
    p.add_argument("--extra", action="append", default=[], help="LABEL=NET:key=value,...")
    p.add_argument("--notes", default="", help="text appended under the table")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "accuracy"))
    p.add_argument("--results-dir", default=str(ROOT / "docs" / "results"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "RESULTS.md"))
    p.add_argument("--only-doc", action="store_true", help="rebuild RESULTS.md from JSON only")
    p.add_argument("--no-plots", dest="plots", action="store_false",
                   help="write RESULTS.md without drawing the plots")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: write the section from the runs of this command that "
                   "have finished, naming the others as not finished (for a stopped run)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train N networks at once, each in its own process (on one GPU: the "
                   "data are decoded once, into the dataset cache, before they start)")
    p.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)  # a --parallel child
    a = p.parse_args(argv)
    results_dir, doc = Path(a.results_dir), Path(a.doc)
    results_dir.mkdir(parents=True, exist_ok=True)
    if a.only_doc:
        write_results(results_dir, doc, a.plots)
        return 0
    if a.context != "cpu" and not torch.cuda.is_available():
        # The section says so instead of running on the CPU or estimating anything.
        (results_dir / f"{a.section}.json").write_text(json.dumps(
            {"section": a.section, "title": a.title or a.section,
             "not_run": "no GPU was available"}))
        write_results(results_dir, doc, a.plots)
        print(f"{a.section}: not run: no GPU was available (-c {a.context}); wrote {doc}",
              file=sys.stderr)
        return 0
    # The float reference first: every other row is measured against it.
    found = {n for pattern in a.nets.split(",") for n in list_models(pattern.strip())}
    nets = sorted(found, key=lambda n: (_family_of(n) != "float", n))
    if not nets:
        raise SystemExit(f"--nets {a.nets!r} matches no model; see `fewbits list`")
    seeds = [int(s) for s in a.seeds.split(",")]
    base: dict[str, Any] = {"dataset": a.dataset, "data_dir": a.data_dir,
                            "batch_size": a.batch_size, "learning_rate": a.learning_rate,
                            "lr_schedule": a.lr_schedule, "context": a.context,
                            "download": False, "plot": False}
    if a.no_first_validation:
        base["validate_first"] = False
    for k in ("max_iter", "val_interval", "threads"):
        if getattr(a, k) is not None:
            base[k] = getattr(a, k)
    if a.epochs is not None:  # one budget for every run, in iterations
        from fewbits.data import load_dataset

        n = len(load_dataset(a.dataset, "train", a.data_dir, download=False).labels)
        base["max_iter"] = max(1, math.ceil(a.epochs * n / a.batch_size))
        base["epochs_note"] = f"{a.epochs:g} epoch(s) of {n} images"
    if "max_iter" not in base:
        raise SystemExit("give a budget: -i/--max-iter or --epochs")
    note = base.pop("epochs_note", None)
    runs = [Run(_family_of(n).replace("_", " ") if _family_of(n) != "float" else "float", n, s,
                {}) for n in nets for s in seeds]
    runs += [Run(label, net, s, kw) for label, net, kw in map(_parse_extra, a.extra)
             for s in seeds]
    budget = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in base.items()
                       if k in ("max_iter", "batch_size", "learning_rate", "lr_schedule",
                                "val_interval"))
    if note:
        budget += f" ({note})"
    section = {
        "section": a.section, "title": a.title or a.section, "kind":
        paper_kind(nets) or ("mnist" if a.dataset in ("mnist", "digits") else "cifar10"),
        "epochs": a.epochs,
        "command": "python benchmarks/accuracy.py " + shlex.join(
            _reproducing(argv if argv is not None else sys.argv[1:])),
        "machine": "{threads} CPU threads, torch {torch}".format(
            **{**C.environment(), **({"threads": a.threads} if a.threads else {})}),
        "date": time.strftime("%Y-%m-%d"), "seeds": seeds,
        "budget": f"Budget: {budget}; seeds {seeds}. INQ schedules are scaled to 50-90 % of "
                  "the budget (the seed's 5000-9000 would never start).",
        "notes": a.notes, "records": [],
    }
    out_dir = Path(a.runs_dir) / a.section
    if a.only is not None:
        _run_one(runs[a.only], base, out_dir)
        return 0
    if a.finished_only:
        done = [r for r in runs if _finished(_folder(r, out_dir),
                                             TrainConfig(**_options(r, base, out_dir)))]
        section["unfinished"] = [f"{r.label} (seed {r.seed})" if len(seeds) > 1 else r.label
                                 for r in runs if r not in done]
        runs = done
        if not runs:
            raise SystemExit(f"--finished-only: no run of this command has finished in "
                             f"{out_dir}")
    if a.parallel > 1 and not a.finished_only:
        from fewbits.data import load_dataset

        for split in ("train", "test"):  # decoded once, into the cache the children read
            load_dataset(a.dataset, split, a.data_dir, download=False)
        _train_in_parallel(list(argv if argv is not None else sys.argv[1:]), runs, out_dir,
                           a.parallel)
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.label} ({run.net}, seed {run.seed})", flush=True)
        rec = _run_one(run, base, out_dir)
        print(f"    test error {100 * rec['final_error']:.2f} %  {rec['images_per_s']:.0f} img/s"
              f"  {rec['packed_bytes'] / 1024:.1f} KiB  {rec['bits_per_weight']:.2f} bits/w",
              flush=True)
        section["records"].append(rec)
        # Written after every run: an interrupted benchmark still leaves its finished rows.
        section["complete"] = i == len(runs) and not section.get("unfinished")
        (results_dir / f"{a.section}.json").write_text(json.dumps(section))
        write_results(results_dir, doc, a.plots)
    print(f"wrote {results_dir / (a.section + '.json')} and {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
