"""The .fewbits container: layout, documented example, tensor codecs, every refusal, atomicity."""

from __future__ import annotations

import doctest
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from fewbits.export import container
from fewbits.export.container import (
    ENCODINGS,
    FORMAT_VERSION,
    MAGIC,
    FormatError,
    decode_tensor,
    dumps,
    encode_tensor,
    loads,
    read_container,
    write_container,
)

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def _example() -> tuple[dict, dict]:
    """The worked example of docs/FORMAT.md section 6, built exactly as documented there."""
    w_fields, w_blob = encode_tensor(np.array([[1, 0], [0, 1]]), "packed", bits=1)
    s_fields, s_blob = encode_tensor(np.array([0.5]), "raw-float16")
    header = {
        "fewbits_version": "0.1.0",
        "model": {"name": "demo", "kwargs": {}},
        "tensors": [
            {"name": "w", "kind": "weight", **w_fields},
            {"name": "w.scale", "kind": "scale", **s_fields},
        ],
    }
    return header, {"w": w_blob, "w.scale": s_blob}


def _documented_dump() -> bytes:
    text = FORMAT_MD.read_text(encoding="utf-8")
    block = re.search(r"<!-- example-dump:begin -->\n```\n(.*?)```", text, re.S)
    assert block, "docs/FORMAT.md lost its example-dump block"
    out = bytearray()
    for line in block.group(1).splitlines():
        offset, rest = line.split(None, 1)
        assert int(offset, 16) == len(out), f"offset column wrong at {line!r}"
        out += bytes.fromhex(rest.split("|")[0])
    return bytes(out)


def _reseal(data: bytes) -> bytes:
    """Recompute the trailing SHA-256 so a deliberate edit passes the checksum."""
    body = data[:-32]
    return body + hashlib.sha256(body).digest()


def _with_header(data: bytes, header_text: bytes) -> bytes:
    """Replace the header JSON (keeping lengths consistent) and reseal."""
    hlen, plen = struct.unpack_from("<IQ", data, 12)
    header_text += b" " * (-(24 + len(header_text)) % 8)
    payload = data[24 + hlen : 24 + hlen + plen]
    prefix = data[:12] + struct.pack("<IQ", len(header_text), plen)
    return _reseal(prefix + header_text + payload + bytes(32))


# ------------------------------------------------------------------------ documented example


def test_documented_example_bytes_match_the_code():
    header, blobs = _example()
    data = dumps(header, blobs)
    documented = _documented_dump()
    assert len(data) == 284
    assert data[:-32] == documented[:-32]  # everything but the checksum
    assert data == documented  # deterministic JSON makes the checksum reproducible too
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()


def test_docstring_examples():
    result = doctest.testmod(container)
    assert result.attempted > 0 and result.failed == 0


def test_documented_example_fields():
    data = _documented_dump()
    magic, version, flags, hlen, plen = struct.unpack_from("<8sHHIQ", data)
    assert (magic, version, flags, hlen, plen) == (MAGIC, 2, 0, 224, 4)
    assert (24 + hlen) % 8 == 0
    payload = data[24 + hlen : 24 + hlen + plen]
    assert payload == bytes.fromhex("09 00 00 38")  # no offsets stored: float16 at 2
    header, blobs = loads(data)
    assert blobs == {"w": b"\x09", "w.scale": b"\x00\x38"}
    w, scale = (decode_tensor(e, blobs[e["name"]]) for e in header["tensors"])
    assert w.tolist() == [[1, 0], [0, 1]]
    assert scale.dtype == np.float16 and scale.tolist() == [0.5]


def test_write_container_produces_the_same_bytes(tmp_path):
    header, blobs = _example()
    path = tmp_path / "demo.fewbits"
    written = write_container(path, header, blobs)
    assert path.read_bytes() == _documented_dump()
    assert read_container(path) == (written, blobs)


# ------------------------------------------------------------------------------ round trips


