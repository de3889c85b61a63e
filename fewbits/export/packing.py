"""Fixed-width bit packing of unsigned integer codes.

Layout (the ``packed`` encoding of ``docs/FORMAT.md``): the codes form one little-endian
bit stream. Bit ``j`` of the stream is bit ``j % 8`` (value ``2**(j % 8)``) of byte
``j // 8``, and code ``i`` of width ``b`` occupies stream bits ``[i*b, (i+1)*b)`` with its
least significant bit first. Equivalently, the packed bytes are the little-endian encoding
of the integer ``sum(code[i] << (i*b))``, ``ceil(count*b / 8)`` bytes long; the unused high
bits of the last byte are zero.

Worked example, codes ``[1, 0, 3, 2]`` at ``b = 2``::

    code i      3    2    1    0
    bits       10   11   00   01        stream bits 7..0 of byte 0
    byte 0  = 0b10_11_00_01 = 0xB1      -> pack_bits == b"\\xb1"

At ``b = 8`` this is plain ``uint8`` bytes, at 16 and 32 bits little-endian ``uint16`` /
``uint32``; every other width is the same rule applied to the bit stream.

>>> pack_bits(np.array([1, 0, 3, 2], dtype=np.uint8), 2)
b'\\xb1'
>>> unpack_bits(b"\\xb1", 2, 4).tolist()
[1, 0, 3, 2]

Trits (ternary weights at 1.6 bits): :func:`pack_trits` stores five codes ``t`` in ``{0, 1,
2}`` per byte, base 3, the first code least significant: byte ``j`` is
``t[5j] + 3 t[5j+1] + 9 t[5j+2] + 27 t[5j+3] + 81 t[5j+4]`` (0..242), ``ceil(count / 5)``
bytes, the missing codes of the last byte 0. Codes ``[2, 0, 1, 1, 2, 1]``::

    byte 0 = 2 + 3*0 + 9*1 + 27*1 + 81*2 = 200 = 0xC8      byte 1 = 1 = 0x01

>>> pack_trits(np.array([2, 0, 1, 1, 2, 1]))
b'\\xc8\\x01'
>>> unpack_trits(b"\\xc8\\x01", 6).tolist()
[2, 0, 1, 1, 2, 1]
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_BITS", "check_int", "code_dtype", "pack_bits", "pack_trits", "packed_size",
           "trits_size", "unpack_bits", "unpack_trits"]

MAX_BITS = 32
# Codes per chunk on the generic path: a multiple of 8 so each chunk ends on a byte boundary,
# and small enough that the (chunk, 32) bit matrix stays at a few MiB.
_CHUNK = 1 << 18


def check_int(name: str, value: int, low: int, high: int) -> int:
    """``value`` as an ``int`` when it is an integer (not a bool) in ``low..high``, else
    ``ValueError`` naming ``name`` and the range. Every size and count read from a caller or a
    file is bounded this way before anything is allocated from it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


def _check_bits(bits: int) -> int:
    return check_int("bits", bits, 1, MAX_BITS)


def packed_size(count: int, bits: int) -> int:
    """Number of bytes ``pack_bits`` produces for ``count`` codes: ``ceil(count*bits / 8)``.

    >>> packed_size(4, 2), packed_size(9, 1), packed_size(3, 12)
    (1, 2, 5)
    """
    bits = _check_bits(bits)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    return (int(count) * bits + 7) // 8


def code_dtype(bits: int) -> np.dtype:
    """Smallest unsigned dtype holding a ``bits``-wide code (uint8, uint16 or uint32)."""
    bits = _check_bits(bits)
    if bits <= 8:
        return np.dtype(np.uint8)
    if bits <= 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _validated_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "ui":
        raise ValueError(
            f"codes must be an integer array (uint8/16/32/64), got dtype {arr.dtype}; "
            "quantize to integer codes first"
        )
    arr = arr.reshape(-1)
    if arr.size == 0:
        return arr.astype(code_dtype(bits))
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise ValueError(f"codes must be non-negative, found {lo} (bits={bits})")
    if hi >= 1 << bits:
        raise ValueError(
            f"code {hi} does not fit in {bits} bits (codes must lie in [0, {(1 << bits) - 1}])"
        )
    return arr.astype(code_dtype(bits), copy=False)


def _pack_sub_byte(codes: np.ndarray, bits: int) -> bytes:
    # 2 or 4 bits: several codes per byte, OR-ed together at their shifts.
    per = 8 // bits
    pad = (-codes.size) % per
    grouped = np.concatenate([codes, np.zeros(pad, np.uint8)]).reshape(-1, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=1).astype(np.uint8).tobytes()


