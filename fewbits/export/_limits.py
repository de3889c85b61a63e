"""The limits of the ``.fewbits`` format and the checks that apply them before allocating.

Every header field is hostile (anyone can recompute the SHA-256): these functions bound each
size and count by what the file holds and what the format allows (docs/FORMAT.md, "Limits"),
so a hostile entry costs nothing to refuse. :mod:`fewbits.export.container` applies them.

>>> tensor_count({"encoding": "packed", "shape": [9], "bits": 1}, 2)
9
"""

from __future__ import annotations

import collections
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .huffman import validated_table
from .packing import MAX_BITS

__all__ = ["ENCODINGS", "HUFFMAN_MAX_BITS", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "MAX_NDIM",
           "MAX_TENSORS", "few", "header_text", "json_depth", "repeated", "tensor_count"]

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
        raise ValueError(f"tensor shape must be a list of non-negative ints, got {shape!r}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"field 'shape' has {len(shape)} dimensions, the format allows "
                         f"{MAX_NDIM}")
    return math.prod(shape)


def _int_field(entry: Mapping, key: str, low: int, high: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"field {key!r} must be an int in {low}..{high}, got {value!r}")
    return value


def tensor_count(entry: Mapping, nbytes: int, blob: Any = None) -> int:
    """Validate a tensor entry's codec fields against its blob length; return its element
    count. Nothing is allocated, so a hostile entry costs nothing to refuse.

    Checks ``encoding`` (one of :data:`ENCODINGS`), ``shape`` (at most :data:`MAX_NDIM`
    non-negative ints), ``bits`` (1..32 packed, 1..16 huffman, 2 trits), ``bit_count``, that
    the blob holds exactly what they describe, and (given the ``blob``) that a Huffman table's
    lengths are <= 24 and satisfy Kraft's inequality. Raises ValueError naming the field.
    """
    encoding = entry.get("encoding")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; this fewbits reads {list(ENCODINGS)}")
    count = _shape_count(entry.get("shape"))
    if encoding.startswith("raw-"):
        need = count * np.dtype(encoding[4:]).itemsize
        if nbytes != need:
            raise ValueError(f"{encoding} of shape {entry.get('shape')} needs {need} bytes, "
                             f"blob has {nbytes}")
        return count
    if encoding == "trits":  # five codes 0..2 a byte (bits is 2, the codes' declared width)
        _int_field(entry, "bits", 2, 2)
        need = (count + 4) // 5
        if nbytes != need:
            raise ValueError(f"packed trits are too {'short' if nbytes < need else 'long'}: "
                             f"{count} codes need {need} bytes, got {nbytes}")
        return count
    limit = MAX_BITS if encoding == "packed" else HUFFMAN_MAX_BITS
    bits = _int_field(entry, "bits", 1, limit)
    if encoding == "packed":
        need = (count * bits + 7) // 8
        if nbytes != need:
            raise ValueError(f"packed data is too {'short' if nbytes < need else 'long'}: "
                             f"{count} codes of {bits} bits need {need} bytes, got {nbytes}")
        return count
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
