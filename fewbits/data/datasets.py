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
so re-compressed copies of the same data are accepted; downloads are always MD5-checked. Every
file is read as hostile: CIFAR-10 batches by a restricted reader that builds the official layout
and nothing else (:mod:`._cifar_pickle`: no pickle machinery runs), labels must be integers in
0..9 and pixels uint8; compressed streams are bounded as they are read (all gzip members), tar
members and batches by their size before they are read, IDX headers against the file's bytes.

The registry (:mod:`fewbits.data.registry`) names these loaders for
:func:`fewbits.data.load_dataset`.

Example:
    >>> from fewbits.data import load_dataset
    >>> ds = load_dataset("digits", "test")
    >>> ds.images.shape, ds.images.dtype, len(ds.classes)
    (torch.Size([300, 1, 28, 28]), torch.uint8, 10)
"""

from __future__ import annotations

import math
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._cifar_pickle import read_pickle
from ._streams import OutputLimitError, is_gzip, open_bounded
from .base import SPLITS, ArrayDataset, check_split, default_data_dir
from .download import download_first
from .errors import CorruptDataError, DatasetNotFoundError

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "MAX_IDX_IMAGES",
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


#: Largest CIFAR-10 batch file read (the official ones are 30-31 MB).
_MAX_BATCH_BYTES = 64 << 20
#: Most bytes read from a CIFAR-10 tarball, decompressed (the official one holds 178 MB, 1.1
#: times its size): at most this, and at most 4 times the file's size (at least 64 MiB).
_MAX_TARBALL_BYTES = 512 << 20
_MAX_LABEL_NAME = 64


def _unpickle(data: bytes, what: str) -> dict[str, Any]:
    """The batch dict, read by the restricted reader (:mod:`._cifar_pickle`: the official
    layout only; nothing of the file is imported or called)."""
    try:
        obj = read_pickle(data)
    except ValueError as e:
        raise CorruptDataError(f"cannot read CIFAR-10 batch {what}: {e}; it is not an official "
                               f"batch: delete it and download it again from {CIFAR10_URL}"
                               ) from None
    if not isinstance(obj, dict):
        raise CorruptDataError(f"CIFAR-10 batch {what} is not a dict (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if isinstance(k, bytes):
            k = k.decode("latin1")
        if isinstance(k, str):
            out[k] = v
    return out


def _label_names(meta: dict[str, Any], what: str) -> tuple[str, ...]:
    """The ten class names of ``batches.meta``: short printable text, or the batch is refused."""
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != len(_CIFAR10_CLASSES):
        raise CorruptDataError(f"CIFAR-10 {what}: label_names must be a list of "
                               f"{len(_CIFAR10_CLASSES)} names; delete it (it is optional) or "
                               "download the official tarball again")
    out = []
    for n in names:
        if isinstance(n, bytes):
            n = n.decode("latin1")
        if not (isinstance(n, str) and 0 < len(n) <= _MAX_LABEL_NAME and n.isprintable()
                and n.isascii()):
            raise CorruptDataError(f"CIFAR-10 {what}: a label name that is not 1 to "
                                   f"{_MAX_LABEL_NAME} printable ASCII characters; delete it "
                                   "(it is optional) or download the official tarball again")
        out.append(n)
    return tuple(out)


def _batch_arrays(d: dict[str, Any], what: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(data (N, 3072) uint8, labels (N,) int64)`` of one batch, each checked exactly."""
    x = d.get("data")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 \
            or x.shape[1] != 3 * 32 * 32:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise CorruptDataError(f"CIFAR-10 batch {what}: data must be a uint8 array (N, 3072), "
                               f"got {got}")
    y = d.get("labels", d.get("fine_labels"))
    if isinstance(y, np.ndarray):
        if y.dtype.kind not in "iu" or y.ndim != 1:
            raise CorruptDataError(f"CIFAR-10 batch {what}: labels must be integers (N,)")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise CorruptDataError(f"CIFAR-10 batch {what}: labels outside 0..{classes - 1}")
        y = y.astype(np.int64)
    elif isinstance(y, list):
        for v in y:
            if type(v) is not int:
                raise CorruptDataError(f"CIFAR-10 batch {what}: a label is a "
                                       f"{type(v).__name__}, not an integer")
            if not 0 <= v < classes:
                shown = v if abs(v) < 10**6 else f"of {v.bit_length()} bits"
                raise CorruptDataError(f"CIFAR-10 batch {what}: label {shown} outside "
                                       f"0..{classes - 1}")
        y = np.asarray(y, dtype=np.int64)
    else:
        raise CorruptDataError(f"CIFAR-10 batch {what} lacks labels (a list of integers)")
    if y.shape != (x.shape[0],):
        raise CorruptDataError(f"CIFAR-10 batch {what}: {x.shape[0]} images but {len(y)} labels")
    return x, y


