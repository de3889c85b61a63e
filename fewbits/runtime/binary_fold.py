"""Batch-norm folding for BinaryNet: ``binary_tanh(BN(s))`` as a per-channel threshold on ``s``.

After a binary convolution the pre-activation ``s`` is an integer in ``[-n, n]`` (``n`` the
fan-in), and BinaryNet's ``binary_tanh`` keeps only the sign of ``BN(s) = s * alpha + beta``
(``+1 if BN(s) > 0 else -1``, ``QUANTIZERS.md`` section 2). Each float32 operation of BN is
monotone in ``s`` (rounding is monotone), so the decision is a step function of ``s``:

* ``alpha > 0``: ``+1  iff  s >= T`` (``flip = 0``);
* ``alpha < 0``: ``+1  iff  s <  T``, stored as ``(s >= T) XOR flip`` with ``flip = 1``;
* ``alpha == 0`` (or a decision that never changes): constant, ``T = lo`` (always ``+1``) or
  ``T = hi + 1`` (always ``-1``) with ``flip = 0``.

``T`` is not computed from a formula in float64 (whose rounding could disagree with float32
at a tie): it is read off PyTorch's own float32 ``batch_norm`` evaluated at every integer of
``[lo, hi]``, so the folded decision equals the float32 one for every value the layer can
produce, ties included (tests check it exhaustively against the BN module on NCHW tensors).
The residual sum of a ResNet unit, ``binary_tanh(BN(s) + x)`` with ``x = +-1``, is two such
thresholds (``x = -1``: row 0, ``x = +1``: row 1) with one flip.

The float stem (float image times +-1 weights) gets a float32 threshold found by bisection over
the ordered float32 values, plus the decisions at ``-inf`` / ``+inf`` (NaN is always ``-1``:
``BN(NaN)`` is NaN, not ``> 0``). A decision that is not monotone (NaN or infinite BN
parameters) raises ``ValueError``: such a layer cannot be folded.

    >>> bn = torch.nn.BatchNorm2d(2).eval()
    >>> _ = bn.running_mean.copy_(torch.tensor([2.5, 0.0]))
    >>> bn.weight.data[1] = -1.0
    >>> t, flip = integer_thresholds(bn, -4, 4)
    >>> t.tolist(), flip.tolist()    # ch 0: +1 iff s >= 3; ch 1: +1 iff s < 0
    ([3, 0], [False, True])
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["bn_affine", "float_thresholds", "integer_thresholds", "smallest_int_dtype"]


def _check_bn(bn: nn.Module) -> None:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None \
            or bn.running_var is None:
        raise ValueError(f"batch-norm folding needs a BatchNorm with running statistics, got "
                         f"{type(bn).__name__} (track_running_stats=False cannot be folded)")


@torch.no_grad()
def _bn_eval(bn: nn.Module, v: Tensor) -> Tensor:
    """float32 eval-mode ``bn`` of values ``v`` (``[R]`` shared, or ``[C, R]``): ``[C, R]``."""
    c = bn.num_features
    v = v.to(torch.float32)
    x = (v.expand(c, -1) if v.dim() == 1 else v).reshape(1, c, -1, 1).contiguous()
    w = None if bn.weight is None else bn.weight.detach().float()
    b = None if bn.bias is None else bn.bias.detach().float()
    y = F.batch_norm(x, bn.running_mean.float(), bn.running_var.float(), w, b, False, 0.0,
                     bn.eps)
    return y[0, :, :, 0]


def _steps(dec: Tensor, lo: int, hi: int, flip: Tensor, where: str) -> Tensor:
    """``T`` per channel with ``dec[:, i] == ((lo + i >= T) != flip)``; raises if none."""
    want = dec ^ flip[:, None]  # must be a non-decreasing step: False ... False True ... True
    bad = (want[:, 1:].int() < want[:, :-1].int()).any(dim=1)
    if bool(bad.any()):
        ch = int(bad.nonzero()[0, 0])
        raise ValueError(f"{where}: channel {ch}: binary_tanh(BN(s)) is not monotone in s over "
                         f"[{lo}, {hi}] (NaN or infinite batch-norm parameters?); it cannot be "
                         "folded into a threshold")
    return lo + (~want).sum(dim=1).to(torch.int64)


def _direction(decs: list[Tensor]) -> Tensor:
    """flip = 1 for channels whose decisions fall as s grows (negative batch-norm scale)."""
    falls = torch.zeros(decs[0].shape[0], dtype=torch.bool)
    for d in decs:
        falls |= d[:, 0] & ~d[:, -1]
    return falls


def integer_thresholds(bn: nn.Module, lo: int, hi: int, residual: bool = False,
                       where: str = "batch norm") -> tuple[np.ndarray, np.ndarray]:
    """Fold ``binary_tanh(bn(s))`` for integer ``s`` in ``[lo, hi]`` into thresholds.

    Returns ``(T, flip)``: ``T`` int64 ``[C]`` (``[2, C]`` with ``residual``: rows for a
    residual input of ``-1`` and ``+1``, i.e. ``binary_tanh(bn(s) + x)``), ``flip`` bool
    ``[C]``; the folded decision is ``+1 iff (s >= T) != flip``, ``T`` in ``[lo, hi + 1]``.
    Raises ``ValueError`` when a channel's decision is not a step function of ``s``.
    """
    _check_bn(bn)
    if not -(2**24) < lo <= hi < 2**24:  # integers exact in float32
        raise ValueError(f"integer range [{lo}, {hi}] must lie within (-2**24, 2**24)")
    y = _bn_eval(bn, torch.arange(lo, hi + 1, dtype=torch.float32))
    decs = [y > 0] if not residual else [(y + (-1.0)) > 0, (y + 1.0) > 0]
    flip = _direction(decs)
    t = torch.stack([_steps(d, lo, hi, flip, where) for d in decs])
    return (t if residual else t[0]).numpy(), flip.numpy()


def _key(f: Tensor) -> Tensor:
    """float32 -> int64 key with the order of the floats (``-0.0`` just below ``+0.0``)."""
    b = f.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(b < 0, -(b & 0x7FFFFFFF) - 1, b)


def _unkey(k: Tensor) -> Tensor:
    b = torch.where(k < 0, (-(k + 1)) | -0x80000000, k)
    return b.to(torch.int32).view(torch.float32)


@torch.no_grad()
def float_thresholds(bn: nn.Module, where: str = "batch norm"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold ``binary_tanh(bn(s))`` for float32 ``s`` (the float stem) into thresholds.

    Returns ``(T, flip, nonfinite)``: ``T`` float32 ``[C]`` and ``flip`` bool ``[C]`` with
    ``+1 iff s >= T`` (flip 0) or ``+1 iff s < T`` (flip 1) for every finite ``s``;
    ``nonfinite`` bool ``[2, C]``, the decisions at ``s = -inf`` and ``s = +inf``. NaN gives
    ``-1``. Found by bisection on the ordered float32 values (32 steps of PyTorch's BN).
    """
    _check_bn(bn)
    c = bn.num_features
    big = torch.finfo(torch.float32).max

    def dec(s: Tensor) -> Tensor:  # s: [C]
        return _bn_eval(bn, s[:, None])[:, 0] > 0

    d_lo, d_hi = dec(torch.full((c,), -big)), dec(torch.full((c,), big))
    flip = d_lo & ~d_hi
    lo, hi = _key(torch.full((c,), -big)), _key(torch.full((c,), big))
    # Invariant: decision (xor flip) is False at lo and True at hi, for the channels that step.
    for _ in range(33):
        mid = lo + (hi - lo) // 2
        up = dec(_unkey(mid)) ^ flip
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    t = _unkey(hi)
    const = d_lo == d_hi
    t = torch.where(const, torch.where(d_lo, -torch.inf, torch.inf), t)
    check = (dec(t.clamp(-big, big)) ^ flip) | const  # the step sits at T
    below = torch.nextafter(t, torch.tensor(-torch.inf))
    check &= ~(dec(below.clamp(-big, big)) ^ flip) | const | (t == -big)
    if not bool(check.all()):
        ch = int((~check).nonzero()[0, 0])
        raise ValueError(f"{where}: channel {ch}: binary_tanh(BN(s)) is not monotone in s; it "
                         "cannot be folded into a threshold")
    inf = torch.full((c,), torch.inf)
    nonfinite = torch.stack([dec(-inf), dec(inf)])
    return t.numpy(), flip.numpy(), nonfinite.numpy()


