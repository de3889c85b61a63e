"""Hostile files found by the QA pass of issue 20 (round 4): each test fails without its fix."""

from __future__ import annotations

import struct

import pytest

from fewbits.data._cifar_pickle import read_pickle


def _memo_bomb(copies: int, size: int) -> bytes:
    """A protocol-2 pickle holding one latin-1 text of ``size`` characters, memoized, and
    ``copies`` calls of ``_codecs.encode`` on it appended to a list: ``copies * size`` bytes
    built from a file of about ``size`` bytes."""
    out = bytearray(b"\x80\x02}X\x04\x00\x00\x00data]")
    out += b"X" + struct.pack("<I", size) + b"A" * size + b"q\x01" + b"0"
    out += b"c_codecs\nencode\nq\x02" + b"0"
    for _ in range(copies):
        out += b"h\x02h\x01X\x06\x00\x00\x00latin1\x86Ra"
    return bytes(out + b"s.")


def test_cifar_pickle_memoized_data_cannot_multiply_memory():
    # 100 kB of file would build 20 MB (a 1 MB file: 2.2 GB and 36 s before the fix)
    data = _memo_bomb(200, 100_000)
    with pytest.raises(ValueError, match="more than twice its own"):
        read_pickle(data)
    assert read_pickle(_memo_bomb(1, 100_000))["data"][0] == b"A" * 100_000
