"""``fewbits eval PATH``: the test error of a run folder, a checkpoint or model file, or a packed
``.fewbits`` file, through the one evaluation loop (:func:`fewbits.train.evaluate`) and printed
in one format (:func:`format_result`, or ``--json``: :meth:`EvalResult.to_dict`).

    $ fewbits eval runs/quickstart --dataset digits
    $ fewbits eval bc.fewbits --fast --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import replace

from .._text import printable
from ..config import CONTEXTS, TYPE_CONFIGS, ConfigError
from ..data import DATASETS, ArrayDataset, load_dataset, to_float
from ..export import load_packed, read_container
from ..export.container import is_packed_file, read_model_file
from ..export.onnx import resolve_file
from ..models import create_model, is_model
from ..runs import data_dir_note, recorded_eval_config, unfollowed_data_dir
from ..runtime import compile_for_cpu
from ..runtime.binary_file import load_engine
from ..train import (
    EvalResult,
    check_model_input,
    evaluate,
    evaluate_file,
    load_split,
    net_input_shape,
)
from .base import use_model_factory

__all__ = ["HELP", "add_eval_arguments", "evaluate_packed", "format_result", "run_eval"]

HELP = "test error of a trained run, checkpoint or .fewbits file"


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """``PATH`` and the data, device and output options."""
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT|FILE.fewbits",
                   help="a run folder (model_best.pt, else model_final.pt, else checkpoint.pt), "
                   "a checkpoint / model file, or a packed .fewbits file")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: the dataset the model was trained on")
    p.add_argument("--data-dir", default=None,
                   help="default: $FEWBITS_DATA or ~/.cache/fewbits/data (the folder a run or "
                   "file records is shown, never used unless given here)")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="never download the dataset")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="default: 256")
    p.add_argument("-c", "--context", choices=CONTEXTS, default="cpu", help="default: cpu")
    p.add_argument("-d", "--device-id", type=int, default=0)
    p.add_argument("-t", "--type-config", choices=TYPE_CONFIGS, default="float")
    p.add_argument("--fast", action="store_true",
                   help=".fewbits files: run on the fastest exact CPU backend (ONNX Runtime on the "
                        "fused int8 export, OpenVINO, PyTorch; see fewbits.runtime)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY", default=None,
                   help="a model outside the registry: the factory a run was trained with, "
                   "or, for a .fewbits file, a function building the model (float or "
                   "quantized) to load the file into")


def evaluate_packed(path: str | os.PathLike, ds: ArrayDataset, batch_size: int = 256, *,
                    fast: bool = False, model: str | None = None) -> EvalResult:
    """The test error on ``ds`` of the network stored in the ``.fewbits`` file ``path``.

    The network is rebuilt from the file (:func:`~fewbits.export.load_packed`) or, with
    ``fast=True``, deployed on the fastest exact CPU backend (:func:`~fewbits.runtime.
    compile_for_cpu`; its name is the result's ``fast_path``), then run through
    :func:`fewbits.train.evaluate` on the CPU. ``model``: a registered name or
    ``package.module:factory`` (registered by the caller) for files of models outside the
    registry: the file is loaded into ``create_model(model)``. A file written with
    ``fold_bn=True`` (``fewbits export --fold-bn``) runs on the binary engine it was folded for
    (:func:`~fewbits.runtime.binary_file.load_engine`; ``fast_path`` ``"binary"``). Raises
    :class:`~fewbits.export.FormatError` for a file that is not a readable fewbits model,
    ``ValueError`` for ``batch_size < 1``.

        >>> import os, tempfile
        >>> from fewbits.export import export_packed
        >>> path = os.path.join(tempfile.mkdtemp(), "m.fewbits")
        >>> _ = export_packed(create_model("mnist_binary_connect_mlp", width=16, depth=1), path)
        >>> ds = load_dataset("synthetic", "test", n=8, shape=(1, 28, 28), num_classes=10)
        >>> r = evaluate_packed(path, ds, batch_size=4)
        >>> r.total, r.net, r.fast_path, r.error == r.wrong / 8
        (8, 'mnist_binary_connect_mlp', None, True)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    contents = read_model_file(path)  # read and checked once; every step below reads this
    header = contents[0]
    spec = header["model"] if isinstance(header["model"], dict) else {}
    net = str(spec.get("name", "?"))
    factory = None if model == net else model  # the file's own model: its recorded options
    if header.get("options", {}).get("fold_bn"):  # only the binary engine runs these files
        if factory is not None:
            raise ConfigError(f"--model {factory}: {path} holds {net} folded for the binary "
                              "engine, which runs it as it is; drop --model")
        r = evaluate(load_engine(path), ds, "cpu", batch_size)
        return replace(r, net=net, file=str(path), fast_path="binary")
    if fast:  # bounded from the file, before anything is built
        _check_fast_memory(path, header)
    built = None if factory is None else load_packed(path, model=_build(factory),
                                                     contents=contents).eval()
    if fast:
        # the split's first images join the probe: real data show a backend's level flips
        source = resolve_file(path, contents) if built is None else built
        run = compile_for_cpu(source, batch_size=min(batch_size, max(1, len(ds))),
                              input_shape=tuple(ds.images.shape[1:]),
                              # 256 real images: the 99.5 % top-1 bar then allows one flip
                              probe_inputs=to_float(ds.images[:256]) if len(ds) else None)
        fast_path = run.kind
    else:
        run = load_packed(path, contents=contents) if built is None else built
        fast_path = None
    r = evaluate(run, ds, "cpu", batch_size)
    return replace(r, net=net, file=str(path), fast_path=fast_path)


#: Float32 copies of a file's values that ``--fast`` holds at its peak: the PyTorch model and,
#: per backend it times, its graph and session (measured: a 4.1 MB file of 31 M binary weights
#: peaks at 2.1 GB, 15 copies of 124 MB, over the interpreter's 0.3 GB).
FAST_COPIES = 16


def _available_memory() -> int | None:
    """Bytes the system can still give (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fast_memory(path: str | os.PathLike, header: dict) -> None:
    """Refuse ``--fast`` when :data:`FAST_COPIES` float32 copies of the file's values would
    not fit the memory available now (``ConfigError``; plain ``fewbits eval`` needs ~3)."""
    values = sum(math.prod(t["shape"]) for t in header["tensors"])
    need, have = FAST_COPIES * 4 * values, _available_memory()
    if have is not None and need > have:
        raise ConfigError(f"--fast: {path} holds {values:,} values; comparing the CPU backends "
                          f"on it needs about {need / 2**30:.1f} GiB ({FAST_COPIES} float32 "
                          f"copies) and {have / 2**30:.1f} GiB is available; evaluate it "
                          "without --fast (PyTorch alone, about 3 copies)")


def _build(factory: str) -> object:
    """``create_model(factory)`` for ``--model``; a factory that cannot build with no
    arguments is a bad option, not a crash."""
    try:
        return create_model(factory)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--model {factory}: cannot build it with no arguments: {e}") from None


def _eval_packed(ns: argparse.Namespace) -> EvalResult:
    """``fewbits eval FILE.fewbits``: on the dataset recorded in the file unless ``--dataset``
    says otherwise (a file that records none needs ``--dataset``: no guess)."""
    given = [flag for flag, v, default in (("-c/--context", ns.context, "cpu"),
                                           ("-d/--device-id", ns.device_id, 0),
                                           ("-t/--type-config", ns.type_config, "float"))
             if v != default]
    if given:  # never silently ignored
        raise ConfigError(f"{', '.join(given)}: a .fewbits file is evaluated on the CPU in "
                          "float32 (its packed form's own arithmetic); drop the option, or "
                          "evaluate the run folder or checkpoint instead")
    header, _ = read_container(ns.path)
    model = header.get("model") if isinstance(header.get("model"), dict) else {}
    net = str(model.get("name", "?"))
    zoo = is_model(net)
    cfg = recorded_eval_config(ns.path, header.get("data"), ns.dataset, ns.data_dir,
                               ns.download)
    with data_dir_note(unfollowed_data_dir(ns.path, header.get("data"), cfg.dataset,
                                           ns.data_dir)):
        if zoo:
            ds = load_split(cfg, "test", net_input_shape(net))
        else:  # the user's own architecture: no declared input shape to check against
            ds = load_dataset(cfg.dataset, "test", cfg.data_dir, download=cfg.download)
    if zoo:
        check_model_input(ns.path, net, model.get("kwargs"), tuple(ds.images.shape[1:]),
                          cfg.dataset)
    try:
        r = evaluate_packed(ns.path, ds, ns.batch_size, fast=ns.fast, model=ns.model)
    except RuntimeError as e:  # a user's model that cannot take these images (no declared shape)
        if zoo:
            raise
        raise ConfigError(f"{ns.path}: {net} cannot run on {cfg.dataset!r}'s images "
                          f"{tuple(ds.images.shape[1:])}: {str(e)[:300]}; evaluate it on data "
                          "like its training data (--dataset, --data-dir)") from None
    return replace(r, dataset=cfg.dataset)


def format_result(r: EvalResult) -> str:
    """The one-line report of ``fewbits eval`` (runs, checkpoints and packed files alike)."""
    on = f", on {printable(r.fast_path)}" if r.fast_path else ""
    return (f"{printable(r.net)} ({printable(r.file)}) on {printable(r.dataset)} test, "
            f"{r.total} images: error "
            f"{100 * r.error:.2f}% (accuracy {100 * r.accuracy:.2f}%), "
            f"{r.images_per_second:.0f} images/s{on}")


def run_eval(ns: argparse.Namespace) -> int:
    """Evaluate ``ns.path`` and print the result (``--json``: as JSON); 0."""
    use_model_factory(ns.model)
    if ns.batch_size < 1:
        raise ConfigError(f"-b/--batch-size must be an integer >= 1, got {ns.batch_size}")
    # by content, or by name for a file (a missing path or a folder: the run reader's errors)
    if is_packed_file(ns.path) or (str(ns.path).endswith(".fewbits")
                                   and os.path.isfile(ns.path)):
        r = _eval_packed(ns)
    else:
        if ns.fast:  # never silently ignored
            raise ConfigError("--fast runs a packed model: write one with `fewbits export "
                              f"{ns.path} -o model.fewbits`, then `fewbits eval model.fewbits "
                              "--fast`")
        r = evaluate_file(ns.path, dataset=ns.dataset, data_dir=ns.data_dir,
                          batch_size=ns.batch_size, context=ns.context,
                          device_id=ns.device_id, download=ns.download,
                          type_config=ns.type_config, model=ns.model)
    print(json.dumps(r.to_dict(), indent=2) if ns.json else format_result(r))
    return 0
