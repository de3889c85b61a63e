"""Hostile files found by the QA pass of issue 20 (round 4): each test fails without its fix."""

from __future__ import annotations

import itertools
import struct

import pytest

from fewbits.data._cifar_pickle import read_pickle


def _memo_bomb(copies: int, size: int) -> bytes:
    """A protocol-2 pickle holding one latin-1 text of ``size`` characters, memoized, and
    ``copies`` calls of ``_codecs.encode`` on it appended to a list: ``copies * size`` bytes
    built from a file of about ``size`` bytes."""
    out = bytearray(b"\x80\x02}X\x04\x00\x00\x00data]")
    out += b"X" + struct.pack("<I", size) + b"A" * size + b"q\x01" + b"0"
    out += b"c_codecs\nencode\nq\x02" + b"0"
    for _ in range(copies):
        out += b"h\x02h\x01X\x06\x00\x00\x00latin1\x86Ra"
    return bytes(out + b"s.")


def test_cifar_pickle_memoized_data_cannot_multiply_memory():
    # 100 kB of file would build 20 MB (a 1 MB file: 2.2 GB and 36 s before the fix)
    data = _memo_bomb(200, 100_000)
    with pytest.raises(ValueError, match="more than twice its own"):
        read_pickle(data)
    assert read_pickle(_memo_bomb(1, 100_000))["data"][0] == b"A" * 100_000


# --------------------------------------------------------------------------- NNabla .h5


def test_nnabla_h5_external_storage_is_refused(tmp_path):
    import h5py

    from fewbits.nnabla.files import NNablaImportError, read_parameters

    secret = tmp_path / "secret"
    secret.write_bytes(b"password" * 8)
    path = tmp_path / "p.h5"
    with h5py.File(path, "w") as f:  # values read from `secret`, a file the .h5 names
        f.create_dataset("affine/W", shape=(64,), dtype="u1", external=[(str(secret), 0, 64)])
    with pytest.raises(NNablaImportError, match="another file"):
        read_parameters(path)


def test_nnabla_h5_virtual_dataset_is_refused(tmp_path):
    import h5py
    import numpy as np

    from fewbits.nnabla.files import NNablaImportError, read_parameters

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(4, dtype=np.float32)
    layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(other), "x", shape=(4,))
    path = tmp_path / "p.h5"
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("affine/W", layout)
    with pytest.raises(NNablaImportError, match="another file"):
        read_parameters(path)


def test_nnabla_h5_hard_link_lattice_is_refused_quickly(tmp_path):
    import h5py

    from fewbits.nnabla.files import NNablaImportError, read_parameters

    path = tmp_path / "p.h5"
    with h5py.File(path, "w") as f:  # 30 levels, two links each: 2**30 paths in 45 kB
        groups = [f.create_group(f"g{i}") for i in range(30)]
        for a, b in itertools.pairwise(groups):
            a["a"] = b
            a["b"] = b
        for i in range(1, 30):
            del f[f"g{i}"]
    with pytest.raises(NNablaImportError, match="already reached"):
        read_parameters(path)


def test_nnabla_nnp_with_a_parameter_file_twice_is_refused(tmp_path):
    import warnings
    import zipfile

    from fewbits.nnabla.files import NNablaImportError, decode_parameter_protobuf, read_parameters

    path = tmp_path / "p.nnp"
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as z:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        z.writestr("parameter.protobuf", b"")
        z.writestr("parameter.protobuf", b"")
    assert decode_parameter_protobuf(b"") == {}
    with pytest.raises(NNablaImportError, match="twice"):
        read_parameters(path)


def test_nnabla_reader_refuses_a_fifo_instead_of_blocking(tmp_path):
    import os
    import threading

    from fewbits.nnabla.files import NNablaImportError, read_parameters

    fifo = tmp_path / "p.protobuf"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def read() -> None:
        try:
            read_parameters(fifo)
            result.append(None)
        except BaseException as e:  # handed to the test thread
            result.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader (open of a FIFO waits for a writer)
        with open(fifo, "wb"):
            pass
        t.join(10)
        pytest.fail("read_parameters blocked on a FIFO")
    assert isinstance(result[0], NNablaImportError) and "regular file" in str(result[0])


# --------------------------------------------------------------------------- --overwrite


@pytest.mark.parametrize("planted", ["file", "link"])
def test_overwrite_refuses_a_set_aside_that_is_a_file_or_a_link(tmp_path, planted):
    import os

    from fewbits.config import ConfigError
    from fewbits.runs import REPLACED_NAME, set_aside_run

    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir()
    other.mkdir()
    (run / "config.json").write_text("{}")
    (run / "checkpoint.pt").write_text("old")
    if planted == "file":
        (run / REPLACED_NAME).write_text("planted")
    else:  # the old run would be moved into `other`, or rmtree refuses with a traceback
        os.symlink(other, run / REPLACED_NAME)
    with pytest.raises(ConfigError, match="not a folder fewbits made"):
        set_aside_run(run)
    assert (run / "checkpoint.pt").read_text() == "old" and not os.listdir(other)


# --------------------------------------------------------------------------- CIFAR nesting


@pytest.mark.parametrize("tail", [b"Ns.", b"X\x01\x00\x00\x00a\x93."], ids=["dict-key", "global"])
def test_cifar_pickle_deep_tuple_is_refused_not_a_crash(tail):
    import subprocess
    import sys

    # a tuple nested 190,000 deep (190 kB) used as a dict key or a global's module name: its
    # hash recursed in C and killed the interpreter (SIGSEGV, exit 139)
    data = b"\x80\x02" + (b"}" if tail == b"Ns." else b"") + b")" + b"\x85" * 190_000 + tail
    code = ("import sys\nfrom fewbits.data._cifar_pickle import read_pickle\n"
            "try:\n    read_pickle(sys.stdin.buffer.read())\nexcept ValueError as e:\n"
            "    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert b"refused:" in out.stdout
