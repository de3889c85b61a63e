"""Where the integer engine's values live: buffers reused by liveness (:class:`Buffers`) and
the maps two VNNI layers pass as bytes (:func:`link_u8_maps`). Read by
:class:`fewbits.runtime.integer.IntegerEngine` when it lays out a program for a batch size."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .integer_plan import Add, Concat, Conv, FAdd, Program

__all__ = ["Buffers", "link_u8_maps", "padded16", "value_reads"]


def value_reads(s: object) -> list[int]:
    """The values a step reads."""
    if isinstance(s, (Add, FAdd)):
        return [s.a, s.b]
    if isinstance(s, Concat):
        return list(s.srcs)
    return [s.src]


class Buffers:
    """Memory for the program's values, reused once a value is dead: a value's buffer returns
    to the free list after the last step that reads it (after that step's own output was
    placed, so no step writes over its inputs). The input (value 1) and the output are never
    reused."""

    def __init__(self, prog: Program) -> None:
        self.last: dict[int, int] = {}
        for k, s in enumerate(prog.steps):
            for v in value_reads(s):
                self.last[v] = k
            self.last.setdefault(s.dst, k)  # a value nothing reads dies where it is made
        self.last.pop(1, None)
        self.last.pop(prog.out.id, None)
        self.free: list[np.ndarray] = []
        self.owner: dict[int, np.ndarray] = {}
        self.dying: dict[int, list[int]] = {}
        for v, k in self.last.items():
            self.dying.setdefault(k, []).append(v)

    def take(self, value: int, shape: tuple[int, ...], dtype: type, over: tuple = (),
             at: int = -1) -> np.ndarray:
        """A ``shape`` / ``dtype`` array for ``value``: the buffer of a value in ``over``
        whose last read is step ``at`` (an elementwise step, which reads each element before
        it writes it), else the smallest free buffer that holds it, else a new one."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        for v in over:
            if self.last.get(v) == at and v in self.owner and self.owner[v].nbytes >= nbytes:
                buf = self.owner.pop(v)
                self.owner[value] = buf
                return buf[:nbytes].view(dtype).reshape(shape)
        fits = [b for b in self.free if b.nbytes >= nbytes]
        if fits:
            buf = min(fits, key=lambda b: b.nbytes)
            self.free = [b for b in self.free if b is not buf]
        else:
            buf = np.empty(max(nbytes, 1), np.uint8)
        self.owner[value] = buf
        return buf[:nbytes].view(dtype).reshape(shape)

    def step_done(self, k: int) -> None:
        """Step ``k`` ran its last read of some values: their buffers are free."""
        for v in self.dying.get(k, ()):
            buf = self.owner.pop(v, None)
            if buf is not None:
                self.free.append(buf)


def link_u8_maps(prog: Program, args: dict[int, Any], direct: Callable[[Any], bool]
                 ) -> dict[int, int]:
    """On VNNI (``args``: each conv's ``_ConvArgs``, updated here): the maps written as
    bytes ``code - shift`` by an integer-input layer (the VNNI epilogue) and read only by one
    layer on the direct u8 path (``direct``: the C engine's own test of a ``_ConvArgs``,
    ``fbi_u8_direct``), which then takes them as its byte image instead of
    converting int16 codes (``fbi_conv.out_u8`` / ``in_u8``); the codes lie in the reader's
    ``[ushift, ushift + 255]`` (``pack_u8`` took its weights for that range). ``{value:
    shift}``; the program's output is never one."""
    readers: dict[int, list] = {}
    for s in prog.steps:
        for v in value_reads(s):
            readers.setdefault(v, []).append(s)
    out: dict[int, int] = {}
    for s in prog.steps:
        if not isinstance(s, Conv) or s.float_in or s.quant is None or s.dst == prog.out.id:
            continue
        rs = readers.get(s.dst, [])
        if len(rs) != 1 or not isinstance(rs[0], Conv) or rs[0].float_in:
            continue
        a, b = args[id(s)], args[id(rs[0])]
        if direct(b):
            a.out_u8, a.u8shift, b.in_u8 = 1, b.ushift, 1
            out[s.dst] = b.ushift
    return out


def padded16(v: np.ndarray, dtype: type) -> np.ndarray:
    """A per-channel array padded with zeros to whole blocks of 16, and 16 more (the kernels
    load 16 channels at a time)."""
    out = np.zeros(-(-len(v) // 16) * 16 + 16, dtype)
    out[:len(v)] = v
    return out
