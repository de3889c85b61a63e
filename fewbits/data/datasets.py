"""Whole-split, in-memory datasets as uint8 tensors: CIFAR-10, MNIST, image folders, digits.

Every loader returns an :class:`ArrayDataset` whose ``images`` are ``uint8`` ``(N, C, H, W)``
(CPU, contiguous) and ``labels`` are ``int64`` ``(N,)``; the ``/255`` to float happens later, on
the training device (:func:`fewbits.data.to_float`).

Where the files live (``data_dir`` defaults to ``$FEWBITS_DATA`` or ``~/.cache/fewbits/data``):

- ``cifar10``: ``data_dir/cifar-10-python.tar.gz`` (the official python tarball, read in place)
  or its extracted ``data_dir/cifar-10-batches-py/``; also looked for under ``data_dir/cifar10/``.
  Missing -> downloaded from the official URL and MD5-checked.
- ``mnist``: the four IDX files, gzipped (``train-images-idx3-ubyte.gz`` ...) or not, in
  ``data_dir`` or ``data_dir/mnist/``. Missing -> downloaded (two mirrors) and MD5-checked.
- ``imagefolder``: ``data_dir/{train,test}/<class>/*.{jpg,jpeg,png,bmp}`` or a ``.tar.gz`` /
  ``.tgz`` / ``.tar`` of that layout (see :mod:`fewbits.data.imagefolder`).
- ``digits``: scikit-learn's bundled 8x8 digits, no files needed.
- ``synthetic``: generated (:func:`synthetic_dataset`).

Files found on disk are checked structurally (magic numbers, shapes, label ranges), not by MD5,
so re-compressed copies of the same data are accepted; downloads are always MD5-checked.

The registry (:mod:`fewbits.data.registry`) names these loaders for
:func:`fewbits.data.load_dataset`.

Example:
    >>> from fewbits.data import load_dataset
    >>> ds = load_dataset("digits", "test")
    >>> ds.images.shape, ds.images.dtype, len(ds.classes)
    (torch.Size([300, 1, 28, 28]), torch.uint8, 10)
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import SPLITS, ArrayDataset, check_split, default_data_dir
from .download import download_first
from .errors import CorruptDataError, DatasetNotFoundError

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "MAX_SYNTHETIC_VALUES",
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "ArrayDataset",
    "default_data_dir",
    "load_cifar10",
    "load_mnist",
    "load_sklearn_digits",
    "synthetic_dataset",
]


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR10_TARBALL = "cifar-10-python.tar.gz"
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# split -> ((images file, md5 of the .gz), (labels file, md5 of the .gz))
MNIST_FILES = {
    "train": (
        ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    ),
    "test": (
        ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
        ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
}

_DIGITS_TEST = 300
_DIGITS_SEED = 0


# --------------------------------------------------------------------------- CIFAR-10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts, lists, bytes, numpy arrays) and nothing else.

    A pickle can run arbitrary code; the batches only ever need numpy's array reconstruction, so
    any other global is refused (a file from elsewhere cannot execute code while we read it).
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # protocol-2 pickles of bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(data: bytes, what: str) -> dict[str, Any]:
    try:
        # latin1: the official batches were pickled by Python 2 (str keys, str array buffers).
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:
        raise CorruptDataError(f"cannot unpickle CIFAR-10 batch {what}: {e}") from e
    if not isinstance(obj, dict):
        raise CorruptDataError(f"CIFAR-10 batch {what} is not a dict (got {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar10_find(data_dir: Path) -> Path | None:
    for root in (data_dir, data_dir / "cifar10"):
        if (root / _CIFAR10_DIR).is_dir():
            return root / _CIFAR10_DIR
        if (root / _CIFAR10_TARBALL).is_file():
            return root / _CIFAR10_TARBALL
    return None


def _cifar10_read(
    src: Path, names: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, bytes]:
    """Raw bytes of the named batch files, from the tarball (not extracted) or the folder.

    Files in ``optional`` are returned when present; a missing required one is an error.
    """
    out: dict[str, bytes] = {}
    if src.is_dir():
        for n in [*names, *optional]:
            if (src / n).is_file():
                out[n] = (src / n).read_bytes()
    else:
        want = {f"{_CIFAR10_DIR}/{n}": n for n in [*names, *optional]}
        try:
            with tarfile.open(src, "r:*") as tf:
                for m in tf:
                    if m.name in want and m.isfile():
                        f = tf.extractfile(m)
                        assert f is not None  # isfile() members always have data
                        out[want[m.name]] = f.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise CorruptDataError(
                f"cannot read the CIFAR-10 tarball {src}: {e}; delete it and download it again "
                f"from {CIFAR10_URL} (md5 {CIFAR10_MD5})"
            ) from e
    missing = [n for n in names if n not in out]
    if missing:
        raise CorruptDataError(
            f"CIFAR-10 source {src} lacks {missing}; it is not the official {_CIFAR10_TARBALL} "
            f"(or a complete extraction of it): delete it and download it again from {CIFAR10_URL}"
        )
    return out


def load_cifar10(split: str, data_dir: Path, download: bool) -> ArrayDataset:
    src = _cifar10_find(data_dir)
    if src is None:
        where = (
            f"put {_CIFAR10_TARBALL} (from {CIFAR10_URL}, md5 {CIFAR10_MD5}) at "
            f"{data_dir / _CIFAR10_TARBALL}, or its extracted folder at {data_dir / _CIFAR10_DIR}"
        )
        if not download:
            raise DatasetNotFoundError(f"CIFAR-10 not found and download=False: {where}")
        try:
            src = download_first([CIFAR10_URL], data_dir / _CIFAR10_TARBALL, CIFAR10_MD5)
        except DatasetNotFoundError as e:
            raise DatasetNotFoundError(
                f"CIFAR-10 not found and the download failed ({e}); {where}"
            ) from e
    names = _CIFAR10_BATCHES[split]
    raw = _cifar10_read(src, names, optional=["batches.meta"])
    classes = _CIFAR10_CLASSES
    if "batches.meta" in raw:
        label_names = _unpickle(raw["batches.meta"], f"{src}:batches.meta").get("label_names")
        if label_names:
            classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in label_names)
    xs, ys = [], []
    for n in names:
        what = f"{src}:{n}"
        d = _unpickle(raw[n], what)
        try:
            x = np.asarray(d["data"], dtype=np.uint8)
            y = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptDataError(f"CIFAR-10 batch {what} lacks data/labels: {e}") from e
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (x.shape[0],):
            raise CorruptDataError(
                f"CIFAR-10 batch {what}: expected data (N, 3072) and labels (N,), got "
                f"{x.shape} and {y.shape}"
            )
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise CorruptDataError(f"CIFAR-10 batch {what}: labels outside [0, {len(classes)})")
        xs.append(x)
        ys.append(y)
    # Rows are 1024 R, then G, then B values, each row-major: exactly (3, 32, 32).
    images = torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32))
    return ArrayDataset(images, torch.from_numpy(np.concatenate(ys)), classes, "cifar10")


# --------------------------------------------------------------------------- MNIST


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (gzipped if the name ends in .gz) holding ``ndim``-dim uint8 data.

    Layout: 2 zero bytes, type code 0x08 (unsigned byte), ndim byte, then ``ndim`` big-endian
    int32 sizes, then the data; anything else is reported as corrupt, naming the file.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise CorruptDataError(f"cannot read MNIST file {path}: {e}; delete it and retry") from e
    fix = "delete it and download it again (or copy an intact file there)"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CorruptDataError(f"{path} is not an IDX file (bad magic number); {fix}")
    if raw[2] != 0x08:
        raise CorruptDataError(
            f"{path}: IDX type code 0x{raw[2]:02x}, expected 0x08 (unsigned byte); {fix}"
        )
    if raw[3] != ndim:
        raise CorruptDataError(f"{path}: IDX has {raw[3]} dimensions, expected {ndim}; {fix}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{path}: truncated IDX header; {fix}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise CorruptDataError(
            f"{path}: IDX header says {dims} = {expected} bytes of data, file has "
            f"{len(raw) - header}; {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _mnist_find(data_dir: Path, stem: str) -> Path | None:
    for root in (data_dir, data_dir / "mnist"):
        for name in (stem + ".gz", stem):
            if (root / name).is_file():
                return root / name
    return None


def load_mnist(split: str, data_dir: Path, download: bool) -> ArrayDataset:
    paths = []
    for stem, md5 in MNIST_FILES[split]:
        p = _mnist_find(data_dir, stem)
        if p is None:
            dest = data_dir / (stem + ".gz")
            urls = [m + stem + ".gz" for m in MNIST_MIRRORS]
            where = (
                f"put {stem}.gz (md5 {md5}, from {' or '.join(urls)}) or the uncompressed "
                f"{stem} at {dest}"
            )
            if not download:
                raise DatasetNotFoundError(f"MNIST file missing and download=False: {where}")
            try:
                p = download_first(urls, dest, md5)
            except DatasetNotFoundError as e:
                raise DatasetNotFoundError(
                    f"MNIST file missing and download failed ({e}); {where}"
                ) from e
        paths.append(p)
    x = _read_idx(paths[0], 3)
    y = _read_idx(paths[1], 1)
    if x.shape[0] != y.shape[0]:
        raise CorruptDataError(
            f"MNIST {split}: {paths[0]} has {x.shape[0]} images but {paths[1]} has "
            f"{y.shape[0]} labels; one of them is from another release, replace both"
        )
    if len(y) and y.max() > 9:
        raise CorruptDataError(f"{paths[1]}: labels must be 0..9, found {int(y.max())}")
    # np.frombuffer views are read-only; copy once into a writable, contiguous tensor.
    images = torch.from_numpy(x.copy()).unsqueeze(1)
    labels = torch.from_numpy(y.astype(np.int64))
    return ArrayDataset(images, labels, tuple(str(i) for i in range(10)), "mnist")


# --------------------------------------------------------------------------- digits


def load_sklearn_digits(split: str) -> ArrayDataset:
    """scikit-learn's 1797 8x8 digits (0..16) -> 0..255, bilinear-resized to 1x28x28 uint8.

    Split: stratified, seeded (``random_state=0``), 300 test / 1497 train, indices kept in
    ascending order, so it is identical on every call.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = x.round().clamp_(0, 255).to(torch.uint8)
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, te = train_test_split(
        idx, test_size=_DIGITS_TEST, stratify=d.target, random_state=_DIGITS_SEED
    )
    sel = torch.from_numpy(np.sort(tr if split == "train" else te))
    return ArrayDataset(
        x.index_select(0, sel).contiguous(),
        y.index_select(0, sel).contiguous(),
        tuple(str(i) for i in range(10)),
        "digits",
    )