def _pack_generic(codes: np.ndarray, bits: int) -> bytes:
    # Spell each code as 32 little-endian bits, keep the low `bits`, and pack the bit stream.
    out = []
    for start in range(0, codes.size, _CHUNK):
        chunk = codes[start : start + _CHUNK].astype("<u4")
        matrix = np.unpackbits(chunk.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        out.append(np.packbits(matrix[:, :bits].reshape(-1), bitorder="little").tobytes())
    # Only the last chunk can end mid-byte (_CHUNK * bits is a multiple of 8).
    return b"".join(out)


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integer ``codes`` (any shape, C order) into ``bits``-wide fields.

    Code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the little-endian bit stream (see the
    module docstring); the result has ``packed_size(codes.size, bits)`` bytes.

    Raises ValueError if ``bits`` is not in 1..32, ``codes`` is not an integer (or bool)
    array, or any code is negative or ``>= 2**bits``.

    >>> pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1)
    b'\\r\\x01'
    """
    bits = _check_bits(bits)
    arr = _validated_codes(codes, bits)
    if arr.size == 0:
        return b""
    if bits == 1:
        return np.packbits(arr, bitorder="little").tobytes()
    if bits in (2, 4):
        return _pack_sub_byte(arr, bits)
    if bits in (8, 16, 32):
        return arr.astype(f"<u{bits // 8}", copy=False).tobytes()
    return _pack_generic(arr, bits)


def _unpack_generic(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    out = np.empty(count, dtype=code_dtype(bits))
    width = 8 * out.itemsize
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first_byte = start * bits // 8  # exact: start is a multiple of 8
        nbytes = (n * bits + 7) // 8
        stream = np.unpackbits(
            buf[first_byte : first_byte + nbytes], bitorder="little", count=n * bits
        ).reshape(n, bits)
        # Widen each row to the dtype's width with zero high bits, then re-pack per row:
        # the row's bytes are the code's little-endian encoding.
        matrix = np.zeros((n, width), dtype=np.uint8)
        matrix[:, :bits] = stream
        packed = np.packbits(matrix, axis=1, bitorder="little")
        out[start : start + n] = packed.reshape(-1).view(out.dtype.newbyteorder("<"))
    return out


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: read ``count`` codes of width ``bits`` from ``data``.

    Returns a 1-D array of dtype ``code_dtype(bits)`` (uint8 up to 8 bits, uint16 up to 16,
    else uint32). ``data`` must be exactly ``packed_size(count, bits)`` bytes; ValueError
    otherwise (too short usually means a truncated tensor, too long a wrong ``count``).
    Padding bits in the last byte are ignored.

    >>> unpack_bits(b"\\r\\x01", 1, 9).tolist()
    [1, 0, 1, 1, 0, 0, 0, 0, 1]
    """
    bits = _check_bits(bits)
    need = packed_size(count, bits)
    count = int(count)
    view = memoryview(data).cast("B")
    if view.nbytes != need:
        problem = "too short" if view.nbytes < need else "too long"
        raise ValueError(
            f"packed data is {problem}: {count} codes of {bits} bits need {need} bytes, "
            f"got {view.nbytes}"
        )
    buf = np.frombuffer(view, dtype=np.uint8)
    if bits == 1:
        return np.unpackbits(buf, bitorder="little", count=count)
    if bits in (2, 4):
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        fields = (buf[:, None] >> shifts) & np.uint8((1 << bits) - 1)
        return fields.reshape(-1)[:count].copy()
    if bits in (8, 16, 32):
        return buf.view(f"<u{bits // 8}").astype(code_dtype(bits))
    return _unpack_generic(buf, bits, count)


_TRIT_WEIGHTS = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def trits_size(count: int) -> int:
    """Bytes :func:`pack_trits` writes for ``count`` codes: ``ceil(count / 5)``.

    >>> trits_size(5), trits_size(6), trits_size(0)
    (1, 2, 0)
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    return (int(count) + 4) // 5


def pack_trits(codes: np.ndarray) -> bytes:
    """Pack codes in ``{0, 1, 2}`` five to a byte, base 3 (module docstring: 1.6 bits a code).

    Raises ValueError for a non-integer array or a code outside ``0..2``."""
    arr = _validated_codes(codes, 2)
    if arr.size and int(arr.max()) > 2:
        raise ValueError(f"trit codes must lie in [0, 2], found {int(arr.max())}")
    pad = (-arr.size) % 5
    grouped = np.concatenate([arr.astype(np.uint8), np.zeros(pad, np.uint8)]).reshape(-1, 5)
    return (grouped * _TRIT_WEIGHTS).sum(1, dtype=np.uint16).astype(np.uint8).tobytes()


def unpack_trits(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`pack_trits`: ``count`` codes (uint8, ``0..2``) from exactly
    ``trits_size(count)`` bytes; ValueError for another length or a byte above 242 (no five
    trits spell it: a corrupt file)."""
    need = trits_size(count)
    view = memoryview(data).cast("B")
    if view.nbytes != need:
        problem = "too short" if view.nbytes < need else "too long"
        raise ValueError(f"packed trits are {problem}: {count} codes need {need} bytes, got "
                         f"{view.nbytes}")
    buf = np.frombuffer(view, dtype=np.uint8)
    if buf.size and int(buf.max()) > 242:
        raise ValueError(f"packed trits hold byte {int(buf.max())} > 242 (3**5 - 1): the data "
                         "is corrupt")
    digits = (buf[:, None] // _TRIT_WEIGHTS) % 3
    return digits.astype(np.uint8).reshape(-1)[: int(count)].copy()
