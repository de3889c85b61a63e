"""fewbits.data: dataset readers (on tiny fake files), downloads (no network), batching."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewbits.data import (
    DATASETS,
    ArrayDataset,
    BatchIterator,
    ChecksumError,
    CorruptDataError,
    DatasetNotFoundError,
    _tar,
    datasets,
    download,
    eval_batches,
    imagefolder,
    load_dataset,
    synthetic_dataset,
    to_float,
)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """No test may reach the network or write to the user's cache."""

    def refuse(url, timeout):
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(download, "_urlopen", refuse)
    monkeypatch.setenv("FEWBITS_DATA", str(tmp_path / "default-data"))


def _serve(monkeypatch, table: dict[str, bytes], calls: list[str] | None = None):
    """Make download._urlopen answer the URLs in ``table`` (others: URLError)."""

    def fake(url, timeout):
        if calls is not None:
            calls.append(url)
        if url not in table:
            raise urllib.error.URLError(f"unreachable {url}")
        return io.BytesIO(table[url])

    monkeypatch.setattr(download, "_urlopen", fake)


def _cat(lists) -> list:
    return [v for part in lists for v in part]


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


# --------------------------------------------------------------------------- CIFAR-10

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]  # fmt: skip


def _cifar_batches(rng: np.random.Generator) -> dict[str, dict]:
    """Tiny batches in the official format: dict with bytes keys, data (N, 3072) uint8."""
    out = {}
    for name, n in [*[(f"data_batch_{i}", 3) for i in range(1, 6)], ("test_batch", 4)]:
        out[name] = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        }
    out["batches.meta"] = {b"label_names": [c.encode() for c in CIFAR_CLASSES]}
    return out


def _cifar_tarball(batches: dict[str, dict]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, d in batches.items():
            blob = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@pytest.fixture(scope="module")
def cifar():
    batches = _cifar_batches(np.random.default_rng(0))
    return batches, _cifar_tarball(batches)


def _check_cifar(ds: ArrayDataset, batches: dict, split: str) -> None:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    data = np.concatenate([batches[n][b"data"] for n in names])
    labels = _cat(batches[n][b"labels"] for n in names)
    assert ds.name == "cifar10" and ds.classes == tuple(CIFAR_CLASSES)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(data), 3, 32, 32)
    # Official layout: each row is the R plane, then G, then B, each row-major.
    assert torch.equal(ds.images[:, 1, 2, 5], torch.from_numpy(data[:, 1024 + 2 * 32 + 5]))
    assert torch.equal(ds.images.reshape(len(data), -1), torch.from_numpy(data))
    assert ds.labels.tolist() == labels and ds.labels.dtype == torch.int64


def test_cifar10_from_tarball_and_extracted_folder(tmp_path, cifar):
    batches, blob = cifar
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(blob)
    for split in ("train", "test"):
        _check_cifar(load_dataset("cifar10", split, tmp_path, download=False), batches, split)
    # Extracted copy (in the cifar10/ sub-folder, also searched).
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        tf.extractall(tmp_path / "x" / "cifar10", filter="data")
    _check_cifar(load_dataset("cifar10", "test", tmp_path / "x", download=False), batches, "test")


def test_cifar10_download_verifies_and_renames(tmp_path, cifar, monkeypatch):
    batches, blob = cifar
    calls: list[str] = []
    _serve(monkeypatch, {datasets.CIFAR10_URL: blob}, calls)
    monkeypatch.setattr(datasets, "CIFAR10_MD5", _md5(blob))
    ds = load_dataset("cifar10", "train", tmp_path / "d")
    _check_cifar(ds, batches, "train")
    assert calls == [datasets.CIFAR10_URL]
    assert (tmp_path / "d" / "cifar-10-python.tar.gz").read_bytes() == blob
    assert os.listdir(tmp_path / "d") == ["cifar-10-python.tar.gz"]  # no temp file left
    load_dataset("cifar10", "test", tmp_path / "d")  # present now: no second download
    assert calls == [datasets.CIFAR10_URL]


