"""The dataset registry: name -> how to load a split, its options and what it is.

:data:`DATASETS` maps each name to a :class:`DatasetSpec`; :func:`load_dataset` looks the name
up, checks the split and the keyword options, and calls the spec's loader. A new dataset is one
:func:`register_dataset` call; the ``--dataset`` choices, ``fewbits list datasets`` and the
default augmentation all read this table.

    >>> list(DATASETS)
    ['cifar10', 'mnist', 'imagefolder', 'digits', 'synthetic']
    >>> DATASETS["cifar10"].augment, DATASETS["digits"].augment
    (True, False)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import datasets as _builtin
from .base import ArrayDataset, check_split, resolve_dir
from .imagefolder import load_imagefolder

__all__ = ["DATASETS", "DatasetSpec", "load_dataset", "register_dataset"]


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset.

    ``load(split, data_dir, download, **options)`` returns the split (``data_dir`` as given:
    ``None`` or a path); ``options`` are the keyword options it accepts; ``help`` one line for
    ``fewbits list datasets``; ``augment``: natural images, trained with rotation and flip
    unless ``--no-augment``.
    """

    name: str
    load: Callable[..., ArrayDataset]
    help: str
    options: frozenset[str] = frozenset()
    augment: bool = False


#: Registered datasets, in registration order (``name in DATASETS``, ``list(DATASETS)``).
DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` under ``spec.name``; a name registered twice raises ``ValueError``."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def load_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None,
                 download: bool = True, **kw: Any) -> ArrayDataset:
    """Load one split (``"train"`` or ``"test"``) of a dataset named in :data:`DATASETS`.

    ``data_dir`` defaults to :func:`fewbits.data.default_data_dir` (``imagefolder`` needs it
    explicitly: the folder or archive). ``download=False`` never touches the network: missing
    files raise :class:`DatasetNotFoundError` naming where to put them. Extra keyword
    arguments:

    - ``imagefolder``: ``cache_dir``, ``cache`` (bool), ``workers`` (see
      :func:`fewbits.data.imagefolder.load_imagefolder`).
    - ``synthetic``: ``n``, ``shape``, ``num_classes``, ``seed`` (see
      :func:`fewbits.data.synthetic_dataset`).

    Raises ``ValueError`` for an unknown name (listing the known ones) or split, ``TypeError``
    for an option the dataset does not take.

    Example:
        >>> load_dataset("synthetic", "train", n=20, shape=(1, 8, 8), num_classes=2).images.shape
        torch.Size([20, 1, 8, 8])
    """
    key = str(name).strip().lower()
    spec = DATASETS.get(key)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    check_split(split)
    extra = set(kw) - spec.options
    if extra:
        raise TypeError(
            f"load_dataset({key!r}) got unexpected keyword argument(s) {sorted(extra)}; "
            f"accepted: {sorted(spec.options) or 'none'}"
        )
    return spec.load(split, data_dir, download, **kw)


# --------------------------------------------------------------------------- built-ins


def _imagefolder(split: str, data_dir: Path | None, download: bool, **kw: Any) -> ArrayDataset:
    if data_dir is None:
        raise ValueError(
            "imagefolder needs data_dir: a folder (or .tar.gz/.tgz/.tar archive) laid out as "
            "train/<class>/*.jpg and test/<class>/*.jpg"
        )
    return load_imagefolder(data_dir, split, **kw)


def _synthetic(split: str, data_dir: Path | None, download: bool, **kw: Any) -> ArrayDataset:
    n = kw.pop("n", 1000 if split == "train" else 200)
    return _builtin.synthetic_dataset(n, split=split, **kw)


register_dataset(DatasetSpec(
    "cifar10", lambda split, d, download: _builtin.load_cifar10(split, resolve_dir(d), download),
    "CIFAR-10, 3x32x32, 10 classes (python tarball; downloaded when missing)", augment=True))
register_dataset(DatasetSpec(
    "mnist", lambda split, d, download: _builtin.load_mnist(split, resolve_dir(d), download),
    "MNIST, 1x28x28, 10 classes (IDX files; downloaded when missing)"))
register_dataset(DatasetSpec(
    "imagefolder", _imagefolder, "train|test/<class>/*.jpg folder or .tar.gz (--data-dir)",
    frozenset({"cache_dir", "cache", "workers"}), augment=True))
register_dataset(DatasetSpec(
    "digits", lambda split, d, download: _builtin.load_sklearn_digits(split),
    "scikit-learn's 8x8 digits resized to 1x28x28, bundled (no download)"))
register_dataset(DatasetSpec(
    "synthetic", _synthetic, "generated, learnable, sized for the net (tests, smoke runs)",
    frozenset({"n", "shape", "num_classes", "seed"})))
