"""Batch-norm folding for deployment: ``BN(conv(x, W))`` as ``conv(x, W') + b'``.

Evaluation batch norm is a per-channel affine map ``alpha * y + c`` with
``alpha = gamma / sqrt(var + eps)`` and ``c = beta - alpha * mean``. Folded into the layer before
it (field-standard batch-norm folding), the weights of output channel ``o`` become
``alpha[o] * W[o]``. For the weight-quantized families ``W[o] = k[o] * s[o]`` with integer codes
``k`` (fixed point: ``s = delta``; min-max: ``s = scale``, ``k = q - zero_point``; pow2, INQ and
binary: ``s[o]`` read off the values, checked exact), so the folded weights are the *same*
integer codes with the per-channel scale ``|alpha[o]| * s[o]`` (codes negated where
``alpha[o] < 0``; a channel holding code -128 there keeps the float form): an int8 per-channel
weight, the form ONNX Runtime's ``QLinearConv`` takes.

``conv -> relu -> bn`` (the min-max recipe) folds too: for ``alpha > 0``,
``alpha * relu(y) + c = max(alpha * y + c, c)`` (``min`` for ``alpha < 0``), so the ReLU
becomes a per-channel bound on the folded output (:attr:`Fold.bound`).

Tolerance. In real arithmetic the folded layer computes exactly what the pair computes; in
float32 both round differently (the fold multiplies once, batch norm subtracts, divides by
``sqrt(var + eps)`` and multiplies): the outputs differ by a few float32 ulps of
``|alpha| * sum |w x| + |c|`` (:data:`FOLD_RTOL` of that magnitude is asserted in
``tests/test_deploy.py``). A quantizer after the fold therefore lands on the other level where
the unfolded value lies within those ulps of a rounding boundary.

Packed files (``export_packed(bn="folded")``) fold a batch norm into the quantized layer before
it where the family's codes can hold it (:meth:`~fewbits.quantizers.Quantizer.fold_scale`:
ternary per-channel scales become ``|alpha| * a``, trits negated where ``alpha < 0``); the batch
norm keeps only ``c`` as its bias (:func:`scale_folds`).

    >>> conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4).eval()
    >>> f = fold_batch_norm(conv.weight.detach(), None, bn)
    >>> f.weight.shape, f.bias.shape
    (torch.Size([4, 3, 3, 3]), torch.Size([4]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from ..layers import quant_layers
from ..quantizers import Codes, Quantizer
from ..quantizers.base import exact_multiples

__all__ = ["FOLD_RTOL", "Fold", "IntWeight", "ScaleFold", "fold_batch_norm", "int8_weight",
           "scale_folds"]

#: Relative float32 error of a folded layer against conv + batch norm, relative to
#: ``|alpha| * sum |w x| + |c|`` (measured: below 2e-7; asserted with margin).
FOLD_RTOL = 1e-6


@dataclass
class IntWeight:
    """``weight = codes * scale[o]`` per output channel: int8 codes, float32 positive scales."""

    codes: Tensor  # int8, the weight's shape
    scale: Tensor  # float32, (out,)

    def value(self) -> Tensor:
        view = (-1,) + (1,) * (self.codes.dim() - 1)
        return self.codes.to(torch.float64) * self.scale.to(torch.float64).view(view)


def _fits_int8(k: Tensor) -> bool:
    return k.numel() > 0 and -128 <= int(k.min()) and int(k.max()) <= 127


def int8_weight(q: Quantizer | None, w: Tensor, codes: Codes | None = None
                ) -> IntWeight | None:
    """The int8 per-channel form of a quantized weight, or ``None`` when its codes do not fit
    ``[-128, 127]``.

    ``w`` holds the values the layer's forward uses. The integers and scales are the family's
    (:meth:`~fewbits.quantizers.Quantizer.integer_weight`: fixed point's grid, min-max's
    affine codes; by default, and for a float weight, each output channel as an exact integer
    multiple of its smallest nonzero magnitude, :func:`~fewbits.quantizers.base.exact_multiples`).
    """
    w = w.detach().float()
    form = q.integer_weight(w, codes) if q is not None else exact_multiples(w)
    if form is None or not _fits_int8(form[0]):
        return None
    k, scale = form
    return IntWeight(k.reshape(w.shape).to(torch.int8), scale.float())


@dataclass
class Fold:
    """A folded layer: ``weight`` (float32 values), ``int_weight`` (its int8 per-channel form
    when the source weight had one), ``bias`` and, for ``conv -> relu -> bn``, the per-channel
    ReLU ``bound`` with ``sign`` (+1: ``max(y, bound)``, -1: ``min(y, bound)``, 0: constant)."""

    weight: Tensor
    bias: Tensor
    int_weight: IntWeight | None = None
    bound: Tensor | None = None
    sign: Tensor | None = None


def _bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
        raise ValueError(f"cannot fold {type(bn).__name__}: need an evaluation batch norm with "
                         "running statistics")
    c = bn.num_features
    gamma = bn.weight.detach().double() if bn.affine else torch.ones(c, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros(c, dtype=torch.float64)
    alpha = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    return alpha, beta - alpha * bn.running_mean.double()


def fold_batch_norm(w: Tensor, b: Tensor | None, bn: nn.Module, *, relu_before: bool = False,
                    int_weight: IntWeight | None = None) -> Fold:
    """Fold evaluation batch norm ``bn`` into the layer ``(w, b)`` before it (``relu_before``:
    a ReLU sits between them). With ``int_weight`` (``w``'s int8 form) the fold keeps the codes
    and scales the per-channel scales. Computed in float64, rounded once to float32."""
    alpha, c = _bn_affine(bn)
    out = w.shape[0]
    if alpha.numel() != out:
        raise ValueError(f"batch norm has {alpha.numel()} channels, the layer {out} outputs")
    b64 = b.detach().double() if b is not None else torch.zeros(out, dtype=torch.float64)
    view = (-1,) + (1,) * (w.dim() - 1)
    iw = None
    if int_weight is not None:
        flips = (int_weight.codes == -128) & (alpha < 0).view(view)
        if bool(flips.any()):  # -(-128) is not an int8: keep the float form
            int_weight = None
    if int_weight is not None:
        sgn = torch.where(alpha < 0, -1, 1).to(torch.int8)
        codes = int_weight.codes * sgn.view(view)
        codes = torch.where((alpha == 0).view(view), torch.zeros_like(codes), codes)
        scale = (int_weight.scale.double() * alpha.abs())
        scale = torch.where(alpha == 0, torch.ones_like(scale), scale).float()
        iw = IntWeight(codes, scale)
        weight = iw.value().float()
    else:
        weight = (w.detach().double() * alpha.view(view)).float()
    bias = (alpha * b64 + c).float()
    if not relu_before:
        return Fold(weight, bias, iw)
    return Fold(weight, bias, iw, bound=c.float(), sign=torch.sign(alpha).float())


@dataclass
class ScaleFold:
    """A quantized layer's weight codes with the batch norm after it folded in (``codes``:
    :meth:`~fewbits.quantizers.Quantizer.fold_scale`), that batch norm's module name and the
    bias left of it, ``c = beta - alpha * mean`` (float32)."""

    codes: Codes
    bn: str
    bias: Tensor


def scale_folds(model: nn.Module) -> dict[str, ScaleFold]:
    """``{weight state-dict key: ScaleFold}`` for each bias-free quantized layer of ``model``
    (evaluation mode) whose only use is an affine batch norm with running statistics, used
    once, whose family folds it (:meth:`~fewbits.quantizers.Quantizer.fold_scale` not
    ``None``). The graph is read with ``torch.fx`` (quantized layers and quantizers as
    leaves); a model fx cannot trace raises ``ValueError``. In real arithmetic
    ``BN(layer(x))`` equals the folded layer plus ``c``; in float32 they differ by the ulps
    of :data:`FOLD_RTOL`."""
    layers = dict(quant_layers(model))

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in layers or isinstance(m, Quantizer) or \
                super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many kinds for data-dependent control flow
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx to fold its batch "
                         f"norm: {e}; export with bn='float32'") from e
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    out: dict[str, ScaleFold] = {}
    for node in graph.nodes:
        name = str(node.target)
        layer = layers.get(name) if node.op == "call_module" else None
        q = getattr(layer, "weight_quantizer", None)
        if q is None or layer.param("bias") is not None or calls[name] != 1 or \
                len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = model.get_submodule(str(user.target)) if user.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine or \
                bn.running_mean is None or calls[str(user.target)] != 1:
            continue
        w = layer.quant_param("weight").detach()
        if bn.num_features != w.shape[0]:
            continue
        alpha, c = _bn_affine(bn)
        folded = q.fold_scale(q.encode(w), alpha)
        if folded is not None:
            out[f"{name}.{layer.param_key('weight')}" if name else layer.param_key("weight")] = \
                ScaleFold(folded, str(user.target), c.float())
    return out