def test_cifar10_checksum_mismatch_rejects_the_download(tmp_path, cifar, monkeypatch):
    _, blob = cifar
    _serve(monkeypatch, {datasets.CIFAR10_URL: blob})  # the fake is not the official file
    with pytest.raises(ChecksumError) as e:
        load_dataset("cifar10", "train", tmp_path)
    msg = str(e.value)
    dest = tmp_path / "cifar-10-python.tar.gz"
    assert str(dest) in msg and datasets.CIFAR10_MD5 in msg and _md5(blob) in msg
    assert "download it again" in msg
    assert not dest.exists() and os.listdir(tmp_path) == []


def test_md5_check_rejects_a_wrong_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello")
    download.check_md5(p, _md5(b"hello"))
    with pytest.raises(ChecksumError, match=r"f\.bin.*expected 0+, got " + _md5(b"hello")):
        download.check_md5(p, "0" * 32)


def test_cifar10_missing_names_paths_and_url(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", "train", tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-python.tar.gz") in msg
    assert str(tmp_path / "cifar-10-batches-py") in msg and datasets.CIFAR10_URL in msg
    # Download allowed but the network is down (autouse fixture): same guidance.
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", "test", tmp_path)
    assert str(tmp_path / "cifar-10-python.tar.gz") in str(e.value)
    assert datasets.CIFAR10_URL in str(e.value)


def test_cifar10_default_dir_is_fewbits_data(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBITS_DATA", str(tmp_path / "envdir"))
    with pytest.raises(DatasetNotFoundError, match="envdir"):
        load_dataset("cifar10", "train", download=False)


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    batches = _cifar_batches(np.random.default_rng(1))
    batches["test_batch"][b"labels"] = Evil()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_cifar_tarball(batches))
    with pytest.raises(CorruptDataError, match=r"system.*not allowed"):
        load_dataset("cifar10", "test", tmp_path, download=False)


def test_cifar10_incomplete_tarball(tmp_path, cifar):
    batches = {k: v for k, v in cifar[0].items() if k != "data_batch_3"}
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_cifar_tarball(batches))
    with pytest.raises(CorruptDataError, match="data_batch_3"):
        load_dataset("cifar10", "train", tmp_path, download=False)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(CorruptDataError, match=r"cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", "test", tmp_path, download=False)


# --------------------------------------------------------------------------- MNIST


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(
        f">{arr.ndim}i", *arr.shape
    ) + arr.astype(np.uint8).tobytes()  # fmt: skip


@pytest.fixture(scope="module")
def mnist():
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    return arrays, {k: gzip.compress(_idx(v)) for k, v in arrays.items()}


def _write_mnist(d: Path, files: dict[str, bytes], gz: bool = True) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for k, v in files.items():
        if gz:
            (d / f"{k}.gz").write_bytes(v)
        else:
            (d / k).write_bytes(gzip.decompress(v))


def _check_mnist(ds: ArrayDataset, arrays: dict, split: str) -> None:
    p = "train" if split == "train" else "t10k"
    assert ds.images.shape == (len(arrays[f"{p}-labels-idx1-ubyte"]), 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(arrays[f"{p}-images-idx3-ubyte"]))
    assert ds.labels.tolist() == arrays[f"{p}-labels-idx1-ubyte"].tolist()
    assert ds.classes == tuple("0123456789") and ds.name == "mnist"


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_gz_and_raw_idx(tmp_path, mnist, gz):
    arrays, files = mnist
    _write_mnist(tmp_path / "mnist", files, gz)  # the mnist/ sub-folder is searched too
    for split in ("train", "test"):
        _check_mnist(load_dataset("mnist", split, tmp_path, download=False), arrays, split)


def test_mnist_download_falls_back_to_the_second_mirror(tmp_path, mnist, monkeypatch):
    arrays, files = mnist
    fake = {
        s: tuple((stem, _md5(files[stem])) for stem, _ in pair)
        for s, pair in datasets.MNIST_FILES.items()
    }
    monkeypatch.setattr(datasets, "MNIST_FILES", fake)
    second = datasets.MNIST_MIRRORS[1]
    calls: list[str] = []
    _serve(monkeypatch, {second + k + ".gz": v for k, v in files.items()}, calls)
    _check_mnist(load_dataset("mnist", "test", tmp_path), arrays, "test")
    first = datasets.MNIST_MIRRORS[0]
    assert calls == [
        first + "t10k-images-idx3-ubyte.gz",
        second + "t10k-images-idx3-ubyte.gz",
        first + "t10k-labels-idx1-ubyte.gz",
        second + "t10k-labels-idx1-ubyte.gz",
    ]
    assert sorted(os.listdir(tmp_path)) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]


