"""Data for fewbits: whole splits in memory as uint8 tensors, fast batches, batched augmentation.

Pipeline: ``load_dataset`` -> :class:`ArrayDataset` (uint8 NCHW on the CPU) ->
:class:`BatchIterator` (seeded, rank-sharded, resumable) -> :func:`to_float` on the device ->
:func:`augment` with :func:`random_augment_params`.

Example:
    >>> import torch
    >>> from fewbits.data import BatchIterator, augment, load_dataset, random_augment_params
    >>> from fewbits.data import to_float
    >>> ds = load_dataset("synthetic", "train", n=64, shape=(3, 8, 8))
    >>> x, y = next(BatchIterator(ds, 16, seed=1))
    >>> g = torch.Generator().manual_seed(0)
    >>> augment(to_float(x, "cpu"), *random_augment_params(16, g)).shape
    torch.Size([16, 3, 8, 8])
"""

from .augment import augment, random_augment_params
from .base import ArrayDataset, default_data_dir
from .datasets import synthetic_dataset
from .errors import ChecksumError, CorruptDataError, DatasetNotFoundError
from .loader import BatchIterator, eval_batches, to_float
from .registry import DATASETS, DatasetSpec, load_dataset, register_dataset

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "BatchIterator",
    "ChecksumError",
    "CorruptDataError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "augment",
    "default_data_dir",
    "eval_batches",
    "load_dataset",
    "random_augment_params",
    "register_dataset",
    "synthetic_dataset",
    "to_float",
]