def _varied() -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(0)
    arrays = {
        "conv.w": (rng.integers(0, 2, (4, 3, 3, 3)), "packed", 1),
        "conv.w3": (rng.integers(0, 8, (5, 7)), "packed", 3),
        "fc.w": (np.minimum(rng.geometric(0.3, (17, 9)) - 1, 255), "huffman", 8),
        "fc.b": (rng.standard_normal(9).astype(np.float32), "raw-float32", None),
        "bn.mean": (rng.standard_normal(3), "raw-float64", None),
        "bn.count": (np.array(7), "raw-int64", None),
        "empty": (np.zeros((0, 3), np.uint8), "packed", 2),
        "nul": (np.zeros((2, 0)), "raw-float16", None),
        "mask": (np.array([True, False, True]), "raw-bool", None),
        "wide": (rng.integers(0, 2**31, 5), "packed", 31),
        "größe": (np.arange(4), "huffman", 2),  # non-ASCII names are fine
    }
    entries, blobs = [], {}
    for name, (arr, enc, bits) in arrays.items():
        fields, blob = encode_tensor(arr, enc, **({"bits": bits} if bits else {}))
        entries.append({"name": name, "kind": "test", "params": {"delta": 0.0625}, **fields})
        blobs[name] = blob
    header = {"model": {"name": "mnist_float_mlp", "kwargs": {"num_classes": 10}},
              "tensors": entries}  # fmt: skip
    return header, blobs, {k: v[0] for k, v in arrays.items()}


def test_round_trip_all_encodings(tmp_path):
    header, blobs, arrays = _varied()
    path = tmp_path / "m.fewbits"
    written = write_container(path, header, blobs)
    read_header, read_blobs = read_container(path)
    assert read_header == written
    assert read_blobs == blobs
    assert read_header["model"] == header["model"]
    assert "fewbits_version" in read_header
    for entry in read_header["tensors"]:
        out = decode_tensor(entry, read_blobs[entry["name"]])
        expected = arrays[entry["name"]]
        assert out.shape == expected.shape
        np.testing.assert_array_equal(out, expected.astype(out.dtype))
        assert entry["params"] == {"delta": 0.0625}


def test_blobs_are_aligned_to_their_item_size_in_order():
    """Version 2: each raw blob at a multiple of its item size (viewable in place), code streams
    packed back to back, opaque blobs at a multiple of 8; zero gaps, none after the last."""
    header, blobs, _ = _varied()
    header["tensors"].insert(2, {"name": "opaque"})
    blobs["opaque"] = b"abc"
    data = dumps(header, blobs)
    read_header, read_blobs = loads(data)
    assert read_blobs == blobs
    hlen = struct.unpack_from("<I", data, 12)[0]
    assert (24 + hlen) % 8 == 0
    end = 0
    for entry in read_header["tensors"]:
        enc = entry.get("encoding", "")
        align = np.dtype(enc[4:]).itemsize if enc.startswith("raw-") else 1 if enc else 8
        assert entry["offset"] % align == 0 and entry["offset"] - end < align
        assert entry["offset"] == end + (-end % align)
        gap = data[24 + hlen + end : 24 + hlen + entry["offset"]]
        assert gap == bytes(len(gap))
        end = entry["offset"] + entry["length"]
    assert struct.unpack_from("<Q", data, 16)[0] == end  # no padding after the last blob
    stored = json.loads(data[24 : 24 + hlen])["tensors"]  # what the file itself holds
    assert all("offset" not in e for e in stored)
    assert [e["length"] for e in stored if "length" in e] == [3]  # the opaque blob's only


#: docs/FORMAT.md's worked example as format version 1 wrote it (offset/length in every entry,
#: 8-byte alignment), byte for byte: files written before version 2 must still load.
_VERSION_1_EXAMPLE = bytes.fromhex(
    "464557424954530001000000080100000a000000000000007b22666577626974735f76657273696f6e223a22"
    "302e312e30222c226d6f64656c223a7b226b7761726773223a7b7d2c226e616d65223a2264656d6f227d2c22"
    "74656e736f7273223a5b7b2262697473223a312c22656e636f64696e67223a227061636b6564222c226b696e"
    "64223a22776569676874222c226c656e677468223a312c226e616d65223a2277222c226f6666736574223a30"
    "2c227368617065223a5b322c325d7d2c7b22656e636f64696e67223a227261772d666c6f61743136222c226b"
    "696e64223a227363616c65222c226c656e677468223a322c226e616d65223a22772e7363616c65222c226f66"
    "66736574223a382c227368617065223a5b315d7d5d7d202009000000000000000038a982afa12e149f2dc0e9"
    "e790ceb6ddcf8f5af575bda2d13ee491074ce7dc3b51"
)


