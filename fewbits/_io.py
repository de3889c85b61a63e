"""The one way fewbits writes a file: atomically, durably, and with errors that name the path.

Every file fewbits writes (checkpoints, model files, ``.fewbits`` exports, ONNX graphs, monitor
series, plots, image caches, downloads, compiled kernels) goes through :func:`atomic_write`:

1. the data goes to a temporary file in the target's folder, named
   ``.fewbits-tmp.<host>.<pid>.<random>.<target name>`` (:data:`TEMP_PREFIX`; the target name
   cut short so that the whole fits the 255 bytes a file name may have);
2. the temporary file is flushed and ``fsync``-ed, then renamed over the target
   (``os.replace``, atomic on POSIX and Windows), then the folder is ``fsync``-ed so that the
   rename itself survives a power cut.

A reader, or a crash at any moment, sees the old file or the complete new one, never a mix.

What is refused, with :class:`WriteError` (an ``OSError``) naming the *target*, never the
temporary name:

* a missing folder (unless ``parents=True``), a folder path that runs through a regular file;
* a target that is a folder, or anything else that is not a regular file (a device such as
  ``/dev/full``, a FIFO, a socket): fewbits never replaces it;
* a read-only or full file system, a permission problem, a file system without room.

A **symbolic link** as the target is followed: the file it points to is replaced (atomically,
in the link target's folder) and the link stays a link. A dangling link's target is created.

Temporary files of a write that was killed (``kill -9``, power loss) are removed by the next
write into the same folder: those of a process of this host that no longer runs, and any older
than :data:`STALE_SECONDS`.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> atomic_write(os.path.join(d, "a.txt"), b"hello")
    >>> open(os.path.join(d, "a.txt"), "rb").read()
    b'hello'
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["NAME_MAX", "STALE_SECONDS", "TEMP_PREFIX", "WriteError", "append_text", "atomic_write",
           "clean_stale_temps", "ensure_folder", "fsync_dir", "silence_stdout", "temp_dir"]

TEMP_PREFIX = ".fewbits-tmp."
#: A temporary file older than this is stale whatever process made it (a day).
STALE_SECONDS = 24 * 3600
#: The longest file name (bytes) most file systems take (ext4, XFS, btrfs, APFS, NTFS).
NAME_MAX = 255
_HOST = socket.gethostname().replace(".", "_")[:32] or "host"


class WriteError(OSError):
    """A file could not be written; ``str(err)`` names the target path and the cause
    (``err.errno`` is the system's code, e.g. ``errno.ENOSPC``)."""

    def __str__(self) -> str:
        return str(self.strerror)


def fsync_dir(directory: str | os.PathLike) -> None:
    """``fsync`` a folder so that a rename inside it is durable (a no-op where a folder cannot
    be opened, as on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or we cannot tell: keep its file)
    return True


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files left in ``directory`` by interrupted writes; returns them.

    A temporary file is stale when its process (same host) no longer runs, or when it is older
    than :data:`STALE_SECONDS`. Files of live writers are left alone.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        if not e.name.startswith(TEMP_PREFIX):
            continue
        parts = e.name[len(TEMP_PREFIX):].split(".", 3)
        try:
            if e.is_symlink():
                continue
            old = now - e.stat(follow_symlinks=False).st_mtime > STALE_SECONDS
            dead = (len(parts) == 4 and parts[0] == _HOST and parts[1].isdigit()
                    and int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1])))
            if old or dead:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            continue
    return removed


def _fit(prefix: str, name: str, reserve: int = 0) -> str:
    """``prefix + name``, ``name`` cut (at a character boundary) so that the result, plus
    ``reserve`` bytes, fits :data:`NAME_MAX` bytes: a legal 240-byte target name still gets a
    legal temporary name."""
    room = NAME_MAX - reserve - len(os.fsencode(prefix))
    while name and len(os.fsencode(name)) > room:  # a few hundred steps at most
        name = name[:-1]
    return prefix + name


def temp_dir(folder: str | os.PathLike, name: str) -> tempfile.TemporaryDirectory:
    """A private temporary folder in ``folder`` for building ``name`` (removed on exit, and by
    :func:`clean_stale_temps` if its process is killed)."""
    prefix = f"{TEMP_PREFIX}{_HOST}.{os.getpid()}."
    # tempfile puts 8 random characters between prefix and suffix
    suffix = _fit("", f".{name}", reserve=len(os.fsencode(prefix)) + 8)
    return tempfile.TemporaryDirectory(dir=folder, prefix=prefix, suffix=suffix)


def _explain(err: OSError, target: Path, what: str) -> WriteError:
    """A :class:`WriteError` for ``err`` that names ``target`` (not a temporary name)."""
    code = err.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        why = "no space left on the device (free some space or write elsewhere)"
    elif code == errno.EROFS:
        why = "the file system is read-only (write elsewhere)"
    elif code in (errno.EACCES, errno.EPERM):
        why = "permission denied (check the folder's permissions or write elsewhere)"
    elif code == errno.ENOENT:
        why = f"the folder {target.parent} does not exist (create it first)"
    elif code == errno.ENOTDIR:
        why = f"a part of the folder path {target.parent} is a file, not a folder"
    elif code == errno.EISDIR:
        why = "it is a folder (give a file name)"
    else:
        why = err.strerror or str(err)
    out = WriteError(code or errno.EIO, f"cannot {what} {target}: {why}")
    out.filename = os.fspath(target)
    return out


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _resolve_target(path: Path) -> Path:
    """Follow a symbolic link to the file it names; refuse a target that is not a regular
    file (or absent)."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    except NotADirectoryError:
        raise WriteError(errno.ENOTDIR, f"cannot write {path}: a part of the folder path "
                         f"{path.parent} is a file, not a folder") from None
    except OSError as e:
        raise _explain(e, path, "write") from None
    if not stat.S_ISREG(st.st_mode):
        shown = path if target == path else f"{path} (-> {target})"
        advice = "give a file name inside it" if stat.S_ISDIR(st.st_mode) else \
            "fewbits replaces only regular files; give another path"
        raise WriteError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                         f"cannot write {shown}: it is {_kind(st.st_mode)}; {advice}")
    return target


