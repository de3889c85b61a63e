"""A convolution's zero padding as explicit sizes, for the native engines
(:mod:`~fewbits.runtime.integer_plan`, :mod:`~fewbits.runtime.binary_ops`): PyTorch's
``padding="same"`` / ``"valid"`` strings read as the integer padding they are.

    >>> zero_padding(nn.Conv2d(3, 8, 3, padding="same"))
    (1, 1)
    >>> zero_padding(nn.Conv2d(3, 8, (5, 3), padding="same", dilation=2))
    (4, 2)
    >>> zero_padding(nn.Conv2d(3, 8, 2, padding="same")) is None  # pads one side more
    True
"""

from __future__ import annotations

from torch import nn

__all__ = ["zero_padding"]


def zero_padding(m: nn.Conv2d) -> tuple[int, int] | None:
    """``(ph, pw)``: the zero padding on each side of ``m``'s map that ``m.padding`` means
    (integers as they are; ``"valid"`` none; ``"same"``, which PyTorch allows at stride 1 only,
    ``dilation * (kernel - 1) / 2`` where that total is even), or None where there is no such
    pair: another ``padding_mode`` (reflect, replicate, circular), or ``"same"`` with an even
    total, which PyTorch pads one pixel more on the bottom / right side."""
    if m.padding_mode != "zeros":
        return None
    if m.padding == "valid":
        return 0, 0
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return int(m.padding[0]), int(m.padding[1])
