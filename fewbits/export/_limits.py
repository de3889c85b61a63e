"""The limits of the ``.fewbits`` format and the checks that apply them before allocating.

Every header field is hostile (anyone can recompute the SHA-256): these functions bound each
size and count by what the file holds and what the format allows (docs/FORMAT.md, "Limits"),
so a hostile entry costs nothing to refuse. :mod:`fewbits.export.container` applies them.

>>> tensor_count({"encoding": "packed", "shape": [9], "bits": 1}, 2)
9
"""

from __future__ import annotations

import collections
import itertools
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .huffman import validated_table
from .packing import MAX_BITS

__all__ = ["ENCODINGS", "HUFFMAN_MAX_BITS", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "MAX_NDIM",
           "MAX_TENSORS", "blob_alignment", "derived_spans", "few", "header_text", "json_depth",
           "repeated", "tensor_count", "tensor_spans"]

#: Flag bit 0 of the container: the header is zlib-compressed JSON.
FLAG_HEADER_ZLIB = 0x0001
#: Widest codes a Huffman-coded tensor may hold: its table is one byte per symbol, 2**16 bytes.
HUFFMAN_MAX_BITS = 16
#: Limits of format version 1 (docs/FORMAT.md, "Limits"); a reader refuses a file beyond them
#: before allocating anything for it.
MAX_HEADER_BYTES = 4 << 20  # the header JSON, inflated: ~200x a ResNet-23 header (18 KB)
MAX_JSON_DEPTH = 32  # nesting of the header JSON (a model's kwargs need < 5)
MAX_TENSORS = 1 << 16  # entries in the tensor table
MAX_NDIM = 8  # dimensions of a tensor's shape
#: Product of a shape's non-zero dimensions: a zero-size tensor of shape [0, 2**70] holds no
#: bytes, so no length check refuses it, but NumPy and PyTorch cannot even shape it.
MAX_ELEMENTS = 1 << 48
_RAW_DTYPES = (
    "float16",
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "bool",
)
ENCODINGS = ("packed", "huffman", "trits", *(f"raw-{d}" for d in _RAW_DTYPES))


def repeated(items: Iterable[Any]) -> list[Any]:
    """The items that occur more than once, sorted (one pass, a ``Counter``)."""
    return sorted(k for k, n in collections.Counter(items).items() if n > 1)


def few(items: list[Any], limit: int = 5) -> str:
    """The first ``limit`` items, escaped (``ascii``), and how many more: a message stays one
    short line whatever a file holds."""
    shown = ", ".join(ascii(x)[:80] for x in items[:limit])
    return f"[{shown}" + (f", ... {len(items) - limit} more]" if len(items) > limit else "]")