def _prepare_folder(folder: Path, path: Path, parents: bool) -> None:
    if folder.is_dir():
        return
    if folder.exists() or any(p.exists() and not p.is_dir() for p in folder.parents):
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()),
                       folder)
        raise WriteError(errno.ENOTDIR, f"cannot write {path}: {blocker} is a file, not a "
                         "folder (give a folder path, or remove that file)")
    if not parents:
        raise WriteError(errno.ENOENT, f"cannot write {path}: the folder {folder} does not "
                         "exist (create it first)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _explain(e, path, "create the folder for") from None


def _guard(op: Callable[[], object], path: Path) -> object:
    try:
        return op()
    except WriteError:
        raise
    except OSError as e:
        raise _explain(e, path, "write") from e


class _Guarded:
    """The temporary file as a writer sees it: write errors name the target path."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self._f, self._path = f, path

    def write(self, b: bytes) -> int:
        return _guard(lambda: self._f.write(b), self._path)  # type: ignore[return-value]

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) if missing; :class:`WriteError` naming it when a
    file stands in the way or the file system refuses."""
    folder = Path(folder)
    probe = folder / "x"
    _prepare_folder(folder, probe, parents=True)
    return folder


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (series files grow a line at a time; not atomic by design).
    Errors are :class:`WriteError` naming ``path``."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise _explain(e, path, "append to") from None


def _file_mode(mode: int | None) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o666 if mode is None else mode) & ~mask


def atomic_write(path: str | os.PathLike, data: bytes | bytearray | memoryview
                 | Callable[[BinaryIO], None], *, parents: bool = False,
                 mode: int | None = None) -> None:
    """Write ``data`` (bytes, or a function that writes to a binary file) to ``path``
    atomically and durably; see the module docstring for what is refused.

    Args:
        path: the target file. A symbolic link is followed (the link stays).
        data: the bytes, or ``write(f)`` streaming into the open temporary file.
        parents: create missing folders (else a missing folder is a :class:`WriteError`).
        mode: permission bits before the umask (default ``0o666``, as ``open()``).

    Raises :class:`WriteError` naming ``path``; a failure leaves the old file untouched and no
    temporary file behind. Exceptions raised by ``data(f)`` propagate unchanged.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise WriteError(errno.EISDIR, f"cannot write {path}: it names a folder, not a file")
    _prepare_folder(path.parent if str(path.parent) else Path("."), path, parents)
    target = _resolve_target(path)
    folder = target.parent
    clean_stale_temps(folder)
    tmp = folder / _fit(f"{TEMP_PREFIX}{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.",
                        target.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     _file_mode(mode))
    except OSError as e:
        raise _explain(e, path, "write") from None
    try:
        f = os.fdopen(fd, "wb")
        try:
            if callable(data):
                data(_Guarded(f, path))
            else:
                _guard(lambda: f.write(data), path)
            _guard(f.flush, path)
            _guard(lambda: os.fsync(f.fileno()), path)
        finally:
            try:
                f.close()
            except OSError:
                pass  # a failed flush was reported above; the temporary file goes anyway
        _guard(lambda: os.replace(tmp, target), path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def silence_stdout() -> None:
    """Point stdout at the null device (after a reader closed the pipe, ``fewbits list |
    head``) so that Python's final flush does not raise ``BrokenPipeError`` again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
