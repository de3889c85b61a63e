"""Read NNabla parameter files without NNabla: ``nn.save_parameters`` HDF5 files, ``.nnp``
archives and the protobuf parameter form.

What NNabla writes (``nnabla/utils/get_file_handle.py``):

* ``.h5`` (``_h5_parameter_file_saver``): one dataset per parameter at its scoped name
  (``conv2/conv1/bn/mean``), with attributes ``need_grad`` (bool) and ``index`` (creation
  order);
* ``.protobuf`` (``_protobuf_parameter_file_saver``): an ``NNablaProtoBuf`` message whose
  field 200 repeats ``Parameter {string variable_name = 1; Shape shape = 20; repeated float
  data = 100; bool need_grad = 101}`` and ``Shape {repeated int64 dim = 1 [packed]}``
  (``nnabla.proto``); decoded here by a small bounded wire-format reader;
* ``.nnp``: a ZIP archive holding ``network.nntxt`` and ``parameter.h5`` or
  ``parameter.protobuf`` (``_nnp_file_saver``).

Every field is hostile: sizes, counts, name lengths and ranks are bounded before anything is
allocated, HDF5 links other than hard links (soft and external links) and datasets whose
values live in another file (external storage, virtual datasets) are refused, and any
problem raises :class:`NNablaImportError` naming the file and the parameter.

    >>> import tempfile, os, h5py, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "params.h5")
    >>> with h5py.File(path, "w") as f:
    ...     f["affine/W"] = np.ones((4, 2), np.float32)
    >>> {k: v.shape for k, v in read_parameters(path).items()}
    {'affine/W': (4, 2)}
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import zipfile
from typing import Any

import numpy as np

__all__ = [
    "MAX_ELEMENTS",
    "MAX_FILE_BYTES",
    "MAX_NAME_LENGTH",
    "MAX_NDIM",
    "MAX_PARAMETERS",
    "NNablaImportError",
    "decode_parameter_protobuf",
    "read_parameters",
]

#: Bounds on what a parameter file may declare (the seed's networks hold ~100 parameters and
#: ~200,000 values; these leave room for far larger networks).
MAX_FILE_BYTES = 1 << 28
MAX_PARAMETERS = 100_000
MAX_NAME_LENGTH = 1024
MAX_NDIM = 8
MAX_ELEMENTS = 1 << 26  # all parameters together
_MAX_DEPTH = 64  # HDF5 group nesting
_MAX_LINKS = 2 * MAX_PARAMETERS  # groups and datasets walked
_MAX_ZIP_ENTRIES = 10_000
_NNP_PARAMETER_FILES = ("parameter.h5", "parameter.protobuf")


class NNablaImportError(ValueError):
    """An NNabla parameter file that cannot be imported; the message names the file, the
    parameter and the problem."""


def read_parameters(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The parameters of an NNabla file (``.h5``, ``.nnp`` or ``.protobuf``) by scoped name,
    as float32 arrays in NNabla's shapes, in file order.

    Raises :class:`NNablaImportError` for a missing, truncated or malformed file, a name,
    count, rank or size beyond the module's bounds, a duplicated name or a non-numeric
    dataset; ``ImportError`` (naming ``pip install fewbits[nnabla]``) when an HDF5 file needs
    ``h5py`` and it is not installed.
    """
    src = str(path)
    try:
        st = os.stat(src)
    except OSError as e:
        raise NNablaImportError(f"{src}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block for ever, a device never ends
        raise NNablaImportError(f"{src}: not a regular file; give the parameter file itself")
    size = st.st_size
    if size > MAX_FILE_BYTES:
        raise NNablaImportError(f"{src}: {size} bytes, more than the {MAX_FILE_BYTES} an NNabla "
                                "parameter file may have here")
    ext = os.path.splitext(src)[1].lower()
    if ext == ".nnp" or (ext not in (".h5", ".protobuf") and zipfile.is_zipfile(src)):
        return _read_nnp(src)
    if ext == ".h5":
        return _read_h5(src, src)
    with open(src, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if ext == ".protobuf":
        return decode_parameter_protobuf(data, src)
    if not data.startswith(b"\x89HDF\r\n\x1a\n"):
        raise NNablaImportError(f"{src}: neither an HDF5 file (nn.save_parameters '.h5'), an "
                                "'.nnp' archive nor a '.protobuf' parameter file")
    return _read_h5(io.BytesIO(data), src)


def _read_nnp(src: str) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(src) as z:
            infos = z.infolist()
            if len(infos) > _MAX_ZIP_ENTRIES:
                raise NNablaImportError(f"{src}: {len(infos)} archive entries, more than "
                                        f"{_MAX_ZIP_ENTRIES}")
            by_name = {i.filename: i for i in infos}
            twice = [n for n in _NNP_PARAMETER_FILES
                     if sum(i.filename == n for i in infos) > 1]
            if twice:  # readers disagree on which copy counts
                raise NNablaImportError(f"{src}: the .nnp archive holds {twice[0]} twice")
            name = next((n for n in _NNP_PARAMETER_FILES if n in by_name), None)
            if name is None:
                raise NNablaImportError(
                    f"{src}: the .nnp archive holds no parameter file (looked for "
                    f"{' or '.join(_NNP_PARAMETER_FILES)}; it has "
                    f"{', '.join(sorted(by_name)[:8]) or 'nothing'})")
            info = by_name[name]
            if info.file_size > MAX_FILE_BYTES:
                raise NNablaImportError(f"{src}: {name} declares {info.file_size} bytes, more "
                                        f"than {MAX_FILE_BYTES}")
            with z.open(info) as f:
                data = f.read(MAX_FILE_BYTES + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError,
            RuntimeError) as e:  # RuntimeError: encrypted entries
        raise NNablaImportError(f"{src}: not a readable .nnp archive ({e})") from None
    where = f"{src}:{name}"
    if name.endswith(".h5"):
        return _read_h5(io.BytesIO(data), where)
    return decode_parameter_protobuf(data, where)


# --------------------------------------------------------------------------- HDF5


def _read_h5(fileobj: Any, src: str) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError as e:  # the optional extra
        raise ImportError(f"{src}: reading NNabla .h5 parameters needs h5py: pip install "
                          "'fewbits[nnabla]'") from e
    try:
        with h5py.File(fileobj, "r") as f:
            found: list[tuple[str, Any]] = []
            _walk_h5(f, "", 0, found, src, h5py, set())
            out: dict[str, np.ndarray] = {}
            total = 0
            # names are keys: the `index` (creation order) and `need_grad` attributes are not read
            for name, ds in found:
                total += _bounded(name, tuple(int(s) for s in ds.shape), total, src)
                if ds.dtype.kind not in "fiub":
                    raise NNablaImportError(f"{src}: parameter {name!r} has dtype {ds.dtype}; "
                                            "NNabla parameters are numbers")
                out[name] = _as_float32(np.asarray(ds[()]), name, src)
            return out
    except NNablaImportError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise NNablaImportError(f"{src}: not a readable HDF5 parameter file "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                ) from None


def _walk_h5(group: Any, prefix: str, depth: int, found: list[tuple[str, Any]], src: str,
             h5py: Any, seen: set) -> None:
    # `seen` holds every object walked: hard links may make a group reachable twice from each
    # parent (40 nested levels of two links each are 2**40 paths), so one reached again is
    # refused; NNabla writes a tree
    if depth > _MAX_DEPTH:
        raise NNablaImportError(f"{src}: groups nested deeper than {_MAX_DEPTH} at {prefix!r}")
    for key in group:
        name = f"{prefix}{key}"
        if len(found) >= MAX_PARAMETERS or len(seen) >= _MAX_LINKS:
            raise NNablaImportError(f"{src}: more than {MAX_PARAMETERS} parameters (or "
                                    f"{_MAX_LINKS} groups and datasets)")
        if len(name) > MAX_NAME_LENGTH:
            raise NNablaImportError(f"{src}: a parameter name is longer than "
                                    f"{MAX_NAME_LENGTH} characters ({name[:60]!r}...)")
        link = group.get(key, getlink=True)
        if not isinstance(link, h5py.HardLink):  # soft or external: may point anywhere
            raise NNablaImportError(f"{src}: {name!r} is a {type(link).__name__}; NNabla "
                                    "writes plain datasets only")
        obj = group[key]
        if obj.id in seen:
            raise NNablaImportError(f"{src}: {name!r} is an object already reached under "
                                    "another name (a second hard link); NNabla writes a tree")
        seen.add(obj.id)
        if isinstance(obj, h5py.Group):
            _walk_h5(obj, name + "/", depth + 1, found, src, h5py, seen)
        elif isinstance(obj, h5py.Dataset):
            # external raw files and virtual datasets read other files the file names
            if obj.external or obj.is_virtual:
                raise NNablaImportError(f"{src}: parameter {name!r} keeps its values in another "
                                        "file (an external or virtual dataset); NNabla writes "
                                        "them inside the file")
            found.append((name, obj))
        else:
            raise NNablaImportError(f"{src}: {name!r} is neither a group nor a dataset")


def _bounded(name: str, shape: tuple[int, ...], total: int, src: str) -> int:
    if len(shape) > MAX_NDIM:
        raise NNablaImportError(f"{src}: parameter {name!r} has {len(shape)} dimensions, more "
                                f"than {MAX_NDIM}")
    if any(s < 0 for s in shape):
        raise NNablaImportError(f"{src}: parameter {name!r} has a negative dimension {shape}")
    n = math.prod(shape)
    if total + n > MAX_ELEMENTS:
        raise NNablaImportError(f"{src}: parameters hold more than {MAX_ELEMENTS} values "
                                f"(at {name!r}, shape {shape})")
    return n


def _as_float32(a: np.ndarray, name: str, src: str) -> np.ndarray:
    if a.dtype == np.float32:
        return np.ascontiguousarray(a)
    b = a.astype(np.float32)
    if a.dtype.kind in "iub" and not np.array_equal(b.astype(a.dtype), a):
        raise NNablaImportError(f"{src}: parameter {name!r}: integer values beyond float32")
    return b


# --------------------------------------------------------------------------- protobuf


def decode_parameter_protobuf(data: bytes, src: str = "<protobuf>") -> dict[str, np.ndarray]:
    """The parameters of a serialized ``NNablaProtoBuf`` (NNabla's ``parameter.protobuf``):
    field 200 ``Parameter`` messages; every other field is skipped by its wire type.

    Raises :class:`NNablaImportError` for truncated or malformed wire data (a varint over 10
    bytes, a length past its message, a deprecated group, an unknown wire type), a shape that
    does not match the number of values, a duplicated name, or anything beyond the bounds.

        >>> decode_parameter_protobuf(b"")
        {}
    """
    out: dict[str, np.ndarray] = {}
    total = 0
    for field, wire, val in _fields(data, 0, len(data), src, "NNablaProtoBuf"):
        if field != 200:
            continue
        if wire != 2:
            raise NNablaImportError(f"{src}: NNablaProtoBuf.parameter has wire type {wire}, "
                                    "expected a message")
        if len(out) >= MAX_PARAMETERS:
            raise NNablaImportError(f"{src}: more than {MAX_PARAMETERS} parameters")
        name, arr = _parameter(data, val[0], val[1], src, total)
        if name in out:
            raise NNablaImportError(f"{src}: parameter {name!r} appears twice")
        total += arr.size
        out[name] = arr
    return out


def _parameter(buf: bytes, start: int, end: int, src: str,
               total: int) -> tuple[str, np.ndarray]:
    name = None
    dims: list[int] = []
    raw = bytearray()  # little-endian float32 values, packed and unpacked alike
    count = 0
    for field, wire, val in _fields(buf, start, end, src, "Parameter"):
        if field == 1 and wire == 2:
            if val[1] - val[0] > MAX_NAME_LENGTH:
                raise NNablaImportError(f"{src}: a parameter name is longer than "
                                        f"{MAX_NAME_LENGTH} bytes")
            try:
                name = buf[val[0]:val[1]].decode("utf-8")
            except UnicodeDecodeError:
                raise NNablaImportError(f"{src}: a parameter name is not UTF-8") from None
        elif field == 20 and wire == 2:  # Shape; repeated occurrences merge
            for f2, w2, v2 in _fields(buf, val[0], val[1], src, "Shape"):
                if f2 != 1:
                    continue
                if w2 == 0:
                    dims.append(_int64(v2))
                elif w2 == 2:
                    pos = v2[0]
                    while pos < v2[1]:
                        v, pos = _varint(buf, pos, v2[1], src)
                        dims.append(_int64(v))
                        if len(dims) > MAX_NDIM:
                            break
                else:
                    raise NNablaImportError(f"{src}: Shape.dim has wire type {w2}")
                if len(dims) > MAX_NDIM:
                    raise NNablaImportError(f"{src}: parameter {name!r}: more than {MAX_NDIM} "
                                            "dimensions")
        elif field == 100 and wire == 2:  # packed floats
            n = val[1] - val[0]
            if n % 4:
                raise NNablaImportError(f"{src}: parameter {name!r}: packed data of {n} bytes "
                                        "is not whole float32 values")
            count += n // 4
            if total + count > MAX_ELEMENTS:
                raise NNablaImportError(f"{src}: parameters hold more than {MAX_ELEMENTS} "
                                        "values")
            raw += buf[val[0]:val[1]]
        elif field == 100 and wire == 5:  # one unpacked float
            count += 1
            if total + count > MAX_ELEMENTS:
                raise NNablaImportError(f"{src}: parameters hold more than {MAX_ELEMENTS} "
                                        "values")
            raw += struct.pack("<I", val)
        elif field in (1, 20, 100):
            raise NNablaImportError(f"{src}: Parameter field {field} has wire type {wire}")
    if name is None:
        raise NNablaImportError(f"{src}: a parameter without variable_name")
    shape = tuple(dims)
    _bounded(name, shape, total, src)
    data = np.frombuffer(bytes(raw), "<f4")
    if data.size != math.prod(shape):
        raise NNablaImportError(f"{src}: parameter {name!r}: shape {shape} needs "
                                f"{math.prod(shape)} values, the file has {data.size}")
    return name, data.astype(np.float32).reshape(shape)


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _varint(buf: bytes, pos: int, end: int, src: str) -> tuple[int, int]:
    result = shift = 0
    for i in range(10):
        if pos >= end:
            raise NNablaImportError(f"{src}: truncated protobuf (a varint runs past its "
                                    "message)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if i == 9 and b > 1:
                break
            return result, pos
        shift += 7
    raise NNablaImportError(f"{src}: malformed protobuf (a varint longer than 64 bits)")


def _fields(buf: bytes, pos: int, end: int, src: str, msg: str):
    """``(field number, wire type, value)`` of each field in ``buf[pos:end]``; the value is an
    int (varint, fixed32, fixed64) or a ``(start, end)`` slice (length-delimited)."""
    while pos < end:
        key, pos = _varint(buf, pos, end, src)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise NNablaImportError(f"{src}: malformed protobuf (field number 0 in {msg})")
        if wire == 0:
            val, pos = _varint(buf, pos, end, src)
            yield field, wire, val
        elif wire == 1 or wire == 5:
            n = 8 if wire == 1 else 4
            if pos + n > end:
                raise NNablaImportError(f"{src}: truncated protobuf in {msg}")
            yield field, wire, int.from_bytes(buf[pos:pos + n], "little")
            pos += n
        elif wire == 2:
            n, pos = _varint(buf, pos, end, src)
            if n > end - pos:
                raise NNablaImportError(f"{src}: truncated protobuf ({msg} field {field} "
                                        f"declares {n} bytes, {end - pos} are left)")
            yield field, wire, (pos, pos + n)
            pos += n
        else:
            raise NNablaImportError(f"{src}: malformed protobuf (wire type {wire} in {msg})")
