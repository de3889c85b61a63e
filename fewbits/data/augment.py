"""Batched training augmentation: random rotation about the image centre, then horizontal flip.

This is the seed example's augmentation (docs/QUANTIZERS.md, "Training data": rotation uniform
in [-0.25, 0.25] rad, bilinear, edge replicate; random left-right flip), done for the whole
batch at once on the batch's device with ``F.affine_grid`` + ``F.grid_sample`` (``bilinear``,
``padding_mode='border'``, ``align_corners=False``).

Direction: a positive angle turns the picture COUNTER-clockwise as displayed (row 0 at the top),
so ``augment(x, +pi/2, no flip)`` equals ``torch.rot90(x, 1, dims=(-2, -1))`` on square images.
Output pixel ``p`` (pixel units, relative to the centre, y pointing down) samples the input at
``R p`` with ``R = [[cos a, -sin a], [sin a, cos a]]``; in ``affine_grid``'s normalised units
this is ``theta = [[cos a, -sin a * H/W], [sin a * W/H, cos a]]``, so non-square images rotate
rigidly too. Images whose angle is exactly 0 are passed through untouched (bit-exact).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(4, 3, 32, 32)
    >>> angles, flips = random_augment_params(4, g)
    >>> augment(x, angles, flips).shape
    torch.Size([4, 3, 32, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment", "random_augment_params"]


def random_augment_params(
    n: int, generator: torch.Generator, max_angle: float = 0.25, flip: bool = True
) -> tuple[Tensor, Tensor]:
    """Draw ``angles`` uniform in ``[-max_angle, max_angle]`` radians and ``flips`` with P = 1/2.

    Draws ``n`` angles then (if ``flip``) ``n`` flips from ``generator`` (a CPU generator), so
    the same seed gives the same parameters. Returns float32 ``(n,)`` and bool ``(n,)`` CPU
    tensors; ``flip=False`` gives all-False flips without consuming random numbers.
    """
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not max_angle >= 0:  # also rejects NaN
        raise ValueError(f"max_angle must be >= 0 (radians), got {max_angle}")
    angles = (torch.rand(int(n), generator=generator) * 2 - 1) * float(max_angle)
    if flip:
        flips = torch.rand(int(n), generator=generator) < 0.5
    else:
        flips = torch.zeros(int(n), dtype=torch.bool)
    return angles, flips


def augment(x: Tensor, angles: Tensor, flips: Tensor) -> Tensor:
    """Rotate each image of ``x`` (N, C, H, W) by ``angles[i]`` (radians, counter-clockwise),
    then mirror it left-right where ``flips[i]``. Pure: ``x`` is not modified.

    ``x`` must be floating point (use :func:`fewbits.data.to_float` first); ``angles``/``flips``
    may live on any device and are moved to ``x``'s.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise TypeError(
            "augment expects a floating-point (N, C, H, W) tensor (convert uint8 images with "
            f"to_float first), got {getattr(x, 'dtype', type(x).__name__)} of shape "
            f"{tuple(getattr(x, 'shape', ()))}"
        )
    n, _, h, w = x.shape
    if angles.shape != (n,) or flips.shape != (n,):
        raise ValueError(
            f"angles and flips must have shape ({n},), got {tuple(angles.shape)} and "
            f"{tuple(flips.shape)}"
        )
    if flips.dtype != torch.bool:
        raise TypeError(f"flips must be a bool tensor, got {flips.dtype}")
    angles = angles.to(device=x.device, dtype=x.dtype)
    flips = flips.to(device=x.device)
    if n == 0:
        return x.clone()
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    theta = torch.stack(
        [
            torch.stack([cos, -sin * (h / w), zero], dim=1),
            torch.stack([sin * (w / h), cos, zero], dim=1),
        ],
        dim=1,
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = torch.where((angles == 0).view(n, 1, 1, 1), x, out)
    return torch.where(flips.view(n, 1, 1, 1), out.flip(-1), out)
