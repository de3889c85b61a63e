"""Image folders (``train|test/<class>/*.jpg``), from a directory or straight from a tarball.

Layout: ``root/{train,test}/<class>/<file>`` with extensions ``.jpg .jpeg .png .bmp`` (any
case). A ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of that layout is read member by member, never
extracted; its paths may carry a common leading folder (``cifar10-jpeg/train/cat/0.jpg``).
Hidden files (``.x``, ``._x``), other extensions, and deeper sub-folders are ignored.

- Classes are the sorted names of the class folders that hold at least one image; when both
  splits are present they must have the same class list.
- Images are sorted by (class, file name), so the order never depends on the file system or the
  archive order.
- All images must have the same height and width. They are decoded to 8-bit RGB, or to 1-channel
  grayscale when every image of both splits is grayscale (``L``/``1``/``LA``); alpha is dropped.
  16-bit and float images are refused.

Both splits are decoded in one pass (the archive is read once anyway), in parallel (a
2-process pool where ``fork`` is available), and cached as one uncompressed ``.npz`` in
``cache_dir`` keyed by the source path + size + mtime (for a folder: every image file's), written
atomically; a later load of either split just reads that file.

Example:
    >>> ds = load_imagefolder("/data/cifar10-jpeg.tar.gz", "train")  # doctest: +SKIP
    >>> ds.images.shape  # doctest: +SKIP
    torch.Size([50000, 3, 32, 32])
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import multiprocessing
import os
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write
from ._tar import iter_tar_files
from .base import SPLITS, ArrayDataset, check_split, default_data_dir
from .errors import CorruptDataError, DatasetNotFoundError

__all__ = ["IMAGE_EXTENSIONS", "MAX_DECODE_RATIO", "MAX_IMAGE_PIXELS", "MIN_DECODE_BYTES",
           "load_imagefolder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_CACHE_VERSION = 1
_CHUNK = 2500  # images per worker task: big enough to amortise IPC, small enough to pipeline
_GRAY_MODES = ("L", "1", "LA")
#: Most pixels one image may have (4096 x 4096), checked from its header before decoding.
MAX_IMAGE_PIXELS = 4096 * 4096
#: An image may decode to at most this many times its file's bytes ...
MAX_DECODE_RATIO = 64
#: ... or to this many bytes (a 147x147 RGB image), whichever is more.
MIN_DECODE_BYTES = 64 << 10

_log = logging.getLogger(__name__)

# (split, class name, file name, source): source is a Path (folder) or a member name (archive)
_Entry = tuple[str, str, str, str]


def load_imagefolder(
    root: str | os.PathLike,
    split: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    workers: int | None = None,
) -> ArrayDataset:
    """Load ``split`` of an image folder or archive as an :class:`ArrayDataset` (uint8 NCHW).

    Args:
        root: the folder holding ``train/`` and/or ``test/``, or a ``.tar.gz``/``.tgz``/``.tar``.
        split: ``"train"`` or ``"test"``.
        cache_dir: where the decoded ``.npz`` goes; default ``default_data_dir() / "cache"``.
        cache: read/write the cache (``False``: always decode, write nothing).
        workers: decoding processes; default ``min(2, os.cpu_count())``; ``0``/``1`` = in-process.
    """
    check_split(split)
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(
            f"image folder {root} does not exist; create {root}/train/<class>/*.jpg and "
            f"{root}/test/<class>/*.jpg (or pass a .tar.gz of that layout)"
        )
    is_archive = root.is_file()
    if is_archive and not root.name.lower().endswith(_ARCHIVE_SUFFIXES):
        raise ValueError(
            f"{root} is a file but not a {'/'.join(_ARCHIVE_SUFFIXES)} archive; pass the folder "
            "holding train/ and test/ or a tarball of it"
        )
    entries = None if is_archive else _scan_folder(root)
    cache_path = None
    if cache and cache_dir is None:
        try:
            cache_dir = default_data_dir() / "cache"
        except DatasetNotFoundError:  # no home folder and no FEWBITS_DATA: decode, cache nothing
            cache = False
    if cache:
        cdir = Path(cache_dir).expanduser()  # type: ignore[arg-type]
        cache_path = cdir / f"imagefolder-{_cache_key(root, entries)}.npz"
        hit = _read_cache(cache_path, split)
        if hit is not None:
            return _to_dataset(hit, split, root)
    _log.info("decoding the images of %s (first load; later loads read %s)", root, cache_path)
    data = _decode_all(root, entries, workers)
    if cache_path is not None:
        _write_cache(cache_path, data)
    return _to_dataset(data, split, root)


# --------------------------------------------------------------------------- listing


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(root: Path) -> list[_Entry]:
    entries: list[_Entry] = []
    for split in SPLITS:
        sdir = root / split
        if not sdir.is_dir():
            continue
        with os.scandir(sdir) as classes:
            for c in classes:
                if not c.is_dir() or c.name.startswith("."):
                    continue
                with os.scandir(c.path) as files:
                    found = [(split, c.name, f.name, f.path) for f in files
                             if _is_image(f.name) and f.is_file()]
                if not found:
                    warnings.warn(f"class folder {c.path} holds no images "
                                  f"({'/'.join(IMAGE_EXTENSIONS)}); class {c.name!r} is left "
                                  "out", stacklevel=4)
                entries.extend(found)
    return entries


def _archive_entry(name: str) -> tuple[str, _Entry] | None:
    """``(root prefix, entry)`` for an image member ``[prefix/]split/class/file``, else None."""
    parts = name.removeprefix("./").split("/")
    if len(parts) < 3 or parts[-3] not in SPLITS or not _is_image(parts[-1]):
        return None
    if parts[-2].startswith("."):
        return None
    return "/".join(parts[:-3]), (parts[-3], parts[-2], parts[-1], name)


# --------------------------------------------------------------------------- cache


def _cache_key(root: Path, entries: list[_Entry] | None) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}\0{root.resolve()}\0".encode())
    if entries is None:  # archive: the file's identity
        st = root.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
    else:  # folder: every image's identity (a folder's own mtime misses edits in sub-folders)
        for split, cls, name, path in sorted(entries):
            st = os.stat(path)
            h.update(f"{split}/{cls}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _read_cache(path: Path, split: str) -> dict[str, np.ndarray] | None:
    """The cached arrays of ``split`` (absent keys if the source has no such split), or None."""
    if not path.is_file():
        return None
    try:
        _check_cache(path)
        with np.load(path, allow_pickle=False) as z:
            keys = ["classes"] + [k for k in (f"{split}_images", f"{split}_labels") if k in z.files]
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        warnings.warn(f"ignoring unreadable cache {path} ({e}); decoding again", stacklevel=3)
        return None


def _check_cache(path: Path) -> None:
    """``ValueError`` unless every array of the ``.npz`` is stored uncompressed and its header
    promises no more bytes than the member holds (NumPy allocates what the header says
    before reading)."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                raise ValueError(f"member {info.filename[:100]!r} is compressed or larger "
                                 "than the file")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
            if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
                raise ValueError(f"array {info.filename[:100]!r} claims {shape} {dtype}, more "
                                 "than it holds")


