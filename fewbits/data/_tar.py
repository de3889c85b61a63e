"""Read the regular files of a (gzipped) tar archive quickly, without extracting it.

``tarfile`` spends ~30 us of Python per member (TarInfo parsing, a file object per member),
which is most of the time for an archive of 60k tiny JPEGs. For archives that fit in memory we
decompress the whole stream at once (C speed) and walk the 512-byte ustar headers ourselves;
anything unusual (bad checksum, base-256 sizes, sparse files) falls back to ``tarfile``.

Understood: ustar/GNU/v7 headers, the ustar ``prefix`` field, GNU long names (``L``), pax
extended headers (``x``: ``path`` and ``size``; ``g`` global headers are skipped).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from ._streams import OutputLimitError, is_gzip, open_bounded

__all__ = ["MAX_MEMBER_BYTES", "MAX_RATIO", "MIN_OUTPUT", "iter_tar_files", "output_limit"]

_BLOCK = 512
_IN_MEMORY_LIMIT = 2 << 30  # bigger archives are streamed by tarfile instead
#: A gzip archive may decompress to at most this many times its size (a tar of JPEG/PNG files
#: compresses about 1.1-4x, the tar headers being most of what compresses; a bomb ~1000x) ...
MAX_RATIO = 20
#: ... or to this many bytes, whichever is more.
MIN_OUTPUT = 64 << 20
#: Largest member (image file) read.
MAX_MEMBER_BYTES = 256 << 20
_REGULAR = (b"0", b"\0", b"7")


class _Unsupported(Exception):
    """The fast parser met a feature it does not handle: use tarfile."""


def iter_tar_files(path: str | os.PathLike,
                   max_member: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes]]:
    """Yield ``(member name, content)`` for each regular file of a ``.tar`` / ``.tar.gz``.

    What the archive decompresses to is bounded (:func:`output_limit`: a decompression bomb,
    one gzip member or many, is refused as soon as it passes the bound) and so is each member
    (``max_member`` bytes, checked on the header before the member is read).

    Raises ``tarfile.TarError`` / ``OSError`` / ``EOFError`` / ``zlib.error`` for broken
    archives, :class:`~fewbits.data._streams.OutputLimitError` (a ``CorruptDataError``) for
    one past a bound.
    """
    path = Path(path)
    raw = _read_whole(path)
    if raw is not None:
        try:
            members = _parse(raw)
        except _Unsupported:
            members = None
        if members is not None:
            for name, off, size in members:
                _check_member(path, name, size, max_member)
                yield name, raw[off : off + size]
            return
    with open_bounded(path, output_limit(path)) as stream, \
            tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as tf:
        for m in tf:
            if m.isfile():
                _check_member(path, m.name, m.size, max_member)
                f = tf.extractfile(m)
                assert f is not None  # regular file member
                yield m.name, f.read()


def output_limit(path: str | os.PathLike) -> int:
    """Most bytes the archive ``path`` may decompress to: a gzip file at most
    :data:`MAX_RATIO` times its size (at least :data:`MIN_OUTPUT`); a plain tar its size."""
    size = os.stat(path).st_size
    return max(MIN_OUTPUT, MAX_RATIO * size) if is_gzip(path) else size


def _check_member(path: Path, name: str, size: int, most: int) -> None:
    if size > most:
        raise OutputLimitError(f"{path}: member {name[:200]!r} is {size:,} bytes, over the "
                               f"{most:,} bytes an image file may have")


def _read_whole(path: Path) -> bytes | None:
    """The decompressed archive, or None when it is too big to hold in memory."""
    size = path.stat().st_size
    gz = is_gzip(path)
    if not gz:
        if path.name.lower().endswith((".gz", ".tgz")):
            with open(path, "rb") as f:
                start = f.read(8)
            raise tarfile.ReadError(f"{path} is named like a gzip file but is not gzip-compressed "
                                    f"(it starts with {start!r}); pass a .tar.gz made with "
                                    "`tar czf`, or rename a plain tar archive to .tar")
        if 0 < size < _BLOCK:
            raise tarfile.ReadError(f"{path} is {size} bytes, too short to be a tar archive")
    if not gz:
        if size > _IN_MEMORY_LIMIT:
            return None
        with open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") > _IN_MEMORY_LIMIT:
            return None  # the last member's size (mod 2**32): a hint only, never a bound
    limit = output_limit(path)
    try:
        with open_bounded(path, min(limit, _IN_MEMORY_LIMIT)) as f:
            return f.read()
    except OutputLimitError:
        if limit <= _IN_MEMORY_LIMIT:
            raise
        return None  # too big to hold, within its bound: streamed (and bounded) by tarfile


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        raise _Unsupported("base-256 number")
    s = field.split(b"\0", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        raise _Unsupported(f"bad octal field {field!r}") from None


def _str(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """Records ``"<len> <key>=<value>\\n"``."""
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise _Unsupported("bad pax record") from None
        if length <= 0:
            raise _Unsupported("bad pax record length")
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _parse(raw: bytes) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file, in archive order."""
    out = []
    pos, n = 0, len(raw)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while pos + _BLOCK <= n:
        hdr = raw[pos : pos + _BLOCK]
        if hdr.count(0) == _BLOCK:  # end-of-archive marker
            break
        chksum = _octal(hdr[148:156])
        # The checksum counts its own field as 8 spaces; sum() over bytes runs in C.
        if sum(hdr) - sum(hdr[148:156]) + 256 != chksum:
            raise _Unsupported("header checksum mismatch")
        typeflag = hdr[156:157]
        size = _octal(hdr[124:136])
        data = pos + _BLOCK
        end = data + size
        if end > n:
            raise tarfile.ReadError(
                f"truncated archive: member at byte {pos} needs {size} bytes, {n - data} left"
            )
        if typeflag == b"L":
            long_name = _str(raw[data:end])
        elif typeflag == b"x":
            pax = _pax(raw[data:end])
        elif typeflag in (b"g", b"K"):
            pass  # global pax header / GNU long link name: nothing we need
        elif typeflag == b"S":
            raise _Unsupported("sparse member")
        else:
            name = _str(hdr[0:100])
            if hdr[257:262] == b"ustar" and hdr[345:346] != b"\0":
                name = _str(hdr[345:500]) + "/" + name
            if long_name is not None:
                name = long_name
            if "path" in pax:
                name = pax["path"]
            if "size" in pax:
                if not pax["size"].isdigit() or len(pax["size"]) > 20:
                    raise _Unsupported("bad pax size")
                size = int(pax["size"])
                end = data + size
                if end > n:
                    raise tarfile.ReadError(f"truncated archive at member {name}")
            if typeflag in _REGULAR and not name.endswith("/"):
                out.append((name, data, size))
            long_name, pax = None, {}
        pos = data + -(-size // _BLOCK) * _BLOCK
    return out