def _check_batch_size(size: int, what: str) -> None:
    if size > _MAX_BATCH_BYTES:
        raise CorruptDataError(f"CIFAR-10 batch {what} is {size:,} bytes, over the "
                               f"{_MAX_BATCH_BYTES:,} an official batch fits in; it is not one: "
                               f"delete it and download it again from {CIFAR10_URL}")


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
                _check_batch_size((src / n).stat().st_size, str(src / n))
                out[n] = (src / n).read_bytes()
    else:
        want = {f"{_CIFAR10_DIR}/{n}": n for n in [*names, *optional]}
        try:
            limit = min(_MAX_TARBALL_BYTES, max(64 << 20, 4 * src.stat().st_size))
            with open_bounded(src, limit) as stream, \
                    tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as tf:
                for m in tf:
                    if m.name in want and m.isfile():
                        _check_batch_size(m.size, f"{src}:{m.name}")
                        f = tf.extractfile(m)
                        assert f is not None  # isfile() members always have data
                        out[want[m.name]] = f.read()
        except OutputLimitError as e:
            raise CorruptDataError(f"{e}; it is not the official {_CIFAR10_TARBALL}: delete it "
                                   f"and download it again from {CIFAR10_URL}") from None
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
        what = f"{src}:batches.meta"
        classes = _label_names(_unpickle(raw["batches.meta"], what), what)
    xs, ys = [], []
    for n in names:
        what = f"{src}:{n}"
        x, y = _batch_arrays(_unpickle(raw[n], what), what, len(classes))
        xs.append(x)
        ys.append(y)
    # Rows are 1024 R, then G, then B values, each row-major: exactly (3, 32, 32).
    images = torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32))
    return ArrayDataset(images, torch.from_numpy(np.concatenate(ys)), classes, "cifar10")


# --------------------------------------------------------------------------- MNIST


#: Most images an MNIST IDX file may hold (MNIST: 60,000; EMNIST by class: 697,932).
MAX_IDX_IMAGES = 1_000_000
#: Most bytes of data a gzipped IDX file may claim per byte of its size (MNIST's: 2-5).
_IDX_GZIP_RATIO = 100
_MNIST_SIZE = (28, 28)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an MNIST IDX file (gzipped when it starts with the gzip magic) holding ``ndim``-dim
    uint8 data: ``(N, 28, 28)`` images or ``(N,)`` labels, ``1 <= N <=`` :data:`MAX_IDX_IMAGES`.

    Layout: 2 zero bytes, type code 0x08 (unsigned byte), ndim byte, then ``ndim`` big-endian
    int32 sizes, then the data; anything else is reported as corrupt, naming the file. The
    sizes are checked before the data is read (against the bounds above and against the bytes
    the file can hold: its size, or 100 times it for a ``.gz``), and the data is
    read as a stream of exactly that many bytes: a decompression bomb stops at the bound.
    """
    fix = "delete it and download it again (or copy an intact file there)"
    header = 4 + 4 * ndim
    try:
        size = path.stat().st_size
        gz = is_gzip(path)
        most = _IDX_GZIP_RATIO * size if gz else size
        with open_bounded(path, header + MAX_IDX_IMAGES * 28 * 28 + 1) as f:
            head = f.read(header)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise CorruptDataError(f"{path} is not an IDX file (bad magic number); {fix}")
            if head[2] != 0x08:
                raise CorruptDataError(f"{path}: IDX type code 0x{head[2]:02x}, expected 0x08 "
                                       f"(unsigned byte); {fix}")
            if head[3] != ndim:
                raise CorruptDataError(f"{path}: IDX has {head[3]} dimensions, expected "
                                       f"{ndim}; {fix}")
            if len(head) < header:
                raise CorruptDataError(f"{path}: truncated IDX header; {fix}")
            dims = tuple(int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
            if dims[0] == 0:
                raise CorruptDataError(f"{path}: the IDX file holds no images (its header says "
                                       f"{dims}); {fix}")
            if dims[0] > MAX_IDX_IMAGES or dims[1:] != _MNIST_SIZE[:ndim - 1]:
                raise CorruptDataError(f"{path}: IDX sizes {dims} are not MNIST's (N, 28, 28) "
                                       f"or (N,) with N <= {MAX_IDX_IMAGES:,}; {fix}")
            expected = math.prod(dims)
            if expected > most:
                raise CorruptDataError(f"{path}: IDX header says {dims} = {expected:,} bytes "
                                       f"of data, more than the {size:,}-byte file can hold; "
                                       f"{fix}")
            data = f.read(expected)
            extra = f.read(1)
    except OutputLimitError as e:
        raise CorruptDataError(f"cannot read MNIST file {path}: {e}; {fix}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise CorruptDataError(f"cannot read MNIST file {path}: {e}; delete it and retry") from e
    if len(data) != expected or extra:
        raise CorruptDataError(
            f"{path}: IDX header says {dims} = {expected:,} bytes of data, the file has "
            f"{'more' if extra else f'{len(data):,}'}; {fix}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


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