def _write_cache(path: Path, data: dict[str, np.ndarray]) -> None:
    """Atomic (:func:`fewbits._io.atomic_write`); a cache that cannot be written is a warning."""
    try:
        atomic_write(path, lambda f: np.savez(f, **data), parents=True, mode=0o644)
    except OSError as e:
        warnings.warn(f"cannot write the image cache: {e}", stacklevel=3)


def _to_dataset(data: dict[str, np.ndarray], split: str, src: Path) -> ArrayDataset:
    if f"{split}_images" not in data:
        raise DatasetNotFoundError(
            f"no {split!r} images in {src}: expected {split}/<class>/<file> with extension "
            f"{'/'.join(IMAGE_EXTENSIONS)}"
        )
    return ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(data[f"{split}_images"])),
        torch.from_numpy(data[f"{split}_labels"].astype(np.int64)),
        tuple(str(c) for c in data["classes"]),
        "imagefolder",
    )


# --------------------------------------------------------------------------- decoding


def _check_pixels(name: str, size: tuple[int, int], nbytes: int) -> None:
    """Refuse an image whose header promises more pixels than :data:`MAX_IMAGE_PIXELS`, or
    more decoded bytes than :data:`MAX_DECODE_RATIO` times its file (at least
    :data:`MIN_DECODE_BYTES`): a decompression bomb is refused before it is decoded."""
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        raise CorruptDataError(f"{name} is {w}x{h} = {w * h:,} pixels, over the "
                               f"{MAX_IMAGE_PIXELS:,} fewbits decodes per image; resize the "
                               "images first")
    if 3 * w * h > max(MIN_DECODE_BYTES, MAX_DECODE_RATIO * nbytes):
        raise CorruptDataError(f"{name}: a {nbytes:,}-byte file that decodes to {w}x{h} "
                               f"pixels ({3 * w * h:,} bytes, over {MAX_DECODE_RATIO}x its "
                               "size): a decompression bomb, or save the images as JPEG or "
                               "a less compressible PNG")


