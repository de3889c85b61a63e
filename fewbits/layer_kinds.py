"""The layer kinds :func:`fewbits.quantize_` converts, as a registry keyed by torch class (or
qualified class name, for packages fewbits does not import), as torchao's ``quantize_``
dispatches: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.MultiheadAttention`` (all its
projections), HF ``transformers``' ``Conv1D`` and, when asked, ``nn.Embedding``. A new layer
kind is one :func:`register_layer_kind` call with a :class:`~fewbits.layers.QuantLayer`
subclass; this module holds the fewbits layers of the kinds beyond conv and linear.

    >>> layer_kind(nn.Conv1d(2, 3, 1)).quant_type.__name__
    'QuantConv1d'
    >>> emb = QuantEmbedding.from_float(nn.Embedding(5, 4), weight_quantizer="binary_connect")
    >>> torch.equal(emb(torch.tensor([0, 4])).abs(), torch.ones(2, 4))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .layers import QuantConv1d, QuantConv2d, QuantLayer, QuantLinear, Spec, quant_layers

__all__ = [
    "LAYER_KINDS",
    "ROLES",
    "LayerKind",
    "QuantEmbedding",
    "QuantHFConv1D",
    "QuantMultiheadAttention",
    "QuantizeReport",
    "disable_fast_paths",
    "global_hooks",
    "layer_kind",
    "layer_options",
    "quantization_report",
    "register_layer_kind",
    "runs_hooks",
]


#: The quantizer roles of a fewbits layer (the keys of a dict config of ``quantize_``).
ROLES = ("weight", "bias", "input", "output")


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


class QuantEmbedding(QuantLayer, nn.Embedding):
    """``nn.Embedding`` whose table passes through a weight quantizer: forward
    ``embedding(ids, w_q(W))`` (ids are integers: no input quantizer; no bias).

    ``max_norm`` (which rewrites the table during the forward) and ``sparse`` gradients are
    refused: ``ValueError``.
    """

    _float_type = nn.Embedding
    bias = None

    @classmethod
    def _check_float(cls, module: nn.Module) -> None:
        super()._check_float(module)
        if module.max_norm is not None or module.sparse:
            raise ValueError("QuantEmbedding: max_norm (renormalises the table in the forward) "
                             "and sparse gradients cannot be quantized; skip this embedding")

    @staticmethod
    def _float_kwargs(m: nn.Module) -> dict[str, Any]:
        return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                "padding_idx": m.padding_idx, "scale_grad_by_freq": m.scale_grad_by_freq}

    def _init_quantizers(self, weight_quantizer: Spec, bias_quantizer: Spec,
                         input_quantizer: Spec, output_quantizer: Spec) -> None:
        if input_quantizer is not None:
            raise ValueError("QuantEmbedding: the input is integer ids, which have no "
                             "input quantizer")
        super()._init_quantizers(weight_quantizer, None, None, output_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return self._q_out(nn.functional.embedding(
            x, self.quantized_weight(), self.padding_idx, None, 2.0, self.scale_grad_by_freq,
            False))


class QuantHFConv1D(QuantLayer, nn.Module):
    """HuggingFace ``transformers``' ``Conv1D`` (GPT-2's projections: a linear layer whose
    weight is stored ``(in, out)``) with quantizers; recognised by its qualified class name,
    so fewbits never imports transformers.

    Forward: ``out_q(addmm(b_q(b), in_q(x), w_q(W^T)^T))``, exactly ``Conv1D``'s with no
    quantizer. Quantizers see ``W^T`` (output channels first, as for ``nn.Linear``), so
    per-channel scales are per output feature. ``to_float`` returns the ``Conv1D`` class the
    layer was converted from.
    """

    _float_type = nn.Module  # the HF class is read from the converted module
    _hf_names = ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D")

    @classmethod
    def _is_float_form(cls, module: nn.Module) -> bool:
        return _qualname(type(module)) in cls._hf_names

    def _adopted(self, module: nn.Module) -> None:
        if not isinstance(module, QuantLayer):  # instance attribute: what to_float rebuilds
            self._float_type = type(module)

    @staticmethod
    def _float_kwargs(m: nn.Module) -> dict[str, Any]:
        return {"nf": m.nf, "nx": m.nx}

    def quant_param(self, role: str) -> Tensor | None:
        p = self.param(role)
        return p.t() if role == "weight" and p is not None else p

    def from_quant_view(self, role: str, t: Tensor) -> Tensor:
        return t.t() if role == "weight" else t

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = self._q_in(x)
        y = torch.addmm(self.quantized_bias(), x.view(-1, x.size(-1)), self.quantized_weight())
        return self._q_out(y.view(size_out))


class QuantMultiheadAttention(QuantLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with every projection quantized: the packed ``in_proj_weight``
    / ``in_proj_bias`` through this layer's weight/bias quantizers, ``out_proj`` a
    :class:`QuantLinear` (its weight/bias quantizers), the family's activation quantizer on
    query, key and value. PyTorch's fused fast path (which reads the float weights) is never
    taken: the forward always runs ``F.multi_head_attention_forward`` on the quantized ones.

    Separate ``q/k/v_proj_weight`` (``kdim``/``vdim`` differing from ``embed_dim``) raise
    ``ValueError``; so do nested-tensor inputs.
    """

    _float_type = nn.MultiheadAttention
    _params: ClassVar[dict[str, str]] = {"weight": "in_proj_weight", "bias": "in_proj_bias"}

    @classmethod
    def _check_float(cls, module: nn.Module) -> None:
        super()._check_float(module)
        if not module._qkv_same_embed_dim:
            raise ValueError("QuantMultiheadAttention: separate q/k/v projection weights "
                             "(kdim/vdim != embed_dim) are not supported; skip this layer")

    @staticmethod
    def _float_kwargs(m: nn.Module) -> dict[str, Any]:
        return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
                "batch_first": m.batch_first}

    def to_float(self, *, drop_activation_quantizers: bool = False) -> nn.Module:
        """A plain ``nn.MultiheadAttention`` holding the quantized projections (see
        :meth:`fewbits.layers.QuantLayer.to_float`)."""
        out = super().to_float(drop_activation_quantizers=drop_activation_quantizers)
        if isinstance(self.out_proj, QuantLinear):
            out.out_proj = self.out_proj.to_float()
        return out

    @property
    def weight(self) -> Tensor:  # the mixin's role "weight"
        return self.in_proj_weight

    @property
    def bias(self) -> Tensor | None:
        return self.in_proj_bias

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("QuantMultiheadAttention does not take nested tensors (PyTorch "
                             "runs them only on its float fast path)")
        f = nn.functional
        is_batched = query.dim() == 3
        key_padding_mask = f._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=f._none_or_dtype(attn_mask), other_name="attn_mask",
            target_type=query.dtype)
        attn_mask = f._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        # quantize each distinct input once, keeping self-attention's identities
        qk, qv = query is key, key is value
        query = self._q_in(query)
        key = query if qk else self._q_in(key)
        value = key if qv else self._q_in(value)
        if self.batch_first and is_batched:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if self.weight_quantizer is not None:  # same bits in every grad mode (QuantLinear)
            q_is_k, k_is_v = query is key, key is value
            query = query.contiguous()
            key = query if q_is_k else key.contiguous()
            value = key if k_is_v else value.contiguous()
        out_w, out_b = _out_proj(self.out_proj)
        y, w = f.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.quantized_weight(),
            self.quantized_bias(), self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            out_w, out_b, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and is_batched:
            y = y.transpose(1, 0)
        return self._q_out(y), w


def _out_proj(m: nn.Module) -> tuple[Tensor, Tensor | None]:
    if isinstance(m, QuantLinear):
        if m.input_quantizer is not None or m.output_quantizer is not None:
            raise ValueError("QuantMultiheadAttention: out_proj cannot quantize its input or "
                             "output (the attention computes it inside one function); give it "
                             "weight/bias quantizers only")
        return m.quantized_weight(), m.quantized_bias()
    return m.weight, m.bias


def layer_options(module: nn.Module) -> dict[str, Any]:
    """The constructor options of a layer of a kind in :data:`LAYER_KINDS`, fewbits or torch
    (channels/features, kernel size, stride, padding, dilation, groups, padding mode ...): what
    must match for stored weights to mean the same thing in another instance.

        >>> layer_options(nn.Linear(3, 2))
        {'in_features': 3, 'out_features': 2}
    """
    kind = layer_kind(module)
    if kind is None:
        raise TypeError(f"{_qualname(type(module))} is not a layer kind fewbits quantizes")
    return kind.quant_type._float_kwargs(module)


@dataclass(frozen=True)
class LayerKind:
    """How :func:`fewbits.quantize_` converts one kind of torch layer: the fewbits layer
    (``quant_type.from_float``), the ``quantize_`` keyword that must ask for it (``opt_in``:
    ``"embeddings"``; ``None``: always converted) and whether the family's activation
    quantizer goes on its input (not for integer ids)."""

    quant_type: type[QuantLayer]
    opt_in: str | None = None
    activations: bool = True


#: Layer kinds by torch class, or by qualified class name for classes of packages fewbits does
#: not import (HF ``Conv1D``). A new layer kind is one :func:`register_layer_kind` call.
LAYER_KINDS: dict[type | str, LayerKind] = {}