def test_mnist_download_checksum_mismatch(tmp_path, mnist, monkeypatch):
    _, files = mnist
    urls = {m + k + ".gz": v for m in datasets.MNIST_MIRRORS for k, v in files.items()}
    _serve(monkeypatch, urls)  # wrong content for the official hashes on every mirror
    with pytest.raises(ChecksumError) as e:
        load_dataset("mnist", "train", tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg
    assert _md5(files["train-images-idx3-ubyte"]) in msg
    assert os.listdir(tmp_path) == []


def test_mnist_missing_names_paths_and_urls(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist", "train", tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in msg
    assert all(m + "train-images-idx3-ubyte.gz" in msg for m in datasets.MNIST_MIRRORS)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda b: b"\x01" + b[1:], "bad magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "type code 0x0d"),
        (lambda b: b[:3] + b"\x02" + b[4:], "2 dimensions, expected 3"),
        (lambda b: b[:-10], "file has"),
        (lambda b: b[:6], "truncated IDX header"),
    ],
)
def test_mnist_corrupt_idx_names_the_file(tmp_path, mnist, corrupt, match):
    _, files = mnist
    _write_mnist(tmp_path, files)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(corrupt(gzip.decompress(files["t10k-images-idx3-ubyte"]))))
    with pytest.raises(CorruptDataError, match=match) as e:
        load_dataset("mnist", "test", tmp_path, download=False)
    assert str(bad) in str(e.value)


def test_mnist_bad_gzip_and_count_mismatch(tmp_path, mnist):
    arrays, files = mnist
    _write_mnist(tmp_path, files)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(files["t10k-labels-idx1-ubyte"][:-8])
    with pytest.raises(CorruptDataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_dataset("mnist", "test", tmp_path, download=False)
    bad.write_bytes(gzip.compress(_idx(arrays["t10k-labels-idx1-ubyte"][:2])))
    with pytest.raises(CorruptDataError, match=r"3 images but .* 2 labels"):
        load_dataset("mnist", "test", tmp_path, download=False)


# --------------------------------------------------------------------------- image folders


def _make_folder(root: Path, *, classes=("cat", "ant"), n=(3, 2), mode="RGB", size=(6, 5), seed=0):
    """PNG folder; returns {split: [(class, file, array HWC or HW)]} in the expected order."""
    rng = np.random.default_rng(seed)
    made: dict[str, list] = {}
    for split, count in zip(("train", "test"), n, strict=True):
        items = []
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(a, mode).save(root / split / c / f"{i:02d}.png")
                items.append((c, f"{i:02d}.png", a))
        made[split] = sorted(items, key=lambda t: (t[0], t[1]))
    return made


def _expected(items, channels):
    arrs = []
    for _, _, a in items:
        a = a if a.ndim == 3 else np.repeat(a[..., None], channels, axis=2)
        arrs.append(a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrs))


def _tar_gz(src: Path, dest: Path, arcroot: str = "top") -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=arcroot)
    return dest


def test_imagefolder_folder_and_tarball(tmp_path):
    made = _make_folder(tmp_path / "f")
    (tmp_path / "f" / "train" / "ant" / "notes.txt").write_text("ignored")
    (tmp_path / "f" / "train" / "ant" / ".hidden.png").write_bytes(b"ignored")
    cache = tmp_path / "cache"
    tar = _tar_gz(tmp_path / "f", tmp_path / "f.tar.gz")
    for src in (tmp_path / "f", tar):
        for split in ("train", "test"):
            ds = load_dataset("imagefolder", split, src, cache_dir=cache)
            assert ds.classes == ("ant", "cat") and ds.name == "imagefolder"
            assert torch.equal(ds.images, _expected(made[split], 3))
            assert ds.labels.tolist() == [int(c == "cat") for c, _, _ in made[split]]
    assert len(list(cache.glob("imagefolder-*.npz"))) == 2  # one per source, both splits inside


