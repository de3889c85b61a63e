"""Batch-norm statistics re-estimated under the network used at inference.

A network trained with stochastic weights (BinaryConnect's stochastic variant, Courbariaux et
al. 2015) gathers its batch-norm running statistics under random weight draws, and is then
evaluated with the deterministic ``sign(w)``: the statistics no longer fit the activations
they normalise. :func:`recalibrate_bn` re-estimates them with the quantizers in their inference
form (the "re-estimate the population statistics after training" of Ioffe & Szegedy 2015,
section 3.1).

    >>> from fewbits.layers import QuantLinear
    >>> net = nn.Sequential(QuantLinear(4, 3, weight_quantizer={"name": "binary_connect",
    ...                                 "stochastic": True}), nn.BatchNorm1d(3))
    >>> recalibrate_bn(net, [torch.randn(8, 4)], 8)
    8
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["batch_norms", "recalibrate_bn"]


def batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every batch norm of ``model`` that keeps running statistics
    (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, their lazy forms; ``track_running_stats=True``).
    Those without running statistics normalise with each batch's own and are left out."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _inputs(batch: Any) -> Tensor:
    x = batch[0] if isinstance(batch, tuple | list) and batch else batch
    if not isinstance(x, Tensor):
        raise TypeError(f"recalibrate_bn: a batch must be an input tensor or a tuple/list whose "
                        f"first item is one (a DataLoader's (x, y)), got {type(batch).__name__}")
    if x.dim() == 0:
        raise ValueError("recalibrate_bn: a batch is a 0-d tensor; give (N, ...) inputs")
    return x


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], n: int) -> int:
    """Reset every batch norm's running mean and variance and re-estimate them over the first
    ``n`` images of ``batches``, with the rest of ``model`` in its inference form.

    Every module but the batch norms is put in evaluation mode (stochastic binarization
    ``sign(w)``, dropout off, activation ranges frozen); each batch norm (see
    :func:`batch_norms`) runs in training mode, so each batch is normalised with its own
    statistics as in training, and its running statistics become the image-weighted average
    of the batches' statistics: ``mean = sum_k b_k mean_k / n``, ``var = sum_k b_k var_k / n``
    with ``b_k`` the images of batch ``k`` and ``var_k`` its unbiased variance (PyTorch's
    cumulative average, ``momentum=None``, when the batches are equal; the last batch is cut
    so that exactly ``n`` images are seen). No gradient is taken, no parameter changes,
    ``num_batches_tracked`` counts the batches; every module's training flag and each batch
    norm's momentum are restored, on error too.

    Args:
        model: any ``nn.Module`` holding at least one batch norm with running statistics.
        batches: yields input tensors ``(N, ...)`` or tuples/lists whose first item is one
            (a ``DataLoader`` of ``(x, y)``); moved to the model's device. Use images without
            augmentation, as they come at inference.
        n: images to use, ``>= 1``.

    Returns:
        ``n``.

    Raises:
        ValueError: ``n`` not an integer ``>= 1``, ``model`` without a batch norm that keeps
            running statistics, ``batches`` holding fewer than ``n`` images (the statistics
            are then reset, and the model must not be used: rerun with a smaller ``n``), or
            a batch norm meeting a batch of one image (PyTorch's error).
        TypeError: a batch that is not a tensor or a tuple/list starting with one.

    Example: see the module docstring.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"recalibrate_bn: n must be an integer >= 1 (images to use), got {n!r}")
    bns = batch_norms(model)
    if not bns:
        raise ValueError(f"recalibrate_bn: {type(model).__name__} has no batch norm with running "
                         "statistics (track_running_stats=True); there is nothing to recalibrate")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for _, m in bns}
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else None
    seen = 0
    try:
        model.eval()
        for _, m in bns:
            m.reset_running_stats()
            m.train()
        for batch in batches:
            x = _inputs(batch)[: n - seen]
            b = x.shape[0]
            if b == 0:
                continue
            for _, m in bns:  # running = (1 - b/seen) running + (b/seen) batch: image-weighted
                m.momentum = b / (seen + b)
            model(x.to(device) if device is not None else x)
            seen += b
            if seen == n:
                break
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, mom in momenta.items():
            m.momentum = mom
    if seen < n:
        raise ValueError(f"recalibrate_bn: batches held {seen} images, fewer than n={n}; the "
                         "running statistics are reset and unfit for use: give n <= "
                         f"{seen} or more batches")
    return n
