"""Every training option, declared once: its default, flags, help group, help text and check.

:class:`QuantConfig` (the quantization options models take) and :class:`TrainConfig` (every
option of a training run) are dataclasses built from five option groups; each field carries
its command-line flags, help text and validation as field metadata. The ``fewbits train`` /
``classification.py`` parser is generated from them (:func:`add_arguments`), and a parsed
namespace becomes a config with :func:`from_namespace`, so a new option is one field here.

    >>> cfg = TrainConfig(net="mnist_float_lenet", max_iter=100, delta=2**-5)
    >>> cfg.delta, QuantConfig().delta, QuantConfig().inq_iterations[0]
    (0.03125, 0.0625, 5000)
    >>> TrainConfig(batch_size=0)
    Traceback (most recent call last):
    ...
    fewbits.config.ConfigError: -b/--batch-size must be an integer >= 1, got 0
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ._args import KeyValueAction, parse_float, parse_int_list, str2bool
from .data import DATASETS
from .quantizers import INQ_ITERATIONS, INQ_SELECTIONS

__all__ = [
    "CONTEXTS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "QUANT_KEYS",
    "RESUME_KEYS",
    "SEED_DELTA",
    "SEED_MAX_ITER",
    "TYPE_CONFIGS",
    "ConfigError",
    "QuantConfig",
    "TrainConfig",
    "add_arguments",
    "from_namespace",
    "str2bool",
]

CONTEXTS = ("cpu", "cudnn", "cuda")
TYPE_CONFIGS = ("float", "half")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
#: The seed's ``-i`` default: 300 CIFAR-10 epochs of 64 images (50000 / 64 * 300).
SEED_MAX_ITER = 234375
#: The seed's fixed-point step ``--delta`` (the MNIST nets default to 2**-7, see models.nets).
SEED_DELTA = 2**-4


class ConfigError(ValueError):
    """Invalid or inconsistent options; the message names the option and the fix."""


# --------------------------------------------------------------------------- value checks


def _inq_values(values: Any) -> tuple[int | float, ...]:
    """INQ iterations (ints), or fractions of the run's iterations (floats in (0, 1]); the
    trainer resolves fractions with :func:`fewbits.train.inq_schedule`."""
    vals = tuple(values)
    if not any(isinstance(v, float) for v in vals):
        return tuple(int(v) for v in vals)
    if not all(0 < float(v) <= 1 for v in vals):
        raise ConfigError(f"--inq-iterations: fractions of the run must lie in (0, 1], got "
                          f"{list(vals)}")
    return tuple(float(v) for v in vals)


# --------------------------------------------------------------------------- declarations

#: ``kind`` of an option -> extra ``add_argument`` keywords. ``value`` takes a typed value.
_KINDS: dict[str, dict[str, Any]] = {
    "value": {},
    "true": {"action": "store_true"},                     # --flag sets True
    "false": {"action": "store_false"},                   # --no-flag sets False
    "bool": {"action": argparse.BooleanOptionalAction},   # --flag / --no-flag
    "bool_value": {"type": str2bool, "nargs": "?", "const": True, "metavar": "{true,false}"},
    "key_value": {"action": KeyValueAction, "metavar": "KEY=VALUE"},
}
_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": parse_float, "str": str}


def option(default: Any = MISSING, *flags: str, help: str, kind: str = "value",
           factory: Callable[[], Any] | None = None, choices: Any = None,
           low: int | None = None, check: tuple[Callable[[Any], bool], str] | None = None,
           parse: Callable[[str], Any] | None = None, metavar: str | None = None,
           const: Any = None, default_text: str | None = None, same_on_resume: bool = False,
           excludes: str | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    ``flags``: its flags (the first long one names it in messages); ``kind``: a key of
    :data:`_KINDS`; ``choices``: allowed values (checked in the dataclass too); ``low``: the
    least integer allowed; ``check``: ``(predicate, "must be ...")``; ``parse``: the argument
    parser (default: from the annotation, int / float (``2**-4`` allowed) / str);
    ``default_text``: the help's "(default: ...)" when the value alone does not say it;
    ``same_on_resume``: ``--resume`` refuses a checkpoint whose value differs; ``excludes``:
    another field that may not be given on the same command line.
    """
    meta = {"flags": flags, "help": help, "kind": kind, "choices": choices, "low": low,
            "check": check, "parse": parse, "metavar": metavar, "const": const,
            "default_text": default_text, "same_on_resume": same_on_resume,
            "excludes": excludes}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _label(f: Field) -> str:
    return "/".join(f.metadata.get("flags") or ()) or f.name