def test_imagefolder_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    made = _make_folder(tmp_path / "f")
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", "train", tmp_path / "f", cache_dir=cache)

    def boom(*a, **k):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(imagefolder, "_decode_all", boom)
        again = load_dataset("imagefolder", "train", tmp_path / "f", cache_dir=cache)
        test = load_dataset("imagefolder", "test", tmp_path / "f", cache_dir=cache)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert torch.equal(test.images, _expected(made["test"], 3))
    # Editing an image changes the key: the stale cache is not used.
    a = np.zeros((5, 6, 3), np.uint8)
    Image.fromarray(a).save(tmp_path / "f" / "train" / "ant" / "00.png")
    fresh = load_dataset("imagefolder", "train", tmp_path / "f", cache_dir=cache)
    assert fresh.images[0].sum() == 0 and not torch.equal(fresh.images, first.images)
    # cache=False writes nothing.
    nocache = tmp_path / "nocache"
    load_dataset("imagefolder", "test", tmp_path / "f", cache_dir=nocache, cache=False)
    assert not nocache.exists()


def test_imagefolder_unreadable_cache_is_rebuilt(tmp_path):
    _make_folder(tmp_path / "f")
    cache = tmp_path / "cache"
    ref = load_dataset("imagefolder", "train", tmp_path / "f", cache_dir=cache)
    (path,) = cache.glob("*.npz")
    path.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="unreadable cache"):
        ds = load_dataset("imagefolder", "train", tmp_path / "f", cache_dir=cache)
    assert torch.equal(ds.images, ref.images)


def test_imagefolder_parallel_decoding_matches_serial(tmp_path, monkeypatch):
    _make_folder(tmp_path / "f", n=(5, 3))
    tar = _tar_gz(tmp_path / "f", tmp_path / "f.tgz", arcroot=".")
    monkeypatch.setattr(imagefolder, "_CHUNK", 3)  # several chunks -> the process pool runs
    serial = imagefolder.load_imagefolder(tar, "train", cache=False, workers=0)
    parallel = imagefolder.load_imagefolder(tar, "train", cache=False, workers=2)
    assert torch.equal(serial.images, parallel.images)
    assert torch.equal(serial.labels, parallel.labels)


def test_imagefolder_grayscale_and_mixed(tmp_path):
    made = _make_folder(tmp_path / "g", mode="L")
    ds = load_dataset("imagefolder", "train", tmp_path / "g", cache=False)
    assert ds.images.shape == (6, 1, 5, 6)
    assert torch.equal(ds.images, _expected(made["train"], 1))
    # One RGB image anywhere (here: test split) -> everything is RGB, gray replicated.
    rgb = np.random.default_rng(5).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "g" / "test" / "ant" / "zz.png")
    ds = load_dataset("imagefolder", "train", tmp_path / "g", cache=False)
    assert torch.equal(ds.images, _expected(made["train"], 3))
    te = load_dataset("imagefolder", "test", tmp_path / "g", cache=False)
    assert torch.equal(te.images[2], torch.from_numpy(rgb.transpose(2, 0, 1)))