def test_version_1_files_still_load_to_the_same_table():
    old_header, old_blobs = loads(_VERSION_1_EXAMPLE)
    new_header, new_blobs = loads(dumps(*_example()))
    assert old_blobs == new_blobs == {"w": b"\x09", "w.scale": b"\x00\x38"}
    assert [(e["offset"], e["length"]) for e in old_header["tensors"]] == [(0, 1), (8, 2)]
    assert [(e["offset"], e["length"]) for e in new_header["tensors"]] == [(0, 1), (2, 2)]
    strip = [{k: v for k, v in e.items() if k not in ("offset", "length")}
             for h in (old_header, new_header) for e in h["tensors"]]
    assert strip[:2] == strip[2:]
    # rewritten, a version-1 table becomes version 2: the stored offsets are dropped
    assert dumps(old_header, old_blobs) == dumps(*_example())


def test_dumps_is_deterministic_and_does_not_mutate_the_header():
    header, blobs, _ = _varied()
    snapshot = json.dumps(header, sort_keys=True)
    assert dumps(header, blobs) == dumps(header, dict(reversed(blobs.items())))
    assert json.dumps(header, sort_keys=True) == snapshot
    assert "offset" not in header["tensors"][0]


def test_empty_container():
    data = dumps({}, {})
    header, blobs = loads(data)
    assert header["tensors"] == [] and blobs == {}
    assert len(data) == 24 + struct.unpack_from("<I", data, 12)[0] + 32


def test_blobs_may_be_any_bytes_like():
    arr = np.arange(6, dtype=np.uint8)
    header = {"tensors": [{"name": "a"}, {"name": "b"}]}
    _, blobs = loads(dumps(header, {"a": arr, "b": bytearray(b"xyz")}))
    assert blobs == {"a": arr.tobytes(), "b": b"xyz"}


# ---------------------------------------------------------------------------- tensor codecs


def test_encode_tensor_fields():
    codes = np.array([[0, 0, 0, 0], [1, 1, 2, 3]])
    fields, blob = encode_tensor(codes, "huffman", bits=2)
    assert fields == {"encoding": "huffman", "shape": [2, 4], "bits": 2, "bit_count": 14}
    assert blob == bytes.fromhex("01020303503b")  # docs/FORMAT.md section 5
    fields, blob = encode_tensor(np.array([1.5, -2.0], dtype=np.float64), "raw-float32")
    assert fields == {"encoding": "raw-float32", "shape": [2]}
    assert blob == np.array([1.5, -2.0], "<f4").tobytes()
    assert "raw-float16" in ENCODINGS and "packed" in ENCODINGS


def test_encode_tensor_errors():
    with pytest.raises(ValueError, match="unknown encoding 'zip'"):
        encode_tensor(np.zeros(2), "zip")
    with pytest.raises(ValueError, match=r"'packed' needs bits in 1\.\.32"):
        encode_tensor(np.zeros(2, np.uint8), "packed")
    with pytest.raises(ValueError, match=r"'huffman' needs bits in 1\.\.16, got 20"):
        encode_tensor(np.zeros(2, np.uint8), "huffman", bits=20)
    with pytest.raises(ValueError, match="bits does not apply"):
        encode_tensor(np.zeros(2), "raw-float32", bits=8)
    with pytest.raises(ValueError, match="refusing to cast float"):
        encode_tensor(np.zeros(2), "raw-int8")
    with pytest.raises(ValueError, match="code 9 does not fit in 3 bits"):
        encode_tensor(np.array([9]), "packed", bits=3)