def _decode_chunk(blobs: list[bytes], names: list[str]) -> np.ndarray:
    """Decode images to ``(n, 1, H, W)`` if all grayscale else ``(n, 3, H, W)`` uint8.

    Runs in worker processes (only PIL and numpy); errors carry the file name.
    """
    from PIL import Image, UnidentifiedImageError

    arrays = []
    gray = True
    for blob, name in zip(blobs, names, strict=True):
        try:
            with warnings.catch_warnings():
                # PIL warns above 89M pixels; _check_pixels refuses far below that
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(blob))
            with im:
                _check_pixels(name, im.size, len(blob))  # from the header, before decoding
                mode = im.mode
                if mode in _GRAY_MODES:
                    a = np.asarray(im.convert("L"))
                elif not mode.startswith(("I", "F")):
                    gray = False
                    a = np.asarray(im if mode == "RGB" else im.convert("RGB"))
        except CorruptDataError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                Image.DecompressionBombError) as e:
            raise CorruptDataError(f"cannot decode image {name}: {e}") from None
        if mode.startswith(("I", "F")):
            raise CorruptDataError(
                f"{name}: {mode} (16-bit/float) images are not supported; convert the folder "
                "to 8-bit RGB or grayscale"
            )
        if arrays and a.shape[:2] != arrays[0].shape[:2]:
            raise CorruptDataError(
                f"{name} is {a.shape[1]}x{a.shape[0]} but {names[0]} is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all images must have the same size "
                "(resize them first)"
            )
        arrays.append(a)
    h, w = arrays[0].shape[:2]
    out = np.empty((len(arrays), 1 if gray else 3, h, w), dtype=np.uint8)
    for i, a in enumerate(arrays):
        # (H, W, 3) -> (3, H, W); a gray (H, W) broadcasts to all 3 channels, which is exactly
        # PIL's L -> RGB conversion.
        out[i] = a if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


def _iter_blobs(root: Path, entries: list[_Entry] | None) -> Iterator[tuple[_Entry, bytes]]:
    if entries is not None:
        for e in entries:
            yield e, Path(e[3]).read_bytes()
        return
    prefixes: set[str] = set()
    try:
        for member, blob in iter_tar_files(root):
            parsed = _archive_entry(member)
            if parsed is None:
                continue
            prefix, e = parsed
            prefixes.add(prefix)
            if len(prefixes) > 1:
                raise CorruptDataError(
                    f"{root} holds images under several roots {sorted(prefixes)}; it must "
                    "hold one [folder/]{train,test}/<class>/ tree"
                )
            yield e, blob
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorruptDataError(f"cannot read archive {root}: {e}; is it complete?") from e