def header_text(raw: bytes, flags: int) -> bytes:
    """The header JSON bytes; a compressed header may inflate to at most MAX_HEADER_BYTES
    (a zlib bomb stops there, without allocating more). Raises ValueError."""
    if flags & FLAG_HEADER_ZLIB:
        inflater = zlib.decompressobj()
        text = inflater.decompress(raw, MAX_HEADER_BYTES)  # trailing alignment zeros ignored
        if inflater.unconsumed_tail:
            raise ValueError(f"the compressed header inflates beyond the format's limit of "
                             f"{MAX_HEADER_BYTES} bytes")
        if not inflater.eof:
            raise ValueError("the compressed header is truncated")
        return text
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"the header is {len(raw)} bytes, beyond the format's limit of "
                         f"{MAX_HEADER_BYTES}")
    return raw


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(text: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in JSON ``text`` (strings skipped), without recursion."""
    skeleton = np.frombuffer(_STRING.sub(b'""', text), dtype=np.uint8)
    step = (np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64)
            - np.isin(skeleton, (ord("]"), ord("}"))))
    return int(np.cumsum(step).max(initial=0))


def _shape_count(shape: Any) -> int:
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"tensor shape must be a list of non-negative ints, got "
                         f"{ascii(shape)[:120]}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"field 'shape' has {len(shape)} dimensions, the format allows "
                         f"{MAX_NDIM}")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:  # even with a 0 among them
        raise ValueError(f"field 'shape' {ascii(shape)[:120]}: its non-zero dimensions "
                         f"multiply to more than the format's {MAX_ELEMENTS} (2**48) elements")
    return math.prod(shape)


def _int_field(entry: Mapping, key: str, low: int, high: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"field {key!r} must be an int in {low}..{high}, got {value!r}")
    return value


def _encoding(entry: Mapping) -> str:
    encoding = entry.get("encoding")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; this fewbits reads {list(ENCODINGS)}")
    return encoding


def _code_bytes(entry: Mapping, encoding: str, count: int) -> int:
    """Bytes of ``count`` elements of a raw, trits or packed entry (its ``bits`` bounded): the
    one formula the entry check (:func:`tensor_count`) and format 2's derived spans use."""
    if encoding.startswith("raw-"):
        return count * np.dtype(encoding[4:]).itemsize
    if encoding == "trits":  # five codes 0..2 a byte (bits is 2, the codes' declared width)
        _int_field(entry, "bits", 2, 2)
        return (count + 4) // 5
    return (count * _int_field(entry, "bits", 1, MAX_BITS) + 7) // 8


def tensor_count(entry: Mapping, nbytes: int, blob: Any = None) -> int:
    """Validate a tensor entry's codec fields against its blob length; return its element
    count. Nothing is allocated, so a hostile entry costs nothing to refuse.

    Checks ``encoding`` (one of :data:`ENCODINGS`), ``shape`` (at most :data:`MAX_NDIM`
    non-negative ints), ``bits`` (1..32 packed, 1..16 huffman, 2 trits), ``bit_count``, that
    the blob holds exactly what they describe, and (given the ``blob``) that a Huffman table's
    lengths are <= 24 and satisfy Kraft's inequality. Raises ValueError naming the field.
    """
    encoding = _encoding(entry)
    count = _shape_count(entry.get("shape"))
    if encoding != "huffman":
        need = _code_bytes(entry, encoding, count)
        if nbytes != need and encoding.startswith("raw-"):
            raise ValueError(f"{encoding} of shape {entry.get('shape')} needs {need} bytes, "
                             f"blob has {nbytes}")
        if nbytes != need:
            what, codes = ("packed trits are", f"{count} codes") if encoding == "trits" else \
                ("packed data is", f"{count} codes of {entry['bits']} bits")
            raise ValueError(f"{what} too {'short' if nbytes < need else 'long'}: {codes} need "
                             f"{need} bytes, got {nbytes}")
        return count
    bits = _int_field(entry, "bits", 1, HUFFMAN_MAX_BITS)
    table = 1 << bits
    if nbytes < table:
        raise ValueError(f"huffman blob of {nbytes} bytes is shorter than its {table}-byte table")
    bit_count = _int_field(entry, "bit_count", 0, 8 * (nbytes - table))
    if (bit_count + 7) // 8 != nbytes - table:
        raise ValueError(f"field 'bit_count' {bit_count} needs {(bit_count + 7) // 8} payload "
                         f"bytes, the blob has {nbytes - table}")
    if count > bit_count:
        raise ValueError(f"{count} symbols cannot fit in bit_count={bit_count} bits")
    if isinstance(blob, (bytes, bytearray, memoryview)):
        validated_table(memoryview(blob).cast("B")[:table])  # Kraft, lengths <= 24
    return count


def blob_alignment(entry: Mapping) -> int:
    """Payload alignment of a format-2 blob: a ``raw-<dtype>`` blob starts at a multiple of its
    item size (viewable in place), code streams (``packed``/``trits``/``huffman``) anywhere,
    an opaque blob (no ``encoding``) at a multiple of 8."""
    encoding = entry.get("encoding")
    if isinstance(encoding, str) and encoding.startswith("raw-"):
        return np.dtype(encoding[4:]).itemsize
    return 1 if "encoding" in entry else 8


def _blob_length(entry: Mapping, limit: int) -> int:
    """Bytes of an entry's blob as its fields describe them (format 2 stores no lengths but an
    opaque blob's ``length``); every field bounded, ``limit`` (the payload) included."""
    if "encoding" not in entry:
        return _int_field(entry, "length", 0, limit)
    encoding = _encoding(entry)
    count = _shape_count(entry.get("shape"))
    if encoding != "huffman":
        return _code_bytes(entry, encoding, count)
    bits = _int_field(entry, "bits", 1, HUFFMAN_MAX_BITS)
    return (1 << bits) + (_int_field(entry, "bit_count", 0, 8 * limit) + 7) // 8


def derived_spans(entries: list, payload_length: int) -> list[tuple[int, int]]:
    """``[(offset, length)]`` of format-2 blobs: each blob's length follows from its entry
    (``shape``, ``encoding``, ``bits``, ``bit_count``; an opaque blob's ``length``) and it
    starts at the previous blob's end rounded up to its alignment (raw: the item size; code
    streams: 1; opaque: 8); the last blob ends at the payload's end. An entry that holds an
    ``offset`` (or a ``length`` besides an ``encoding``), a blob beyond the payload or bytes
    after the last blob raise ValueError naming the entry; nothing is allocated.

    >>> derived_spans([{"name": "w", "encoding": "trits", "bits": 2, "shape": [6]},
    ...                {"name": "s", "encoding": "raw-float32", "shape": [2]}], 12)
    [(0, 2), (4, 8)]
    """
    spans, end = [], 0
    for k, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if not isinstance(name, str):
            raise ValueError(f"tensor table entry {k} needs a str name, got {ascii(entry)[:200]}")
        if "offset" in entry or ("length" in entry and "encoding" in entry):
            raise ValueError(f"tensor {name!r} holds an offset or length: format version 2 "
                             "derives them from the entry (a version-1 table relabelled?)")
        try:
            length = _blob_length(entry, payload_length)
        except ValueError as err:
            raise ValueError(f"tensor {name!r}: {err}") from None
        offset = end + (-end % blob_alignment(entry))
        end = offset + length
        if end > payload_length:
            raise ValueError(f"tensor {name!r} spans payload bytes [{offset}, {end}), beyond the "
                             f"{payload_length}-byte payload")
        spans.append((offset, length))
    if end != payload_length:
        raise ValueError(f"the payload has {payload_length - end} bytes after its last tensor")
    return spans


def tensor_spans(header: Mapping, payload: memoryview, version: int) -> list[tuple[str, int, int]]:
    """``[(name, offset, length)]`` of a container's blobs, each entry checked against its blob
    (:func:`tensor_count`) before anything is decoded. Version 1 stores each ``offset`` and
    ``length``; version 2 derives them (:func:`derived_spans`, zero padding checked) and adds
    them to the header's entries, so callers see one table whatever the version. Names must
    be unique and blobs must not overlap; ValueError otherwise."""
    payload_length = payload.nbytes
    entries = header.get("tensors", [])
    if not isinstance(entries, list):
        raise ValueError('header "tensors" is not a list')
    if len(entries) > MAX_TENSORS:
        raise ValueError(f'header "tensors" lists {len(entries)} tensors, beyond the format\'s '
                         f"limit of {MAX_TENSORS}")
    if version >= 2:
        end = 0
        for entry, (offset, length) in zip(entries, derived_spans(entries, payload_length),
                                           strict=True):
            if any(payload[end:offset]):
                raise ValueError(f"nonzero padding before tensor {entry['name']!r}")
            entry["offset"], entry["length"], end = offset, length, offset + length
    spans = []
    for k, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        offset = entry.get("offset") if isinstance(entry, dict) else None
        length = entry.get("length") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)
        ):
            raise ValueError(f"tensor table entry {k} needs a str name and int offset/length "
                             f">= 0, got {ascii(entry)[:200]}")
        if offset + length > payload_length:
            raise ValueError(f"tensor {name!r} spans payload bytes [{offset}, {offset + length}),"
                             f" beyond the {payload_length}-byte payload")
        if "encoding" in entry:
            try:
                tensor_count(entry, length, payload[offset : offset + length])
            except ValueError as err:
                raise ValueError(f"tensor {name!r}: {err}") from None
        spans.append((name, offset, length))
    names = [s[0] for s in spans]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names in the tensor table: {few(repeated(names))}")
    ordered = sorted(spans, key=lambda s: (s[1], s[2]))
    for (a, a_off, a_len), (b, b_off, _) in itertools.pairwise(ordered):
        if a_off + a_len > b_off:
            raise ValueError(f"tensors {a!r} and {b!r} overlap in the payload")
    return spans
