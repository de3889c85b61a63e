"""A restricted reader for the CIFAR-10 python batches: the official layout, nothing else.

The batches are pickles. Even an allow-list unpickler that admits only ``numpy.ndarray`` and
``numpy.dtype`` lets a file build an object array whose pointers come from the file (a crash,
SIGSEGV) or a zero-stride array of gigabytes from a few bytes. So no pickle machinery runs
here: :func:`read_pickle` walks the opcodes (each argument read by :mod:`pickletools`' reader
for it, with a bounds check against the bytes left; at most :data:`MAX_OPCODES` of them, binary
protocols 2-5 only) on a small stack machine of its own that
builds only ``dict``, ``list``, ``tuple``, ``str``, ``bytes``, ``int``, ``float``, ``bool``,
``None`` and contiguous NumPy arrays of integer dtype:

- the only globals are numpy's array reconstruction (``_reconstruct`` / ``_frombuffer`` of
  protocols 2-5), ``numpy.dtype`` with an integer type code (``u1``, ``i8``, ...: never an
  object, float or structured dtype) and ``_codecs.encode(text, "latin1")`` (protocol 2 bytes);
  they are stand-ins defined here, never imported;
- an array's bytes must be exactly ``prod(shape) * itemsize`` of the file's own bytes (no
  strides, no repetition): element counts are bounded by the file's size;
- copies (a text encoded to bytes, a byte-swapped array) total at most twice the file's size
  (memoized data cannot be built again and again); dict keys and global names are flat text
  (a deeply nested tuple would be hashed recursively in C);
- any other opcode (object construction, extensions, out-of-band buffers, persistent ids) is
  refused, naming it.

Errors are ``ValueError`` with the reason; the caller names the file.

    >>> import pickle
    >>> read_pickle(pickle.dumps({b"labels": [1, 2]}, protocol=2))
    {b'labels': [1, 2]}
"""

from __future__ import annotations

import io
import math
import pickletools
from typing import Any

import numpy as np

__all__ = ["MAX_OPCODES", "read_pickle"]

#: Integer type codes an array may have (a byte-order prefix is allowed: ``<i8``).
_INT_CODES = frozenset({"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"})
# Binary opcodes only (protocols 2-5, which the official files and NumPy use): the text forms
# of protocol 0 (INT, LONG, STRING, ...) would convert digits of any length.
_TEXT_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})
_STR_OPS = frozenset({"SHORT_BINSTRING", "BINSTRING"})  # Python 2 str (read as latin-1)
_BYTES_OPS = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"})
_NUMBER_OPS = frozenset({"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT"})
_PUT_OPS = frozenset({"BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"BINGET", "LONG_BINGET"})
_SKIP_OPS = frozenset({"PROTO", "FRAME"})
_OTHER_OPS = frozenset({"STOP", "NONE", "NEWTRUE", "NEWFALSE", "MARK", "POP", "EMPTY_DICT",
                        "EMPTY_LIST", "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE",
                        "LIST", "DICT", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MEMOIZE",
                        "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD"})
_ALLOWED = {op.code.encode("latin-1"): op for op in pickletools.opcodes
            if op.name in _TEXT_OPS | _STR_OPS | _BYTES_OPS | _NUMBER_OPS | _PUT_OPS | _GET_OPS
            | _SKIP_OPS | _OTHER_OPS}
_NAMES = {op.code.encode("latin-1"): op.name for op in pickletools.opcodes}
#: Most opcodes a batch may hold (an official batch has about 40,000: a label and a file name
#: per image); each costs a few microseconds.
MAX_OPCODES = 200_000


class _Global:
    """A stand-in for one allowed global; calling it is done by :func:`_reduce`."""

    def __init__(self, name: str) -> None:
        self.name = name


_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",
}


class _Dtype:
    """``numpy.dtype(code)`` of an integer code, its byte order set by ``BUILD``."""

    def __init__(self, code: str) -> None:
        self.code, self.order = code, "|"

    def numpy(self) -> np.dtype:
        order = {"|": "=", "=": "="}.get(self.order, self.order)
        return np.dtype(self.code).newbyteorder(order)


class _Array:
    """An array waiting for its state (``BUILD``)."""


class _Budget:
    """Bytes the reader may still allocate beyond the file's own: every copy (a text encoded
    to bytes, an array byte-swapped) is charged, up to twice the file's size, so memoized data
    reused by ``BINGET`` cannot multiply a small file into gigabytes."""

    def __init__(self, limit: int) -> None:
        self.limit, self.left = limit, 2 * limit

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ValueError(f"the pickle builds more than twice its own {self.limit:,} bytes "
                             "of data (memoized data used again)")


def _dtype(args: tuple) -> _Dtype:
    code = args[0] if args else None
    if isinstance(code, bytes):
        code = code.decode("latin1")
    if not isinstance(code, str) or code.lstrip("<>|=") not in _INT_CODES:
        raise ValueError(f"dtype {str(code)[:20]!r} is not allowed (only integer arrays: "
                         f"{', '.join(sorted(_INT_CODES))})")
    return _Dtype(code.lstrip("<>|="))


def _dtype_state(d: _Dtype, state: Any) -> None:
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[1] in ("<", ">", "|", "=")
            and state[2:5] == (None, None, None)):
        raise ValueError("a dtype state that is not a plain integer type")
    d.order = state[1]


