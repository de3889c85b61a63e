"""Ternary weights ``{-a, 0, +a}`` (TWN, TTQ, BitNet b1.58's absmean) and BitNet's absmax
activations. Codes: two bits per weight, ``t + 1`` for ``t`` in ``{-1, 0, +1}``
(:func:`fewbits.export.packing.pack_trits` stores five of them in a byte).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import _math
from ..ops import ternary as tern
from .base import AffineCodes, Codes, Quantizer, float_checkpoint_load, register_quantizer

__all__ = [
    "TERNARY_MODES",
    "AbsMax",
    "Ternary",
]

TERNARY_MODES = ("twn", "ttq", "absmean")
_ABSMAX_PER = ("token", "sample", "tensor")


@register_quantizer("ternary")
class Ternary(Quantizer):
    """Ternary weights; ``mode`` picks the levels (formulas: :mod:`fewbits.ops.ternary`):

    - ``"twn"`` (Li & Liu 2016): ``delta = 0.7 * mean|w|``, ``alpha`` the mean of ``|w|`` above
      it; per output channel by default (``per_channel=None``), as the issue's TWN asks.
    - ``"ttq"`` (Zhu et al. 2017): ``delta = threshold * max|w|``; the levels ``wp`` and
      ``-wn`` are parameters (``(C,)`` per channel, else scalars), started at :meth:`setup`
      from the weights as TWN's ``alpha`` over ``|w| > delta``, and trained by the paper's
      gradients. Per tensor by default.
    - ``"absmean"`` (BitNet b1.58, Ma et al. 2024): ``round(w / mean|w|)`` clipped to
      ``[-1, 1]``, times ``mean|w|``; per tensor by default.

    Gradient to the latent weight: identity (``twn``, ``absmean``), the TTQ scaled one
    (``ttq``). ``bits = 2``; codes ``t + 1``; affine form (``twn``, ``absmean``): ``int_repr =
    t``, scale ``alpha`` / ``gamma``, zero point 0, ``[-1, 1]``. TTQ's two levels differ in
    magnitude, so it has no affine form (``affine`` returns ``None``).

    In evaluation mode ``twn`` and ``absmean`` keep their last weight and its quantized form
    (one copy of each): a forward whose weight equals the kept one (``torch.equal``, one pass;
    the formula is several reductions) returns the kept form with the same identity gradient,
    so however the weight changed (an optimizer, ``load_state_dict``, ``w.data.mul_``, which
    no version counter sees) the output follows it. ``train()`` and ``load_state_dict`` drop
    them; ``torch.compile``, tracing, ``torch.func`` transforms (``vmap``, ``grad``) and
    tensor subclasses never use them.

        >>> q = Ternary("twn", per_channel=False)
        >>> q(torch.tensor([[1.0, -0.1, -2.0, 0.5]]))
        tensor([[ 1.5000,  0.0000, -1.5000,  0.0000]])
    """

    bits = 2
    weight_only = True

    def __init__(self, mode: str = "twn", per_channel: bool | None = None,
                 threshold: float = 0.05) -> None:
        super().__init__()
        if mode not in TERNARY_MODES:
            raise ValueError(f"Ternary: unknown mode {mode!r}; known: {', '.join(TERNARY_MODES)}")
        if not 0.0 <= float(threshold) < 1.0:
            raise ValueError(f"Ternary: threshold (ttq: delta = threshold * max|w|) must be in "
                             f"[0, 1), got {threshold!r}")
        self.mode, self.threshold = mode, float(threshold)
        self._kept: tuple[Tensor, Tensor] | None = None  # eval: (weight, its ternary form)
        #: the family protocol: t * scale is an integer affine form, except TTQ's two levels
        self.uniform = mode != "ttq"
        self.per_channel = (mode == "twn") if per_channel is None else bool(per_channel)
        if mode == "ttq":
            shape = (0,) if self.per_channel else ()
            self.wp = nn.Parameter(torch.ones(shape))
            self.wn = nn.Parameter(torch.ones(shape))

    def _kwargs(self) -> dict[str, Any]:
        return {"mode": self.mode, "per_channel": self.per_channel, "threshold": self.threshold}

    def setup(self, param: Tensor) -> None:
        if self.per_channel and param.dim() < 2:
            raise ValueError(
                f"ternary per_channel=True needs a weight with an output-channel axis, got shape "
                f"{tuple(param.shape)}; use per_channel=False"
                + (" (or None)" if self.mode != "twn" else "") + " for biases")
        if self.mode == "ttq":
            self._init_scales(param)

    def init_from_(self, x: Tensor) -> None:
        if self.mode == "ttq":
            self._init_scales(x)

    @torch.no_grad()
    def _init_scales(self, w: Tensor) -> None:
        """``wp = wn =`` the mean of ``|w|`` beyond TTQ's threshold (per channel or tensor)."""
        if w.is_meta:
            shape = (w.shape[0],) if self.per_channel else ()
            self.wp = nn.Parameter(torch.ones(shape, device="meta"))
            self.wn = nn.Parameter(torch.ones(shape, device="meta"))
            return
        ww = w.detach().float()
        delta = tern.channel_view(tern.ttq_threshold(ww, self.threshold, self.per_channel), ww,
                                  self.per_channel)
        a = ww.abs()
        above = a > delta
        kept = torch.where(above, a, 0.0).double()
        if self.per_channel:
            tot, cnt = kept.flatten(1).sum(1), above.flatten(1).sum(1)
        else:
            tot, cnt = kept.sum(), above.sum()
        alpha = torch.where(cnt > 0, tot / cnt.clamp(min=1), 1.0).to(w.dtype)
        self.wp = nn.Parameter(alpha.clone().to(w.device))
        self.wn = nn.Parameter(alpha.clone().to(w.device))

    # the family protocol (fewbits.quantizers.base.Quantizer): standard PyTorch operators, no
    # translations of its own; integer_weight is the default (exact multiples per channel)
    weight_form = "ternary float constant"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any
                              ) -> None:
        # a float checkpoint has no wp/wn: the layer restarts them from the loaded weights
        self._kept = None
        float_checkpoint_load(self, state_dict, prefix, args)

    def train(self, mode: bool = True) -> Ternary:
        self._kept = None  # kept for evaluation only
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> Ternary:
        self._kept = None  # .to / .cpu / .half: no copy left behind on the old device
        return super()._apply(fn, recurse)

    def _formula(self, w: Tensor) -> Tensor:
        if self.mode == "twn":
            return tern.twn(w, self.per_channel)
        return tern.absmean(w, self.per_channel)

    def forward(self, w: Tensor) -> Tensor:
        if self.mode == "ttq":
            return tern.ttq(w, self.wp, self.wn, self.threshold, self.per_channel)
        if self.training or type(w) not in (Tensor, nn.Parameter) or w.is_meta or \
                torch.compiler.is_compiling() or torch.jit.is_tracing() or \
                torch._C._functorch.is_functorch_wrapped_tensor(w):  # vmap/grad: per call
            return self._formula(w)
        kept = self._kept
        if kept is None or kept[0].shape != w.shape or kept[0].dtype != w.dtype or \
                kept[0].device != w.device or not torch.equal(kept[0], w.detach()):
            with torch.no_grad():
                kept = self._kept = (w.detach().clone(), self._formula(w.detach()))
        # the formula's identity gradient to w; a copy when no graph is built (never the kept)
        return tern.straight(kept[1], w) if w.requires_grad else kept[1].clone()

    def _levels_and_scale(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = x.detach().float()
        y = self.infer(x).float()
        if self.mode == "ttq":
            delta = tern.channel_view(tern.ttq_threshold(x, self.threshold, self.per_channel), x,
                                      self.per_channel)
            t = tern.ternary_levels(x, delta)
            return t, {"wp": self.wp.detach().float().clone(),
                       "wn": self.wn.detach().float().clone()}
        if self.mode == "twn":
            scale = tern.twn_threshold_scale(x, self.per_channel)[1]
        else:
            scale = tern.absmean_scale(x, self.per_channel)
        t = torch.sign(y)  # y = t * scale, scale >= 0; a zero scale leaves only t = 0
        return t, {"scale": scale}

    def encode(self, x: Tensor) -> Codes:
        t, params = self._levels_and_scale(x)
        return Codes((t.to(torch.int64) + 1).reshape(-1), 2, tuple(x.shape), params)

    def decode(self, codes: Codes) -> Tensor:
        t = (codes.codes.reshape(codes.shape) - 1).to(torch.float32)
        if self.mode == "ttq":
            p, n = (tern.channel_view(codes.params[k].float(), t, self.per_channel)
                    for k in ("wp", "wn"))
            return torch.where(t > 0, p, torch.where(t < 0, -n, torch.zeros_like(t)))
        return t * tern.channel_view(codes.params["scale"].float(), t, self.per_channel)

    def fold_scale(self, codes: Codes, alpha: Tensor) -> Codes | None:
        """Per-channel ``twn`` / ``absmean`` codes times ``alpha[o]``: ``t`` negated where
        ``alpha < 0`` (a zero ``alpha`` leaves ``t = 0``), scale ``|alpha| * scale`` (float64,
        rounded once). ``None`` for ``ttq`` and per-tensor scales (one scale cannot hold a
        factor per channel)."""
        scale = codes.params.get("scale")
        if self.mode == "ttq" or not self.per_channel or scale is None or \
                scale.shape != (codes.shape[0],) or alpha.shape != scale.shape:
            return None
        t = (codes.codes.reshape(codes.shape[0], -1) - 1) * torch.sign(alpha).to(
            torch.int64).view(-1, 1)
        s = (scale.double() * alpha.abs()).float()
        return Codes((t + 1).reshape(-1), codes.bits, codes.shape, {"scale": s})

    def affine(self, codes: Codes) -> AffineCodes | None:
        """``t * scale`` (``twn``, ``absmean``): integer ``t`` in ``[-1, 1]``, the scale per
        output channel (``axis=0``) or per tensor, zero point 0; ``None`` for ``ttq``."""
        if self.mode == "ttq":
            return None
        scale = codes.params["scale"].float()
        return AffineCodes((codes.codes - 1).reshape(codes.shape), scale,
                           torch.zeros(scale.shape, dtype=torch.int64),
                           0 if self.per_channel else None, -1, 1)


@register_quantizer("absmax")
class AbsMax(Quantizer):
    """BitNet's absmax activations (Wang et al. 2023; Ma et al. 2024, b1.58): ``bits``-bit
    symmetric integers with the scale ``max|x| / (2**(bits-1) - 1)`` taken from the input
    itself, per token (last dim, the paper), per sample or per tensor; identity gradient
    (:func:`fewbits.ops.ternary.absmax`). No state: the scale is computed at every call, at
    inference too (dynamic quantization), so nothing is stored beside the activations.

        >>> AbsMax(bits=8)(torch.tensor([[1.0, -0.1, -2.0]]))
        tensor([[ 1.0079, -0.0945, -2.0000]])
    """

    def __init__(self, bits: int = 8, per: str = "token", eps: float = tern.ABSMEAN_EPS) -> None:
        super().__init__()
        tern.check_absmax_args("AbsMax", bits, eps)
        if per not in _ABSMAX_PER:
            raise ValueError(f"AbsMax: per must be one of {', '.join(_ABSMAX_PER)}, got {per!r}")
        self.bits, self.per, self.eps = int(bits), per, float(eps)

    def _kwargs(self) -> dict[str, Any]:
        return {"bits": self.bits, "per": self.per, "eps": self.eps}

    def forward(self, x: Tensor) -> Tensor:
        return tern.absmax(x, self.bits, self.per, self.eps)

    def encode(self, x: Tensor) -> Codes:
        """Codes ``k + Q`` of one tensor, with its scales (one per token, sample or tensor)."""
        xf = x.detach().float()
        scale = tern.absmax_scale(xf, self.bits, self.per, self.eps)
        q = float(2 ** (self.bits - 1) - 1)
        k = _math.round_half_away(xf / scale).clamp_(-q, q)
        return Codes(k.to(torch.int64).reshape(-1) + int(q), self.bits, tuple(x.shape),
                     {"scale": scale})

    def decode(self, codes: Codes) -> Tensor:
        q = 2 ** (self.bits - 1) - 1
        k = (codes.codes - q).to(torch.float32).reshape(codes.shape)
        return k * codes.params["scale"].float()