def test_imagefolder_jpeg_matches_pil(tmp_path):
    root = tmp_path / "j"
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                root / split / c / "x.JPG", quality=90
            )
    ds = load_dataset("imagefolder", "test", root, cache=False)
    ref = np.asarray(Image.open(root / "test" / "b" / "x.JPG").convert("RGB"))
    assert torch.equal(ds.images[1], torch.from_numpy(ref.transpose(2, 0, 1).copy()))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("imagefolder", "train")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("imagefolder", "train", tmp_path / "nope")
    # Different class lists.
    _make_folder(tmp_path / "c")
    (tmp_path / "c" / "test" / "dog").mkdir()
    Image.new("RGB", (6, 5)).save(tmp_path / "c" / "test" / "dog" / "0.png")
    with pytest.raises(CorruptDataError, match=r"only in test \['dog'\]"):
        load_dataset("imagefolder", "train", tmp_path / "c", cache=False)
    # Different sizes.
    _make_folder(tmp_path / "s")
    Image.new("RGB", (7, 5)).save(tmp_path / "s" / "train" / "cat" / "99.png")
    with pytest.raises(CorruptDataError, match="same size"):
        load_dataset("imagefolder", "train", tmp_path / "s", cache=False)
    # Undecodable image names the file.
    _make_folder(tmp_path / "b")
    (tmp_path / "b" / "test" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CorruptDataError, match=r"test/cat/broken\.png"):
        load_dataset("imagefolder", "test", tmp_path / "b", cache=False)
    # Only a train split: test is a clear error.
    (tmp_path / "t" / "train" / "x").mkdir(parents=True)
    Image.new("L", (4, 4)).save(tmp_path / "t" / "train" / "x" / "0.png")
    assert len(load_dataset("imagefolder", "train", tmp_path / "t", cache_dir=tmp_path)) == 1
    with pytest.raises(DatasetNotFoundError, match=r"no 'test' images in .*/t: expected test/"):
        load_dataset("imagefolder", "test", tmp_path / "t", cache_dir=tmp_path)  # cached
    # Empty folder, wrong archive type, truncated archive.
    (tmp_path / "e").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_dataset("imagefolder", "train", tmp_path / "e", cache=False)
    (tmp_path / "z.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match="archive"):
        load_dataset("imagefolder", "train", tmp_path / "z.zip")
    tar = _tar_gz(tmp_path / "b", tmp_path / "b.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(tar[: len(tar) // 2])
    with pytest.raises(CorruptDataError, match=r"cut\.tar\.gz"):
        load_dataset("imagefolder", "train", tmp_path / "cut.tar.gz", cache=False)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_fast_tar_reader_matches_tarfile(tmp_path, fmt):
    files = {
        "r/train/a/" + "x" * 120 + ".png": b"long name" * 3,  # GNU 'L' / pax path
        "r/" + "d" * 90 + "/train/b/" + "y" * 60 + ".png": b"ustar prefix",
        "r/test/a/\u00e9t\u00e9.png": b"non-ascii",  # pax path (utf-8)
        "r/empty.png": b"",
        "r/test/b/z.png": bytes(range(256)) * 5,
    }
    if fmt == tarfile.USTAR_FORMAT:
        del files["r/train/a/" + "x" * 120 + ".png"]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        folder = tarfile.TarInfo("r/train")
        folder.type = tarfile.DIRTYPE  # non-file members are skipped
        tf.addfile(folder)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = path.read_bytes()
    assert len(_tar._parse(raw)) == len(files)  # the fast path handles all of these itself
    assert dict(_tar.iter_tar_files(path)) == files
    gz = tmp_path / "t.tar.gz"
    gz.write_bytes(gzip.compress(raw))
    assert list(_tar.iter_tar_files(gz)) == list(files.items())


def test_big_archives_are_streamed_by_tarfile(tmp_path, monkeypatch):
    src = tmp_path / "f"
    made = _make_folder(src)
    tar = _tar_gz(src, tmp_path / "f.tar.gz")
    monkeypatch.setattr(_tar, "_IN_MEMORY_LIMIT", 100)  # "too big": the tarfile path runs
    monkeypatch.setattr(_tar, "_parse", None)  # ...and the fast parser is not touched
    assert _tar._read_whole(tar) is None
    ds = load_dataset("imagefolder", "train", tar, cache=False)
    assert torch.equal(ds.images, _expected(made["train"], 3))


def test_fast_tar_reader_falls_back_on_bad_checksum(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("a.png")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    raw = bytearray(path.read_bytes())
    raw[148:156] = b"0000000\0"  # wrong checksum: the fast parser gives up, tarfile decides
    path.write_bytes(bytes(raw))
    with pytest.raises(_tar._Unsupported):
        _tar._parse(bytes(raw))
    with pytest.raises(tarfile.TarError):
        list(_tar.iter_tar_files(path))


# --------------------------------------------------------------------------- digits, synthetic


def test_digits_fixed_stratified_split():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert tr.images.shape == (1497, 1, 28, 28) and te.images.shape == (300, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and tr.classes == tuple("0123456789")
    assert int(tr.images.max()) >= 250 and int(tr.images.min()) == 0
    counts = te.labels.bincount(minlength=10)
    assert counts.sum() == 300 and int(counts.min()) >= 29 and int(counts.max()) <= 31
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, te.images) and torch.equal(again.labels, te.labels)


def test_synthetic_is_deterministic_and_split_dependent():
    a = synthetic_dataset(50, (3, 8, 8), 5, seed=3)
    b = synthetic_dataset(50, (3, 8, 8), 5, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.labels.bincount().tolist() == [10] * 5
    assert not torch.equal(a.images, synthetic_dataset(50, (3, 8, 8), 5, seed=4).images)
    t = load_dataset("synthetic", "test", n=50, shape=(3, 8, 8), num_classes=5, seed=3)
    assert t.images.shape == (50, 3, 8, 8) and not torch.equal(t.images, a.images)
    with pytest.raises(ValueError, match="shape"):
        synthetic_dataset(4, (8, 8))


def test_synthetic_is_learnable():
    torch.manual_seed(0)
    tr = synthetic_dataset(400, (1, 8, 8), 4, seed=0)
    te = load_dataset("synthetic", "test", n=200, shape=(1, 8, 8), num_classes=4, seed=0)
    model = torch.nn.Linear(64, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    it = BatchIterator(tr, 50, seed=0)
    losses = []
    for _ in range(60):
        x, y = next(it)
        loss = torch.nn.functional.cross_entropy(model(to_float(x).flatten(1) - 0.5), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    acc = (model(to_float(te.images).flatten(1) - 0.5).argmax(1) == te.labels).float().mean()
    assert acc > 0.9  # chance is 0.25; the held-out split shares the class prototypes


# --------------------------------------------------------------------------- load_dataset


def test_load_dataset_rejects_bad_names_splits_and_kwargs():
    with pytest.raises(ValueError) as e:
        load_dataset("imagenet", "train")
    assert all(n in str(e.value) for n in DATASETS)
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")
    with pytest.raises(TypeError, match="workers"):
        load_dataset("synthetic", "train", workers=2)
    assert load_dataset(" Synthetic ", "train", n=3).name == "synthetic"


def test_array_dataset_validates():
    x, y = torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1])
    assert len(ArrayDataset(x, y, ("a", "b"), "t")) == 2
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(x.float(), y, ("a", "b"), "t")
    with pytest.raises(ValueError, match="int64"):
        ArrayDataset(x, y.int(), ("a", "b"), "t")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ArrayDataset(x, y, ("a",), "t")
    with pytest.raises(ValueError, match="contiguous"):
        ArrayDataset(x.transpose(2, 3), y, ("a", "b"), "t")


# --------------------------------------------------------------------------- batching


def _indexed(n: int) -> ArrayDataset:
    """Image i holds i (as two bytes) so batches reveal which rows they contain."""
    i = torch.arange(n)
    x = torch.stack([i // 256, i % 256], 1).to(torch.uint8).view(n, 1, 1, 2).contiguous()
    return ArrayDataset(x, i % 3, ("a", "b", "c"), "indexed")


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()


def test_batch_iterator_epochs_are_seeded_permutations():
    ds = _indexed(20)
    it = BatchIterator(ds, 5, seed=7)
    assert it.batches_per_epoch == 4
    epoch0 = _cat(_ids(next(it)[0]) for _ in range(4))
    assert sorted(epoch0) == list(range(20)) and epoch0 != list(range(20))
    assert (it.epoch, it.position) == (0, 4)
    x, y = next(it)
    assert (it.epoch, it.position) == (1, 1)
    assert y.tolist() == [i % 3 for i in _ids(x)] and x.dtype == torch.uint8
    epoch1 = _ids(x) + _cat(_ids(next(it)[0]) for _ in range(3))
    assert sorted(epoch1) == list(range(20)) and epoch1 != epoch0
    same = BatchIterator(ds, 5, seed=7)
    assert _cat(_ids(next(same)[0]) for _ in range(4)) == epoch0
    other = BatchIterator(ds, 5, seed=8)
    assert _cat(_ids(next(other)[0]) for _ in range(4)) != epoch0
    ordered = BatchIterator(ds, 5, shuffle=False)
    assert _ids(next(ordered)[0]) == [0, 1, 2, 3, 4]


def test_batch_iterator_rank_sharding():
    ds = _indexed(30)
    whole = BatchIterator(ds, 6, seed=1)
    ranks = [BatchIterator(ds, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    assert whole.batches_per_epoch == ranks[0].batches_per_epoch == 5
    for _ in range(12):  # across two epoch boundaries
        assert _ids(next(whole)[0]) == _cat(_ids(next(r)[0]) for r in ranks)


def test_batch_iterator_drop_last():
    ds = _indexed(11)
    it = BatchIterator(ds, 4, seed=0)
    assert it.batches_per_epoch == 2
    keep = BatchIterator(ds, 4, seed=0, drop_last=False)
    sizes, seen = [], []
    for _ in range(3):
        x, _ = next(keep)
        sizes.append(len(x))
        seen += _ids(x)
    assert sizes == [4, 4, 3] and sorted(seen) == list(range(11))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchIterator(ds, 6, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchIterator(ds, 2, rank=2, world_size=2)


@pytest.mark.parametrize("consumed", [0, 3, 5, 6, 7, 13])
def test_batch_iterator_resumes_exactly(consumed):
    # 6 batches per epoch: 5/6/7 straddle the epoch boundary, 13 is in epoch 2.
    ds = _indexed(25)
    kw = dict(seed=3, rank=1, world_size=2)
    ref = BatchIterator(ds, 2, **kw)
    run = BatchIterator(ds, 2, **kw)
    for _ in range(consumed):
        next(ref)
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # must survive a JSON checkpoint
    resumed = BatchIterator(ds, 2, **kw)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (run.epoch, run.position)
    for _ in range(8):
        a, b = next(ref), next(resumed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batch_iterator_refuses_a_foreign_state():
    ds = _indexed(25)
    state = BatchIterator(ds, 2, seed=3).state_dict()
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        BatchIterator(ds, 2, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        BatchIterator(ds, 1, seed=3, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid"):
        BatchIterator(ds, 2, seed=3).load_state_dict({**state, "position": 99})


@pytest.mark.parametrize(("n", "bs", "ws"), [(10, 3, 3), (7, 4, 1), (5, 2, 4), (2, 1, 3)])
def test_eval_batches_cover_every_image_once(n, bs, ws):
    ds = _indexed(n)
    seen = []
    for r in range(ws):
        batches = list(eval_batches(ds, bs, rank=r, world_size=ws))
        assert all(0 < len(x) <= bs and len(x) == len(y) for x, y in batches)
        again = list(eval_batches(ds, bs, rank=r, world_size=ws))
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
        seen += _cat(_ids(x) for x, _ in batches)
    assert seen == list(range(n))  # contiguous shards, in order: no duplicate, no drop
    with pytest.raises(ValueError, match="rank"):
        eval_batches(ds, bs, rank=ws, world_size=ws)


def test_to_float():
    x = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    y = to_float(x, "cpu")
    assert y.dtype == torch.float32 and torch.allclose(y, torch.tensor([[0, 128 / 255, 1]]))
    assert x.dtype == torch.uint8  # input untouched
    with pytest.raises(TypeError, match="uint8"):
        to_float(y, "cpu")


def test_synthetic_size_is_bounded_before_allocating():
    from fewbits.data.datasets import MAX_SYNTHETIC_VALUES, synthetic_dataset

    n = MAX_SYNTHETIC_VALUES // (3 * 32 * 32) + 1
    with pytest.raises(ValueError, match="--synthetic-size"):
        synthetic_dataset(n, (3, 32, 32))
    with pytest.raises(ValueError, match="--synthetic-size"):
        synthetic_dataset(10**11, (1, 28, 28))  # 1e11 images: refused, not an out-of-memory