def _at_least(label: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{label} must be an integer >= {low}, got {value!r}")


def _check_fields(obj: Any) -> None:
    """Apply every field's declared ``choices`` / ``low`` / ``check`` (``None`` = unset)."""
    for f in fields(obj):
        value, m, label = getattr(obj, f.name), f.metadata, _label(f)
        if value is None or not m:
            continue
        if m["choices"] is not None and value not in m["choices"]:
            raise ConfigError(f"{label}: {value!r} is not one of {', '.join(m['choices'])}")
        if m["low"] is not None:
            _at_least(label, value, m["low"])
        if m["check"] is not None and not m["check"][0](value):
            raise ConfigError(f"{label} must be {m['check'][1]}, got {value!r}")


_WITH_STOCHASTIC = "on with --stochastic, as the paper; off otherwise, as the seed"
_POSITIVE = (lambda v: v > 0 and math.isfinite(v), "> 0")
_BITS = (lambda v: 1 <= int(v) <= 32, "in [1, 32]")
#: torch generators take 64-bit seeds; the run derives a few more from ``--seed`` (+ 0x5EED).
_SEED = (lambda v: isinstance(v, int) and -(2 ** 62) <= v < 2 ** 62,
         "an integer in [-2**62, 2**62) (torch's generators take 64-bit seeds)")


@dataclass
class _SeedOptions:
    """seed flags (as the seed's classification.py)"""

    context: str = option("cpu", "-c", "--context", choices=CONTEXTS,
                          help="cpu, or cudnn/cuda for an NVIDIA GPU")
    device_id: int = option(0, "-d", "--device-id", low=0,
                            help="GPU index (under torchrun each process uses LOCAL_RANK)")
    type_config: str = option("float", "-t", "--type-config", choices=TYPE_CONFIGS,
                              same_on_resume=True,
                              help="half = mixed precision: fp16 autocast + GradScaler on "
                              "CUDA, bf16 autocast on the CPU")
    batch_size: int = option(64, "-b", "--batch-size", low=1, same_on_resume=True,
                             help="images per process per step")
    learning_rate: float = option(1e-3, "-l", "--learning-rate", check=_POSITIVE, help="")
    max_iter: int = option(SEED_MAX_ITER, "-i", "--max-iter", low=1, excludes="epochs",
                           default_text=f"{SEED_MAX_ITER} = 300 CIFAR-10 epochs",
                           help="training iterations")
    val_interval: int = option(1000, "-v", "--val-interval", low=1,
                               help="validate when iteration %% v == 0, and at the end")
    weight_decay: float = option(0.0, "-w", "--weight-decay", check=(lambda v: v >= 0, ">= 0"),
                                 help="")
    monitor_path: str = option("tmp.monitor", "-m", "--monitor-path",
                               help="folder for the series files, config.json and "
                               "training_curves.png")
    model_save_path: str | None = option(None, "-o", "--model-save-path",
                                         default_text="the monitor path",
                                         help="folder for checkpoint.pt, model_best.pt, "
                                         "model_final.pt")
    net: str = option("cifar10_resnet23_prediction", "-n", "--net", same_on_resume=True,
                      help="a registered network (see `fewbits list models`) or your own as "
                      "package.module:factory")


@dataclass
class _QuantOptions:
    """quantization"""

    bit_width: int | None = option(None, "--bit-width", check=_BITS,
                                   default_text="the family's: 8, INQ and LSQ 4",
                                   help="bits of fixed-point/pow2/INQ/LSQ quantizers")
    delta: float | None = option(None, "--delta", check=_POSITIVE,
                                 default_text="2**-4 as the seed; 2**-7 for the MNIST nets, "
                                 "whose wide layers would otherwise round to 0",
                                 help="fixed-point step")
    upper_bound: int = option(1, "--upper-bound", help="pow2: largest level 2**upper_bound")
    ql_min: int = option(0, "--ql-min", help="min-max: lowest level")
    ql_max: int = option(255, "--ql-max", help="min-max: highest level")
    p_min_max: bool = option(False, "--p-min-max", kind="true",
                             help="min-max weights: ranges from each batch instead of learnt")
    a_min_max: bool = option(False, "--a-min-max", kind="true",
                             help="min-max activations: ranges from each batch instead of "
                             "learnt")
    a_ema: bool = option(False, "--a-ema", kind="true",
                         help="with --a-min-max: exponential moving average of the batch "
                         "ranges")
    ste_fine_grained: bool = option(True, "--ste-fine-grained", kind="bool_value",
                                    help="straight-through gradient only inside the "
                                    "quantizer's range")
    inq_iterations: tuple[int | float, ...] = option(
        INQ_ITERATIONS, "--inq-iterations", parse=parse_int_list, metavar="I1,I2,...",
        help="INQ: iterations at which more weights are fixed, or fractions of the run such "
        "as 0.5,0.75,0.875,0.9375,1.0")
    inq_selection: str = option("largest_abs", "--inq-selection", choices=INQ_SELECTIONS,
                                help="INQ: which weights are fixed first")
    stochastic: bool = option(False, "--stochastic", kind="true",
                              help="binary connect/net: stochastic binarization in training "
                              "(+1 with probability hard_sigmoid(w), Courbariaux et al. 2015); "
                              "sign at inference")
    # The paper's latent-weight training: on with --stochastic, which needs it (the draws are
    # fair coins for small weights), off otherwise (the seed's); each can be set either way.
    clip_weights: bool | None = option(None, "--clip-weights", kind="bool",
                                       default_text=_WITH_STOCHASTIC,
                                       help="binary connect/net: clip latent weights to "
                                       "[-1, 1] after each step")
    uniform_init: bool | None = option(None, "--uniform-init", kind="bool",
                                       default_text=_WITH_STOCHASTIC,
                                       help="binary connect/net: latent weights start uniform "
                                       "in [-1, 1] (the paper's code)")
    glorot_lr_scale: bool | None = option(None, "--glorot-lr-scale", kind="bool",
                                          default_text=_WITH_STOCHASTIC,
                                          help="binary connect/net: each binarized layer's "
                                          "updates times 1/H, H = sqrt(1.5 / (fan_in + "
                                          "fan_out)) (the paper's learning-rate scale)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (tuples as lists)."""
        d = asdict(self)
        d["inq_iterations"] = list(self.inq_iterations)
        return d

    def _check_quant(self) -> None:
        self.inq_iterations = _inq_values(self.inq_iterations)
        _check_fields(self)
        if not self.ql_min < self.ql_max:
            raise ConfigError(f"need ql_min < ql_max (--ql-min < --ql-max), got {self.ql_min} "
                              f">= {self.ql_max}")
        if self.a_ema and not self.a_min_max:
            raise ConfigError("a_ema (--a-ema) needs a_min_max (--a-min-max): it is an EMA of "
                              "the per-batch ranges, as in the seed")


@dataclass
class _ModelOptions:
    """quantization"""

    # option() returns a dataclasses.field (with a default_factory), as RUF009 cannot see.
    model_args: dict[str, Any] = option(None, "--model-arg", kind="key_value",  # noqa: RUF009
                                        factory=dict,
                                        help="extra model option, e.g. width=64 for the MNIST "
                                        "nets (repeatable)")


@dataclass
class _DataOptions:
    """data"""

    dataset: str = option("cifar10", "--dataset", choices=None, same_on_resume=True,
                          default_text="cifar10 (downloaded to --data-dir when missing)",
                          help="")
    data_dir: str | None = option(None, "--data-dir",
                                  default_text="$FEWBITS_DATA or ~/.cache/fewbits/data",
                                  help="where the dataset lives; imagefolder: a folder or "
                                  ".tar.gz with train/<class>/*.jpg and test/<class>/*.jpg")
    download: bool = option(True, "--no-download", kind="false",
                            help="never download; fail with where to put the files instead")
    augment: bool | None = option(None, "--augment", kind="bool", same_on_resume=True,
                                  default_text="on for " + " and ".join(
                                      n for n, d in DATASETS.items() if d.augment)
                                  + ", off otherwise",
                                  help="random rotation (+-0.25 rad) and flip")
    synthetic_size: int = option(1000, "--synthetic-size", low=2, same_on_resume=True,
                                 help="synthetic dataset: training images (test: a fifth)")
    workers: int | None = option(None, "--workers", low=0,
                                 default_text="the data package's",
                                 help="processes decoding image folders (0: in this process)")
    val_batch_size: int | None = option(None, "--val-batch-size", low=1,
                                        default_text="max(batch size, 256)",
                                        help="validation batch")


@dataclass
class _OptimOptions:
    """optimisation"""

    epochs: float | None = option(None, "--epochs", check=_POSITIVE,
                                  help="train this many epochs instead of -i iterations")
    optimizer: str = option("adam", "--optimizer", choices=OPTIMIZERS, same_on_resume=True,
                            default_text="adam (the seed's)", help="")
    momentum: float = option(0.9, "--momentum", check=(lambda v: 0 <= v < 1, "in [0, 1)"),
                             help="sgd momentum")
    lr_schedule: str = option("constant", "--lr-schedule", choices=LR_SCHEDULES,
                              default_text="constant (the seed's)",
                              help="cosine decays to 0 at the last iteration")
    accum_steps: int = option(1, "--accum-steps", low=1, same_on_resume=True,
                              help="micro-batches of -b images accumulated per optimizer step")
    seed: int = option(0, "--seed", same_on_resume=True, check=_SEED,
                       help="seed of weights, batch order and augmentation")
    # Stochastic weights gather batch norm's statistics under random draws; inference uses
    # sign(w): re-estimated after the last iteration (fewbits.batch_norm.recalibrate_bn).
    bn_recalibrate: int | None = option(None, "--bn-recalibrate", low=0, metavar="IMAGES",
                                        default_text="20000 (or all the training images if "
                                        "fewer) with --stochastic on a net with batch norm; 0 "
                                        "otherwise",
                                        help="after the last iteration, re-estimate batch "
                                        "norm's running statistics over IMAGES training images "
                                        "(seeded draw, no augmentation) with the quantizers in "
                                        "inference form; 0: off")


@dataclass
class _RunOptions:
    """run control"""

    channels_last: bool = option(False, "--channels-last", kind="true",
                                 help="channels-last memory layout (CPU and GPU)")
    compile: bool = option(False, "--compile", kind="true", help="torch.compile the model")
    resume: str | None = option(None, "--resume", const="auto", metavar="PATH",
                                help="continue from MODEL_SAVE_PATH/checkpoint.pt, or from "
                                "PATH (a checkpoint or run folder)")
    overwrite: bool = option(False, "--overwrite", kind="true",  # fewbits.runs.check_run_folder
                             help="start a new run in a folder that holds one, replacing its "
                             "files (default: refuse; --resume continues it instead)")
    checkpoint_interval: int | None = option(None, "--checkpoint-interval", low=1,
                                             default_text="the validation interval",
                                             help="iterations between checkpoints")
    progress: bool = option(True, "--no-progress", kind="false",
                            help="log lines instead of a progress bar")
    plot: bool = option(True, "--no-plot", kind="false",
                        help="do not draw training_curves.png")
    validate_first: bool = option(True, "--no-first-validation", kind="false",
                                  help="skip the validation at iteration 0 (the seed does it; "
                                  "it costs a full test-set pass)")
    threads: int | None = option(None, "--threads", low=1,
                                 help="CPU threads for torch (at most the usable cores: more "
                                 "are lowered, with a warning)")


# Fields are ordered base class last to first: seed flags, quantization, model, data, ...
@dataclass
class QuantConfig(_QuantOptions):
    """Quantization options shared by all families (the seed's flags, and a few beyond).

    ``bit_width=None`` means the family default: 8 (fixed point, pow2), 4 (INQ);
    ``delta=None`` means the seed's :data:`SEED_DELTA` (``2**-4``). Raises
    :class:`ConfigError` (a ``ValueError``) naming the bad option.
    """

    def __post_init__(self) -> None:
        if self.delta is None:
            self.delta = SEED_DELTA
        self._check_quant()

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown model options {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


#: Quantization options that models take (the fields of :class:`QuantConfig`).
QUANT_KEYS = tuple(f.name for f in fields(QuantConfig))


@dataclass
class TrainConfig(_RunOptions, _OptimOptions, _DataOptions, _ModelOptions, _QuantOptions,
                  _SeedOptions):
    """Every training option; the CLI flags map 1:1 onto these fields (see the field
    declarations above for each one's flag, default and meaning).

    ``delta=None`` and ``bit_width=None`` mean the net's defaults; ``model_args`` are extra
    model keyword arguments (e.g. ``{"width": 64}``); ``epochs`` (when given) sets ``max_iter``;
    ``resume`` is a checkpoint path, a run folder, or ``"auto"`` (the model save path).
    Raises :class:`ConfigError` naming the flag of a bad value.
    """

    def __post_init__(self) -> None:
        self.model_args = dict(self.model_args)
        self._check_quant()

    @property
    def save_path(self) -> Path:
        """Where checkpoints and model files go (``model_save_path`` or ``monitor_path``)."""
        return Path(self.model_save_path or self.monitor_path)

    @property
    def uses_augment(self) -> bool:
        """``augment``, or (when ``None``) whether the registry marks the dataset augmented."""
        if self.augment is not None:
            return self.augment
        spec = DATASETS.get(self.dataset)
        return spec is not None and spec.augment


#: Options that must be equal for ``--resume``: they change the batches or the optimizer state.
RESUME_KEYS = tuple(f.name for f in fields(TrainConfig) if f.metadata["same_on_resume"])

#: Help groups in the order ``--help`` shows them, each with the fields it declares.
_GROUPS = (_SeedOptions, _QuantOptions, _ModelOptions, _DataOptions, _OptimOptions,
           _RunOptions)
#: Choices read from a registry when the parser is built (a later registration shows).
_LATE_CHOICES = {"dataset": DATASETS}


# --------------------------------------------------------------------------- the parser


def _help(f: Field) -> str:
    m = f.metadata
    text = m["default_text"]
    if text is None and m["kind"] == "bool_value":
        text = str(f.default).lower()
    elif text is None and m["kind"] == "value" and f.default is not None:
        text = (",".join(str(v) for v in f.default) if isinstance(f.default, tuple)
                else str(f.default))
    if text is None:
        return m["help"]
    return f"{m['help']} (default: {text})" if m["help"] else f"default: {text}"


def _argument(f: Field) -> dict[str, Any]:
    m = f.metadata
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f),
                          **_KINDS[m["kind"]]}
    choices = _LATE_CHOICES.get(f.name, m["choices"])
    if m["kind"] == "value":
        kw["type"] = m["parse"] or _PARSERS[str(f.type).split(" ")[0].split("[")[0]]
        if choices is not None:
            kw["choices"] = choices
        if m["const"] is not None:
            kw.update(nargs="?", const=m["const"])
    if m["metavar"] is not None:
        kw["metavar"] = m["metavar"]
    return kw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`TrainConfig` field, in its help group. Flags not given stay
    out of the namespace (``argparse.SUPPRESS``), so the dataclass defaults apply."""
    seen: set[str] = set()
    for group_cls in _GROUPS:
        title = (group_cls.__doc__ or "").strip()
        group = next((g for g in parser._action_groups if g.title == title), None)
        group = group or parser.add_argument_group(title)
        for f in fields(group_cls):
            if f.name in seen or f.name not in inspect.get_annotations(group_cls):
                continue
            seen.add(f.name)
            group.add_argument(*f.metadata["flags"], **_argument(f))


def from_namespace(ns: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of the flags given in ``ns`` (the others keep their defaults).
    Raises :class:`ConfigError` for two flags that exclude each other."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(ns).items() if k in by_name}
    for name in given:
        other = by_name[name].metadata["excludes"]
        if other in given:
            raise ConfigError(f"give either {_label(by_name[name])} or "
                              f"{_label(by_name[other])}, not both")
    return TrainConfig(**given)