def _pool(workers: int | None) -> Executor | None:
    n = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    if n <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        # Without fork each worker would re-import torch (seconds): decode in-process instead.
        return None
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"))


def _decode_all(root: Path, entries: list[_Entry] | None, workers: int | None) -> dict:
    """Read every image of both splits, decode in parallel, return the cache arrays."""
    pool: Executor | None = None
    metas: list[_Entry] = []
    parts: list[Future | np.ndarray] = []
    blobs: list[bytes] = []

    def flush(full: bool) -> None:
        nonlocal pool
        names = [f"{root}:{m[0]}/{m[1]}/{m[2]}" for m in metas[len(metas) - len(blobs) :]]
        if pool is None and full and workers != 0:
            # Only folders of at least one full chunk are worth a pool (tiny ones stay in-process).
            pool = _pool(workers)
        if pool is None:
            parts.append(_decode_chunk(blobs, names))
        else:
            parts.append(pool.submit(_decode_chunk, list(blobs), names))
        blobs.clear()

    try:
        # Reading (main process) overlaps with decoding (workers): submit chunk by chunk.
        for meta, blob in _iter_blobs(root, entries):
            metas.append(meta)
            blobs.append(blob)
            if len(blobs) == _CHUNK:
                flush(full=True)
        if blobs:
            flush(full=False)
        arrays = [p.result() if isinstance(p, Future) else p for p in parts]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if not metas:
        raise DatasetNotFoundError(
            f"no images found in {root}: expected {{train,test}}/<class>/<file> with extension "
            f"{'/'.join(IMAGE_EXTENSIONS)}"
        )
    sizes = {a.shape[2:] for a in arrays}
    if len(sizes) > 1:
        raise CorruptDataError(
            f"images in {root} have different sizes {sorted(sizes)}; all must have the same "
            "height and width (resize them first)"
        )
    return _assemble(root, metas, arrays)


def _assemble(root: Path, metas: list[_Entry], arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Sort by (class, file), check the class lists, and scatter the decoded chunks (in read
    order) into one NCHW array per split: a single copy of the pixels."""
    by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, m in enumerate(metas):
        by_split[m[0]].append(i)
    class_lists = {s: sorted({metas[i][1] for i in idx}) for s, idx in by_split.items() if idx}
    lists = list(class_lists.values())
    if len(lists) == 2 and lists[0] != lists[1]:
        tr, te = set(class_lists["train"]), set(class_lists["test"])
        raise CorruptDataError(
            f"train and test of {root} have different classes: only in train "
            f"{sorted(tr - te)}, only in test {sorted(te - tr)}; both splits need the same "
            "class folders, each with at least one image"
        )
    classes = lists[0]
    cindex = {c: k for k, c in enumerate(classes)}
    channels = max(a.shape[1] for a in arrays)
    h, w = arrays[0].shape[2:]
    # dest[i] = row of image i (read order) inside its split's array
    dest = np.empty(len(metas), dtype=np.int64)
    out: dict[str, np.ndarray] = {"classes": np.array(classes, dtype=str)}
    for s, idx in by_split.items():
        if not idx:
            continue
        idx.sort(key=lambda i: (metas[i][1], metas[i][2]))
        dest[idx] = np.arange(len(idx))
        out[f"{s}_images"] = np.empty((len(idx), channels, h, w), dtype=np.uint8)
        out[f"{s}_labels"] = np.asarray([cindex[metas[i][1]] for i in idx], dtype=np.int64)
    split_of = np.asarray([SPLITS.index(m[0]) for m in metas])
    start = 0
    for a in arrays:
        stop = start + len(a)
        for k, s in enumerate(SPLITS):
            rows = np.flatnonzero(split_of[start:stop] == k)
            if len(rows):
                # A 1-channel chunk broadcasts into 3 channels when other chunks are RGB.
                out[f"{s}_images"][dest[start + rows]] = a[rows]
        start = stop
    return out