# --------------------------------------------------------------------------- synthetic


#: Most pixel values :func:`synthetic_dataset` generates in one call (2**27: 43,690 CIFAR-sized
#: images); bounded before any allocation.
MAX_SYNTHETIC_VALUES = 1 << 27


def synthetic_dataset(
    n: int,
    shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
    *,
    split: str = "train",
) -> ArrayDataset:
    """Deterministic, learnable images: a smooth per-class prototype plus per-image noise.

    ``x = clamp(128 + 80 * proto[label] + 40 * noise + shift, 0, 255)`` where ``proto`` is
    low-frequency noise (at most 8x8, upsampled bilinearly) scaled to max |proto| = 1, ``noise``
    is standard normal and ``shift`` a random per-image brightness offset. Prototypes depend on
    ``seed`` only, the samples on ``(seed, split)``, so train and test share classes but not
    images. Labels are balanced (``i % num_classes``, shuffled). A small convnet or MLP separates
    the classes within a few dozen steps.

    Example:
        >>> ds = synthetic_dataset(8, (1, 4, 4), num_classes=2, seed=1)
        >>> ds.images.shape, ds.labels.tolist().count(0)
        (torch.Size([8, 1, 4, 4]), 4)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape}")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if int(n) * math.prod(shape) > MAX_SYNTHETIC_VALUES:  # float work arrays: ~16 bytes a value
        raise ValueError(f"{int(n)} synthetic images of {shape} are {int(n) * math.prod(shape):,} "
                         f"values, over the {MAX_SYNTHETIC_VALUES:,} generated at once (about "
                         f"{MAX_SYNTHETIC_VALUES * 16 >> 30} GiB of work memory); use fewer "
                         "images (--synthetic-size) or real data")
    check_split(split)
    n, num_classes, seed = int(n), int(num_classes), int(seed)
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, c, min(h, 8), min(w, 8), generator=g)
    proto = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    proto = proto / proto.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    gs = torch.Generator().manual_seed(seed * 2 + SPLITS.index(split) + 0x5EED)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gs)]
    noise = torch.randn(n, c, h, w, generator=gs)
    shift = (torch.rand(n, 1, 1, 1, generator=gs) - 0.5) * 40
    x = 128 + 80 * proto[labels] + 40 * noise + shift
    images = x.round().clamp_(0, 255).to(torch.uint8).contiguous()
    return ArrayDataset(images, labels, tuple(str(i) for i in range(num_classes)), "synthetic")
