"""Bit packing and canonical Huffman coding of integer code streams (fewbits.export)."""

from __future__ import annotations

import doctest
import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fewbits.export import huffman as hf
from fewbits.export import packing
from fewbits.export.huffman import MAX_CODE_LENGTH, huffman_decode, huffman_encode
from fewbits.export.packing import (
    _CHUNK,
    code_dtype,
    pack_bits,
    pack_trits,
    packed_size,
    trits_size,
    unpack_bits,
    unpack_trits,
)

# ------------------------------------------------------------------------------ references


def _reference_pack(codes: list[int], bits: int) -> bytes:
    """The documented rule, literally: little-endian bytes of sum(code[i] << (i*bits))."""
    value = sum(c << (i * bits) for i, c in enumerate(codes))
    return value.to_bytes((len(codes) * bits + 7) // 8, "little")


def _reference_canonical(lengths: list[int]) -> dict[int, str]:
    """DEFLATE's canonical code assignment, as a bit string per symbol (MSB first)."""
    codes, code, prev = {}, 0, 0
    for sym in sorted((s for s, n in enumerate(lengths) if n), key=lambda s: (lengths[s], s)):
        if codes:
            code = (code + 1) << (lengths[sym] - prev)
        prev = lengths[sym]
        codes[sym] = format(code, f"0{lengths[sym]}b")
    return codes


def _reference_stream(symbols: list[int], lengths: list[int]) -> tuple[bytes, int]:
    """Write codes MSB first into the LSB-first stream, one bit at a time."""
    codes = _reference_canonical(lengths)
    bits = "".join(codes[s] for s in symbols)
    out = bytearray((len(bits) + 7) // 8)
    for j, b in enumerate(bits):
        out[j // 8] |= int(b) << (j % 8)
    return bytes(out), len(bits)


def _reference_decode(table: bytes, payload: bytes, bit_count: int) -> list[int]:
    """Bit-serial decoder: read stream bits until they spell a code."""
    by_code = {c: s for s, c in _reference_canonical(list(table)).items()}
    out, cur = [], ""
    for j in range(bit_count):
        cur += str((payload[j // 8] >> (j % 8)) & 1)
        if cur in by_code:
            out.append(by_code[cur])
            cur = ""
    assert cur == "", "stream ended inside a code"
    return out


def _entropy(codes: np.ndarray) -> float:
    p = np.bincount(codes) / codes.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


# -------------------------------------------------------------------------- packing: examples


@pytest.mark.parametrize("module", [packing, hf], ids=["packing", "huffman"])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_documented_two_bit_example():
    # docs/FORMAT.md and the packing docstring: code i occupies stream bits [2i, 2i+2).
    assert pack_bits(np.array([1, 0, 3, 2], dtype=np.uint8), 2) == bytes([0b10_11_00_01])
    assert pack_bits(np.array([1, 0, 3, 2], dtype=np.uint8), 2) == b"\xb1"
    assert unpack_bits(b"\xb1", 2, 4).tolist() == [1, 0, 3, 2]


def test_documented_trit_example_and_round_trip():
    # the packing docstring: five trits a byte, base 3, first code least significant
    assert pack_trits(np.array([2, 0, 1, 1, 2, 1])) == bytes([2 + 9 + 27 + 81 * 2, 1])
    assert unpack_trits(b"\xc8\x01", 6).tolist() == [2, 0, 1, 1, 2, 1]
    codes = np.random.default_rng(0).integers(0, 3, 1003).astype(np.uint8)
    data = pack_trits(codes)
    assert len(data) == trits_size(1003) == 201  # 1.6 bits a code, vs 251 bytes at 2 bits
    assert np.array_equal(unpack_trits(data, 1003), codes)
    assert pack_trits(np.array([2] * 5)) == b"\xf2"  # 242: the largest byte
    for bad, match in [(lambda: pack_trits(np.array([3])), "trit codes"),
                       (lambda: unpack_trits(b"\xf3", 5), "corrupt"),
                       (lambda: unpack_trits(b"\x00", 6), "too short"),
                       (lambda: unpack_trits(b"\x00\x00", 5), "too long")]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_documented_one_and_twelve_bit_examples():
    assert pack_bits(np.array([[1, 0], [0, 1]]), 1) == b"\x09"  # C order, LSB first
    assert pack_bits(np.array([0xABC, 0x123], dtype=np.uint16), 12) == bytes.fromhex("bc3a12")
    assert unpack_bits(bytes.fromhex("bc3a12"), 12, 2).tolist() == [0xABC, 0x123]
    # Padding bits of the last byte are zero.
    assert pack_bits(np.array([1, 1, 1]), 1) == b"\x07"


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_byte_widths_are_plain_little_endian_arrays(bits):
    codes = np.array([0, 1, 2**bits - 1, 0x5A], dtype=np.uint64)
    assert pack_bits(codes, bits) == codes.astype(f"<u{bits // 8}").tobytes()


@pytest.mark.parametrize("bits", [1, 3, 8, 9, 16, 17, 32])
def test_unpacked_dtype_is_smallest_unsigned(bits):
    out = unpack_bits(pack_bits(np.array([2**bits - 1, 0]), bits), bits, 2)
    assert out.dtype == code_dtype(bits)
    assert out.dtype.itemsize == (1 if bits <= 8 else 2 if bits <= 16 else 4)
    assert out.tolist() == [2**bits - 1, 0]


def test_packed_size():
    assert [packed_size(n, 3) for n in (0, 1, 2, 3, 8)] == [0, 1, 1, 2, 3]
    assert packed_size(10, 32) == 40


# ------------------------------------------------------------------------ packing: round trip


@st.composite
def _codes_and_bits(draw):
    bits = draw(st.integers(1, 32))
    codes = draw(st.lists(st.integers(0, 2**bits - 1), max_size=70))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64, np.int64]))
    if codes and max(codes) > np.iinfo(dtype).max:
        dtype = np.uint64
    return codes, bits, dtype


@settings(max_examples=300, deadline=None)
@given(_codes_and_bits())
def test_pack_matches_reference_and_round_trips(case):
    codes, bits, dtype = case
    packed = pack_bits(np.array(codes, dtype=dtype), bits)
    assert packed == _reference_pack(codes, bits)
    assert len(packed) == packed_size(len(codes), bits)
    out = unpack_bits(packed, bits, len(codes))
    assert out.dtype == code_dtype(bits)
    assert out.tolist() == codes


@pytest.mark.parametrize("bits", [3, 5, 12, 27])
def test_generic_path_across_chunk_boundaries(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, _CHUNK + 13, dtype=np.uint64)
    packed = pack_bits(codes, bits)
    # The first chunk ends on a byte boundary, so it packs to a prefix of the whole stream.
    assert packed[: 1000 * bits // 8] == _reference_pack(codes[:1000].tolist(), bits)
    assert packed[: _CHUNK * bits // 8] == pack_bits(codes[:_CHUNK], bits)
    tail = codes[_CHUNK - 8 :].tolist()  # last full byte group of chunk 1 plus chunk 2
    assert packed[(_CHUNK - 8) * bits // 8 :] == _reference_pack(tail, bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, codes.size), codes)


def test_bool_codes_pack_as_one_bit():
    assert pack_bits(np.array([True, False, True]), 1) == b"\x05"


def test_pack_ten_million_one_bit_codes_fast():
    codes = np.random.default_rng(0).integers(0, 2, 10_000_000, dtype=np.uint8)
    start = time.process_time()  # CPU time: robust to other jobs sharing the machine
    packed = pack_bits(codes, 1)
    unpacked = unpack_bits(packed, 1, codes.size)
    elapsed = time.process_time() - start
    assert len(packed) == 1_250_000
    np.testing.assert_array_equal(unpacked, codes)
    assert elapsed < 1.0, f"pack+unpack of 10M 1-bit codes took {elapsed:.2f}s CPU"


# ---------------------------------------------------------------------------- packing: errors


@pytest.mark.parametrize("bits", [0, 33, -1, 2.0, True, None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_bits(np.array([0]), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(b"\x00", bits, 1)


def test_code_out_of_range_names_the_numbers():
    with pytest.raises(ValueError, match=r"code 4 does not fit in 2 bits .*\[0, 3\]"):
        pack_bits(np.array([1, 4, 2]), 2)
    with pytest.raises(ValueError, match="code 4294967296 does not fit in 32 bits"):
        pack_bits(np.array([2**32], dtype=np.uint64), 32)


def test_negative_code():
    with pytest.raises(ValueError, match="non-negative, found -3"):
        pack_bits(np.array([1, -3]), 4)


def test_float_codes_rejected():
    with pytest.raises(ValueError, match=r"integer array.*float64"):
        pack_bits(np.array([0.0, 1.0]), 1)


def test_data_length_must_match():
    with pytest.raises(ValueError, match=r"too short: 9 codes of 3 bits need 4 bytes, got 3"):
        unpack_bits(b"\x00\x00\x00", 3, 9)
    with pytest.raises(ValueError, match=r"too long: .* need 1 bytes, got 2"):
        unpack_bits(b"\x00\x00", 1, 8)
    with pytest.raises(ValueError, match="count"):
        unpack_bits(b"", 1, -1)


# -------------------------------------------------------------------------- huffman: examples


def test_documented_huffman_example():
    table, payload, bit_count = huffman_encode(np.array([0, 0, 0, 0, 1, 1, 2, 3]), 4)
    assert table == bytes([1, 2, 3, 3])
    assert payload == bytes([0x50, 0x3B])
    assert bit_count == 14
    assert _reference_canonical([1, 2, 3, 3]) == {0: "0", 1: "10", 2: "110", 3: "111"}
    assert huffman_decode(table, payload, bit_count, 8).tolist() == [0, 0, 0, 0, 1, 1, 2, 3]


def test_single_symbol_stream_costs_one_bit_per_symbol():
    table, payload, bit_count = huffman_encode(np.full(10, 5), 8)
    assert list(table) == [0, 0, 0, 0, 0, 1, 0, 0]
    assert (bit_count, payload) == (10, b"\x00\x00")
    assert huffman_decode(table, payload, bit_count, 10).tolist() == [5] * 10


def test_empty_stream():
    table, payload, bit_count = huffman_encode(np.array([], dtype=np.uint8), 4)
    assert (table, payload, bit_count) == (bytes(4), b"", 0)
    out = huffman_decode(table, payload, bit_count, 0)
    assert out.size == 0 and out.dtype == np.uint8


# ------------------------------------------------------------------------ huffman: properties


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40).flatmap(lambda a: st.tuples(
    st.just(a), st.lists(st.integers(0, a - 1), max_size=120))))  # fmt: skip
def test_huffman_matches_bit_serial_reference(case):
    alphabet, symbols = case
    table, payload, bit_count = huffman_encode(np.array(symbols, dtype=np.int64), alphabet)
    lengths = list(table)
    assert len(lengths) == alphabet
    assert sum(2.0**-n for n in lengths if n) <= 1.0
    assert {s for s, n in enumerate(lengths) if n} == set(symbols)
    assert (payload, bit_count) == _reference_stream(symbols, lengths)
    assert _reference_decode(table, payload, bit_count) == symbols
    out = huffman_decode(table, payload, bit_count, len(symbols))
    assert out.tolist() == symbols


@pytest.mark.parametrize("seed", range(6))
def test_average_length_within_one_bit_of_entropy(seed):
    rng = np.random.default_rng(seed)
    alphabet = int(rng.choice([2, 4, 16, 256]))
    probs = rng.dirichlet(np.full(alphabet, rng.choice([0.1, 1.0, 10.0])))
    codes = rng.choice(alphabet, size=20_000, p=probs)
    if np.unique(codes).size < 2:
        codes[:2] = [0, 1]
    table, payload, bit_count = huffman_encode(codes, alphabet)
    mean_bits, entropy = bit_count / codes.size, _entropy(codes)
    print(f"alphabet {alphabet}: {mean_bits:.4f} bits/symbol, entropy {entropy:.4f}")
    assert entropy - 1e-9 <= mean_bits < entropy + 1
    np.testing.assert_array_equal(huffman_decode(table, payload, bit_count, codes.size), codes)


def test_decode_one_million_symbols_fast():
    rng = np.random.default_rng(0)
    codes = np.minimum(rng.geometric(0.15, 1_000_000) - 1, 255).astype(np.uint8)
    table, payload, bit_count = huffman_encode(codes, 256)
    start = time.process_time()
    out = huffman_decode(table, payload, bit_count, codes.size)
    elapsed = time.process_time() - start
    np.testing.assert_array_equal(out, codes)
    assert out.dtype == np.uint8
    print(f"decoded 1M symbols ({bit_count / codes.size:.3f} bits each) in {elapsed:.3f}s CPU")
    assert elapsed < 2.0, f"decoding 1M symbols took {elapsed:.2f}s CPU"


def test_decodes_codes_up_to_the_maximum_length():
    # Lengths 1, 2, ..., 24, 24: a complete code whose longest codes need the slow path.
    lengths = [*range(1, MAX_CODE_LENGTH + 1), MAX_CODE_LENGTH]
    table = bytes(lengths + [0] * 7)  # a 32-symbol alphabet with 7 absent symbols
    rng = np.random.default_rng(1)
    symbols = rng.integers(0, len(lengths), 3000).tolist()
    payload, bit_count = _reference_stream(symbols, lengths + [0] * 7)
    assert huffman_decode(table, payload, bit_count, len(symbols)).tolist() == symbols


# ------------------------------------------------------------------- huffman: length limiting


def _fibonacci_stream(n: int) -> np.ndarray:
    fib = [1, 1]
    while len(fib) < n:
        fib.append(fib[-1] + fib[-2])
    return np.repeat(np.arange(n), fib)


def test_length_limit_binds_and_still_round_trips():
    codes = _fibonacci_stream(20)  # unlimited Huffman lengths would reach 19 bits
    free_table, _, free_bits = huffman_encode(codes, 20)
    assert max(free_table) == 19
    table, payload, bit_count = huffman_encode(codes, 20, max_length=7)
    assert max(table) == 7
    assert sum(2.0**-n for n in table) == 1.0
    assert bit_count > free_bits  # the limit costs bits, but the code stays valid
    np.testing.assert_array_equal(huffman_decode(table, payload, bit_count, codes.size), codes)


def _brute_force_cost(freqs: list[int], limit: int) -> int:
    best = None
    for lens in itertools.product(range(1, limit + 1), repeat=len(freqs)):
        if sum(2.0**-n for n in lens) <= 1.0:
            cost = sum(f * n for f, n in zip(freqs, lens, strict=True))
            best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=2, max_size=5), st.integers(3, 4))
def test_package_merge_is_optimal(freqs, limit):
    lens = hf._package_merge_lengths(freqs, limit)
    assert max(lens) <= limit and sum(2.0**-n for n in lens) <= 1.0
    cost = sum(f * n for f, n in zip(freqs, lens, strict=True))
    assert cost == _brute_force_cost(freqs, limit)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=2, max_size=40))
def test_package_merge_equals_huffman_when_limit_does_not_bind(freqs):
    free = hf._huffman_lengths(freqs)
    limited = hf._package_merge_lengths(freqs, MAX_CODE_LENGTH)
    cost = lambda lens: sum(f * n for f, n in zip(freqs, lens, strict=True))  # noqa: E731
    assert cost(limited) == cost(free)
    assert math.isclose(sum(2.0**-n for n in free), 1.0)


# ---------------------------------------------------------------------------- huffman: errors


def test_huffman_encode_errors():
    with pytest.raises(ValueError, match=r"code 4 is outside the alphabet \[0, 4\)"):
        huffman_encode(np.array([0, 4]), 4)
    with pytest.raises(ValueError, match="code -1 is outside"):
        huffman_encode(np.array([0, -1]), 4)
    with pytest.raises(ValueError, match="integer array"):
        huffman_encode(np.array([0.5]), 4)
    with pytest.raises(ValueError, match="alphabet_size"):
        huffman_encode(np.array([0]), 0)
    with pytest.raises(ValueError, match="5 distinct symbols cannot be coded with max_length=2"):
        huffman_encode(np.arange(5), 5, max_length=2)
    with pytest.raises(ValueError, match="max_length"):
        huffman_encode(np.arange(5), 5, max_length=25)


def test_huffman_decode_errors():
    table, payload, bit_count = huffman_encode(np.array([0, 0, 0, 0, 1, 1, 2, 3]), 4)
    with pytest.raises(ValueError, match="over-subscribed"):
        huffman_decode(bytes([1, 1, 1, 0]), payload, bit_count, 8)
    with pytest.raises(ValueError, match=r"lengths must be in 0\.\.24"):
        huffman_decode(bytes([1, 25, 0, 0]), payload, bit_count, 8)
    with pytest.raises(ValueError, match="payload is 1 bytes, but bit_count=14 needs 2"):
        huffman_decode(table, payload[:1], bit_count, 8)
    with pytest.raises(ValueError, match="stream ended after"):
        huffman_decode(table, payload, bit_count, 9)
    with pytest.raises(ValueError, match="8 symbols end at bit 14, bit_count is 15"):
        huffman_decode(table, payload, 15, 8)
    # Lengths [1, 2, 0, 0] leave "11" unassigned; stream bits 1,1 hit it.
    with pytest.raises(ValueError, match="unassigned code at bit 0"):
        huffman_decode(bytes([1, 2, 0, 0]), b"\x03", 2, 1)