@torch.no_grad()
def bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, beta)`` float32 ``[C]`` of eval-mode ``bn`` as PyTorch's CPU kernel forms them:
    ``alpha = weight * (1 / sqrt(var + eps))`` in float32 and ``y = fma(x, alpha, beta)``;
    ``beta`` is read off PyTorch's own batch norm at ``x = 0`` (``fma(0, alpha, beta)``), so a
    float epilogue ``fmaf(x, alpha, beta)`` gives PyTorch's outputs bit for bit on builds that
    contract its multiply-add (x86-64 AVX2 / AVX-512), within one rounding elsewhere."""
    _check_bn(bn)
    c = bn.num_features
    var = bn.running_var.detach().float()
    inv = 1.0 / torch.sqrt(var + torch.tensor(bn.eps, dtype=torch.float32))
    w = torch.ones(c) if bn.weight is None else bn.weight.detach().float()
    alpha = (inv * w).numpy().astype(np.float32)
    beta = _bn_eval(bn, torch.zeros(1))[:, 0].numpy().astype(np.float32)
    if not (np.isfinite(alpha).all() and np.isfinite(beta).all()):
        raise ValueError("batch norm with NaN or infinite parameters cannot be run as a float "
                         "epilogue")
    return alpha, beta


def smallest_int_dtype(lo: int, hi: int) -> np.dtype:
    """The smallest signed integer dtype holding ``[lo, hi]`` (for stored thresholds)."""
    for dt in (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise ValueError(f"range [{lo}, {hi}] does not fit in int64")
