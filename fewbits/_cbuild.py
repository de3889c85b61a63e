"""Build a small C source into a shared library on first use and load it with ctypes.

fewbits' C kernels (fused training quantizers, XNOR inference) are plain C (pthreads or OpenMP)
without torch headers, so they compile with the system compiler in about a second. Libraries are
cached in ``$FEWBITS_CACHE`` (default ``~/.cache/fewbits/kernels``: a folder of their own, apart
from the data fewbits keeps in ``~/.cache/fewbits``) under a name that hashes the source,
the flags and the CPU (``-march=native`` code must not run on another CPU). The SHA-256 of each
library is recorded beside it (``.sha256``) and checked before loading: a damaged library (a full
disk, a killed copy) is rebuilt, and where it cannot be, the caller's PyTorch path runs and
``CLibrary.error`` says why.

A library is code that runs as the user who loads it, so the cache is trusted only when nobody
else can have put a file there (the SHA-256 detects damage, not an attacker, who writes a
matching one):

- Folders fewbits creates are mode 0700 whatever the umask; libraries are written 0700 and
  hashes 0600 (exact modes, set on the open file).
- The cache folder and every entry in it must be owned by the current user and not writable
  by group or others; each folder above it must be owned by the user or root and not writable
  by others (unless sticky, as ``/tmp``). Otherwise nothing is loaded or written there: the
  PyTorch path runs, with a warning naming the folder and the reason.
- Files are opened relative to the opened folder with ``O_NOFOLLOW`` and checked with
  ``fstat`` on the open descriptor; the library loaded is the file that was hashed (same
  inode, in a folder nobody else can write). New files are built in a
  private temporary folder and renamed in (a rename replaces a planted symbolic link, never the
  file it points to), hash last, then the folder is ``fsync``-ed.
- With no home folder (``HOME`` unset and no passwd entry: ``~`` would stay a relative ``~``),
  the cache is a private temporary folder of this process, removed at exit.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ._io import clean_stale_temps, fsync_dir, temp_dir

__all__ = ["CLibrary", "UnsafeCacheError", "build", "cache_dir", "isa_paths", "pick_isa"]

_PRIVATE: list[Path] = []  # this process's own cache when there is no home folder
_MAX_LIBRARY_BYTES = 256 << 20  # a cached library larger than this is refused unread


class UnsafeCacheError(OSError):
    """The kernel cache folder, or a file in it, could have been written by someone else."""


def _private_cache() -> Path:
    if not _PRIVATE:
        path = Path(tempfile.mkdtemp(prefix="fewbits-kernels-"))  # 0700, owned by us
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _PRIVATE.append(path)
    return _PRIVATE[0]


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$FEWBITS_CACHE`` or ``~/.cache/fewbits/kernels``,
    made absolute; a private temporary folder of this process when there is no home folder
    (never a relative ``~``)."""
    env = os.environ.get("FEWBITS_CACHE")
    root = os.path.expanduser(env) if env else os.path.join(os.path.expanduser("~"), ".cache",
                                                            "fewbits", "kernels")
    if root.startswith("~") or not (env or os.path.isabs(root)):
        return _private_cache()
    return Path(os.path.abspath(root))


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return flags + platform.machine() + platform.processor()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _who(uid: int) -> str:
    return f"uid {uid}" + (" (root)" if uid == 0 else "")


def _check(st: os.stat_result, what: str, *, entry: bool = True) -> None:
    """Refuse ``what`` unless this user owns it and group and others cannot write it."""
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafeCacheError(f"{what} is owned by {_who(st.st_uid)}, not by this user "
                               f"({_who(me)})")
    if stat.S_ISLNK(st.st_mode):
        return  # a link's own mode means nothing; it is never followed (O_NOFOLLOW)
    if st.st_mode & 0o022:
        by = {0o020: "its group", 0o002: "others", 0o022: "group and others"}
        raise UnsafeCacheError(f"{what} is writable by {by[st.st_mode & 0o022]} "
                               f"(mode {stat.S_IMODE(st.st_mode):04o})")
    if entry and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise UnsafeCacheError(f"{what} is not a regular file")


