"""Command-line glue for ``fewbits export``, ``fewbits info`` and evaluating ``.fewbits`` files.

``fewbits.cli`` wires these in::

    p = sub.add_parser("export"); add_export_arguments(p); p.set_defaults(func=run_export)
    p = sub.add_parser("info");   add_info_arguments(p);   p.set_defaults(func=run_info)

and its ``eval`` calls :func:`evaluate_packed` for ``.fewbits`` files.

    fewbits export runs/fp_net -o fp_net.fewbits --entropy --onnx fp_net.onnx
    fewbits info fp_net.fewbits
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from .._io import WriteError
from .container import FormatError

__all__ = [
    "add_export_arguments",
    "add_info_arguments",
    "evaluate_packed",
    "run_export",
    "run_info",
]


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fewbits export SOURCE -o model.fewbits [--entropy] [--bn ...]
    [--fold-bn] [--onnx]``."""
    parser.add_argument("source", help="run folder or checkpoint of a trained model (or a "
                        ".fewbits file, to write its --onnx form)")
    parser.add_argument("-o", "--output", help="packed model file to write (.fewbits)")
    parser.add_argument("--entropy", action="store_true",
                        help="Huffman-code each tensor's codes where that is smaller")
    parser.add_argument("--bn", choices=("float32", "float16"), default="float32",
                        help="batch-norm storage; float16 is smaller but not bit-exact "
                        "(default: float32)")
    parser.add_argument("--fold-bn", action="store_true",
                        help="binary_net: store batch norm folded into exact per-channel "
                        "thresholds for the binary engine (fewbits.runtime.binary_file)")
    parser.add_argument("--onnx", metavar="PATH", help="also write an ONNX graph (QDQ for fixed "
                        "point / min-max, binarized constants for binary families)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 21)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing the ONNX graph with PyTorch on random images")
    parser.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY", default=None,
                        help="the factory a run was trained with (`fewbits train --net "
                        "package.module:factory`), to rebuild it")
    return parser


def add_info_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fewbits info model.fewbits [--json]``."""
    parser.add_argument("path", help="a .fewbits file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def run_export(args: argparse.Namespace) -> int:
    """Write the packed file (and ONNX graph) for ``args.source``; print the size report."""
    from .container import is_packed_file
    from .onnx import DEFAULT_OPSET, compare_onnx, export_onnx, input_shape_of
    from .packed import export_packed, model_of

    if not args.output and not args.onnx:
        return _fail("nothing to write: give -o model.fewbits and/or --onnx model.onnx")
    source: Any = args.source
    try:
        if getattr(args, "model", None):
            from ..models import register_factory

            register_factory(args.model)
        if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
            return _fail(f"{source}: no such run folder, checkpoint or .fewbits file")
        packed_source = not isinstance(source, torch.nn.Module) and is_packed_file(source)
        if packed_source and args.output:
            return _fail(f"{source} is already a packed model; export from the run folder or "
                         "checkpoint to write a new .fewbits file (or give only --onnx)")
        model = source if packed_source else model_of(source)
        used = (getattr(model, "fewbits_source", None) or {}).get("path") or source
        print(f"exporting {used}", flush=True)  # which checkpoint of a run folder was used
        if args.output:
            report = export_packed(model, args.output, entropy=args.entropy, bn=args.bn,
                                   fold_bn=args.fold_bn)
            print(report.table())
        if args.onnx:
            rep = export_onnx(model, args.onnx, opset=args.opset or DEFAULT_OPSET)
            print(rep.table())
            if not args.no_check:
                from .onnx import resolve_source

                m, _ = resolve_source(model)
                g = torch.Generator().manual_seed(0)
                x = torch.rand(32, *input_shape_of(m), generator=g)
                c = compare_onnx(m, args.onnx, x)
                print(f"ONNX Runtime vs PyTorch on 32 random images: top-1 agreement "
                      f"{100 * c['top1_agreement']:.1f}%, max |logit difference| "
                      f"{c['max_abs']:.3g} ({c['max_rel']:.2g} of the largest logit)")
    except (FormatError, ValueError, FileNotFoundError, ImportError, WriteError) as e:
        return _fail(str(e))
    except RuntimeError as e:  # fewbits.checkpoint.CheckpointError names the file and problem
        if type(e).__name__ != "CheckpointError":
            raise
        return _fail(str(e))
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print the per-tensor table of a ``.fewbits`` file (bits per weight, size, ratio to fp32)."""
    from .packed import packed_info

    if not os.path.isfile(args.path):
        return _fail(f"{args.path}: no such file")
    try:
        report = packed_info(args.path)
    except (FormatError, ValueError) as e:
        return _fail(str(e))
    if getattr(args, "json", False):
        print(json.dumps({
            "path": report.path, "model": report.model, "file_bytes": report.file_bytes,
            "fp32_bytes": report.fp32_bytes, "ratio": report.ratio,
            "bits_per_weight": report.bits_per_weight,
            "tensors": [{"name": e.name, "role": e.role, "count": e.count, "bits": e.bits,
                         "bytes": e.nbytes, "encoding": e.encoding} for e in report.entries],
        }, indent=2))
    else:
        print(report.table())
    return 0


