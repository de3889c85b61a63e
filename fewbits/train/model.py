"""The model of a run and the checks on its input: which net, which images, which INQ schedule.

Every check raises :class:`ConfigError` naming the problem and the fix, before any training
step (a net that cannot take the data, ``-b 1`` under batch norm, an INQ schedule outside the
run).

    >>> inq_schedule((0.5, 1.0), 400)
    (200, 399)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterator
from dataclasses import MISSING, fields
from typing import Any

import torch
from torch import Tensor, nn

from ..batch_norm import batch_norms
from ..config import QUANT_KEYS, ConfigError, QuantConfig, TrainConfig
from ..data import ChecksumError, CorruptDataError, load_dataset, to_float
from ..models import FAMILIES, create_model, list_models, model_info, register_factory
from ..quantizers import Quantizer

__all__ = [
    "BN_RECALIBRATE_IMAGES",
    "bn_recalibration_batches",
    "build_model",
    "check_batch_norm",
    "check_dead_start",
    "check_input_shape",
    "check_inq",
    "check_model_input",
    "check_net",
    "check_quant_options",
    "count_parameters",
    "inq_schedule",
    "load_split",
    "net_input_shape",
    "probe_forward",
    "resolve_bn_recalibrate",
]

#: Training images ``--bn-recalibrate`` uses by default with ``--stochastic``.
BN_RECALIBRATE_IMAGES = 20000


def inq_schedule(values: tuple[int | float, ...], steps: int) -> tuple[int, ...]:
    """The INQ iterations of a run of ``steps`` optimizer iterations (``max_iter``; the INQ
    counter counts optimizer steps, see :func:`fewbits.layers.count_optimizer_steps`):
    integers as given; fractions ``f`` at iteration ``min(steps - 1, floor(f * steps))``, so
    ``1.0`` fixes the last weights at the last iteration. Fractions that land on the same
    iteration raise :class:`ConfigError`.

        >>> inq_schedule((0.5, 0.75, 0.875, 0.9375, 1.0), 400)
        (200, 300, 350, 375, 399)
    """
    if not any(isinstance(v, float) for v in values):
        return tuple(int(v) for v in values)
    if any(a >= b for a, b in itertools.pairwise(values)):
        raise ConfigError(f"--inq-iterations {list(values)}: fractions must increase, e.g. "
                          "0.5,0.75,0.875,0.9375,1.0")
    its = tuple(min(steps - 1, int(v * steps)) for v in values)
    if len(set(its)) != len(its):
        raise ConfigError(f"--inq-iterations {list(values)} of a {steps}-iteration run give "
                          f"iterations {list(its)}, two on the same iteration; use fewer steps "
                          "or a longer run (the default five fractions need -i 32 or more)")
    return its


def check_inq(model: nn.Module, steps: int) -> None:
    """Refuse a quantizer schedule (INQ's, :meth:`Quantizer.schedule`) that never starts within
    the run; warn when it does not end."""
    scheds = {(type(m).__name__, m.schedule()) for m in model.modules()
              if isinstance(m, Quantizer) and m.schedule()}
    for name, its in sorted(scheds):
        if its[0] >= steps:
            raise ConfigError(
                f"{name} schedule {list(its)} starts after the run's {steps} iterations: no "
                "weight would ever be quantized. Give iterations inside the run, or fractions "
                "of it: --inq-iterations 0.5,0.75,0.875,0.9375,1.0")
        if its[-1] >= steps:
            warnings.warn(
                f"{name} schedule {list(its)} ends after the run's {steps} iterations: part of "
                "the weights stays float and the model cannot be exported as powers of two "
                "(--inq-iterations 0.5,0.75,0.875,0.9375,1.0 ends within the run)",
                stacklevel=2)

# --------------------------------------------------------------------------- data and model


def net_input_shape(net: str) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` images a registered net was built for, as its registration declares
    (``None`` if it declares none). Channels adapt to the data (``in_channels``)."""
    return model_info(net).input_shape


def check_net(net: str) -> None:
    """Unknown ``-n/--net`` -> :class:`ConfigError`; ``package.module:factory`` is imported and
    registered (the user asked for it on the command line)."""
    try:
        if ":" in net:
            register_factory(net)
        model_info(net)
    except ValueError as e:
        raise ConfigError(f"-n/--net: {e}") from None


def load_split(cfg: TrainConfig, split: str, shape: tuple[int, int, int] | None = None):
    """Load one split of ``cfg.dataset`` (synthetic data gets ``shape``, default 3x32x32)."""

    kw: dict[str, Any] = {}
    if cfg.dataset == "synthetic":
        n = cfg.synthetic_size if split == "train" else max(2, cfg.synthetic_size // 5)
        kw = {"n": n, "shape": shape or (3, 32, 32), "num_classes": 10, "seed": 0}
    elif cfg.dataset == "imagefolder" and cfg.workers is not None:
        kw = {"workers": cfg.workers}
    try:
        return load_dataset(cfg.dataset, split, cfg.data_dir, download=cfg.download, **kw)
    except (ValueError, TypeError) as e:
        if isinstance(e, ChecksumError | CorruptDataError):
            raise
        raise ConfigError(f"--dataset {cfg.dataset}: {e}") from e


def check_input_shape(net: str, image_shape: tuple[int, ...], dataset: str) -> None:
    """Raise :class:`ConfigError` when ``dataset``'s images (C, H, W) do not fit ``net``,
    naming the nets that do."""
    want = net_input_shape(net)
    if want is None:
        return
    h, w = int(image_shape[-2]), int(image_shape[-1])
    if (h, w) == want[1:]:
        return
    shapes: dict[tuple[int, int], list[str]] = {}
    for name in list_models():
        shape = model_info(name).input_shape
        if shape is not None:
            shapes.setdefault(shape[1:], []).append(name)
    fits = shapes.get((h, w), [])
    hint = (f"nets that fit {h}x{w} images: {', '.join(fits[:4])}"
            + (f" ... ({len(fits)} in all)" if len(fits) > 4 else "") + " (see `fewbits list`)"
            if fits else f"no registered net takes {h}x{w} images; resize the data to "
            + " or ".join(f"{a}x{b} (e.g. {n[0]})" for (a, b), n in shapes.items()))
    raise ConfigError(
        f"dataset {dataset!r} has {tuple(image_shape)} images but {net} expects "
        f"{want[1]}x{want[2]} images ({want[0]} channel{'s' if want[0] > 1 else ''}); {hint}"
    )


def check_model_input(source: Any, net: str, kwargs: Any, image_shape: tuple[int, ...],
                      dataset: str) -> None:
    """Raise :class:`ConfigError` when a trained model (options ``kwargs``) cannot take
    ``dataset``'s images: wrong size (:func:`check_input_shape`), channels or features."""
    check_input_shape(net, image_shape, dataset)
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    c, n = int(image_shape[0]), math.prod(int(s) for s in image_shape)
    for key, have, what in (("in_channels", c, "-channel"), ("in_features", n, "-value")):
        want = kwargs.get(key)
        if isinstance(want, int) and want != have:
            raise ConfigError(
                f"{source}: {net} was trained on {want}{what} images but {dataset!r} has "
                f"{have}{what} images {tuple(image_shape)}; evaluate it on data like its "
                "training data (--dataset, --data-dir)")


def build_model(cfg: TrainConfig, image_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``create_model(cfg.net, ...)`` with the quantization options of ``cfg``, the classes and
    input channels (or features, for MLPs) of the data, and ``cfg.model_args``. Seeds the
    global RNG with ``cfg.seed`` first, so the initial weights are reproducible."""
    check_net(cfg.net)
    defaults = model_info(cfg.net).defaults
    c, h, w = (int(s) for s in image_shape[-3:])
    kwargs: dict[str, Any] = {k: getattr(cfg, k) for k in QUANT_KEYS
                              if k in defaults and getattr(cfg, k) is not None}
    check_quant_options(cfg, defaults)
    if "inq_iterations" in kwargs:
        kwargs["inq_iterations"] = list(inq_schedule(cfg.inq_iterations, cfg.max_iter))
    derived = {"num_classes": num_classes, "in_channels": c, "in_features": c * h * w}
    kwargs.update({k: v for k, v in derived.items() if k in defaults})
    unknown = sorted(set(cfg.model_args) - set(defaults))
    if unknown:
        raise ConfigError(f"--model-arg {unknown}: {cfg.net} has no such option; its options "
                          f"are {sorted(set(defaults) - set(QUANT_KEYS))}")
    kwargs.update(cfg.model_args)
    torch.manual_seed(cfg.seed)
    try:
        model = create_model(cfg.net, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {cfg.net}: {e}") from e
    return model


def check_quant_options(cfg: TrainConfig, defaults: dict[str, Any]) -> None:
    """Refuse quantization options set away from their defaults that ``cfg.net`` does not use:
    ``--bit-width 3`` on a float net or factory, or on ``binary_connect``, would otherwise
    train a model without it in silence. A zoo net's family decides what it uses
    (:meth:`~fewbits.models.Family.ignored`); any other net, its factory's signature."""
    given = [f for f in fields(TrainConfig) if f.name in QUANT_KEYS
             and getattr(cfg, f.name) != (f.default if f.default is not MISSING
                                          else f.default_factory())]
    if not given:
        return
    fam = model_info(cfg.net).family
    if fam is not None:
        qc = QuantConfig.from_kwargs({k: getattr(cfg, k) for k in QUANT_KEYS})
        ignored = set(FAMILIES[fam].ignored(qc, [f.name for f in given]))
    else:
        ignored = {f.name for f in given if f.name not in defaults}
    if not ignored:
        return
    flags = ", ".join("/".join(f.metadata["flags"]) for f in given if f.name in ignored)
    if fam is not None:
        hint = f"the {fam} family has no use for it (docs/QUANTIZERS.md, 'The families')"
    elif any(k in QUANT_KEYS for k in defaults):
        hint = f"its quantization options are {', '.join(k for k in defaults if k in QUANT_KEYS)}"
    else:
        hint = ("it builds no quantizer from options: give a quantized net (`fewbits list`), "
                "or quantize the factory's layers with fewbits.quantize_ (README, 'Your own "
                "model')")
    raise ConfigError(f"{flags}: {cfg.net} would ignore it; {hint}")


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def probe_forward(model: nn.Module, image_shape: tuple[int, ...], net: str,
                   dataset: str, batch: int = 2) -> None:
    """For nets without a known input shape: one eval forward on ``batch`` blank images;
    :class:`ConfigError` when the net cannot take them. The RNG and train mode are kept."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.zeros(batch, *image_shape))
    except RuntimeError as e:
        raise ConfigError(f"{net} cannot take the {tuple(image_shape)} images of {dataset!r}: "
                          f"{str(e).splitlines()[0]}") from e
    finally:
        model.train(was)


def check_batch_norm(model: nn.Module, image_shape: tuple[int, ...], net: str,
                      dataset: str, batch_size: int) -> None:
    """Refuse ``-b 1`` for nets whose batch norm would see one value per channel in training
    (``BatchNorm1d`` after a linear layer, or a 1x1 feature map), where PyTorch fails mid-run.
    Batch norm's training statistics need two values per channel; the shapes come from one
    eval forward of a blank image (no state changes)."""
    if batch_size > 1:
        return
    single: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args: single.append(names[mod]) if math.prod(args[0].shape[2:]) == 1
        else None) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        probe_forward(model, image_shape, net, dataset, batch=1)
    finally:
        for h in hooks:
            h.remove()
    if single:
        raise ConfigError(
            f"-b/--batch-size 1: {net} normalises {', '.join(single[:3])} with batch norm over "
            "one value per channel, whose training statistics need at least 2 images per batch "
            "(per process under torchrun); use -b 2 or more")


def resolve_bn_recalibrate(cfg: TrainConfig, model: nn.Module, train_images: int) -> int:
    """The images ``--bn-recalibrate`` re-estimates batch norm over (0: off). Unset, it
    follows ``--stochastic`` on a net with batch norm: ``min(BN_RECALIBRATE_IMAGES,
    train_images)``. Raises :class:`ConfigError` for a count on a net without batch norm,
    a count of 1 (batch norm needs two images a batch) or more than the training images."""
    asked, has_bn = cfg.bn_recalibrate, bool(batch_norms(model))
    if asked is None:
        return min(BN_RECALIBRATE_IMAGES, train_images) if cfg.stochastic and has_bn else 0
    if asked and not has_bn:
        raise ConfigError(f"--bn-recalibrate {asked}: {cfg.net} has no batch norm with running "
                          "statistics to re-estimate; drop the flag (or give 0)")
    if asked == 1 or asked > train_images:
        raise ConfigError(f"--bn-recalibrate {asked}: give 2 to {train_images} images (the "
                          f"training split of --dataset {cfg.dataset}), or 0 for off")
    return asked


def bn_recalibration_batches(images: Tensor, n: int, batch_size: int, seed: int,
                             device: torch.device) -> Iterator[Tensor]:
    """``n`` of the uint8 ``images`` drawn without replacement by a generator seeded with
    ``seed + 0xB4``, as float batches on ``device``: ``max(1, n // max(batch_size, 2))``
    near-equal batches (each of at least two images), no augmentation."""
    g = torch.Generator().manual_seed(seed + 0xB4)
    idx = torch.randperm(images.shape[0], generator=g)[:n]
    for part in torch.tensor_split(idx, max(1, n // max(batch_size, 2))):
        yield to_float(images[part], device)


def _one_level(t: torch.Tensor) -> bool:
    flat = t.detach().reshape(-1)
    return flat.numel() > 1 and bool((flat == flat[0]).all())


@contextlib.contextmanager
def check_dead_start(model: nn.Module, net: str) -> Iterator[list[torch.Tensor]]:
    """Around the first training forward: :class:`ConfigError` when the net's output is the
    same for every image of the batch (append the logits to the yielded list) and a quantizer
    of ``model`` mapped inputs that differ to one single value, so that training would sit at
    chance with every gradient but the last bias's exactly zero (a min-max range far wider than
    the data at few levels: ``--ql-max 3`` on the ``[-2, 2]`` weight range has a step of 4/3,
    and every weight rounds to 0)."""
    collapsed: list[str] = []

    def hook(name: str, mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        x = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
        if (x is not None and isinstance(out, torch.Tensor) and _one_level(out)
                and not _one_level(x)):
            collapsed.append(f"{name or 'the input'} ({type(mod).__name__}) maps "
                             f"[{float(x.min()):.3g}, {float(x.max()):.3g}] to "
                             f"{float(out.detach().reshape(-1)[0]):.3g}")

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(n, mod, a, o))
               for n, m in model.named_modules() if isinstance(m, Quantizer)]
    logits: list[torch.Tensor] = []
    try:
        yield logits
    finally:
        for h in handles:
            h.remove()
    out = logits[0].detach() if logits else None
    if collapsed and out is not None and out.shape[0] > 1 and bool((out == out[:1]).all()):
        raise ConfigError(
            f"{net} gives the same output for every image at the first iteration, so training "
            f"would sit at chance: {'; '.join(collapsed[:3])}"
            f"{f' (and {len(collapsed) - 3} more)' if len(collapsed) > 3 else ''} to one "
            "value. Give the quantizers a grid that covers the data: for min_max, ranges from "
            "the data (fewbits.calibrate, or --p-min-max / --a-min-max) or more levels "
            "(--ql-max); for fixed point, a --delta and --bit-width that span the values")