def test_decode_tensor_checks_the_blob():
    with pytest.raises(ValueError, match=r"raw-float16 of shape \[3\] needs 6 bytes, blob has 4"):
        decode_tensor({"name": "s", "encoding": "raw-float16", "shape": [3]}, b"\0" * 4)
    with pytest.raises(ValueError, match="too short"):
        decode_tensor({"encoding": "packed", "shape": [9], "bits": 1}, b"\0")
    with pytest.raises(ValueError, match="unknown encoding 'lz4'"):
        decode_tensor({"name": "x", "encoding": "lz4", "shape": [1]}, b"\0")
    with pytest.raises(ValueError, match="shape must be a list"):
        decode_tensor({"encoding": "packed", "shape": "3", "bits": 1}, b"\0")
    with pytest.raises(ValueError, match="shorter than its 4-byte table"):
        decode_tensor({"encoding": "huffman", "shape": [1], "bits": 2, "bit_count": 1}, b"\1")


# ------------------------------------------------------------------------------ refusals


@pytest.fixture
def good(tmp_path) -> tuple[Path, bytes]:
    header, blobs = _example()
    path = tmp_path / "good.fewbits"
    write_container(path, header, blobs)
    return path, path.read_bytes()


def _refusal(tmp_path, data: bytes) -> FormatError:
    bad = tmp_path / "bad.fewbits"
    bad.write_bytes(data)
    with pytest.raises(FormatError) as info:
        read_container(bad)
    assert str(bad) in str(info.value), "the error must name the file"
    assert isinstance(info.value, ValueError)
    return info.value


def test_flipped_payload_byte_is_corrupt(tmp_path, good):
    _, data = good
    flipped = bytearray(data)
    flipped[24 + 224] ^= 0x01  # the packed weight byte
    err = _refusal(tmp_path, bytes(flipped))
    assert "checksum mismatch" in str(err) and "corrupt or was modified" in str(err)


def test_flipped_header_and_checksum_bytes_are_corrupt(tmp_path, good):
    _, data = good
    for pos in (30, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x20
        assert "checksum mismatch" in str(_refusal(tmp_path, bytes(flipped)))


@pytest.mark.parametrize("keep", [283, 250, 200, 24, 20, 8, 5])
def test_truncated_file(tmp_path, good, keep):
    _, data = good
    err = _refusal(tmp_path, data[:keep])
    assert "truncated" in str(err)
    if keep >= 24:
        assert f"expected 284 bytes (header 224, payload 4), found {keep}" in str(err)


def test_trailing_bytes(tmp_path, good):
    _, data = good
    err = _refusal(tmp_path, data + b"\0")
    assert "trailing bytes: expected 284 bytes" in str(err) and "found 285" in str(err)


@pytest.mark.parametrize("prefix", [b"GGUF\x03\x00\x00\x00", b"PK\x03\x04", b"", b"FEWBITZ\0"])
def test_bad_magic(tmp_path, good, prefix):
    _, data = good
    err = _refusal(tmp_path, prefix + data[len(prefix) :] if prefix else b"")
    assert "not a .fewbits file" in str(err)


def test_newer_version_is_refused_with_both_versions(tmp_path, good):
    _, data = good
    newer = data[:8] + struct.pack("<H", FORMAT_VERSION + 1) + data[10:]
    err = _refusal(tmp_path, _reseal(newer))
    assert f"format version {FORMAT_VERSION + 1} is newer than" in str(err)
    assert "this fewbits reads (1, 2)" in str(err)
    assert "upgrade fewbits" in str(err)


def test_unknown_old_version_is_refused(tmp_path, good):
    _, data = good
    err = _refusal(tmp_path, _reseal(data[:8] + b"\x00\x00" + data[10:]))
    assert "format version 0 is not one of the versions" in str(err)


def test_unknown_flags_are_refused(tmp_path, good):
    _, data = good
    err = _refusal(tmp_path, _reseal(data[:10] + b"\x02\x00" + data[12:]))
    assert "unknown flags 0x0002" in str(err)


def test_compressed_header_round_trips_and_is_flagged(tmp_path):
    header = {"model": {"name": "m"}, "tensors": [{"name": f"t{i}", "kind": "state"}
                                                   for i in range(50)]}
    blobs = {f"t{i}": bytes([i]) * 3 for i in range(50)}
    plain = dumps(header, blobs)
    packed = dumps(header, blobs, compress_header=True)
    assert struct.unpack_from("<H", packed, 10)[0] == 1
    assert len(packed) < len(plain) // 2
    h, b = loads(packed)
    assert b == blobs and h["model"] == {"name": "m"}
    path = tmp_path / "c.fewbits"
    written = write_container(path, header, blobs, compress_header=True)
    assert written["tensors"][3]["name"] == "t3"
    assert read_container(path)[1] == blobs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"tensors": [', "header is not valid UTF-8 JSON"),
        (b'{"a": 1, "a": 2}', "duplicate keys"),
        (b'{"x": NaN}', "NaN"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[1, 2]", "header is a JSON list, expected an object"),
    ],
)
def test_invalid_header_json(tmp_path, good, text, message):
    _, data = good
    err = _refusal(tmp_path, _with_header(data, text))
    assert message in str(err)


def _table(entries: list) -> bytes:
    return json.dumps({"tensors": entries}).encode()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "w", "offset": 8, "length": 3}], r"'w' spans payload bytes \[8, 11\), beyond "
         "the 10-byte payload"),
        ([{"name": "w", "offset": -1, "length": 1}], "int offset/length >= 0"),
        ([{"name": "w", "offset": 0}], "int offset/length >= 0"),
        ([{"offset": 0, "length": 1}], "needs a str name"),
        (["w"], "tensor table entry 0"),
        ([{"name": "a", "offset": 0, "length": 4}, {"name": "b", "offset": 2, "length": 2}],
         "'a' and 'b' overlap"),
        ([{"name": "a", "offset": 0, "length": 1}, {"name": "a", "offset": 8, "length": 1}],
         "duplicate tensor names"),
    ],
)  # fmt: skip
def test_inconsistent_version_1_tensor_table(tmp_path, entries, message):
    err = _refusal(tmp_path, _with_header(_VERSION_1_EXAMPLE, _table(entries)))
    assert re.search(message, str(err))


