"""The in-memory split every dataset loader returns, and where data lives by default.

Both the built-in readers (:mod:`fewbits.data.datasets`) and the image-folder reader
(:mod:`fewbits.data.imagefolder`) build on this module; the registry
(:mod:`fewbits.data.registry`) names them, so no reader imports another.

    >>> import torch
    >>> ds = ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]),
    ...                   ("a", "b"), "tiny")
    >>> len(ds), ds.classes
    (2, ('a', 'b'))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DatasetNotFoundError

__all__ = ["SPLITS", "ArrayDataset", "check_split", "default_data_dir", "resolve_dir"]

SPLITS = ("train", "test")


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@dataclass(frozen=True)
class ArrayDataset:
    """One whole split in memory.

    Attributes:
        images: ``uint8`` ``(N, C, H, W)``, CPU, contiguous.
        labels: ``int64`` ``(N,)`` with values in ``[0, len(classes))``.
        classes: class names; ``labels[i]`` indexes it.
        name: dataset name (e.g. ``"cifar10"``), for logs and checks.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(
                f"ArrayDataset {self.name!r}: images must be a uint8 (N, C, H, W) tensor, got "
                f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}"
            )
        if x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(
                f"ArrayDataset {self.name!r}: images must be on the CPU and contiguous; "
                "pass images.cpu().contiguous()"
            )
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise ValueError(
                f"ArrayDataset {self.name!r}: labels must be an int64 tensor of shape "
                f"({x.shape[0]},), got {getattr(y, 'dtype', type(y).__name__)} of shape "
                f"{tuple(getattr(y, 'shape', ()))}"
            )
        if y.device.type != "cpu" or not y.is_contiguous():
            raise ValueError(f"ArrayDataset {self.name!r}: labels must be on the CPU, contiguous")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
            raise ValueError(
                f"ArrayDataset {self.name!r}: labels must lie in [0, {len(self.classes)}), got "
                f"[{int(y.min())}, {int(y.max())}]"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, images={tuple(self.images.shape)} uint8, "
            f"classes={len(self.classes)})"
        )


def _expand(path: str | os.PathLike, what: str) -> Path:
    """``path`` with ``~`` expanded; :class:`DatasetNotFoundError` when there is no home folder
    to expand it to (``HOME`` unset and no passwd entry), never a relative ``./~``."""
    out = os.path.expanduser(os.fspath(path))
    if out.startswith("~"):
        raise DatasetNotFoundError(f"{what} {os.fspath(path)!r}: there is no home folder to "
                                   "expand ~ to (HOME is unset); give an absolute path "
                                   "(--data-dir, or set FEWBITS_DATA)")
    return Path(out)


def default_data_dir() -> Path:
    """``$FEWBITS_DATA`` if set, else ``~/.cache/fewbits/data``; :class:`DatasetNotFoundError`
    (saying to set ``FEWBITS_DATA`` or pass ``--data-dir``) when there is no home folder."""
    env = os.environ.get("FEWBITS_DATA")
    if env:
        return _expand(env, "FEWBITS_DATA")
    return _expand(os.path.join("~", ".cache", "fewbits", "data"), "the default data folder")


def resolve_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` (``~`` expanded), or :func:`default_data_dir` when it is ``None``."""
    return _expand(data_dir, "data folder") if data_dir is not None else default_data_dir()