def _make_private(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each mode 0700 whatever the umask."""
    missing = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # made meanwhile by another process: checked below like any other
        os.chmod(d, 0o700)  # mkdir's mode is reduced by the umask, never raised


def _open_folder(folder: Path) -> int:
    """Create the cache folder if missing and open it, after checking it, each folder above it
    and every entry in it (:class:`UnsafeCacheError` says what is wrong)."""
    _make_private(folder)
    me = os.geteuid()
    for up in folder.parents:
        st = os.stat(up)
        if st.st_uid not in (0, me):
            raise UnsafeCacheError(f"the folder {up} above it is owned by {_who(st.st_uid)}, "
                                   "who could replace the cache")
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeCacheError(f"the folder {up} above it is writable by everyone "
                                   f"(mode {stat.S_IMODE(st.st_mode):04o}, not sticky)")
    if os.path.islink(folder):
        _check(os.lstat(folder), "the link to the folder")
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeCacheError("it is not a folder")
        _check(st, "the folder", entry=False)
        with os.scandir(fd) as entries:
            for e in entries:
                _check(e.stat(follow_symlinks=False), f"its entry {e.name!r}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_file(dfd: int, name: str, limit: int) -> tuple[int, bytes] | None:
    """``(descriptor, contents)`` of the regular file ``name`` in the folder ``dfd``, opened
    without following a link and checked on the descriptor; None when absent, a link or too
    large (rebuilt then); :class:`UnsafeCacheError` when someone else could have written it."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError:  # ELOOP: a link, never followed (the rebuild replaces the link itself)
        return None
    try:
        st = os.fstat(fd)
        _check(st, f"its file {name!r}")
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            os.close(fd)
            return None
        chunks, left = [], st.st_size
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return fd, b"".join(chunks)
    except BaseException:
        os.close(fd)
        raise


def _load_verified(dfd: int, folder: Path, name: str) -> ctypes.CDLL | None:
    """The library ``name`` of the open folder when it matches its ``.sha256`` record (a
    truncated or damaged library would crash the process with SIGBUS when loaded), else None.
    What is loaded is the descriptor that was hashed."""
    rec = _open_file(dfd, name[:-3] + ".sha256", 4096)
    if rec is None:
        return None
    os.close(rec[0])
    lib = _open_file(dfd, name, _MAX_LIBRARY_BYTES)
    if lib is None:
        return None
    fd, data = lib
    try:
        if rec[1].decode(errors="replace").strip() != _digest(data):
            warnings.warn(f"the cached kernel library {folder / name} is damaged (it does "
                          "not match its recorded SHA-256); rebuilding it", stacklevel=4)
            return None
        # The folder is checked private, so the name still means the descriptor's file (a
        # /proc/self/fd path would not do: the loader reuses a library loaded under that name).
        st, now = os.fstat(fd), os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            return None
        return ctypes.CDLL(str(folder / name))
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchmod(fd, mode)  # exact, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _compile(cc: str, src: Path, flags: list[str], folder: Path, name: str) -> None:
    """Compile in a private folder inside the cache, then rename the library and its hash in
    (the hash last, so that a reader never trusts a library the hash does not describe)."""
    clean_stale_temps(folder)
    with temp_dir(folder, name) as tmp:
        out = Path(tmp) / "out.so"
        subprocess.run([cc, *flags, "-o", str(out), str(src)], check=True,
                       capture_output=True, timeout=120)
        data = out.read_bytes()
        lib, rec = Path(tmp) / name, Path(tmp) / (name[:-3] + ".sha256")
        _write_private(lib, data, 0o700)
        _write_private(rec, _digest(data).encode() + b"\n", 0o600)
        os.replace(lib, folder / name)  # a planted link at the target is replaced, not followed
        os.replace(rec, folder / rec.name)
    fsync_dir(folder)


def build(src: Path, name: str, flags: list[str]) -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, reason)`` when there is no compiler, the build fails
    or the cache folder is not safe (see the module docstring); callers then use their
    PyTorch path.

    A cached library is loaded only if it matches the SHA-256 recorded beside it; a damaged one
    (truncated by a full disk, say) is rebuilt, with a warning."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not src.is_file() or cc is None:
        return None, "no C compiler (set CC) or kernel source missing"
    if not hasattr(os, "O_NOFOLLOW") or os.open not in os.supports_dir_fd:
        return None, "the kernel cache needs a POSIX system (O_NOFOLLOW, dir_fd)"
    code = src.read_bytes()
    key = hashlib.sha256(code + " ".join(flags).encode() + _cpu_key().encode()).hexdigest()[:16]
    folder = cache_dir()
    lib_name = f"{name}-{key}.so"
    dfd = -1
    try:
        dfd = _open_folder(folder)
        lib = _load_verified(dfd, folder, lib_name)
        if lib is None:
            _compile(cc, src, flags, folder, lib_name)
            lib = _load_verified(dfd, folder, lib_name)
            if lib is None:
                raise OSError(f"{folder / lib_name} changed while it was being written "
                              "(another process?)")
        return lib, None
    except UnsafeCacheError as e:
        return None, (f"the kernel cache folder {folder} is not safe to load code from: {e}; "
                      "nothing was loaded from it. Set FEWBITS_CACHE to a folder only you can "
                      "write (fewbits creates it, mode 0700), or remove that one")
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        return None, f"building {src.name} failed: {e} {detail.decode(errors='replace')}"
    finally:
        if dfd >= 0:
            os.close(dfd)


