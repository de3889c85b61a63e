"""Stochastic binarization (BinaryConnect's stochastic variant, Courbariaux et al. 2015) from
given uniform noise: ``y = +1 where u < hard_sigmoid(w) else -1``, ``hard_sigmoid(w) =
clamp((w + 1) / 2, 0, 1)``; gradient ``dw = dy`` (identity, as the deterministic sign).

The noise is an argument, not drawn here: :class:`fewbits.quantizers.BinaryConnect` draws it
from its own seeded generator, whose state is saved with the model, so a run is reproducible
and a resumed run continues the same stream.

    >>> import torch
    >>> stochastic_sign(torch.tensor([-2.0, 0.0, 0.0, 2.0]), torch.tensor([0.0, 0.4, 0.6, 0.99]))
    tensor([-1.,  1., -1.,  1.])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._core import widen
from .ternary import checked

__all__ = ["hard_sigmoid", "stochastic_sign"]


def hard_sigmoid(w: Tensor) -> Tensor:
    """``clamp((w + 1) * 0.5, 0, 1)`` (float32 for half precision input): the probability of
    ``+1``."""
    return torch.clamp((widen(w) + 1.0) * 0.5, 0.0, 1.0)


def stochastic_sign(w: Tensor, u: Tensor, fn: str = "binary_connect") -> Tensor:
    """``+1`` where ``u < hard_sigmoid(w)``, else ``-1``, in ``w``'s dtype; ``dw = dy``.

    ``u``: uniform noise in ``[0, 1)`` of ``w``'s shape (any float dtype, any device: moved to
    ``w``'s). ``w = -1`` or below is always ``-1``, ``w >= 1`` always ``+1`` (``u < 1``)."""
    checked(w, fn, "w")
    if tuple(u.shape) != tuple(w.shape):
        raise ValueError(f"{fn}: the noise must have the weight's shape {tuple(w.shape)}, got "
                         f"{tuple(u.shape)}")
    p = hard_sigmoid(w.detach())
    u = u.to(device=p.device, dtype=p.dtype)
    one = torch.ones_like(p)
    y = torch.where(u < p, one, -one).to(w.dtype)
    if not w.requires_grad:
        return y
    return y + (w - w.detach())