_W = {"name": "w", "encoding": "packed", "bits": 1, "shape": [2, 2]}
_S = {"name": "w.scale", "encoding": "raw-float16", "shape": [1]}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{**_W, "offset": 0}, _S], "'w' holds an offset or length: format version 2 derives"),
        ([{**_W, "length": 1}, _S], "'w' holds an offset or length"),
        ([_W], "the payload has 3 bytes after its last tensor"),
        ([_W, {**_S, "shape": [2]}], r"'w.scale' spans payload bytes \[2, 6\), beyond the "
         "4-byte payload"),
        ([_W, {**_S, "encoding": "raw-float32"}], r"spans payload bytes \[4, 8\)"),
        ([{**_W, "shape": [2] * 9}, _S], "'w': field 'shape' has 9 dimensions"),
        ([{**_W, "shape": [10**30]}, _S], "'w': field 'shape' .*multiply to more than"),
        # zero bytes, yet NumPy cannot shape it: it failed in decode_tensor, naming no file
        ([{**_W, "shape": [0, 2**70]}, _S], r"'w': field 'shape' \[0, 1180591620717411303424\]"),
        ([{**_W, "shape": [2**62, 0, 2**62]}, _S], "'w': field 'shape' .*more than the format's"),
        ([{**_W, "encoding": "huffman", "bit_count": 10**30}, _S], "'w': field 'bit_count'"),
        ([{**_W, "bits": 40}, _S], r"'w': field 'bits' must be an int in 1\.\.32"),
        ([{"name": "w", "length": 2**70}], r"'w': field 'length' must be an int in 0\.\.4"),
        ([{**_W, "encoding": "zip"}, _S], "'w': unknown encoding 'zip'"),
        (["w"], "tensor table entry 0 needs a str name"),
        ([_W, _W, _S], r"duplicate tensor names in the tensor table: \['w'\]"),
        ([{**_W, "shape": [16]}], "the payload has 2 bytes after its last tensor"),
    ],
)  # fmt: skip
def test_inconsistent_version_2_tensor_table(tmp_path, good, entries, message):
    _, data = good
    err = _refusal(tmp_path, _with_header(data, _table(entries)))
    assert re.search(message, str(err))