class CLibrary:
    """A C source built and loaded on first :meth:`get` (once per process), with the ctypes
    ``signatures`` (``{function: (argtypes, restype)}``) set; ``get()`` is None and ``error``
    says why when it cannot be built. ``optional`` flags (e.g. ``-fopenmp``) are tried first,
    then left out if the build fails with them (a compiler without OpenMP)."""

    def __init__(self, src: Path, name: str, flags: list[str],
                 signatures: dict[str, tuple[list[Any], Any]],
                 optional: tuple[str, ...] = ()) -> None:
        self.src, self.name, self.flags, self.signatures = src, name, flags, signatures
        self.optional = list(optional)
        self.error: str | None = None
        self._lib: ctypes.CDLL | None = None

    def get(self) -> ctypes.CDLL | None:
        if self._lib is None and self.error is None:
            lib = None
            if self.optional:
                lib, _ = build(self.src, self.name, self.flags + self.optional)
            if lib is None:
                lib, self.error = build(self.src, self.name, self.flags)
            if lib is None:
                warnings.warn(f"fewbits' C kernels ({self.src.name}) are not available, the "
                              f"slower PyTorch path runs instead: {self.error}", stacklevel=3)
            else:
                for fn, (argtypes, restype) in self.signatures.items():
                    getattr(lib, fn).argtypes = argtypes
                    getattr(lib, fn).restype = restype
            self._lib = lib
        return self._lib


def isa_paths(names: tuple[str, ...], runs: Any) -> list[str]:
    """The CPU paths of an engine this machine can run, best first: ``names`` lists them from
    the portable one up, ``runs(i)`` is the engine's C probe of path ``i``."""
    return [n for i, n in reversed(list(enumerate(names))) if runs(i)]


class IsaError(ValueError):
    """A forced ISA path (argument or ``$FEWBITS_*_ISA``) that is unknown or that this CPU
    cannot run: the machine's setting, not the model's (the planner warns, as for a failed
    build, where it would only note an operation its engine does not cover)."""


def pick_isa(name: str | None, env: str, names: tuple[str, ...], have: list[str],
             engine: str) -> str:
    """The path an engine runs: ``name``, else ``$env``, else the best of ``have``. Raises
    :class:`IsaError` for a name not in ``names`` or a path this CPU cannot run."""
    name = name or os.environ.get(env) or None
    if name is None:
        return have[0]
    if name not in names:
        raise IsaError(f"unknown {engine}-engine ISA {name!r} (argument or ${env}); known: "
                         f"{', '.join(names)}")
    if name not in have:
        raise IsaError(f"this CPU cannot run the {name!r} path of the {engine} engine (forced "
                         f"by argument or ${env}); it can run: {', '.join(have)}")
    return name
