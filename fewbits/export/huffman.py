"""Canonical Huffman coding of integer code streams (as in Deep Compression).

A stream of symbols in ``[0, alphabet_size)`` is stored as

* the **table**: one byte per symbol, its code length in bits (0 = symbol absent, else
  1..``MAX_CODE_LENGTH``), ``alphabet_size`` bytes in all; and
* the **payload**: the concatenated codes, ``bit_count`` bits, ``ceil(bit_count / 8)`` bytes.

Canonical codes (the DEFLATE rule) follow from the lengths alone: sort the present symbols by
``(length, symbol)``; the first gets the all-zero code of its length, each next one gets the
previous code plus one, shifted left by the increase in length. The bit stream is the same
little-endian stream as ``packing``: stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``.
Each code is written **most significant bit first** into the stream, and the unused high bits
of the last byte are zero. A stream with a single distinct symbol gives it length 1 (code
``0``), so every present symbol costs at least one bit.

Worked example, codes ``[0, 0, 0, 0, 1, 1, 2, 3]`` with ``alphabet_size = 4``::

    frequencies 4, 2, 1, 1  -> lengths [1, 2, 3, 3]  -> codes 0:"0" 1:"10" 2:"110" 3:"111"
    stream bits 0 0 0 0 10 10 110 111 (14 bits)
    byte 0 = stream bits 0..7  = 0,0,0,0,1,0,1,0 (LSB first) = 0x50
    byte 1 = stream bits 8..13 = 1,1,0,1,1,1 (+ 2 zero pad bits) = 0x3B

>>> table, payload, nbits = huffman_encode(np.array([0, 0, 0, 0, 1, 1, 2, 3]), 4)
>>> list(table), payload.hex(), nbits
([1, 2, 3, 3], '503b', 14)
>>> huffman_decode(table, payload, nbits, 8).tolist()
[0, 0, 0, 0, 1, 1, 2, 3]

Which optimal lengths the encoder picks among ties is not part of the format: a decoder
needs only the table. The encoder breaks ties deterministically (same input, same bytes).
"""

from __future__ import annotations

import heapq
from array import array

import numpy as np

from .packing import check_int

__all__ = ["MAX_ALPHABET_SIZE", "MAX_CODE_LENGTH", "huffman_decode", "huffman_encode",
           "validated_table"]

MAX_CODE_LENGTH = 24
# One table byte per symbol; 2**24 symbols is the most a 24-bit code space can hold.
MAX_ALPHABET_SIZE = 1 << MAX_CODE_LENGTH
_ENCODE_CHUNK = 1 << 18  # symbols per encoding step


def _symbol_dtype(alphabet_size: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if alphabet_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _check_alphabet(alphabet_size: int) -> int:
    return check_int("alphabet_size", alphabet_size, 1, MAX_ALPHABET_SIZE)


def _huffman_lengths(freqs: list[int]) -> list[int]:
    """Optimal (unlimited) code lengths for positive ``freqs`` (at least two)."""
    # Heap items (weight, tiebreak, node); leaves tie-break by symbol, merged nodes after them
    # in creation order, so the result is deterministic.
    heap = [(f, i, i) for i, f in enumerate(freqs)]
    heapq.heapify(heap)
    parent = [-1] * len(freqs)
    next_id = len(freqs)
    while len(heap) > 1:
        f1, _, a = heapq.heappop(heap)
        f2, _, b = heapq.heappop(heap)
        parent.append(-1)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (f1 + f2, next_id, next_id))
        next_id += 1
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):  # parents have larger ids than children
        depth[node] = depth[parent[node]] + 1
    return depth[: len(freqs)]


