"""fewbits._io.atomic_write (every file fewbits writes) and the verified kernel-library cache."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fewbits import _cbuild
from fewbits._io import TEMP_PREFIX, WriteError, atomic_write, clean_stale_temps

ROOT = Path(__file__).resolve().parents[1]


def test_writes_replace_atomically_and_leave_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write(p, b"old")
    atomic_write(p, lambda f: f.write(b"new"))
    assert p.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_missing_folder_and_file_in_the_path_name_the_target(tmp_path):
    target = tmp_path / "no" / "such" / "m.fewbits"
    with pytest.raises(WriteError, match=rf"{target}: the folder .*no/such does not exist"):
        atomic_write(target, b"x")
    atomic_write(target, b"x", parents=True)  # checkpoints create their folder
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(WriteError, match=r"plain is a file, not a folder"):
        atomic_write(tmp_path / "plain" / "x.pt", b"x", parents=True)
    assert not any(n.startswith(TEMP_PREFIX) for n in os.listdir(tmp_path))


def test_never_replaces_a_folder_or_a_device(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(WriteError, match=r"d: it is a folder"):
        atomic_write(tmp_path / "d", b"x")
    assert (tmp_path / "d").is_dir()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(WriteError, match="FIFO"):
        atomic_write(tmp_path / "fifo", b"x")
    if os.path.exists("/dev/null") and os.access("/dev", os.W_OK):
        with pytest.raises(WriteError, match="character device"):
            atomic_write("/dev/null", b"x")
        assert not Path("/dev/null").is_file()


def test_a_symlink_is_followed_and_stays_a_link(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    (tmp_path / "link.bin").symlink_to(real)
    atomic_write(tmp_path / "link.bin", b"new")
    assert (tmp_path / "link.bin").is_symlink() and real.read_bytes() == b"new"


def test_full_and_read_only_file_systems_name_the_target(tmp_path, monkeypatch):
    p = tmp_path / "m.pt"
    atomic_write(p, b"old")
    for code, text in ((errno.ENOSPC, "no space left"),
                       (errno.EROFS, "the file system is read-only"),
                       (errno.EACCES, "permission denied")):
        def fail(*a, code=code):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(os, "fsync", fail)
        with pytest.raises(WriteError, match=rf"cannot write {p}: {text}") as e:
            atomic_write(p, b"new")
        assert TEMP_PREFIX not in str(e.value)
        monkeypatch.undo()
        assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.pt"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_dev_full_is_neither_written_nor_replaced():
    with pytest.raises(WriteError):
        atomic_write("/dev/full", b"x")
    assert Path("/dev/full").is_char_device()


def test_temp_files_of_a_killed_writer_are_cleaned(tmp_path):
    """kill -9 during a write leaves a temp file; the next write into that folder removes it."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from fewbits._io import atomic_write
        def slow(f):
            f.write(b"x" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(tmp_path / "big.pt")!r}, slow)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"writing"
        assert any(n.startswith(TEMP_PREFIX) for n in os.listdir(tmp_path))
        assert clean_stale_temps(tmp_path) == []  # the writer is alive: its file stays
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    atomic_write(tmp_path / "other.pt", b"y")
    assert sorted(os.listdir(tmp_path)) == ["other.pt"]


def _replace_with_truncated(so: Path) -> None:
    tmp = so.with_name("cut.tmp")
    tmp.write_bytes(so.read_bytes()[:100])
    os.replace(tmp, so)


def test_truncated_kernel_library_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    """Issue 13, item 7: a truncated cached library crashed training with SIGBUS."""
    monkeypatch.setenv("FEWBITS_CACHE", str(tmp_path))
    src = tmp_path / "k.c"
    src.write_text("int fb_answer(void) { return 42; }\n")
    lib, err = _cbuild.build(src, "k", ["-O1", "-shared", "-fPIC"])
    if lib is None:
        pytest.skip(f"no C compiler: {err}")
    so = next(tmp_path.glob("k-*.so"))
    assert so.with_suffix(".sha256").read_text().strip()
    # Damage it as a full disk or a kill during a copy leaves it; a new file (not truncating
    # the one this process has mapped, which would SIGBUS this test).
    _replace_with_truncated(so)
    with pytest.warns(UserWarning, match="damaged.*rebuilding"):
        lib, err = _cbuild.build(src, "k", ["-O1", "-shared", "-fPIC"])
    assert err is None and lib.fb_answer() == 42
    # No compiler left: the damaged library is not loaded, the caller falls back
    _replace_with_truncated(so)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(UserWarning, match="damaged"):
        lib, err = _cbuild.build(src, "k", ["-O1", "-shared", "-fPIC"])
    assert lib is None and "failed" in err
    kernels = _cbuild.CLibrary(src, "k", ["-O1", "-shared", "-fPIC"], {})
    with pytest.warns(UserWarning) as caught:
        assert kernels.get() is None
    assert any("PyTorch path runs instead" in str(w.message) for w in caught)


def test_optional_compiler_flags_are_left_out_when_they_fail(tmp_path, monkeypatch):
    # The training kernels ask for -fopenmp; a compiler that refuses a flag still builds them.
    monkeypatch.setenv("FEWBITS_CACHE", str(tmp_path))
    src = tmp_path / "k.c"
    src.write_text("int fb_answer(void) { return 42; }\n")
    base = ["-O1", "-shared", "-fPIC"]
    if _cbuild.build(src, "k", base)[0] is None:
        pytest.skip("no C compiler")
    kernels = _cbuild.CLibrary(src, "k", base, {}, optional=("-fno-such-flag-anywhere",))
    assert kernels.get().fb_answer() == 42 and kernels.error is None
    with_ok = _cbuild.CLibrary(src, "k2", base, {}, optional=("-DFB_ANSWER=1",))
    assert with_ok.get().fb_answer() == 42
    assert len(list(tmp_path.glob("k2-*.so"))) == 1  # built once, with the optional flag
