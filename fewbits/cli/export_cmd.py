"""``fewbits export`` (a trained run -> its packed low-bit file and ONNX graph) and ``fewbits
info`` (bits per weight, size and ratio to fp32 of a ``.fewbits`` file).

    $ fewbits export runs/fp_net -o fp_net.fewbits --entropy --onnx fp_net.onnx
    $ fewbits info fp_net.fewbits

Errors are raised, not printed: :func:`fewbits.cli.main` reports them (:mod:`fewbits.cli.base`).
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile

import torch

from .._text import printable
from ..checkpoint import load_model
from ..config import ConfigError
from ..export import export_packed, packed_info
from ..export.container import is_packed_file
from ..export.onnx import DEFAULT_OPSET, compare_onnx, export_onnx, input_shape_of, resolve_source
from .base import use_model_factory

__all__ = [
    "EXPORT_ERRORS",
    "EXPORT_HELP",
    "INFO_HELP",
    "add_export_arguments",
    "add_info_arguments",
    "run_export",
    "run_info",
]

EXPORT_HELP = "write a trained run in its packed low-bit form (and ONNX)"
INFO_HELP = "bits per weight, size and ratio to fp32 of a .fewbits file"
#: What the exporters and readers raise for input they cannot use, besides
#: :data:`fewbits.cli.base.USER_ERRORS`: a model they cannot export (``ValueError``, e.g.
#: ``--fold-bn`` on a family other than binary_net), a missing source, ONNX not installed.
EXPORT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ImportError)


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fewbits export SOURCE -o model.fewbits [--entropy] [--bn ...]
    [--fold-bn] [--onnx]``."""
    parser.add_argument("source", help="run folder or checkpoint of a trained model (or a "
                        ".fewbits file, to write its --onnx form)")
    parser.add_argument("-o", "--output", help="packed model file to write (.fewbits)")
    parser.add_argument("--entropy", action="store_true",
                        help="Huffman-code each tensor's codes where that is smaller")
    parser.add_argument("--bn", choices=("float32", "float16", "folded"), default="float32",
                        help="batch-norm storage; float16 is smaller but not bit-exact; folded "
                        "(ternary): folded into the per-channel scales, the bias kept, exact "
                        "to float32 rounding (default: float32)")
    parser.add_argument("--fold-bn", action="store_true",
                        help="binary_net: store batch norm folded into exact per-channel "
                        "thresholds for the binary engine (fewbits.runtime.binary_file)")
    parser.add_argument("--onnx", metavar="PATH", help="also write an ONNX graph (PyTorch's "
                        "exporter with fewbits' exact ONNX form of each quantizer)")
    parser.add_argument("--fuse", action="store_true",
                        help="--onnx: write the fused deployment form instead (batch norm "
                        "folded, integer weights, QDQ that ONNX Runtime runs as QLinearConv; "
                        "within a stated tolerance of PyTorch)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 21)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing the ONNX graph with PyTorch (on the example "
                        "input before writing it, and on 32 random images)")
    parser.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY", default=None,
                        help="the factory a run was trained with (`fewbits train --net "
                        "package.module:factory`), to rebuild it")
    parser.add_argument("--input-shape", metavar="C,H,W", type=_input_shape, default=None,
                        help="--onnx: the input image shape, for a model whose registration "
                        "declares none (default: the registered shape)")
    return parser


def _input_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers C,H,W such as "
                                         f"3,32,32, got {text!r}")
    return shape  # type: ignore[return-value]


def add_info_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``fewbits info model.fewbits [--json]``."""
    parser.add_argument("path", help="a .fewbits file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Write the packed file (and ONNX graph) for ``args.source``; print the size report; 0."""
    if not args.output and not args.onnx:
        raise ConfigError("nothing to write: give -o model.fewbits and/or --onnx model.onnx")
    use_model_factory(getattr(args, "model", None))
    source = args.source
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such run folder, checkpoint or .fewbits file")
    packed_source = is_packed_file(source)
    if packed_source and args.output:
        raise ConfigError(f"{source} is already a packed model; export from the run folder or "
                          "checkpoint to write a new .fewbits file (or give only --onnx)")
    model = source if packed_source else load_model(source)
    if args.model and not packed_source and args.model != model.fewbits_spec["name"]:
        raise ConfigError(f"--model {args.model}: {source} was trained as "
                          f"{model.fewbits_spec['name']}, which it is rebuilt as; drop --model")
    used = (getattr(model, "fewbits_source", None) or {}).get("path") or source
    print(f"exporting {printable(used)}", flush=True)  # which checkpoint of a run folder was used
    if args.output:
        report = export_packed(model, args.output, entropy=args.entropy, bn=args.bn,
                               fold_bn=args.fold_bn)
        print(report.table())
    if args.onnx:
        shape = getattr(args, "input_shape", None)
        src = resolve_source(model)  # once: the export and the comparison below read it
        rep = export_onnx(src, args.onnx, opset=args.opset or DEFAULT_OPSET,
                          input_shape=shape, fuse=bool(getattr(args, "fuse", False)),
                          check=not args.no_check)
        print(rep.table())
        if not args.no_check:
            g = torch.Generator().manual_seed(0)
            x = torch.rand(32, *(shape or input_shape_of(src.model)), generator=g)
            c = compare_onnx(src, args.onnx, x)
            print(f"ONNX Runtime vs PyTorch on 32 random images: top-1 agreement "
                  f"{100 * c['top1_agreement']:.1f}%, max |logit difference| "
                  f"{c['max_abs']:.3g} ({c['max_rel']:.2g} of the largest logit)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print the per-tensor table of a ``.fewbits`` file (bits per weight, size, ratio to
    fp32), or with ``--json`` the same as JSON; 0."""
    if not os.path.exists(args.path):
        raise FileNotFoundError(f"{args.path}: no such file")
    if not is_packed_file(args.path) and (os.path.isdir(args.path)
                                          or zipfile.is_zipfile(args.path)):
        raise ConfigError(f"{args.path} is a run folder or training checkpoint, not a .fewbits "
                          f"file: write its packed form with `fewbits export {args.path} -o "
                          "model.fewbits`, then `fewbits info model.fewbits`")
    report = packed_info(args.path)
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