def evaluate_packed(path: str | os.PathLike, images_uint8: torch.Tensor, labels: torch.Tensor,
                    batch_size: int = 256, fast: bool = False,
                    model: str | None = None) -> dict[str, Any]:
    """Classify ``images_uint8`` (uint8 ``(N, C, H, W)``) with the network stored at ``path``.

    The network is rebuilt from the file (:func:`~fewbits.export.load_packed`) or, with
    ``fast=True``, deployed on the fastest exact CPU backend (:func:`~fewbits.runtime.
    compile_for_cpu`). Images are scaled by 1/255 as in training. Returns ``{"error", "top1",
    "images_per_s", "n", "fast_path"}`` (``top1`` and ``error`` are fractions; ``fast_path`` is
    the backend used, or None), plus ``accuracy``, ``total`` and ``images_per_second``
    (the same numbers under the names ``fewbits eval`` reports for checkpoints).

    ``model``: a registered name or ``package.module:factory`` (registered by the caller) for
    files of models outside the registry: the file is loaded into ``create_model(model)``.
    """
    from ..runtime import compile_for_cpu
    from .packed import load_packed

    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    if labels.shape[0] != images_uint8.shape[0]:
        raise ValueError(f"{images_uint8.shape[0]} images but {labels.shape[0]} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from .container import read_model_file

    factory = model
    if factory is not None and read_model_file(path)[0]["model"]["name"] == factory:
        factory = None  # the file's own registered model, rebuilt with its recorded options
    if fast:
        source = path
        if factory is not None:  # a user's architecture: load into its instance first
            from ..models import create_model

            source = load_packed(path, model=create_model(factory)).eval()
        model = compile_for_cpu(source, batch_size=min(batch_size, max(1, images_uint8.shape[0])),
                                input_shape=tuple(images_uint8.shape[1:]))
        kind = model.kind
    elif factory is not None:
        from ..models import create_model

        model, kind = load_packed(path, model=create_model(factory)).eval(), None
    else:
        model, kind = load_packed(path).eval(), None
    n = images_uint8.shape[0]
    correct = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            x = images_uint8[i:i + batch_size].float() / 255
            pred = model(x).argmax(1)
            correct += int((pred == labels[i:i + batch_size].to(pred.device)).sum())
    elapsed = time.perf_counter() - start
    top1 = correct / n if n else 0.0
    speed = n / elapsed if elapsed else 0.0
    # accuracy / total / images_per_second: the names `fewbits eval` uses for checkpoints
    return {"error": 1.0 - top1, "top1": top1, "images_per_s": speed, "n": n,
            "fast_path": kind, "accuracy": top1, "total": n, "images_per_second": speed}