def _shape(shape: Any, limit: int) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > 8 or not all(
            type(s) is int and 0 <= s <= limit for s in shape):
        raise ValueError("an array shape that is not a tuple of at most 8 sizes in "
                         f"0..{limit} (the file's size)")
    return shape


def _array(raw: Any, dtype: Any, shape: tuple[int, ...], fortran: bool,
           budget: _Budget) -> np.ndarray:
    if not isinstance(dtype, _Dtype):
        raise ValueError("an array without an integer dtype")
    if isinstance(raw, str):
        budget.spend(len(raw))
        raw = raw.encode("latin1")  # a Python 2 str buffer
    if not isinstance(raw, bytes):
        raise ValueError(f"an array whose data is {type(raw).__name__}, not bytes (object "
                         "arrays are not allowed)")
    dt = dtype.numpy()
    need = math.prod(shape) * dt.itemsize
    if len(raw) != need:
        raise ValueError(f"an array of shape {shape} and dtype {dt} needs {need} bytes, the "
                         f"file gives {len(raw)}")
    out = np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")
    if not dt.isnative:
        budget.spend(need)  # the byte-swapped copy below
    return out.astype(dt.newbyteorder("="), copy=False)


def _reduce(fn: Any, args: Any, budget: _Budget) -> Any:
    if not isinstance(fn, _Global) or not isinstance(args, tuple):
        raise ValueError("a call of something other than numpy's array reconstruction")
    if fn.name == "dtype":
        return _dtype(args)
    if fn.name == "reconstruct":
        if len(args) != 3 or not isinstance(args[0], _Global) or args[0].name != "ndarray":
            raise ValueError("an array reconstruction of another type than numpy.ndarray")
        return _Array()
    if fn.name == "frombuffer":  # protocol 5: _frombuffer(buf, dtype, shape, order)
        if len(args) != 4 or args[3] not in ("C", "F"):
            raise ValueError("a malformed array buffer")
        return _array(args[0], args[1], _shape(args[2], budget.limit), args[3] == "F",
                      budget)
    if fn.name == "encode":  # protocol 2 bytes: _codecs.encode(text, "latin1")
        if (len(args) != 2 or not isinstance(args[0], str)
                or args[1] not in ("latin1", "latin-1")):
            raise ValueError("a text encoding other than latin1")
        budget.spend(len(args[0]))
        return args[0].encode("latin1")
    raise ValueError(f"a call of {fn.name}")


def _build(obj: Any, state: Any, budget: _Budget) -> Any:
    if isinstance(obj, _Dtype):
        _dtype_state(obj, state)
        return obj
    if isinstance(obj, _Array):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1
                and isinstance(state[3], bool)):
            raise ValueError("an array state that is not (1, shape, dtype, fortran, bytes)")
        return _array(state[4], state[2], _shape(state[1], budget.limit), state[3], budget)
    raise ValueError(f"setting the state of a {type(obj).__name__}")


def _pop_mark(stack: list, marks: list) -> list:
    if not marks:
        raise ValueError("a MARK is missing")
    at = marks.pop()
    items = stack[at:]
    del stack[at:]
    return items


def _key(k: Any) -> Any:
    # only flat keys: hashing a tuple nested 190,000 deep recurses in C and crashes (SIGSEGV)
    if type(k) not in (str, bytes, int):
        raise ValueError(f"a malformed pickle: a dict key of type {type(k).__name__} (a batch's "
                         "keys are text)")
    return k


def _pairs(items: list) -> list:
    if len(items) % 2:
        raise ValueError("an odd number of dict items")
    return [(_key(k), v) for k, v in zip(items[::2], items[1::2], strict=True)]


def _container(stack: list, kind: type) -> Any:
    if not stack or type(stack[-1]) is not kind:
        raise ValueError(f"a {kind.__name__} operation on "
                         f"{type(stack[-1]).__name__ if stack else 'an empty stack'}")
    return stack[-1]


def read_pickle(data: bytes) -> Any:
    """The object of the pickle ``data``, built from the restricted vocabulary above;
    ``ValueError`` naming what is not allowed or malformed."""
    budget = _Budget(len(data))
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    f = io.BytesIO(data)
    try:
        for _ in range(MAX_OPCODES):
            code = f.read(1)
            if not code:
                break
            op = _ALLOWED.get(code)
            if op is None:
                raise ValueError(f"pickle opcode {_NAMES.get(code, code.hex())} is not allowed "
                                 "in a CIFAR batch")
            # the argument is read by pickletools (its length checked against the bytes left)
            arg = None if op.arg is None else op.arg.reader(f)
            name = op.name
            if name in _SKIP_OPS:
                continue
            if name == "STOP":
                if len(stack) != 1 or marks:
                    raise ValueError("the pickle does not end with exactly one object")
                out = stack.pop()
                if isinstance(out, (_Array, _Dtype, _Global)):
                    raise ValueError("an unfinished array")
                return out
            if name in _NUMBER_OPS or name in _TEXT_OPS or name in _STR_OPS:
                stack.append(arg)
            elif name in _BYTES_OPS:
                stack.append(bytes(arg))
            elif name == "NONE":
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "POP":
                stack.pop()
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(stack) < n:
                    raise ValueError("stack underflow")
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif name == "TUPLE":
                stack.append(tuple(_pop_mark(stack, marks)))
            elif name == "LIST":
                stack.append(_pop_mark(stack, marks))
            elif name == "DICT":
                stack.append(dict(_pairs(_pop_mark(stack, marks))))
            elif name == "APPEND":
                v = stack.pop()
                _container(stack, list).append(v)
            elif name == "APPENDS":
                items = _pop_mark(stack, marks)
                _container(stack, list).extend(items)
            elif name == "SETITEM":
                v, k = stack.pop(), stack.pop()
                _container(stack, dict)[_key(k)] = v
            elif name == "SETITEMS":
                items = _pop_mark(stack, marks)
                _container(stack, dict).update(_pairs(items))
            elif name in _PUT_OPS:
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in _GET_OPS:
                stack.append(memo[int(arg)])
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, _, attr = str(arg).partition(" ")
                else:
                    attr, module = stack.pop(), stack.pop()
                if type(module) is not str or type(attr) is not str:
                    raise ValueError("a global named by something other than text")
                key = (module, attr)
                if key not in _GLOBALS:
                    raise ValueError(f"global {str(module)[:60]}.{str(attr)[:60]} is not "
                                     "allowed in a CIFAR batch")
                stack.append(_Global(_GLOBALS[key]))
            elif name == "REDUCE":
                args, fn = stack.pop(), stack.pop()
                stack.append(_reduce(fn, args, budget))
            elif name == "BUILD":
                state = stack.pop()
                stack.append(_build(stack.pop(), state, budget))
        else:
            raise ValueError(f"more than {MAX_OPCODES:,} pickle opcodes (an official batch has "
                             "about 40,000)")
    except IndexError:
        raise ValueError("stack underflow (a malformed pickle)") from None
    except KeyError as e:
        raise ValueError(f"a memo reference {str(e)[:20]} that was never stored") from None
    except RecursionError:  # comparing or printing objects nested too deep
        raise ValueError("objects nested too deep (a malformed pickle)") from None
    except TypeError as e:  # an unhashable dict key, say
        raise ValueError(f"a malformed pickle: {str(e)[:200]}") from None
    raise ValueError("the pickle has no STOP (truncated)")
