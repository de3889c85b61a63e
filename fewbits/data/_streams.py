"""Read a possibly gzip-compressed file as a stream with a bound on what it decompresses to.

A few megabytes of gzip can decompress to gigabytes (one member at ratio ~1000, or many
members concatenated: ``gzip`` reads them all, and the size field at the end describes only
the last one). :func:`open_bounded` decompresses every member as a stream and raises
:class:`OutputLimitError` as soon as the output passes the bound, so a bomb costs at most
the bound in time and one buffer in memory (the caller decides what it keeps).

    >>> import gzip, os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "x.gz")
    >>> with open(p, "wb") as f:
    ...     _ = f.write(gzip.compress(b"a" * 10) + gzip.compress(b"b" * 10))
    >>> with open_bounded(p, 20) as f:
    ...     f.read()
    b'aaaaaaaaaabbbbbbbbbb'
    >>> with open_bounded(p, 15) as f:
    ...     f.read()
    Traceback (most recent call last):
    ...
    fewbits.data._streams.OutputLimitError: ... decompresses to more than 15 bytes ...
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from .errors import CorruptDataError

__all__ = ["OutputLimitError", "is_gzip", "open_bounded"]

_BUFFER = 1 << 20


class OutputLimitError(CorruptDataError):
    """A file decompresses (or reads) to more bytes than its reader allows."""


def is_gzip(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class _Limited(io.RawIOBase):
    def __init__(self, f: BinaryIO, limit: int, what: str) -> None:
        self._f, self._limit, self._what, self.total = f, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self._f.readinto(b)
        self.total += n
        if self.total > self._limit:
            raise OutputLimitError(f"{self._what} decompresses to more than {self._limit:,} "
                                   "bytes (a decompression bomb, or not the file expected)")
        return n

    def readall(self) -> bytes:
        parts = []
        while chunk := self._f.read(_BUFFER):
            self.total += len(chunk)
            if self.total > self._limit:
                raise OutputLimitError(f"{self._what} decompresses to more than "
                                       f"{self._limit:,} bytes (a decompression bomb, or not "
                                       "the file expected)")
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            super().close()


@contextmanager
def open_bounded(path: str | os.PathLike, limit: int) -> Iterator[BinaryIO]:
    """A buffered binary stream of ``path``'s content, gunzipped (all members) when it starts
    with the gzip magic; reading past ``limit`` bytes of content raises
    :class:`OutputLimitError` naming the file."""
    raw = open(path, "rb")
    try:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        inner: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore
        with io.BufferedReader(_Limited(inner, limit, os.fspath(path)), _BUFFER) as f:
            yield f  # type: ignore[misc]
    finally:
        raw.close()
