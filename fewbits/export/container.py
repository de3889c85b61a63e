"""The versioned ``.fewbits`` container (byte layout in ``docs/FORMAT.md``).

::

    offset        size  field
    0             8     magic b"FEWBITS\\0"
    8             2     format version, u16 little-endian (writes 2; reads 1 and 2)
    10            2     flags, u16 LE (bit 0: the header is zlib-compressed; others must be 0)
    12            4     header length H, u32 LE
    16            8     payload length P, u64 LE
    24            H     header: UTF-8 JSON object, padded to a multiple of 8 bytes (spaces;
                        zero bytes after a compressed header)
    24+H          P     payload: the tensor blobs in table order, zero gaps
    24+H+P        32    SHA-256 of bytes [0, 24+H+P)

The header is JSON with sorted keys and no insignificant whitespace (before the padding), so
the same header and blobs always give the same bytes. It is an object with a ``"tensors"``
list, one entry per blob. Format version 2 stores no offsets: blob ``k``'s length follows from
its entry (``encoding``, ``shape``, ``bits``, ``bit_count``; an entry without ``encoding``, an
opaque blob, stores its ``length``) and it starts at blob ``k-1``'s end rounded up to its
alignment: the item size for ``raw-<dtype>`` (so it can be viewed in place), 1 for code
streams (``packed``, ``trits``, ``huffman``), 8 for opaque blobs. Version 1 (still read) stored
``offset``/``length`` in every entry, each blob 8-byte aligned: about 6 bytes a tensor of a
compressed header, and up to 7 of padding. :func:`loads` returns the entries with ``offset``
and ``length`` filled in whatever the version; the writer ignores the caller's (and fills in
``"fewbits_version"`` when missing); every other key (model name and kwargs, per-tensor kind,
encoding, shape, params) is the caller's, stored verbatim. Codes ``[2, 0, 1, 1, 2, 1]`` as
trits and a float32 ``1.0``, in a ``{"tensors": [...]}`` header::

    payload +0  c8 01          "w": trits, ceil(6 / 5) = 2 bytes
    payload +2  00 00          zero gap: float32 starts at a multiple of 4
    payload +4  00 00 80 3f    "s": raw-float32 1.0;  P = 8

>>> w_fields, w_blob = encode_tensor(np.array([2, 0, 1, 1, 2, 1]), "trits", bits=2)
>>> s_fields, s_blob = encode_tensor(np.array([1.0], np.float32), "raw-float32")
>>> data = dumps({"tensors": [{"name": "w", **w_fields}, {"name": "s", **s_fields}]},
...              {"w": w_blob, "s": s_blob})
>>> h, blobs = loads(data)
>>> data[8], data[-40:-32].hex(" "), [(e["offset"], e["length"]) for e in h["tensors"]]
(2, 'c8 01 00 00 00 00 80 3f', [(0, 2), (4, 4)])

:func:`encode_tensor` / :func:`decode_tensor` turn arrays into blobs with the encodings of the
format: ``packed`` (fixed-width codes), ``huffman`` (canonical Huffman codes) and
``raw-<dtype>`` (little-endian ``float16``/``float32``/``float64``/``(u)int8..64``/``bool``).

>>> fields, blob = encode_tensor(np.array([[1, 0], [0, 1]]), "packed", bits=1)
>>> header = {"tensors": [{"name": "w", **fields}]}
>>> h, blobs = loads(dumps(header, {"w": blob}))
>>> decode_tensor(h["tensors"][0], blobs["w"]).tolist()
[[1, 0], [0, 1]]
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .._io import atomic_write
from .._version import __version__
from ._limits import (
    ENCODINGS,
    FLAG_HEADER_ZLIB,
    HUFFMAN_MAX_BITS,
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    MAX_NDIM,
    MAX_TENSORS,
    blob_alignment,
    derived_spans,
    few,
    header_text,
    json_depth,
    repeated,
    tensor_count,
    tensor_spans,
)
from .huffman import MAX_CODE_LENGTH, huffman_decode, huffman_encode
from .packing import MAX_BITS, pack_bits, pack_trits, unpack_bits, unpack_trits

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_NDIM",
    "MAX_TENSORS",
    "MODEL_FORMAT",
    "FormatError",
    "decode_tensor",
    "dumps",
    "encode_tensor",
    "is_packed_file",
    "loads",
    "read_container",
    "read_model_file",
    "tensor_count",
    "write_container",
]

#: The header's ``format`` of a packed model (``fewbits.export.packed``).
MODEL_FORMAT = "fewbits-model"

MAGIC = b"FEWBITS\0"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
ALIGN = 8
_PREFIX = struct.Struct("<8sHHIQ")  # magic, version, flags, header length, payload length
_DIGEST = 32
#: Flags this reader knows. Bit 0 (FLAG_HEADER_ZLIB): the header is zlib-compressed JSON (a
#: model's tensor table repeats its keys hundreds of times; compressed it stops dominating the
#: file of a 1-bit network).
_KNOWN_FLAGS = FLAG_HEADER_ZLIB


class FormatError(ValueError):
    """A ``.fewbits`` file (or buffer) that this fewbits cannot read.

    ``str(err)`` reads ``"<source>: <problem>; <what to do>"``; ``err.source`` and
    ``err.problem`` hold the parts.
    """

    def __init__(self, source: str, problem: str, advice: str = "") -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}" + (f"; {advice}" if advice else ""))


def _json_bytes(obj: Any) -> bytes:
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"header is not JSON-serialisable ({err}); use plain dicts, lists, str, int, "
            "finite floats, bool and None (convert tensors with .tolist())"
        ) from None
    return text.encode("utf-8")


def _pad(n: int) -> int:
    return -n % ALIGN


def _layout(
    header: Mapping, blobs: Mapping[str, Any], compress_header: bool = False
) -> tuple[bytes, list, int]:
    """Validate ``header``/``blobs``; return ``(prefix + header, [(offset, blob)], P)``."""
    if not isinstance(header, Mapping):
        raise ValueError(f"header must be a dict, got {type(header).__name__}")
    full = copy.deepcopy(dict(header))
    full.setdefault("fewbits_version", __version__)
    entries = full.get("tensors", [])
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ValueError('header["tensors"] must be a list of dicts, one per blob')
    names = [e.get("name") for e in entries]
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ValueError(f'every header["tensors"] entry needs a non-empty str "name", got {bad}')
    dupes = repeated(names)  # linear time: 10,000 layers are not 10**8 comparisons
    if dupes:
        raise ValueError(f"duplicate tensor names in header: {few(dupes)}")
    known = set(names)
    missing = [n for n in names if n not in blobs]
    extra = [n for n in blobs if n not in known]
    if missing or extra:
        raise ValueError(
            f"header tensors and blobs must match one to one: no blob for {few(missing)}, "
            f"no header entry for {few(extra)}"
        )
    placed, table, offset = [], [], 0
    for entry in entries:  # format 2: offsets and lengths follow from the entries
        view = memoryview(blobs[entry["name"]]).cast("B")
        stored = {k: v for k, v in entry.items() if k not in ("offset", "length")}
        if "encoding" not in stored:  # an opaque blob: its length is the one stored field
            stored["length"] = view.nbytes
        offset += -offset % blob_alignment(stored)
        table.append(stored)
        placed.append((offset, view))
        offset += view.nbytes
    payload_length = offset
    full["tensors"] = table
    text = _json_bytes(full)
    flags = 0
    if compress_header:
        text, flags = zlib.compress(text, 9), FLAG_HEADER_ZLIB
    text += (b"\0" if compress_header else b" ") * _pad(_PREFIX.size + len(text))
    if len(text) >= 1 << 32:
        raise ValueError(f"header is {len(text)} bytes; the format allows < 4 GiB")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, flags, len(text), payload_length)
    return prefix + text, placed, payload_length


def _chunks(head: bytes, placed: list[tuple[int, memoryview]]) -> Iterable[bytes | memoryview]:
    """The file body in order: prefix and header, then each blob after its zero padding."""
    yield head
    written = 0
    for offset, view in placed:
        if offset > written:
            yield bytes(offset - written)
        yield view
        written = offset + view.nbytes


def dumps(header: Mapping, blobs: Mapping[str, bytes], *, compress_header: bool = False) -> bytes:
    """Serialise to the bytes of a ``.fewbits`` file (see :func:`write_container`)."""
    head, views, _ = _layout(header, blobs, compress_header)
    digest = hashlib.sha256()
    parts = []
    for chunk in _chunks(head, views):
        digest.update(chunk)
        parts.append(chunk)
    parts.append(digest.digest())
    return b"".join(parts)


def write_container(
    path: str | os.PathLike,
    header: Mapping,
    blobs: Mapping[str, bytes],
    *,
    compress_header: bool = False,
) -> dict:
    """Write ``header`` and ``blobs`` (name -> bytes-like) to ``path`` atomically.

    ``header["tensors"]`` lists one dict per blob with at least ``"name"``; the payload holds
    the blobs in that order. Returns the header as written (with ``offset``/``length`` per
    tensor and ``fewbits_version``). The file is streamed to a temporary file in the same
    directory, fsync-ed and renamed over ``path`` (:func:`fewbits._io.atomic_write`): a failure
    leaves any old file untouched and no temporary file behind; :class:`fewbits._io.WriteError`
    names ``path`` (missing folder, a folder or device as target, read-only or full disk).
    Raises ValueError for a header/blobs mismatch or a header that
    is not JSON-serialisable. ``compress_header`` stores the JSON zlib-compressed (flag bit 0).
    """
    head, views, _ = _layout(header, blobs, compress_header)
    written = _readable(head, views, path)  # every reader check first: a good file is
    #                                          never replaced by one that would be refused

    def write(f: Any) -> None:
        digest = hashlib.sha256()
        for chunk in _chunks(head, views):
            digest.update(chunk)
            f.write(chunk)
        f.write(digest.digest())

    atomic_write(path, write)
    return written


def _readable(head: bytes, placed: list[tuple[int, memoryview]], path: Any) -> dict:
    """The header as :func:`loads` will parse it, after the reader's checks on it (size,
    nesting, tensor count, each tensor's fields against its bytes); ValueError naming
    ``path`` and saying nothing was written otherwise."""
    try:
        text = header_text(head[_PREFIX.size :], _PREFIX.unpack_from(head)[2])
        depth = json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"header JSON is nested {depth} levels deep, beyond the format's "
                             f"limit of {MAX_JSON_DEPTH}")
        written = json.loads(text)
        table = written.get("tensors", [])
        if len(table) > MAX_TENSORS:
            raise ValueError(f"{len(table)} tensors, beyond the format's limit of {MAX_TENSORS}")
        for entry, (_, view) in zip(table, placed, strict=True):  # each entry, its blob
            if "encoding" in entry:
                tensor_count(entry, view.nbytes, view)
        spans = derived_spans(table, _PREFIX.unpack_from(head)[4])
        for entry, span in zip(table, spans, strict=True):
            entry["offset"], entry["length"] = span  # as loads() returns the table
    except ValueError as err:
        raise ValueError(f"cannot write {os.fspath(path)}: {err}; fewbits would refuse to "
                         "read such a file, so nothing was written (an existing file is "
                         "kept)") from None
    return written


def read_container(path: str | os.PathLike) -> tuple[dict, dict[str, bytes]]:
    """Read a ``.fewbits`` file: ``(header, {name: blob bytes})``; see :func:`loads`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return loads(data, source=path)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):  # linear: a 330,000-key object is refused at once
        raise ValueError(f"duplicate keys {few(repeated(k for k, _ in pairs))}")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def loads(data: bytes, source: str = "<bytes>") -> tuple[dict, dict[str, bytes]]:
    """Parse the bytes of a ``.fewbits`` file: ``(header, {name: blob bytes})``.

    Checks, in order: magic, format version, flags, that the file is as long as its lengths
    say, the SHA-256, the header JSON and the tensor table. Each failure raises
    :class:`FormatError` naming ``source`` (the path for :func:`read_container`).
    """
    view = memoryview(data).cast("B")
    size = view.nbytes
    fixed = _PREFIX.size + _DIGEST
    if size == 0:
        raise FormatError(source, "empty file (0 bytes), not a .fewbits file", "check the path")
    if bytes(view[: len(MAGIC)]) != MAGIC[: min(size, len(MAGIC))]:
        raise FormatError(
            source,
            f"not a .fewbits file (starts with {bytes(view[:8])!r}, expected {MAGIC!r})",
            "check the path; .fewbits files are written by fewbits' exporter",
        )
    if size < _PREFIX.size:
        raise FormatError(
            source,
            f"file is truncated: {size} bytes, shorter than the {_PREFIX.size}-byte fixed header",
            "the file is incomplete; copy or export it again",
        )
    _, version, flags, header_length, payload_length = _PREFIX.unpack_from(view)
    if version not in SUPPORTED_VERSIONS:
        newer = version > max(SUPPORTED_VERSIONS)
        raise FormatError(
            source,
            f"format version {version} is {'newer than' if newer else 'not one of'} the "
            f"versions this fewbits reads ({', '.join(map(str, SUPPORTED_VERSIONS))})",
            "upgrade fewbits to read it" if newer else "the file is corrupt or not from fewbits",
        )
    if flags & ~_KNOWN_FLAGS:
        raise FormatError(
            source,
            f"unknown flags 0x{flags:04x} (format version {version} defines 0x{_KNOWN_FLAGS:04x})",
            "the file needs a newer fewbits, or is corrupt",
        )
    expected = fixed + header_length + payload_length
    if size != expected:
        problem = "file is truncated" if size < expected else "file has trailing bytes"
        raise FormatError(
            source,
            f"{problem}: expected {expected} bytes (header {header_length}, payload "
            f"{payload_length}), found {size}",
            "the file is incomplete or was appended to; copy or export it again",
        )
    body = view[: size - _DIGEST]
    if hashlib.sha256(body).digest() != bytes(view[size - _DIGEST :]):
        raise FormatError(
            source,
            "SHA-256 checksum mismatch: the file is corrupt or was modified",
            "export it again or restore a good copy",
        )
    header_bytes = bytes(view[_PREFIX.size : _PREFIX.size + header_length])
    try:
        text = header_text(header_bytes, flags)
    except (ValueError, zlib.error) as err:
        raise FormatError(source, f"header: {err}", "the file was not written by fewbits") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise FormatError(source, f"header JSON is nested {depth} levels deep, beyond the "
                          f"format's limit of {MAX_JSON_DEPTH}", "the file was not written by "
                          "fewbits")
    try:
        header = json.loads(
            text.decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise FormatError(
            source, f"header is not valid UTF-8 JSON ({err})", "the file was not written by fewbits"
        ) from None
    if not isinstance(header, dict):
        raise FormatError(source, f"header is a JSON {type(header).__name__}, expected an object")
    payload_start = _PREFIX.size + header_length
    blobs = {}
    payload = view[payload_start : payload_start + payload_length]
    try:
        spans = tensor_spans(header, payload, version)
    except ValueError as err:
        raise FormatError(source, str(err), "the tensor table is inconsistent: the file is "
                          "corrupt or was not written by fewbits") from None
    for name, offset, length in spans:
        start = payload_start + offset
        blobs[name] = bytes(view[start : start + length])
    return header, blobs


# ---------------------------------------------------------------------------- tensor codecs


def encode_tensor(
    array: np.ndarray, encoding: str, *, bits: int | None = None
) -> tuple[dict, bytes]:
    """Encode ``array`` as one blob: ``(fields, blob)``.

    ``fields`` (``encoding``, ``shape``, and ``bits``/``bit_count`` where they apply) go into
    the tensor's header entry next to the caller's ``name``/``kind``/``params``;
    :func:`decode_tensor` needs exactly them.

    * ``packed``: unsigned integer codes, ``bits`` in 1..32, blob = ``pack_bits``.
    * ``huffman``: codes in ``[0, 2**bits)``, ``bits`` in 1..16; blob = the ``2**bits``-byte
      length table followed by the payload; ``bit_count`` is recorded.
    * ``trits``: codes in ``0..2`` (``bits`` 2), five a byte, base 3 (``pack_trits``).
    * ``raw-<dtype>``: the array cast to ``<dtype>``, little-endian, C order.

    >>> encode_tensor(np.array([0.5], np.float32), "raw-float16")
    ({'encoding': 'raw-float16', 'shape': [1]}, b'\\x008')
    """
    arr = np.asarray(array)
    shape = [int(d) for d in arr.shape]
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {list(ENCODINGS)}")
    if encoding.startswith("raw-"):
        if bits is not None:
            raise ValueError(f"bits does not apply to {encoding!r}")
        dtype = np.dtype(encoding[4:]).newbyteorder("<")
        if arr.dtype.kind == "f" and dtype.kind != "f":
            raise ValueError(f"refusing to cast float array to {encoding!r}; round it first")
        return {"encoding": encoding, "shape": shape}, np.ascontiguousarray(arr, dtype).tobytes()
    if encoding == "trits":
        if bits != 2:
            raise ValueError(f"'trits' holds 2-bit codes 0..2, got bits={bits!r}")
        return {"encoding": encoding, "shape": shape, "bits": 2}, pack_trits(arr)
    limit = MAX_BITS if encoding == "packed" else HUFFMAN_MAX_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= limit:
        raise ValueError(f"{encoding!r} needs bits in 1..{limit}, got {bits!r}")
    if encoding == "packed":
        return {"encoding": encoding, "shape": shape, "bits": bits}, pack_bits(arr, bits)
    table, payload, bit_count = huffman_encode(arr, 1 << bits, MAX_CODE_LENGTH)
    fields = {"encoding": encoding, "shape": shape, "bits": bits, "bit_count": bit_count}
    return fields, table + payload


def decode_tensor(entry: Mapping, blob: bytes) -> np.ndarray:
    """Decode a blob written by :func:`encode_tensor` using its header ``entry``.

    Returns an array of ``entry["shape"]``: unsigned codes (``packed``/``huffman``, smallest
    uint dtype for ``bits``) or the raw dtype. Raises ValueError if the entry is incomplete or
    the blob length does not match it.
    """
    view = memoryview(blob).cast("B")
    try:
        count = tensor_count(entry, view.nbytes, view)  # before anything is allocated
    except ValueError as err:
        raise ValueError(f"tensor {entry.get('name')!r}: {err}") from None
    encoding, shape = entry["encoding"], entry["shape"]
    if encoding.startswith("raw-"):
        dtype = np.dtype(encoding[4:]).newbyteorder("<")
        return np.frombuffer(view, dtype).astype(dtype.newbyteorder("=")).reshape(shape)
    if encoding == "packed":
        return unpack_bits(view, entry["bits"], count).reshape(shape)
    if encoding == "trits":
        return unpack_trits(view, count).reshape(shape)
    alphabet = 1 << entry["bits"]
    codes = huffman_decode(view[:alphabet], view[alphabet:], entry["bit_count"], count)
    return codes.reshape(shape)


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict[str, bytes]]:
    """:func:`read_container` of a packed model file: ``FormatError`` when the container holds
    something else (its header's ``format`` is not :data:`MODEL_FORMAT` or it has no model)."""
    header, blobs = read_container(path)
    if header.get("format") != MODEL_FORMAT or "model" not in header:
        raise FormatError(str(path), "it is a .fewbits container but not a fewbits model",
                          "export a model with `fewbits export`")
    return header, blobs


def is_packed_file(source: Any) -> bool:
    """Whether ``source`` is a path to a file starting with :data:`MAGIC` (a ``.fewbits``
    container, whatever its extension); False for folders, missing paths and other objects."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
        return False
    with open(source, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC
