"""Quantized layers: ``nn.Conv2d`` / ``nn.Linear`` subclasses that change only how the weight
(and optionally bias, input and output) is produced.

With every quantizer ``None`` a layer computes exactly what its torch parent computes, so any
model can swap them in. Quantizer specs go through :func:`fewbits.quantizers.get`.

    >>> layer = QuantLinear(4, 2, weight_quantizer="binary_connect")
    >>> torch.equal(layer.quantized_weight().abs(), torch.ones(2, 4))
    True
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .quantizers import Quantizer, get

__all__ = [
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "apply_weight_constraints",
    "count_optimizer_steps",
    "layer_options",
    "quant_layers",
]

Spec = str | dict[str, Any] | Quantizer | None
_L = TypeVar("_L", bound="_QuantMixin")


class _QuantMixin:
    """Shared quantizer plumbing of the quantized layers."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, *args: Any, weight_quantizer: Spec = None, bias_quantizer: Spec = None,
                 input_quantizer: Spec = None, output_quantizer: Spec = None,
                 **kwargs: Any) -> None:
        # the torch parent's arguments pass through unchanged (cooperative __init__)
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_quantizer, bias_quantizer, input_quantizer, output_quantizer)

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

    #: The torch parent (``nn.Conv2d`` / ``nn.Linear``); set by each subclass.
    _float_type: type[nn.Module]

    @staticmethod
    def _float_kwargs(module: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_float(cls: type[_L], module: nn.Module, *, weight_quantizer: Spec = None,
                   bias_quantizer: Spec = None, input_quantizer: Spec = None,
                   output_quantizer: Spec = None, init_ranges: bool = True) -> _L:
        """The fewbits layer computing ``module`` with quantizers, sharing its parameters.

        ``module`` must be exactly the torch parent (``nn.Conv2d`` for ``QuantConv2d``,
        ``nn.Linear`` for ``QuantLinear``); every option (stride, padding, dilation, groups,
        padding mode) is kept, and the new layer holds the *same* ``weight`` / ``bias``
        ``Parameter`` objects (so an optimizer built before keeps working), on their device and
        dtype. The RNG is not touched. With ``init_ranges`` the weight/bias quantizers'
        data-dependent state starts from the tensors (:meth:`Quantizer.init_from_`: min-max
        ranges = the weights' min and max, per tensor or per channel).

        Raises ``TypeError`` for a subclass of the torch layer (its forward may differ),
        ``ValueError`` for a parametrized (e.g. weight-normed) or uninitialised (lazy) layer.

            >>> fc = nn.Linear(4, 2)
            >>> q = QuantLinear.from_float(fc, weight_quantizer="binary_connect")
            >>> q.weight is fc.weight
            True
        """
        base = cls._float_type
        if type(module) is not base:
            raise TypeError(
                f"{cls.__name__}.from_float needs exactly a torch {base.__name__}, got "
                f"{type(module).__module__}.{type(module).__qualname__}: a subclass may compute "
                "differently from its parent, so fewbits does not convert it")
        if torch.nn.utils.parametrize.is_parametrized(module):
            raise ValueError(f"{cls.__name__}.from_float: the {base.__name__} has parametrized "
                             "weights (e.g. weight norm); remove the parametrization first")
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{cls.__name__}.from_float: the layer is lazy and uninitialised; "
                             "run one forward pass before converting it")
        layer = cls(**cls._float_kwargs(module), bias=module.bias is not None, device="meta")
        layer.weight, layer.bias = module.weight, module.bias
        layer.train(module.training)
        layer._init_quantizers(weight_quantizer, bias_quantizer, input_quantizer,
                               output_quantizer)
        for q in (layer.weight_quantizer, layer.bias_quantizer, layer.input_quantizer,
                  layer.output_quantizer):
            if q is not None:
                q.to(device=module.weight.device)
        if init_ranges:
            for q, p in ((layer.weight_quantizer, layer.weight),
                         (layer.bias_quantizer, layer.bias)):
                if q is not None and p is not None:
                    q.init_from_(p.detach())
        return layer

    def to_float(self, *, drop_activation_quantizers: bool = False) -> nn.Module:
        """A plain torch layer (``nn.Conv2d`` / ``nn.Linear``) holding the quantized weight and
        bias (evaluation-mode values, new parameters; quantizer state is not advanced).

        A plain layer cannot quantize its input or output: when this layer does, ``ValueError``
        unless ``drop_activation_quantizers=True``.
        """
        acts = [r for r in ("input", "output") if getattr(self, f"{r}_quantizer") is not None]
        if acts and not drop_activation_quantizers:
            raise ValueError(f"this layer quantizes its {' and '.join(acts)}, which a plain "
                             f"{self._float_type.__name__} cannot; pass "
                             "drop_activation_quantizers=True to drop them")
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                w, b = self.quantized_weight(), self.quantized_bias()
        finally:
            self.train(was)
        out = self._float_type(**self._float_kwargs(self), bias=b is not None, device="meta")
        out.weight = nn.Parameter(w.detach().clone(), requires_grad=self.weight.requires_grad)
        if b is not None:
            out.bias = nn.Parameter(b.detach().clone(), requires_grad=self.bias.requires_grad)
        return out.train(was)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any
                              ) -> None:
        # A state dict without any key of the weight/bias quantizer (a float checkpoint loaded
        # after quantize_): the loaded tensor gets a quantizer state started from it, as
        # from_float gives (min-max ranges from its min and max, INQ afresh), instead of
        # ranges of the tensor it replaces. The quantizers do not report their keys missing.
        fresh = [(q, role) for q, role in ((self.weight_quantizer, "weight"),
                                           (self.bias_quantizer, "bias"))
                 if q is not None and prefix + role in state_dict and
                 not any(k.startswith(f"{prefix}{role}_quantizer.") for k in state_dict)]
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
        for q, role in fresh:
            p = getattr(self, role)
            if p is not None and p.shape == state_dict[prefix + role].shape:
                q.init_from_(p.detach())

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

    _float_type = nn.Conv2d

    @staticmethod
    def _float_kwargs(m: nn.Module) -> dict[str, Any]:
        return {"in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                "dilation": m.dilation, "groups": m.groups, "padding_mode": m.padding_mode}

    def forward(self, x: Tensor) -> Tensor:
        return self._q_out(self._conv_forward(self._q_in(x), self.quantized_weight(),
                                              self.quantized_bias()))


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose weight/bias/input/output pass through quantizers.

    Forward: ``out_q(linear(in_q(x), w_q(W), b_q(b)))``.
    """

    _float_type = nn.Linear

    @staticmethod
    def _float_kwargs(m: nn.Module) -> dict[str, Any]:
        return {"in_features": m.in_features, "out_features": m.out_features}

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


def layer_options(module: nn.Module) -> dict[str, Any]:
    """The constructor options of a conv or linear layer, fewbits or torch (channels/features,
    kernel size, stride, padding, dilation, groups, padding mode): what must match for stored
    weights to mean the same thing in another instance.

        >>> layer_options(nn.Linear(3, 2))
        {'in_features': 3, 'out_features': 2}
    """
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    return cls._float_kwargs(module)
