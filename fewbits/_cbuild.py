"""Build a small C source into a shared library on first use and load it with ctypes.

fewbits' C kernels (fused training quantizers, XNOR inference) are plain C with pthreads and no
torch headers, so they compile with the system compiler in about a second. Libraries are cached
in ``$FEWBITS_CACHE`` (default ``~/.cache/fewbits``) under a name that hashes the source, the
flags and the CPU (``-march=native`` code must not run on another CPU), and are written
atomically so concurrent processes (DDP ranks) never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

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


def build(src: Path, name: str, flags: list[str]) -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, reason)`` when there is no compiler or the build fails
    (callers then use their PyTorch path)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not src.is_file() or cc is None:
        return None, "no C compiler (set CC) or kernel source missing"
    code = src.read_bytes()
    key = hashlib.sha256(code + " ".join(flags).encode() + _cpu_key().encode()).hexdigest()[:16]
    lib_path = cache_dir() / f"{name}-{key}.so"
    try:
        if not lib_path.is_file():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=lib_path.parent, suffix=".so")
            os.close(fd)
            try:
                subprocess.run([cc, *flags, "-o", tmp, str(src)], check=True,
                               capture_output=True, timeout=120)
                os.replace(tmp, lib_path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(lib_path)), None
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        return None, f"building {src.name} failed: {e} {detail.decode(errors='replace')}"


class CLibrary:
    """A C source built and loaded on first :meth:`get` (once per process), with the ctypes
    ``signatures`` (``{function: (argtypes, restype)}``) set; ``get()`` is None and ``error``
    says why when it cannot be built."""

    def __init__(self, src: Path, name: str, flags: list[str],
                 signatures: dict[str, tuple[list[Any], Any]]) -> None:
        self.src, self.name, self.flags, self.signatures = src, name, flags, signatures
        self.error: str | None = None
        self._lib: ctypes.CDLL | None = None

    def get(self) -> ctypes.CDLL | None:
        if self._lib is None and self.error is None:
            lib, self.error = build(self.src, self.name, self.flags)
            if lib is not None:
                for fn, (argtypes, restype) in self.signatures.items():
                    getattr(lib, fn).argtypes = argtypes
                    getattr(lib, fn).restype = restype
            self._lib = lib
        return self._lib
