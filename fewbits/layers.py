"""Quantized layers: ``nn.Conv2d`` / ``nn.Linear`` subclasses that change only how the weight
(and optionally bias, input and output) is produced.

With every quantizer ``None`` a layer computes exactly what its torch parent computes, so any
model can swap them in. Quantizer specs go through :func:`fewbits.quantizers.get`.

    >>> layer = QuantLinear(4, 2, weight_quantizer="binary_connect")
    >>> torch.equal(layer.quantized_weight().abs(), torch.ones(2, 4))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .quantizers import Quantizer, get

__all__ = [
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "apply_weight_constraints",
    "count_optimizer_steps",
    "quant_layers",
]

Spec = str | dict[str, Any] | Quantizer | None


class _QuantMixin:
    """Shared quantizer plumbing of the quantized layers."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_quantizers(self, weight_quantizer: Spec, bias_quantizer: Spec,
                         input_quantizer: Spec, output_quantizer: Spec) -> None:
        self.weight_quantizer = get(weight_quantizer)
        self.bias_quantizer = get(bias_quantizer) if self.bias is not None else None
        self.input_quantizer = get(input_quantizer)
        self.output_quantizer = get(output_quantizer)
        if self.weight_quantizer is not None:
            self.weight_quantizer.setup(self.weight)
        if self.bias_quantizer is not None:
            self.bias_quantizer.setup(self.bias)

    def quantized_weight(self) -> Tensor:
        """The weight the forward uses."""
        q = self.weight_quantizer
        return self.weight if q is None else q(self.weight)

    def quantized_bias(self) -> Tensor | None:
        """The bias the forward uses (``None`` for a layer without bias)."""
        q = self.bias_quantizer
        return self.bias if q is None or self.bias is None else q(self.bias)

    def _q_in(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _q_out(self, y: Tensor) -> Tensor:
        return y if self.output_quantizer is None else self.output_quantizer(y)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight/bias/input/output pass through quantizers.

    Forward: ``out_q(conv2d(in_q(x), w_q(W), b_q(b)))``; the gradient reaching ``W`` is the
    quantizer's straight-through estimate. All ``nn.Conv2d`` arguments are accepted.
    """

    def __init__(self, *args: Any, weight_quantizer: Spec = None, bias_quantizer: Spec = None,
                 input_quantizer: Spec = None, output_quantizer: Spec = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_quantizer, bias_quantizer, input_quantizer, output_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return self._q_out(self._conv_forward(self._q_in(x), self.quantized_weight(),
                                              self.quantized_bias()))


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose weight/bias/input/output pass through quantizers.

    Forward: ``out_q(linear(in_q(x), w_q(W), b_q(b)))``.
    """

    def __init__(self, *args: Any, weight_quantizer: Spec = None, bias_quantizer: Spec = None,
                 input_quantizer: Spec = None, output_quantizer: Spec = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_quantizer, bias_quantizer, input_quantizer, output_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.linear(self._q_in(x), self.quantized_weight(), self.quantized_bias())
        return self._q_out(y)


class QuantAct(nn.Module):
    """An activation quantizer as a module (identity when the spec is ``None``)."""

    def __init__(self, quantizer: Spec) -> None:
        super().__init__()
        self.quantizer = get(quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return x if self.quantizer is None else self.quantizer(x)


def quant_layers(model: nn.Module) -> list[tuple[str, QuantConv2d | QuantLinear]]:
    """``(name, layer)`` of every quantized layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantMixin)]


@torch.no_grad()
def apply_weight_constraints(model: nn.Module) -> None:
    """Run each weight/bias quantizer's ``constrain_`` (e.g. BinaryConnect's ``[-1, 1]`` clip)
    and every quantizer's ``after_optimizer_step`` (MinMax keeps learned ranges valid, a
    step-counted INQ advances its schedule).

    Call after every optimizer step; a no-op for quantizers without constraints.
    """
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.after_optimizer_step()
    for _, layer in quant_layers(model):
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.constrain_(layer.weight)
        if layer.bias_quantizer is not None and layer.bias is not None:
            layer.bias_quantizer.constrain_(layer.bias)


def count_optimizer_steps(model: nn.Module) -> None:
    """Make every scheduled quantizer (INQ) count optimizer steps instead of training forwards.

    Call once before training when a step runs several forwards (gradient accumulation), then
    :func:`apply_weight_constraints` after every optimizer step, which advances the schedules:

        >>> model = QuantLinear(4, 2, weight_quantizer={"name": "inq", "inq_iterations": [2]})
        >>> count_optimizer_steps(model)
        >>> for step in range(3):
        ...     for micro_batch in range(4):
        ...         model(torch.randn(8, 4)).sum().backward()
        ...     apply_weight_constraints(model)     # after optimizer.step()
        >>> model.weight_quantizer.counter
        3
    """
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.count_optimizer_steps()