def test_nonzero_padding_is_refused(tmp_path, good):
    _, data = good
    hlen = struct.unpack_from("<I", data, 12)[0]
    bad = bytearray(data)
    bad[24 + hlen + 1] = 7  # the gap byte before the float16 scale
    assert "nonzero padding before tensor 'w.scale'" in str(_refusal(tmp_path, _reseal(bytes(bad))))


def test_tensors_must_be_a_list(tmp_path, good):
    _, data = good
    err = _refusal(tmp_path, _with_header(data, b'{"tensors": {"w": 1}}'))
    assert '"tensors" is not a list' in str(err)


def test_loads_names_its_source():
    with pytest.raises(FormatError, match=r"^<bytes>: not a \.fewbits file"):
        loads(b"hello world, this is not it")
    with pytest.raises(FormatError, match=r"^model\.bin: file is truncated"):
        loads(MAGIC + b"\x01", source="model.bin")


# ---------------------------------------------------------------------------- writer checks


@pytest.mark.parametrize(
    ("header", "blobs", "message"),
    [
        ({"tensors": [{"name": "a"}]}, {}, r"no blob for \['a'\]"),
        ({"tensors": []}, {"a": b"x"}, r"no header entry for \['a'\]"),
        ({"tensors": [{"name": "a"}, {"name": "a"}]}, {"a": b""}, "duplicate tensor names"),
        ({"tensors": [{"kind": "weight"}]}, {}, 'non-empty str "name"'),
        ({"tensors": {"a": {}}}, {"a": b""}, "must be a list of dicts"),
        ({"x": float("nan")}, {}, "not JSON-serialisable"),
        ({"x": np.float32(1)}, {}, "not JSON-serialisable"),
        ([("tensors", [])], {}, "header must be a dict"),
    ],
)
def test_writer_rejects_bad_input(header, blobs, message):
    with pytest.raises(ValueError, match=message):
        dumps(header, blobs)


# ------------------------------------------------------------------------------- atomicity


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    header, blobs = _example()
    path = tmp_path / "model.fewbits"
    write_container(path, header, blobs)
    old = path.read_bytes()

    def failing_chunks(head, placed):
        yield head  # some bytes reach the temporary file first
        raise RuntimeError("blob serialisation failed")

    monkeypatch.setattr(container, "_chunks", failing_chunks)
    with pytest.raises(RuntimeError, match="blob serialisation failed"):
        write_container(path, {"tensors": []}, {})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.fewbits"]

    with pytest.raises(RuntimeError, match="blob serialisation failed"):
        write_container(tmp_path / "new.fewbits", header, blobs)
    assert os.listdir(tmp_path) == ["model.fewbits"]


def test_failed_rename_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    header, blobs = _example()
    path = tmp_path / "model.fewbits"
    write_container(path, header, blobs)
    old = path.read_bytes()

    def no_replace(src, dst):
        assert Path(src).parent == Path(dst).parent  # the temp file lives beside the target
        assert Path(src).read_bytes() != old  # and holds the complete new file
        raise OSError("disk full")

    monkeypatch.setattr(container.os, "replace", no_replace)
    with pytest.raises(OSError, match="disk full"):
        write_container(path, {"tensors": []}, {})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.fewbits"]


def test_invalid_input_creates_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_container(tmp_path / "x.fewbits", {"tensors": [{"name": "a"}]}, {})
    assert os.listdir(tmp_path) == []


def test_written_file_gets_umask_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_container(tmp_path / "p.fewbits", {}, {})
    finally:
        os.umask(mask)
    assert (tmp_path / "p.fewbits").stat().st_mode & 0o777 == 0o644


def test_writer_refuses_an_entry_that_misdescribes_its_blob(tmp_path):
    """Format 2 places blobs by their entries: an entry whose fields do not describe its blob
    would shift every later blob, so the writer names it and writes nothing."""
    header = {"tensors": [{"name": "a", "encoding": "raw-float32", "shape": [3]},
                          {"name": "b", "encoding": "raw-uint8", "shape": [1]}]}
    with pytest.raises(ValueError, match=r"cannot write .*raw-float32 of shape \[3\] needs 12 "
                       "bytes, blob has 4"):
        write_container(tmp_path / "x.fewbits", header, {"a": b"\0" * 4, "b": b"\1"})
    assert os.listdir(tmp_path) == []
