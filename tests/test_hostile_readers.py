"""Hostile inputs to fewbits' readers, round 3 (issue 20): files planted in the compiled-kernel
cache, CIFAR-10 batches built to crash or exhaust the reader, a file that chooses where data is
read or written, and decompression bombs (gzip, IDX, tar, images). Each must be refused with a
clean error (or ignored, with a warning) in bounded time and memory; nothing planted is run."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fewbits import _cbuild

# --------------------------------------------------------------------------- kernel cache

_VICTIM = "int fb_answer(void) { return 42; }\n"
_FLAGS = ["-O1", "-shared", "-fPIC"]


def _evil(marker: Path) -> str:
    """A library with the victim's function and a constructor that runs on load."""
    return ("#include <stdio.h>\n"
            f'__attribute__((constructor)) static void pwn(void) {{ FILE *f = fopen("{marker}", '
            '"w"); if (f) { fputs("pwned", f); fclose(f); } }\n'
            "int fb_answer(void) { return 666; }\n")


@pytest.fixture
def victim(tmp_path, monkeypatch):
    """``(source, library file name)`` of a kernel, built once in a private cache so that the
    attacker knows the cache name (the key is public: source, flags, CPU)."""
    src = tmp_path / "victim.c"
    src.write_text(_VICTIM)
    good = tmp_path / "good-cache"
    monkeypatch.setenv("FEWBITS_CACHE", str(good))
    lib, err = _cbuild.build(src, "k", _FLAGS)
    if lib is None:
        pytest.skip(f"no C compiler: {err}")
    return src, next(good.glob("k-*.so")).name


def _plant(folder: Path, name: str, marker: Path) -> None:
    """What an attacker writes: a library with a constructor, and its matching .sha256."""
    folder.mkdir(exist_ok=True)
    evil = folder.parent / "evil.c"
    evil.write_text(_evil(marker))
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, *_FLAGS, "-o", str(folder / name), str(evil)], check=True)
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / name).with_suffix(".sha256").write_text(digest + "\n")


def _refused(src: Path, folder: Path, monkeypatch, why: str) -> None:
    monkeypatch.setenv("FEWBITS_CACHE", str(folder))
    lib, err = _cbuild.build(src, "k", _FLAGS)
    assert lib is None and str(folder) in err and "not safe" in err, err
    assert why in err, err
    # The caller falls back, warning with the folder and the reason.
    kernels = _cbuild.CLibrary(src, "k", _FLAGS, {})
    with pytest.warns(UserWarning, match="PyTorch path runs instead.*not safe") as w:
        assert kernels.get() is None
    assert str(folder) in str(w[0].message)


def test_a_world_writable_cache_folder_is_never_loaded_from(victim, tmp_path, monkeypatch):
    src, name = victim
    marker = tmp_path / "pwned"
    folder = tmp_path / "shared-cache"
    _plant(folder, name, marker)
    os.chmod(folder, 0o777)
    _refused(src, folder, monkeypatch, "writable by group and others (mode 0777)")
    assert not marker.exists()  # the constructor never ran
    # a group-writable file in a private folder: refused as well
    os.chmod(folder, 0o700)
    os.chmod(folder / name, 0o775)
    _refused(src, folder, monkeypatch, "writable by its group")
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to give a file to another uid")
def test_a_file_of_another_user_in_the_cache_is_never_loaded(victim, tmp_path, monkeypatch):
    src, name = victim
    marker = tmp_path / "pwned"
    folder = tmp_path / "cache"
    _plant(folder, name, marker)
    os.chmod(folder, 0o700)
    os.chmod(folder / name, 0o755)
    os.chown(folder / name, 54321, 54321)
    _refused(src, folder, monkeypatch, "owned by uid 54321")
    assert not marker.exists()
    os.chown(folder / name, 0, 0)
    os.chown(folder, 54321, 54321)  # the folder itself someone else's
    _refused(src, folder, monkeypatch, "the folder is owned by uid 54321")
    assert not marker.exists()
    os.chown(folder, 0, 0)
    os.chmod(tmp_path, 0o777)  # a folder above it anyone can rename things in
    try:
        _refused(src, folder, monkeypatch, f"the folder {tmp_path} above it is writable by "
                 "everyone")
    finally:
        os.chmod(tmp_path, 0o700)
    assert not marker.exists()


def test_planted_symlinks_are_replaced_not_followed(victim, tmp_path, monkeypatch):
    src, name = victim
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    bashrc, record = tmp_path / "bashrc", tmp_path / "notes"
    bashrc.write_text("export PATH=/usr/bin\n")
    record.write_text("keep me\n")
    os.chmod(bashrc, 0o600)
    os.symlink(bashrc, folder / name)
    os.symlink(record, (folder / name).with_suffix(".sha256"))
    monkeypatch.setenv("FEWBITS_CACHE", str(folder))
    lib, err = _cbuild.build(src, "k", _FLAGS)
    assert err is None and lib.fb_answer() == 42
    assert bashrc.read_text() == "export PATH=/usr/bin\n" and record.read_text() == "keep me\n"
    assert stat.S_IMODE(bashrc.stat().st_mode) == 0o600
    assert not (folder / name).is_symlink() and (folder / name).is_file()
    assert not (folder / name).with_suffix(".sha256").is_symlink()


def test_cache_is_private_under_any_umask(victim, tmp_path, monkeypatch):
    src, name = victim
    folder = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("FEWBITS_CACHE", str(folder))
    old = os.umask(0)
    try:
        lib, err = _cbuild.build(src, "k", _FLAGS)
    finally:
        os.umask(old)
    assert err is None and lib.fb_answer() == 42
    for d in (tmp_path / "a", tmp_path / "a" / "b", folder):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((folder / name).stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / name).with_suffix(".sha256").stat().st_mode) == 0o600


def test_no_home_folder_gives_a_private_cache_never_a_relative_tilde(tmp_path, monkeypatch):
    # HOME unset and a uid without a passwd entry: expanduser("~") stays "~".
    monkeypatch.delenv("FEWBITS_CACHE", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_cbuild, "_PRIVATE", [])
    folder = _cbuild.cache_dir()
    assert folder.is_absolute() and tmp_path not in folder.parents
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.geteuid()
    assert _cbuild.cache_dir() == folder  # one per process
    monkeypatch.setenv("FEWBITS_CACHE", "~/cache")  # an unexpandable ~ in the variable too
    assert _cbuild.cache_dir() == folder
    src = tmp_path / "k.c"
    src.write_text(_VICTIM)
    lib, err = _cbuild.build(src, "k", _FLAGS)
    if lib is None:
        pytest.skip(f"no C compiler: {err}")
    assert lib.fb_answer() == 42 and list(folder.glob("k-*.so"))
    assert not (tmp_path / "~").exists()
    shutil.rmtree(folder)


def test_no_home_in_a_fresh_process_uses_a_private_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "FEWBITS_CACHE")}
    code = ("import os, os.path; os.path.expanduser = lambda p: p\n"
            "from fewbits import _cbuild; d = _cbuild.cache_dir(); print(d)\n"
            "assert d.is_absolute() and oct(d.stat().st_mode & 0o777) == '0o700'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    folder = Path(out.stdout.strip())
    assert not folder.exists()  # removed at exit
    assert not (tmp_path / "~").exists()
