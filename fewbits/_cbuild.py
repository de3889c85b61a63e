"""Build a small C source into a shared library on first use and load it with ctypes.

fewbits' C kernels (fused training quantizers, XNOR inference) are plain C (pthreads or OpenMP)
without torch headers, so they compile with the system compiler in about a second. Libraries are
cached in ``$FEWBITS_CACHE`` (default ``~/.cache/fewbits``) under a name that hashes the source,
the flags and the CPU (``-march=native`` code must not run on another CPU), and are written
atomically (:func:`fewbits._io.atomic_write`, fsync before the rename) so concurrent processes (DDP
ranks) never load a half-written file. The SHA-256 of each library is recorded beside it
(``.sha256``) and checked before loading: a damaged library is rebuilt, and where it cannot be, the
caller's PyTorch path runs and ``CLibrary.error`` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

from ._io import atomic_write, temp_dir

__all__ = ["CLibrary", "build", "cache_dir"]


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$FEWBITS_CACHE`` or ``~/.cache/fewbits``."""
    root = os.environ.get("FEWBITS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "fewbits")
    return Path(root)


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return flags + platform.machine() + platform.processor()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified(lib_path: Path) -> bool:
    """Whether ``lib_path`` is the complete library its ``.sha256`` record describes (a
    truncated or damaged library would crash the process with SIGBUS when loaded)."""
    try:
        recorded = lib_path.with_suffix(".sha256").read_text().strip()
        return recorded == _digest(lib_path.read_bytes())
    except OSError:
        return False


def _compile(cc: str, src: Path, flags: list[str], lib_path: Path) -> None:
    """Compile into a private folder, then publish the library and its hash atomically (the
    hash last, so that a reader never trusts a library the hash does not describe)."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(lib_path.parent, lib_path.name) as tmp:
        out = Path(tmp) / lib_path.name
        subprocess.run([cc, *flags, "-o", str(out), str(src)], check=True,
                       capture_output=True, timeout=120)
        data = out.read_bytes()
    atomic_write(lib_path, data, mode=0o755)
    atomic_write(lib_path.with_suffix(".sha256"), _digest(data).encode() + b"\n")


def build(src: Path, name: str, flags: list[str]) -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, reason)`` when there is no compiler or the build fails
    (callers then use their PyTorch path).

    A cached library is loaded only if it matches the SHA-256 recorded beside it; a damaged one
    (truncated by a full disk, say) is rebuilt, with a warning."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not src.is_file() or cc is None:
        return None, "no C compiler (set CC) or kernel source missing"
    code = src.read_bytes()
    key = hashlib.sha256(code + " ".join(flags).encode() + _cpu_key().encode()).hexdigest()[:16]
    lib_path = cache_dir() / f"{name}-{key}.so"
    try:
        if not _verified(lib_path):
            if lib_path.exists() and lib_path.with_suffix(".sha256").exists():
                warnings.warn(f"the cached kernel library {lib_path} is damaged (it does not "
                              "match its recorded SHA-256); rebuilding it", stacklevel=3)
            _compile(cc, src, flags, lib_path)
            if not _verified(lib_path):
                raise OSError(f"{lib_path} changed while it was being written (another "
                              "process?)")
        return ctypes.CDLL(str(lib_path)), None
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        return None, f"building {src.name} failed: {e} {detail.decode(errors='replace')}"


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