def _package_merge_lengths(freqs: list[int], max_length: int) -> list[int]:
    """Optimal code lengths bounded by ``max_length`` (package-merge, Larmore & Hirschberg).

    Level 0 is the leaves sorted by weight; each next level merges the leaves with the
    pairwise "packages" of the level before. A symbol's length is how many of the cheapest
    ``2n - 2`` items of the last level contain it. The chosen items of a level are always a
    prefix of it, so only the number of packages per prefix has to be tracked.
    """
    n = len(freqs)
    weights = np.asarray(freqs, dtype=np.int64)
    order = np.argsort(weights, kind="stable")
    leaves = weights[order]
    current = leaves
    is_package = []  # per level above 0: which items of the sorted list are packages
    for _ in range(max_length - 1):
        paired = current[: current.size // 2 * 2]
        merged = np.concatenate([leaves, paired[0::2] + paired[1::2]])
        flags = np.concatenate([np.zeros(n, bool), np.ones(paired.size // 2, bool)])
        sort = np.argsort(merged, kind="stable")
        current, flags = merged[sort], flags[sort]
        is_package.append(flags)
    lengths = np.zeros(n, dtype=np.int64)
    take = 2 * n - 2
    for flags in reversed(is_package):
        packages = int(np.count_nonzero(flags[:take]))
        lengths[order[: take - packages]] += 1
        take = 2 * packages
    lengths[order[:take]] += 1
    return lengths.tolist()


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Canonical codes for a length table: ``(codes per symbol, order, max length)``.

    ``order`` lists the present symbols sorted by (length, symbol). With ``L`` the max length,
    symbol ``order[k]`` owns the aligned range ``[start_k, start_k + 2**(L - len))`` of the
    L-bit code space, ``start_k = sum of 2**(L - len)`` over earlier symbols, and its code is
    ``start_k >> (L - len)``.
    """
    lengths = lengths.astype(np.int64)
    present = np.flatnonzero(lengths)
    codes = np.zeros(lengths.size, dtype=np.int64)
    if present.size == 0:
        return codes, present, 0
    max_len = int(lengths[present].max())
    order = present[np.argsort(lengths[present], kind="stable")]
    span = np.int64(1) << (max_len - lengths[order])
    start = np.concatenate([[0], np.cumsum(span)[:-1]])
    codes[order] = start >> (max_len - lengths[order])
    return codes, order, max_len


def validated_table(table: bytes | np.ndarray) -> np.ndarray:
    if isinstance(table, (bytes, bytearray, memoryview)):
        lengths = np.frombuffer(memoryview(table).cast("B"), dtype=np.uint8)
    else:
        lengths = np.asarray(table)
    if lengths.ndim != 1 or lengths.dtype.kind not in "ui":
        raise ValueError("Huffman table must be a 1-D sequence of integer code lengths")
    _check_alphabet(lengths.size)
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_CODE_LENGTH):
        raise ValueError(
            f"Huffman code lengths must be in 0..{MAX_CODE_LENGTH}, "
            f"found {int(lengths.min())}..{int(lengths.max())}"
        )
    lengths = lengths.astype(np.int64)
    kraft = int(np.sum(np.int64(1) << (MAX_CODE_LENGTH - lengths[lengths > 0])))
    if kraft > 1 << MAX_CODE_LENGTH:
        raise ValueError(
            "Huffman table is over-subscribed (Kraft sum "
            f"{kraft / (1 << MAX_CODE_LENGTH):.6g} > 1): not a valid prefix code"
        )
    return lengths


def huffman_encode(
    codes: np.ndarray, alphabet_size: int, max_length: int = MAX_CODE_LENGTH
) -> tuple[bytes, bytes, int]:
    """Huffman-code ``codes`` (any shape, C order; ints in ``[0, alphabet_size)``).

    Returns ``(table, payload, bit_count)``: ``table`` is ``alphabet_size`` bytes of code
    lengths, ``payload`` the ``ceil(bit_count / 8)``-byte bit stream (module docstring).
    Lengths are optimal Huffman lengths; if one would exceed ``max_length`` (1..24) the
    optimal length-limited code (package-merge) is used instead. Mean bits per symbol is then
    ``>= entropy`` and, when the limit does not bind, ``< entropy + 1``.

    Raises ValueError for non-integer codes, codes outside ``[0, alphabet_size)``, a bad
    ``alphabet_size`` or a ``max_length`` too small for the number of distinct symbols.
    """
    alphabet_size = _check_alphabet(alphabet_size)
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
        raise ValueError(f"max_length must be an int in 1..{MAX_CODE_LENGTH}, got {max_length!r}")
    if not 1 <= max_length <= MAX_CODE_LENGTH:
        raise ValueError(f"max_length must be in 1..{MAX_CODE_LENGTH}, got {max_length}")
    arr = np.asarray(codes)
    if arr.dtype.kind not in "uib":
        raise ValueError(f"codes must be an integer array, got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    lengths = np.zeros(alphabet_size, dtype=np.uint8)
    if arr.size == 0:
        return lengths.tobytes(), b"", 0
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= alphabet_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"code {bad} is outside the alphabet [0, {alphabet_size})")
    arr = arr.astype(np.int64, copy=False)

    freqs = np.bincount(arr, minlength=alphabet_size)
    present = np.flatnonzero(freqs)
    if present.size > 1 << max_length:
        raise ValueError(
            f"{present.size} distinct symbols cannot be coded with max_length={max_length} "
            f"(at most {1 << max_length}); raise max_length"
        )
    if present.size == 1:
        lengths[present] = 1
    else:
        f = freqs[present].tolist()
        lens = _huffman_lengths(f)
        if max(lens) > max_length:
            lens = _package_merge_lengths(f, max_length)
        lengths[present] = lens

    code_of, _, _ = _canonical(lengths)
    sym_len = lengths[arr]
    bit_count = int(sym_len.sum(dtype=np.int64))
    stream = np.empty(bit_count, dtype=np.uint8)  # one byte per output bit, packed at the end
    done = 0
    for s in range(0, arr.size, _ENCODE_CHUNK):  # chunks bound the per-bit temporaries
        sym, n = arr[s : s + _ENCODE_CHUNK], sym_len[s : s + _ENCODE_CHUNK].astype(np.int64)
        nbits = int(n.sum())
        # One row per output bit: the symbol it belongs to and its index within the code.
        owner = np.repeat(np.arange(sym.size), n)
        within = np.arange(nbits, dtype=np.int64) - (np.cumsum(n) - n)[owner]
        shift = n[owner] - 1 - within  # MSB of the code first
        stream[done : done + nbits] = (code_of[sym][owner] >> shift) & 1
        done += nbits
    return lengths.tobytes(), np.packbits(stream, bitorder="little").tobytes(), bit_count


# Bit-reversal of every byte: turns the LSB-first stream into an MSB-first one.
_REVERSE_BYTE = np.array([int(f"{b:08b}"[::-1], 2) for b in range(256)], dtype=np.uint8)
_FAST_BITS = 16  # first-level lookup table: 2**16 entries


class _Decoder:
    """Maps the next ``L`` stream bits (MSB-first window, ``L`` = longest code) to a symbol.

    Canonical symbol ``k`` (present symbols sorted by (length, symbol)) owns the L-bit
    windows ``[ends[k-1], ends[k])``, so ``k = searchsorted(ends, window, 'right')``, with
    ``k == n`` meaning no symbol owns the window. A table on the first ``T = min(L, 16)`` bits
    answers that directly for codes of length <= T; windows of longer codes (entry ``LONG``)
    fall back to the binary search.
    """

    def __init__(self, lengths: np.ndarray) -> None:
        _, self.order, self.max_len = _canonical(lengths)
        n = self.order.size
        lens = lengths[self.order]
        self.ends = np.cumsum(np.int64(1) << (self.max_len - lens))
        self.lens = np.concatenate([lens, [0, 0]]).astype(np.uint8)  # k == n: unassigned
        self.long = n + 1
        self.fast = min(self.max_len, _FAST_BITS)
        shift = self.max_len - self.fast
        starts = np.arange(1 << self.fast, dtype=np.int64) << shift
        table = np.searchsorted(self.ends, starts, side="right")
        assigned = table < n
        table[assigned & (lens[np.minimum(table, n - 1)] > self.fast)] = self.long
        self.table = table

    def index(self, windows: np.ndarray) -> np.ndarray:
        """Canonical index (``n`` if unassigned) of the code starting each window."""
        k = self.table[windows >> np.uint32(self.max_len - self.fast)]
        slow = k == self.long
        if slow.any():
            k[slow] = np.searchsorted(self.ends, windows[slow], side="right")
        return k


def huffman_decode(
    table: bytes | np.ndarray, payload: bytes, bit_count: int, count: int
) -> np.ndarray:
    """Decode ``count`` symbols from a ``huffman_encode`` result.

    ``table`` is the length table (bytes or an integer array). Returns a 1-D array of the
    smallest unsigned dtype holding ``len(table) - 1``. Raises ValueError if the table is not
    a valid prefix code, ``payload`` is not ``ceil(bit_count / 8)`` bytes, the stream holds an
    unassigned code, or the ``count`` symbols do not use exactly ``bit_count`` bits.

    Decoding is table driven: the code length at *every* bit position is found with one
    vectorised lookup on the next ``L`` bits; a tight loop then hops from code to code, and
    the symbols at the visited positions are looked up in one vectorised step.
    """
    lengths = validated_table(table)
    out_dtype = _symbol_dtype(lengths.size)
    for label, value in (("bit_count", bit_count), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{label} must be a non-negative int, got {value!r}")
    bit_count, count = int(bit_count), int(count)
    data = np.frombuffer(memoryview(payload).cast("B"), dtype=np.uint8)
    if data.size != (bit_count + 7) // 8:
        raise ValueError(
            f"Huffman payload is {data.size} bytes, but bit_count={bit_count} needs "
            f"{(bit_count + 7) // 8}"
        )
    if count == 0 or bit_count == 0:
        if count or bit_count:
            raise ValueError(
                f"Huffman stream mismatch: {count} symbols cannot use {bit_count} bits"
            )
        return np.zeros(0, dtype=out_dtype)
    if not lengths.any():
        raise ValueError("Huffman table is empty (all lengths 0) but the stream is not")
    if count > bit_count:  # before allocating per-symbol arrays: every code is >= 1 bit
        raise ValueError(
            f"Huffman stream mismatch: {count} symbols cannot fit in {bit_count} bits "
            "(each code is at least 1 bit)"
        )

    decoder = _Decoder(lengths)
    # Big-endian 32-bit word of the bit-reversed bytes at every byte offset: the MSB-first
    # window at stream bit p is (word[p // 8] << p % 8) >> (32 - L); L + 7 <= 31 bits fit.
    rev = np.concatenate([_REVERSE_BYTE[data], np.zeros(3, np.uint8)]).astype(np.uint32)
    words = (rev[:-3] << 24) | (rev[1:-2] << 16) | (rev[2:-1] << 8) | rev[3:]
    drop = np.uint32(32 - decoder.max_len)

    def windows(positions: np.ndarray) -> np.ndarray:
        return (words[positions >> 3] << (positions & 7).astype(np.uint32)) >> drop

    # Code length at every bit position (as bytes, for a fast scalar loop), then the chain.
    hop = np.empty(bit_count, dtype=np.uint8)
    chunk = 1 << 20
    for s in range(0, bit_count, chunk):
        pos = np.arange(s, min(s + chunk, bit_count), dtype=np.int64)
        hop[s : s + pos.size] = decoder.lens[decoder.index(windows(pos))]
    hops = hop.tobytes()
    # The only sequential step: hop from code start to code start (~0.1 us per symbol).
    # An unassigned code has hop 0, so the walk sticks there and is reported below.
    starts = array("q", [0]) * count
    p = i = 0
    try:
        for i in range(count):
            starts[i] = p
            p += hops[p]
    except IndexError:
        raise ValueError(
            f"Huffman stream ended after {i} of {count} symbols ({bit_count} bits); "
            "the payload is truncated or count is wrong"
        ) from None
    if p < bit_count and hops[p] == 0:
        raise ValueError(f"Huffman stream holds an unassigned code at bit {p}")
    if p != bit_count:
        raise ValueError(
            f"Huffman stream mismatch: {count} symbols end at bit {p}, bit_count is {bit_count}"
        )
    k = decoder.index(windows(np.frombuffer(starts, dtype=np.int64)))
    return decoder.order[k].astype(out_dtype)
