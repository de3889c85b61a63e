"""The first layer on images of 8-bit pixels: ``uint8 / 255`` (torchvision's ``ToTensor``,
fewbits' own loaders, most decoded JPEG / PNG pipelines).

Such an image's every value is ``fl(k / 255)`` (float32's correctly rounded quotient) for an
integer ``k`` in ``[0, 255]``. The first layer then multiplies the codes ``k`` by its integer
weights (u8 x s8 on AVX2 / VNNI, as the hidden layers) and scales the int32 sums by
``fl(1/255) * s_w`` once, instead of summing float products: the stem of ResNet-23 runs ~4x
faster. Its sums are the exact sums of ``(k / 255) * w``; PyTorch's are float sums of
``fl(k / 255) * w`` in oneDNN's order, and the engine's float path sums them in its own order:
the three differ by float32 rounding only (a relative 2^-24 per pixel, a few units in the last
place of a sum), within the tolerance the planner checks, as any float-input layer.

The engine decides per image (``fbi_run`` step kind 8): every value must equal ``k / 255``
rounded, bit for bit (``-0`` as ``+0``); an image that does not (mean / std normalized images,
``k / 256``, noise) runs the float layer, so nothing changes for it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .integer_mem import value_reads
from .integer_plan import Compiler, Conv

__all__ = ["GRID_LEVELS", "grid_layer"]

#: pixel codes ``k`` in ``[0, GRID_LEVELS]``: the images ``uint8 / 255`` make
GRID_LEVELS = 255


def grid_layer(comp: Compiler) -> Conv | None:
    """The program's first layer again, reading the images' codes ``k`` (NHWC, value
    ``k * fl(1/255)``, channels padded with zeros to a multiple of 4) instead of the float
    images; every epilogue field as the float layer's
    (same output). None where no single layer reads the images, or its weights are not on a
    uniform integer grid (a float first layer: the engine keeps the float layer only), or
    padding its channels to a quad would add more than a third."""
    prog = comp.prog
    readers = [s for s in prog.steps if 1 in value_reads(s)]
    if len(prog.in_shape) != 3 or len(readers) != 1 or not isinstance(readers[0], Conv) or \
            not readers[0].float_in or \
            readers[0].nhwc or prog.out is None or prog.out.id == 1:
        return None
    first = readers[0]
    # channels padded to whole quads (zero codes, zero weights): the u8 layers' direct path
    # reads a pixel's taps as quads of bytes (fbi_u8_direct); a grouped layer's groups split
    # the channels as they are
    c, h, w = prog.in_shape
    cy = -(-c // 4) * 4 if first.geom["groups"] == 1 else c
    if 3 * cy > 4 * c:  # padding adds more than a third (1, 2, 5 channels): the u8 layer
        return None  # multiplies 1.6-4x the bytes, slower than the float one on AVX2 (LeNet)
    codes = comp.new("int", (cy, h, w), scale=float(np.float32(1.0 / GRID_LEVELS)), lo=0,
                     hi=GRID_LEVELS)
    try:
        alt = comp.layer(first.name, comp.modules[first.name], codes)
    except ValueError:  # float weights: no integer codes to multiply
        return None
    return dataclasses.replace(
        first, src=codes.id, geom={**first.geom, "cin": alt.geom["cin"], "kp": alt.geom["kp"],
                                   "kf": 0},
        wpack=alt.wpack, sacc=alt.sacc, float_in=False, nhwc=False, wpack8=alt.wpack8,
        kq4=alt.kq4, kchunk=alt.kchunk, ushift=alt.ushift, corr=alt.corr,
        acc_range=alt.acc_range)
