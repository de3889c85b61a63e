"""Download a file atomically and check its MD5.

``download_url(url, dest, md5)`` streams ``url`` into a temporary file next to ``dest``, checks
the MD5 of what arrived, and only then renames it to ``dest`` (``os.replace``), so ``dest`` is
either absent or complete and verified, never half-written.

Example:
    >>> from fewbits.data.download import file_md5
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"
    >>> _ = p.write_bytes(b"abc")
    >>> file_md5(p)
    '900150983cd24fb0d6963f7d28e17f72'
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import WriteError, atomic_write
from .errors import ChecksumError, DatasetNotFoundError

__all__ = ["check_md5", "download_first", "download_url", "file_md5"]

_log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def _urlopen(url: str, timeout: float):
    """The one place that touches the network (tests monkeypatch it)."""
    return urllib.request.urlopen(url, timeout=timeout)


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(
    path: str | os.PathLike, expected: str, actual: str, url: str | None
) -> ChecksumError:
    src = f" (downloaded from {url})" if url else ""
    again = f"download it again from {url}" if url else "download it again"
    return ChecksumError(
        f"MD5 mismatch for {os.fspath(path)}{src}: expected {expected}, got {actual}. "
        f"The file is truncated, corrupted or not the official one; delete it and {again}."
    )


def check_md5(path: str | os.PathLike, expected: str, *, url: str | None = None) -> None:
    """Raise :class:`ChecksumError` unless ``md5(path) == expected``.

    The message names the file, both hashes, and what to do about it.
    """
    actual = file_md5(path)
    if actual != expected.lower():
        raise _mismatch(path, expected.lower(), actual, url)


def download_url(
    url: str, dest: str | os.PathLike, md5: str | None = None, *, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``md5`` before the rename.

    On a checksum mismatch the temporary file is deleted, ``dest`` is left untouched and
    :class:`ChecksumError` is raised. Network errors propagate as ``urllib.error.URLError`` /
    ``OSError``.
    """
    dest = Path(dest)
    _log.info("downloading %s -> %s", url, dest)

    def fetch(out: Any) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with _urlopen(url, timeout) as resp:
            while chunk := resp.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        # Checked before the rename: a wrong file never replaces dest. Name dest, not the temp.
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise _mismatch(dest, md5.lower(), digest.hexdigest(), url)

    atomic_write(dest, fetch, parents=True, mode=0o644)  # a dataset file is not a secret
    return dest


def download_first(
    urls: Sequence[str], dest: str | os.PathLike, md5: str | None = None, *, timeout: float = 60.0
) -> Path:
    """Try each mirror in ``urls`` in turn until one gives a file with the right MD5.

    Raises :class:`ChecksumError` if some mirror answered but every answer had the wrong hash,
    else :class:`DatasetNotFoundError` (all mirrors unreachable) listing the URLs and errors.
    """
    errors: list[str] = []
    mismatch: ChecksumError | None = None
    for url in urls:
        try:
            return download_url(url, dest, md5, timeout=timeout)
        except WriteError:
            raise  # our disk, not the mirror: another mirror would fail the same way
        except ChecksumError as e:
            mismatch = e
            errors.append(f"{url}: {e}")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            errors.append(f"{url}: {e}")
    if mismatch is not None:
        raise mismatch
    raise DatasetNotFoundError(
        f"could not download {Path(dest).name} to {os.fspath(dest)}; tried:\n  "
        + "\n  ".join(errors)
    )