def register_layer_kind(float_type: type[nn.Module] | str, quant_type: type[QuantLayer], *,
                        opt_in: str | None = None, activations: bool = True) -> None:
    """Register how ``float_type`` (a class, or ``"package.module.Class"``) is quantized.
    A kind registered twice raises ``ValueError``."""
    if float_type in LAYER_KINDS:
        raise ValueError(f"layer kind {float_type!r} is already registered")
    LAYER_KINDS[float_type] = LayerKind(quant_type, opt_in, activations)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The :class:`LayerKind` of ``module`` (exact class or qualified name, never a subclass:
    a subclass may compute differently), of its fewbits layer, or ``None``."""
    t = type(module)
    if isinstance(module, QuantLayer):
        return next((k for k in LAYER_KINDS.values() if k.quant_type is t), LayerKind(t))
    return LAYER_KINDS.get(t) or LAYER_KINDS.get(_qualname(t))


for _t, _q in ((nn.Linear, QuantLinear), (NonDynamicallyQuantizableLinear, QuantLinear),
               (nn.Conv1d, QuantConv1d), (nn.Conv2d, QuantConv2d),
               (nn.MultiheadAttention, QuantMultiheadAttention)):
    register_layer_kind(_t, _q)
for _n in QuantHFConv1D._hf_names:
    register_layer_kind(_n, QuantHFConv1D)
register_layer_kind(nn.Embedding, QuantEmbedding, opt_in="embeddings", activations=False)


@dataclass
class QuantizeReport:
    """What :func:`quantize_` did: ``converted`` (``(layer name, fewbits class, quantizer
    names by role)``) and ``float_tensors`` (``(tensor name, shape, why)``: every weight
    matrix, a parameter of two or more dimensions not named ``bias*``, that the forward still
    uses in float)."""

    converted: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    float_tensors: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)

    @property
    def float_count(self) -> int:
        """Elements of the weight matrices left float."""
        return sum(math.prod(s) for _, s, _ in self.float_tensors)

    def table(self) -> str:
        lines = [f"converted {len(self.converted)} layers:"]
        lines += [f"  {n:48s} {c:24s} " + ", ".join(f"{r}={q}" for r, q in qs.items())
                  for n, c, qs in self.converted]
        lines.append(f"{len(self.float_tensors)} weight tensors stay float "
                     f"({self.float_count:,} elements):")
        lines += [f"  {n:48s} {'x'.join(map(str, s)):>14s}  {why}"
                  for n, s, why in self.float_tensors]
        return "\n".join(lines)


def quantization_report(model: nn.Module) -> QuantizeReport:
    """The :class:`QuantizeReport` of ``model`` as it is now: its fewbits layers with
    quantizers, and every weight matrix (parameter with two or more dimensions) that some
    module of the model uses in float (a tied tensor is float where a float module reads it)."""
    rep = QuantizeReport()
    quantized: set[int] = set()
    for lname, layer in quant_layers(model):
        qs = {r: q.name for r in ROLES if (q := getattr(layer, f"{r}_quantizer")) is not None}
        if layer.weight_quantizer is not None:
            quantized.add(id(layer.param("weight")))
            rep.converted.append((lname, type(layer).__name__, qs))
    seen: set[tuple[int, int]] = set()
    for mname, m in model.named_modules(remove_duplicate=False):
        qlayer = isinstance(m, QuantLayer) and m.weight_quantizer is not None
        for pname, p in m.named_parameters(recurse=False):
            if p is None or p.dim() < 2 or pname.startswith("bias") or (id(m), id(p)) in seen:
                continue
            seen.add((id(m), id(p)))
            if qlayer and p is m.param("weight"):
                continue
            key = f"{mname}.{pname}" if mname else pname
            why = (f"{type(m).__name__} reads it in float; it is quantized elsewhere (tied)"
                   if id(p) in quantized else f"{type(m).__name__} is not converted")
            rep.float_tensors.append((key, tuple(p.shape), why))
    return rep


def disable_fast_paths(model: nn.Module) -> None:
    """Keep PyTorch's fused inference paths, which read float weights around any quantizer,
    off every module of ``model`` that holds a fewbits layer: ``nn.TransformerEncoderLayer``
    (its fast path is off while it has a forward pre-hook, so a no-op one is registered) and
    ``nn.TransformerEncoder`` (``use_nested_tensor = False``). ``quantize_`` and
    ``load_packed`` call it; :class:`~fewbits.layer_kinds.QuantMultiheadAttention` never takes
    its own. Idempotent."""
    for m in model.modules():
        if not any(isinstance(c, QuantLayer) for c in m.modules()):
            continue
        if isinstance(m, nn.TransformerEncoderLayer):
            if _no_fast_path not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_no_fast_path)
        elif isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False


def _no_fast_path(module: nn.Module, args: Any) -> None:
    """Forward pre-hook doing nothing: its presence keeps PyTorch's fused path off."""
    return None


def runs_hooks(m: nn.Module) -> bool:
    """Whether ``m`` runs forward hooks, which fx does not trace (they may change what it
    computes); fewbits' own hook keeping PyTorch's fused attention path off computes nothing
    and does not count."""
    return bool(m._forward_hooks) or any(h is not _no_fast_path
                                         for h in m._forward_pre_hooks.values())


def global_hooks() -> bool:
    """Whether a global forward hook (``register_module_forward_hook``) is registered: it runs
    on every module, untraced by fx."""
    glob = torch.nn.modules.module
    return bool(glob._global_forward_hooks or glob._global_forward_pre_hooks)
