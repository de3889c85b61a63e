"""What a node of a model's ``torch.fx`` graph is to the binary engine
(:mod:`~fewbits.runtime.binary_graph`): a binary_tanh, a convolution's geometry, a max pooling's
window, a global average pool, a flatten; and the refusal that names an uncovered node.

    >>> out_size(32, 7, 3, 2)   # a 7x7/2 convolution with padding 3 on 32 pixels
    16
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .conv_pad import zero_padding

__all__ = ["POOL_ARGS", "conv_geometry", "is_binary_tanh", "is_flatten", "is_global_pool",
           "max_pool_geometry", "out_size", "refuse"]


def is_binary_tanh(q: object) -> bool:
    """Whether quantizer ``q`` is a sign activation with levels -1 / +1 (binary_tanh)."""
    # ask the family: a sign activation with levels -1 / +1 (binary_tanh), never its class
    levels = getattr(q, "step_levels", None)
    return callable(levels) and levels() == (-1.0, 1.0)


def refuse(node: fx.Node, what: str) -> ValueError:
    """The ``ValueError`` (to raise) that names ``node`` and the operation not covered."""
    return ValueError(f"operation not covered by the binary engine: {what} (graph node "
                      f"{node.name!r}: {node.op} {getattr(node.target, '__name__', node.target)})")


def conv_geometry(node: fx.Node, m: nn.Module) -> tuple[int, int, int]:
    """``(k, padding, stride)`` of a square convolution (``(0, 0, 1)`` for an affine);
    raises (:func:`refuse`) for dilation, groups, other padding modes, unequal sides, or a
    padding as large as the kernel (output pixels with no input)."""
    if isinstance(m, nn.Linear):
        return 0, 0, 1
    if not isinstance(m, nn.Conv2d):
        raise refuse(node, f"layer {type(m).__name__}")
    pad = zero_padding(m)  # "same" / "valid" as the integers they mean
    bad = [f"stride {m.stride}" if m.stride[0] != m.stride[1] else "",
           f"dilation {m.dilation}" if m.dilation != (1, 1) else "",
           f"groups {m.groups}" if m.groups != 1 else "",
           f"padding mode {m.padding_mode!r}" if m.padding_mode != "zeros" else "",
           f"padding {m.padding!r}" if m.padding_mode == "zeros" and
           (pad is None or pad[0] != pad[1]) else "",
           f"kernel {m.kernel_size}" if m.kernel_size[0] != m.kernel_size[1] else "",
           f"padding {m.padding} >= kernel" if pad is not None and pad[0] >= m.kernel_size[0]
           else ""]
    bad = [b for b in bad if b]
    if bad or pad is None:
        raise refuse(node, f"convolution {node.target} with {', '.join(bad)} (the engine runs "
                      "square convolutions with zero padding and equal strides)")
    return m.kernel_size[0], pad[0], m.stride[0]


def out_size(n: int, k: int, pad: int, stride: int) -> int:
    """Output side of a window ``k`` with padding ``pad`` and ``stride`` on ``n`` pixels."""
    return (n + 2 * pad - k) // stride + 1


def is_global_pool(node: fx.Node, m: nn.Module | None, h: int, w: int) -> bool:
    """Whether the node averages an ``h x w`` map to one value per channel."""
    def one(s: object) -> bool:
        return s in (1, (1, 1))

    if m is not None:
        # divisor_override divides the window's sum by another count than h * w
        return (isinstance(m, nn.AdaptiveAvgPool2d) and one(m.output_size)) or (
            isinstance(m, nn.AvgPool2d) and m.kernel_size in ((h, w), h)
            and h == w and not m.padding and m.divisor_override is None)
    if node.target is nn.functional.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return one(size)
    if node.target == torch.mean or (node.op == "call_method" and node.target == "mean"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return tuple(dims or ()) in ((2, 3), (-2, -1)) and not node.kwargs.get("keepdim")
    return False


def is_flatten(node: fx.Node, m: nn.Module | None) -> bool:
    """Whether the node flattens all but the batch dimension."""
    if m is not None:
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.target == torch.flatten or (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def max_pool_geometry(m: nn.Module | None, node: fx.Node) -> tuple[int, int, int] | None:
    """``(k, stride, padding)`` of a square max pooling (module or function), None when the
    node is no max pooling; raises for one of other options (dilation, ceil mode, ...)."""
    if m is not None:
        if not isinstance(m, nn.MaxPool2d):
            return None
        a = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
             "dilation": m.dilation, "ceil_mode": m.ceil_mode,
             "return_indices": m.return_indices}
    elif node.target in (nn.functional.max_pool2d, torch.max_pool2d):
        if len(node.args) > len(POOL_ARGS) + 1 or set(node.kwargs) - set(POOL_ARGS):
            raise refuse(node, "max pooling with unknown arguments")
        a = dict(zip(POOL_ARGS, node.args[1:], strict=False)) | dict(node.kwargs)
    else:
        return None

    def sq(v: object) -> int | None:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, (tuple, list)) and len(v) == 2 and v[0] == v[1] and \
                all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return int(v[0])
        return None

    k, s = sq(a.get("kernel_size")), a.get("stride")
    s = k if s is None or s == () or s == [] else sq(s)
    p, d = sq(a.get("padding", 0)), sq(a.get("dilation", 1))
    flags = (a.get("ceil_mode", False), a.get("return_indices", False))
    if k is None or s is None or p is None or d != 1 or flags != (False, False) or k < 1 \
            or s < 1 or not 0 <= p <= k // 2:
        raise refuse(node, f"max pooling with {a} (square kernel, stride and padding, no "
                      "dilation, ceil_mode or indices)")
    return k, s, p
