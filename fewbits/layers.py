"""Quantized layers: ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.Linear`` subclasses that change only
how the weight (and optionally bias, input and output) is produced, on :class:`QuantLayer`
(embeddings, attention and HF ``Conv1D`` are in :mod:`fewbits.layer_kinds`).

With every quantizer ``None`` a layer computes exactly what its torch parent computes, so any
model can swap them in. Quantizer specs go through :func:`fewbits.quantizers.get`.

    >>> layer = QuantLinear(4, 2, weight_quantizer="binary_connect")
    >>> torch.equal(layer.quantized_weight().abs(), torch.ones(2, 4))
    True
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .quantizers import Quantizer, get
from .quantizers.optim import scale_updates

__all__ = [
    "QuantAct",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "apply_weight_constraints",
    "count_optimizer_steps",
    "quant_layers",
]

Spec = str | dict[str, Any] | Quantizer | None
_L = TypeVar("_L", bound="QuantLayer")


class QuantLayer:
    """The base of every fewbits layer (mixed in before its torch parent): the quantizer
    plumbing shared by :class:`QuantConv2d`, :class:`QuantLinear` ... and
    :mod:`fewbits.layer_kinds`.

    ``_params`` maps the roles ``weight`` / ``bias`` to the attribute holding the tensor
    (``in_proj_weight`` for attention); :meth:`quant_param` is what the role's quantizer sees.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    _params: ClassVar[dict[str, str]] = {"weight": "weight", "bias": "bias"}

    def __init__(self, *args: Any, weight_quantizer: Spec = None, bias_quantizer: Spec = None,
                 input_quantizer: Spec = None, output_quantizer: Spec = None,
                 **kwargs: Any) -> None:
        # the torch parent's arguments pass through unchanged (cooperative __init__)
        super().__init__(*args, **kwargs)
        self._init_quantizers(weight_quantizer, bias_quantizer, input_quantizer, output_quantizer)
        with torch.no_grad():  # a fresh layer: the quantizers' own initialisation, if any
            for role in ("weight", "bias"):
                q, p = getattr(self, f"{role}_quantizer"), self.quant_param(role)
                if q is not None and p is not None:
                    q.init_(p)

    def _init_quantizers(self, weight_quantizer: Spec, bias_quantizer: Spec,
                         input_quantizer: Spec, output_quantizer: Spec) -> None:
        self.weight_quantizer = get(weight_quantizer)
        self.bias_quantizer = get(bias_quantizer) if self.param("bias") is not None else None
        self.input_quantizer = get(input_quantizer)
        self.output_quantizer = get(output_quantizer)
        for role in ("weight", "bias"):
            q = getattr(self, f"{role}_quantizer")
            if q is not None:
                q.setup(self.quant_param(role))
                self._scale_updates(role, q)

    def _scale_updates(self, role: str, q: Quantizer) -> None:
        # the quantizer's factor on the optimizer's updates of the parameter (1: none);
        # registered again at each training forward, for a copy (deepcopy, assign=True loads)
        p = self.param(role)
        if p is not None and (s := q.update_scale(self.quant_param(role))) != 1.0:
            scale_updates(p, s)

    @classmethod
    def param_key(cls, role: str) -> str:
        """The attribute (and state-dict key under the layer) of role ``weight`` / ``bias``."""
        return cls._params[role]

    def param(self, role: str) -> nn.Parameter | None:
        """The parameter of role ``weight`` / ``bias`` (``None`` when the layer has none)."""
        return getattr(self, self._params[role], None)

    def quant_param(self, role: str) -> Tensor | None:
        """The tensor the role's quantizer sees: the parameter itself, or a view of it whose
        first axis is the output channel (HF ``Conv1D`` stores its weight transposed)."""
        return self.param(role)

    def from_quant_view(self, role: str, t: Tensor) -> Tensor:
        """Inverse of :meth:`quant_param`'s view: ``t`` in the parameter's layout."""
        return t

    #: The torch parent; set by each subclass.
    _float_type: type[nn.Module]

    @staticmethod
    def _float_kwargs(module: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _is_float_form(cls, module: nn.Module) -> bool:
        return type(module) is cls._float_type

    def is_float(self) -> bool:
        """True when the layer has no quantizer at all (it computes its torch parent)."""
        return all(getattr(self, f"{r}_quantizer") is None
                   for r in ("weight", "bias", "input", "output"))

    @classmethod
    def _check_float(cls, module: nn.Module) -> None:
        """Refuse what ``from_float`` cannot convert exactly (``TypeError`` / ``ValueError``)."""
        if type(module) is cls and module.is_float():
            return  # a fewbits layer without quantizers (a zoo float net) gets them
        if not cls._is_float_form(module):
            raise TypeError(
                f"{cls.__name__}.from_float needs exactly a {_qualname(cls._float_type)}, got "
                f"{_qualname(type(module))}: a subclass may compute differently from its "
                "parent, so fewbits does not convert it")
        if torch.nn.utils.parametrize.is_parametrized(module):
            raise ValueError(f"{cls.__name__}.from_float: the layer has parametrized weights "
                             "(e.g. weight norm); remove the parametrization first")
        for p in module.parameters(recurse=False):
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(f"{cls.__name__}.from_float: the layer is lazy and "
                                 "uninitialised; run one forward pass before converting it")

    @classmethod
    def from_float(cls: type[_L], module: nn.Module, *, weight_quantizer: Spec = None,
                   bias_quantizer: Spec = None, input_quantizer: Spec = None,
                   output_quantizer: Spec = None, init_ranges: bool = True) -> _L:
        """The fewbits layer computing ``module`` with quantizers, sharing its parameters.

        ``module`` must be exactly the torch parent (``nn.Conv2d`` for ``QuantConv2d`` ...) or
        a layer of this class without quantizers (:meth:`is_float`, as in a zoo float net);
        every option (stride, padding, dilation, groups, padding mode, padding index ...) and
        attribute is kept, and the new layer holds the *same* parameter objects (so an
        optimizer built before keeps working), on their device and dtype. The RNG is not
        touched. With ``init_ranges`` the weight/bias quantizers' data-dependent state starts
        from the tensors (:meth:`Quantizer.init_from_`: min-max ranges = the weights' min and
        max, per tensor or per channel).

        Raises ``TypeError`` for a subclass of the torch layer (its forward may differ),
        ``ValueError`` for a parametrized (e.g. weight-normed) or uninitialised (lazy) layer
        and for options the layer cannot quantize exactly (named in the message).

            >>> fc = nn.Linear(4, 2)
            >>> q = QuantLinear.from_float(fc, weight_quantizer="binary_connect")
            >>> q.weight is fc.weight
            True
        """
        cls._check_float(module)
        layer = cls.__new__(cls)
        # adopt the module's state (parameters, buffers, children, options, hooks): the new
        # layer is the same layer with quantizers, not a copy
        layer.__dict__.update({k: v.copy() if isinstance(v, dict) else v
                               for k, v in module.__dict__.items()})
        layer._adopted(module)
        layer._init_quantizers(weight_quantizer, bias_quantizer, input_quantizer,
                               output_quantizer)
        p0 = next(module.parameters(recurse=False))
        for q in (layer.weight_quantizer, layer.bias_quantizer, layer.input_quantizer,
                  layer.output_quantizer):
            if q is not None:
                q.to(device=p0.device)
        if init_ranges:
            for role in ("weight", "bias"):
                q, p = getattr(layer, f"{role}_quantizer"), layer.quant_param(role)
                if q is not None and p is not None:
                    q.init_from_(p.detach())
        return layer

    def _adopted(self, module: nn.Module) -> None:
        """Hook after ``from_float`` took over ``module``'s state (children to convert ...)."""

    def to_float(self, *, drop_activation_quantizers: bool = False) -> nn.Module:
        """A plain torch layer (the torch parent) holding the quantized weight and bias
        (evaluation-mode values, new parameters; quantizer state is not advanced).

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
                values = {"weight": self.quantized_weight(), "bias": self.quantized_bias()}
        finally:
            self.train(was)
        out = self._float_type.__new__(self._float_type)
        out.__dict__.update({k: v.copy() if isinstance(v, dict) else v
                             for k, v in self.__dict__.items()})
        for role in ("weight", "bias"):
            delattr(out, f"{role}_quantizer")
        del out.input_quantizer, out.output_quantizer
        for role, v in values.items():
            p = self.param(role)
            if p is not None:
                setattr(out, self.param_key(role),
                        nn.Parameter(v.detach().clone(), requires_grad=p.requires_grad))
        return out.train(was)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any
                              ) -> None:
        # A state dict without any key of the weight/bias quantizer (a float checkpoint loaded
        # after quantize_): the loaded tensor gets a quantizer state started from it, as
        # from_float gives (min-max ranges from its min and max, INQ afresh), instead of
        # ranges of the tensor it replaces. The quantizers do not report their keys missing.
        fresh = [(q, role) for q, role in ((self.weight_quantizer, "weight"),
                                           (self.bias_quantizer, "bias"))
                 if q is not None and prefix + self.param_key(role) in state_dict and
                 not any(k.startswith(f"{prefix}{role}_quantizer.") for k in state_dict)]
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
        for q, role in fresh:
            p = self.param(role)
            if p is not None and p.shape == state_dict[prefix + self.param_key(role)].shape:
                t = self.quant_param(role).detach()
                if getattr(q, "grid_fitted", False):  # quantize_ fitted delta / m to weights
                    q.fit_grid_(t)
                q.init_from_(t)

    def quantized_weight(self) -> Tensor:
        """The weight the forward uses (in the parameter's layout)."""
        q = self.weight_quantizer
        if q is None:
            return self.param("weight")
        if self.training and not torch.compiler.is_compiling():
            self._scale_updates("weight", q)
        return self.from_quant_view("weight", q(self.quant_param("weight")))

    def quantized_bias(self) -> Tensor | None:
        """The bias the forward uses (``None`` for a layer without bias)."""
        q, b = self.bias_quantizer, self.param("bias")
        if q is None or b is None:
            return b
        if self.training and not torch.compiler.is_compiling():
            self._scale_updates("bias", q)
        return self.from_quant_view("bias", q(b))

    def _q_in(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _q_out(self, y: Tensor) -> Tensor:
        return y if self.output_quantizer is None else self.output_quantizer(y)


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _conv_kwargs(m: nn.Module) -> dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
            "dilation": m.dilation, "groups": m.groups, "padding_mode": m.padding_mode}


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` whose weight/bias/input/output pass through quantizers.

    Forward: ``out_q(conv2d(in_q(x), w_q(W), b_q(b)))``; the gradient reaching ``W`` is the
    quantizer's straight-through estimate. All ``nn.Conv2d`` arguments are accepted.
    """

    _float_type = nn.Conv2d
    _float_kwargs = staticmethod(_conv_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self._q_out(self._conv_forward(self._q_in(x), self.quantized_weight(),
                                              self.quantized_bias()))


class QuantConv1d(QuantLayer, nn.Conv1d):
    """``nn.Conv1d`` whose weight/bias/input/output pass through quantizers (as
    :class:`QuantConv2d`, on ``(N, C, L)`` inputs)."""

    _float_type = nn.Conv1d
    _float_kwargs = staticmethod(_conv_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self._q_out(self._conv_forward(self._q_in(x), self.quantized_weight(),
                                              self.quantized_bias()))


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` whose weight/bias/input/output pass through quantizers.

    Forward: ``out_q(linear(in_q(x), w_q(W), b_q(b)))``. Also converts the out projection of
    ``nn.MultiheadAttention`` (``NonDynamicallyQuantizableLinear``, an ``nn.Linear`` that
    computes the same).
    """

    _float_type = nn.Linear

    @classmethod
    def _is_float_form(cls, module: nn.Module) -> bool:
        return type(module) in (nn.Linear, NonDynamicallyQuantizableLinear)

    @staticmethod
    def _float_kwargs(m: nn.Module) -> dict[str, Any]:
        return {"in_features": m.in_features, "out_features": m.out_features}

    def forward(self, x: Tensor) -> Tensor:
        x = self._q_in(x)
        if self.weight_quantizer is not None and x.dim() > 2:
            # PyTorch multiplies a strided 3-D input by a different kernel depending on whether
            # the weight requires grad, which a quantized weight does only with grad enabled:
            # a contiguous input gives the same bits under grad, no_grad and inference_mode
            x = x.contiguous()
        y = nn.functional.linear(x, self.quantized_weight(), self.quantized_bias())
        return self._q_out(y)


class QuantAct(nn.Module):
    """An activation quantizer as a module (identity when the spec is ``None``)."""

    def __init__(self, quantizer: Spec) -> None:
        super().__init__()
        self.quantizer = get(quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return x if self.quantizer is None else self.quantizer(x)


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """``(name, layer)`` of every quantized layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


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
        for role in ("weight", "bias"):
            q, p = getattr(layer, f"{role}_quantizer"), layer.quant_param(role)
            if q is not None and p is not None:
                q.constrain_(p)


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
