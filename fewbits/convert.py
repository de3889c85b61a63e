"""Quantize any PyTorch model in one call, and set activation ranges from data.

:func:`quantize_` swaps, in place, every layer of a kind in :data:`fewbits.layer_kinds.LAYER_KINDS`
(``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.MultiheadAttention`` with all its projections, HF
``transformers``' ``Conv1D``, and ``nn.Embedding`` when asked) for the fewbits layer built by its
``from_float`` (same parameters, options, device and dtype), dispatching on the layer's type as
torchao's ``quantize_`` and Brevitas' ``layerwise_quantize`` do. The model then trains in any
PyTorch loop, and :func:`fewbits.export.export_packed` writes it at its real width.

A *config* says what each layer gets:
- a family name (one of :data:`fewbits.models.FAMILIES`): the family's weight quantizer (its
  bias quantizer on layers with a bias) and, for the families that quantize activations
  (``binary_net``, ``fp_net``, ``pow2_net``, ``min_max``), its activation quantizer as the layer's
  input quantizer; :func:`family_config` gives the same with options (``bit_width=4`` ...);
- a dict of quantizer specs by role, ``{"weight": ..., "bias": ..., "input": ..., "output": ...}``
  (each spec as :func:`fewbits.quantizers.get` takes it; a quantizer instance is copied per
  layer, since quantizers hold per-layer state);
- a callable ``(qualified_name, module) -> config or None`` for per-layer choices (``None`` keeps
  the layer in float).

Where activations are quantized (one placement for every model, zoo or not): the family's activation
quantizer quantizes what each converted layer reads, except the raw model input (the first converted
layer in module order when no embedding comes before it) unless ``quantize_input=True``; LSQ's is
unsigned where the layer reads a ReLU's output (the fx graph,
:func:`~fewbits.signs.nonnegative_inputs`), else signed, unless its spec says (the first batch warns
if it holds negatives). Weight grids start from the weights: min-max ranges from their min and max,
fixed point's ``delta`` and pow2's ``m`` (largest level ``2**m``) from their largest magnitude,
unless the config gives them (``family_config("fp_connect", delta=2**-7)``).

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    >>> _ = net(torch.zeros(1, 3, 8, 8))             # materialise the lazy layer
    >>> net = quantize_(net, "binary_weight", skip=["0"])   # first conv stays float
    >>> [type(m).__name__ for m in net]
    ['Conv2d', 'ReLU', 'Flatten', 'QuantLinear']
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .hf_record import record_for_save_pretrained
from .layer_kinds import (
    ROLES,
    LayerKind,
    QuantizeReport,
    QuantMultiheadAttention,
    disable_fast_paths,
    layer_kind,
    quantization_report,
)
from .layers import QuantAct, QuantLayer, QuantLinear, quant_layers
from .models.families import QuantConfig, family
from .quantizers import Quantizer, get
from .quantizers import optim as qoptim
from .quantizers.base import fitted_step
from .signs import nonnegative_inputs

__all__ = ["ROLES", "QuantizeReport", "calibrate", "disable_fast_paths", "family_config",
           "quantization_report", "quantize_"]


Config = str | dict[str, Any] | Callable[[str, nn.Module], Any] | None

# Torch layers fewbits has no quantized form of: converting a model that holds one must not
# quietly leave it in float.
_NO_FORM = (nn.modules.conv._ConvNd, nn.Bilinear)
#: The grid option fitted to the weights when a spec leaves it out, per quantizer name.
_GRID_KEYS = {"fixed_point": "delta", "pow2": "m"}
#: Above this fraction of zeros among a layer's quantized weights, quantize_ warns.
MOSTLY_ZERO = 0.5


def family_config(name: str, **options: Any) -> dict[str, Any]:
    """The dict config of family ``name`` with :class:`fewbits.models.QuantConfig` options
    (``bit_width``, ``delta``, ``inq_iterations`` ...): weight, bias and (for the families that
    quantize activations) input quantizer specs, from the family table.

    Fixed point's ``delta`` and pow2's upper bound ``m`` are left out of the weight and bias
    specs unless given (``delta=``, ``upper_bound=``): :func:`quantize_` then fits them to each
    layer's weights (the zoo keeps the seed's values).

    Raises ``ValueError`` listing the known families or naming an option the family does not
    use (``bit_width`` for ``binary_connect``; ``None``, "the family default", is never
    refused), ``TypeError`` listing the known options.

        >>> family_config("fp_connect", bit_width=4)["weight"]
        {'name': 'fixed_point', 'sign': True, 'n': 4, 'ste_fine_grained': True}
    """

    fam = family(name)
    cfg = QuantConfig.from_kwargs(options)
    # None is "not set" (the family default), as QuantConfig reads it: never refused
    ignored = fam.ignored(cfg, [k for k, v in options.items() if v is not None])
    if ignored:
        raise ValueError(f"family {name!r} does not use {', '.join(ignored)}; it would be "
                         "ignored (docs/QUANTIZERS.md, 'The families')")
    specs = fam.specs(cfg)
    given = {"delta": options.get("delta") is not None,
             "m": options.get("upper_bound") is not None}
    for role in ("weight", "bias"):
        spec = specs.get(role)
        key = _GRID_KEYS.get(spec.get("name")) if isinstance(spec, dict) else None
        if key is not None and not given[key]:
            specs[role] = {k: v for k, v in spec.items() if k != key}
    return specs


def _role_specs(config: Any, where: str) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, str):
        return family_config(config)
    if isinstance(config, dict):
        bad = sorted(set(config) - set(ROLES))
        if bad:
            hint = (" (a quantizer spec goes under a role: {'weight': {'name': ...}})"
                    if "name" in bad else "")
            raise ValueError(f"{where}: unknown config key(s) {bad}; known roles: "
                             f"{', '.join(ROLES)}{hint}")
        return {r: copy.deepcopy(v) if isinstance(v, Quantizer) else v
                for r, v in config.items()}
    raise TypeError(f"{where}: a config is a family name, a dict of quantizer specs by role or "
                    f"None; got {type(config).__name__}")


def _fit_grid(spec: Any, t: Tensor | None) -> Any:
    """``spec`` with fixed point's ``delta`` / pow2's ``m`` chosen from ``t`` when it leaves
    them out: the smallest power-of-two step (largest level) that holds ``max |t|`` unclipped
    (:func:`fewbits.quantizers.base.fitted_step`). Meta tensors (a bounded rebuild) and
    all-zero or non-finite ones keep the quantizer's default; the state dict or file brings
    the grid."""
    key = _GRID_KEYS.get(spec.get("name")) if isinstance(spec, dict) else None
    if key is None or key in spec or t is None:
        return spec
    if key == "delta":
        n = int(spec.get("n", 8))
        step = fitted_step(t, 2 ** (n - 1) - 1 if spec.get("sign", True) else 2**n - 1)
    else:
        step = fitted_step(t, 1)
    if step is None:
        return spec
    return {**spec, key: step if key == "delta" else round(math.log2(step))}


def _skip_matcher(skip: str | Sequence[str] | None, names: list[str]) -> Callable[[str], bool]:
    patterns = [skip] if isinstance(skip, str) else list(skip or [])

    def hit(p: str, n: str) -> bool:  # a pattern, or a module under a matched container
        return fnmatch.fnmatchcase(n, p) or n.startswith(p + ".")

    unused = [p for p in patterns if not any(hit(p, n) for n in names)]
    if unused:
        shown = ", ".join(names[:60]) + (f" ... ({len(names)} in all)" if len(names) > 60 else "")
        raise ValueError(f"skip pattern(s) {unused} match no weight-bearing layer of the model; "
                         f"its layers: {shown or '(none)'}")
    return lambda n: any(hit(p, n) for p in patterns)


def _occurrences(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(qualified name, parent, attribute, module)`` of every child, shared ones repeated."""
    out = []
    for pname, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():  # named_children() drops repeats
            if child is None:
                continue
            out.append((f"{pname}.{attr}" if pname else attr, parent, attr, child))
    return out


def quantize_(model: nn.Module, config: Config, *,
              skip: str | Sequence[str] | None = None, embeddings: bool = False,
              quantize_input: bool = False, strict: bool = False,
              verbose: bool = False,
              optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Convert, in place, every layer of ``model`` of a kind in
    :data:`~fewbits.layer_kinds.LAYER_KINDS` into the fewbits layer given by ``config`` (see
    the module doc); returns ``model``.

    Each new layer holds the same weight and bias parameters, keeps
    every option, device and dtype, and starts its weight grid from its weights (min-max
    ranges; fixed point ``delta`` and pow2 ``m`` when the config leaves them out). A module
    shared at several places is converted once; a parameter shared by two layers (tied
    weights) gets one quantizer object, and two different quantizers on it raise
    ``ValueError`` naming both.

    - ``skip``: layer names or shell patterns (``"layer4.*"``, ``"fc"``; a container's name skips
      everything in it) left in float, or the name of a weight tensor the report lists (a
      model's own ``nn.Parameter`` that its forward passes to ``F.linear``: ``"w"``). A
      pattern that matches no weight-bearing module raises ``ValueError`` listing them.
    - ``embeddings=True`` converts ``nn.Embedding`` tables too (weight quantizer only).
    - ``quantize_input=True`` puts the activation quantizer on the raw model input as well.
    - A callable config returning ``None`` keeps that layer float, as ``skip`` does.
    - Layers that already are fewbits layers with a quantizer are left as they are
      (``quantize_`` is idempotent); fewbits layers without any (a zoo float net) are converted.
    - A subclass of a converted kind (whose forward may differ), a parametrized or lazy layer,
      and convolutions of other kinds (``Conv3d``, transposed) raise ``ValueError`` naming them
      (the model is then left unchanged), unless skipped or the callable config returns
      ``None`` for them. A model without any such layer raises ``ValueError``.
    - Every weight matrix the forward still uses in float is reported: a ``UserWarning``
      names those ``skip`` does not cover (``verbose=True`` prints the whole
      :class:`QuantizeReport`, also given by :func:`quantization_report`), and
      ``strict=True`` raises ``ValueError`` instead (the model left unchanged). A layer
      whose quantized weights are more than half zeros warns, naming the grid.
    - ``optimizer``: an optimizer built before this call. Learned min-max ranges are new
      parameters, which it does not hold: passing it adds them as one new parameter group (its
      defaults). Without it, the first ``step()`` of an optimizer that holds the model's
      weights but not the new ranges raises ``RuntimeError`` saying this
      (:mod:`fewbits.quantizers.optim`); an optimizer built after ``quantize_`` holds all.

    PyTorch's fused transformer paths are switched off around converted layers
    (:func:`disable_fast_paths`). A transformers model records the conversion for
    ``save_pretrained`` (:func:`fewbits.hf_record.record_for_save_pretrained`). Errors name the
    layer: ``"layer1.0.conv1: ..."``.
    """
    before = {id(p) for p in model.parameters()}
    order = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
    occ = sorted(_occurrences(model), key=lambda o: order[o[0]])  # module (forward) order
    owners = {id(m) for _, _, _, m in occ if isinstance(m, nn.MultiheadAttention)}
    found = [(n, p, a, m) for n, p, a, m in occ if id(p) not in owners and
             (layer_kind(m) is not None or isinstance(m, _NO_FORM) or _subclass_of_kind(m))]
    weighty = [n for n, _, _, m in occ if any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    names = list(dict.fromkeys(n for n, *_ in found))
    if not names:
        raise ValueError(f"{type(model).__name__} has no layer of a kind fewbits quantizes "
                         "(nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention, HF Conv1D, "
                         "nn.Embedding)")
    # a weight of a module with no fewbits layer (a root nn.Parameter fed to F.linear): by name
    layers = {id(m) for *_, m in found}
    tensors = [f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules()
               if id(m) not in layers for pn, p in m.named_parameters(recurse=False)
               if p.dim() >= 2]
    skipped = _skip_matcher(skip, list(dict.fromkeys(names + weighty + tensors)))
    first_reader = _raw_input_reader(found)
    plan: list[tuple[str, nn.Module, LayerKind, dict[str, Any]]] = []
    problems: list[str] = []
    done: set[int] = set()
    asked_float: set[str] = set()
    for name, _, _, module in found:
        if id(module) in done or skipped(name):
            continue
        done.add(id(module))
        kind = layer_kind(module)
        if isinstance(module, QuantLayer) and not module.is_float():
            continue
        if kind is not None and kind.opt_in == "embeddings" and not embeddings:
            continue
        specs = _role_specs(config(name, module) if callable(config) else config, name)
        if specs is None:  # the caller's choice, as skip
            asked_float.add(name)
            continue
        if specs.get("weight") is None:  # a config without a weight quantizer ("float",
            asked_float.add(name)  # activations only): float weights are what was asked
        if kind is None:
            problems.append(f"{name}: {type(module).__module__}.{type(module).__qualname__} has "
                            "no fewbits form (a subclass may compute differently from its "
                            "parent; fewbits converts the exact classes of LAYER_KINDS)")
            continue
        if not kind.activations or (name == first_reader and not quantize_input):
            specs = {r: s for r, s in specs.items() if r in ("weight", "bias", "output")
                     and (r != "output" or kind.activations)}
        plan.append((name, module, kind, specs))
    auto = {n: sp for n, *_, sp in plan if isinstance(sp.get("input"), dict)  # LSQ inputs
            and sp["input"].get("name") == "lsq" and "signed" not in sp["input"]}  # w/o signed
    unsigned = nonnegative_inputs(model, list(auto)) if auto else set()
    for n, sp in auto.items():
        sp["input"] = {**sp["input"], "signed": n not in unsigned}
    converted = _convert(plan, problems)
    if problems:  # all or nothing: the model is left as it was
        raise ValueError("cannot quantize these layers (add them to skip= to keep them float):\n"
                         + "\n".join(f"  {p}" for p in problems))
    for n, module, *_ in plan:  # unsigned on fx's word: the first batch checks it (LSQ)
        if n in unsigned and id(module) in converted:  # (zoo's unsigned ones replace the ReLU)
            converted[id(module)].input_quantizer.expects_nonnegative = True
    for _, parent, attr, module in occ:
        if id(module) in converted:  # a shared module gets the same layer everywhere
            setattr(parent, attr, converted[id(module)])
    for names in _shared_schedules(model):
        warnings.warn(f"{', '.join(names)}: one scheduled quantizer (INQ) runs at each of these "
                      "places, so its schedule would count every forward that many times; call "
                      "fewbits.layers.count_optimizer_steps(model) before training and "
                      "apply_weight_constraints(model) after each optimizer step", stacklevel=2)
    try:
        _report(model, lambda n: skipped(n) or n in asked_float, strict, verbose)
    except ValueError:  # strict: the model is left as it was
        for _, parent, attr, module in occ:
            if id(module) in converted:
                setattr(parent, attr, module)
        raise
    added = [(n, p) for n, p in model.named_parameters() if id(p) not in before]
    if optimizer is not None:
        qoptim.add_to_optimizer(optimizer, [p for _, p in added])
    qoptim.require_companions([p for p in model.parameters() if id(p) in before], added)
    disable_fast_paths(model)
    record_for_save_pretrained(model, config, skip, embeddings, quantize_input)
    return model


def _shared_schedules(model: nn.Module) -> list[list[str]]:
    """The places of each forward-counted scheduled quantizer (INQ) that runs more than once
    per forward: on a tied tensor, or in a layer used at several places."""
    places: dict[int, list[str]] = {}
    for name, _, _, m in _occurrences(model):
        if not isinstance(m, QuantLayer):
            continue
        for r in ("weight", "bias"):
            q = getattr(m, f"{r}_quantizer")
            if q is not None and hasattr(q, "step_counted") and not q.step_counted:
                places.setdefault(id(q), []).append(f"{name}.{r}_quantizer")
    return [names for names in places.values() if len(names) > 1]


def _subclass_of_kind(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention, nn.Embedding))


def _raw_input_reader(found: list[tuple[str, nn.Module, str, nn.Module]]) -> str | None:
    """The layer that reads the raw model input: the first converted kind in module order, or
    none when an embedding comes first (then every layer reads activations)."""
    kinds = [(name, layer_kind(m)) for name, _, _, m in found]
    return next((name if k.activations else None for name, k in kinds if k is not None), None)


def _convert(plan: list[tuple[str, nn.Module, LayerKind, dict[str, Any]]],
             problems: list[str]) -> dict[int, nn.Module]:
    """Build the fewbits layers of ``plan``; tied parameters share one quantizer object."""
    converted: dict[int, nn.Module] = {}
    owner: dict[tuple[int, str], tuple[str, Quantizer | None, Any]] = {}  # param, role -> ...
    for name, module, kind, specs in plan:
        cls = kind.quant_type
        try:
            new = cls.from_float(module, **{f"{r}_quantizer": s for r, s in specs.items()
                                            if r in ("input", "output")})
            parts = [(name, new, specs)]
            if isinstance(new, QuantMultiheadAttention) and type(new.out_proj) is not QuantLinear:
                new.out_proj = QuantLinear.from_float(new.out_proj)
                parts.append((f"{name}.out_proj", new.out_proj, specs))
            for lname, layer, sp in parts:
                for role in ("weight", "bias"):
                    p = layer.quant_param(role)
                    spec = _fit_grid(sp.get(role), p)
                    if spec is None or p is None:
                        continue
                    key = (id(layer.param(role)), role)
                    if key in owner:
                        other, q, _ = owner[key]
                        if get(spec).config() != q.config():
                            raise ValueError(
                                f"its {role} is the tensor of {other} (tied), which gets "
                                f"{q.config()}, but this layer would get {get(spec).config()}; "
                                "give both the same config or skip one")
                    else:
                        q = get(copy.deepcopy(spec) if isinstance(spec, Quantizer) else spec)
                        q.to(device=p.device).setup(p)
                        q.place(f"{lname}.{layer.param_key(role)}" if lname else role)
                        q.init_from_(p.detach())
                        # a grid fitted to these weights is refitted to weights loaded later
                        q.grid_fitted = spec is not sp.get(role)
                        owner[key] = (lname, q, spec)
                    setattr(layer, f"{role}_quantizer", q)
        except (TypeError, ValueError) as e:
            problems.append(f"{name}: {e}")
            continue
        converted[id(module)] = new
    return converted


def _report(model: nn.Module, skipped: Callable[[str], bool], strict: bool,
            verbose: bool) -> None:
    rep = quantization_report(model)
    if verbose:
        print(rep.table())
    left = [(n, s, why) for n, s, why in rep.float_tensors
            if not skipped(n.rpartition(".")[0]) and not skipped(n)]
    if left:
        shown = "; ".join(f"{n} {'x'.join(map(str, s))} ({why})" for n, s, why in left[:8])
        more = f" ... ({len(left)} in all)" if len(left) > 8 else ""
        msg = (f"{len(left)} weight tensor(s) stay float: {shown}{more}; convert them "
               "(embeddings=True for nn.Embedding) or name them in skip=")
        if strict:
            raise ValueError(f"quantize_(strict=True): {msg}")
        warnings.warn(msg, UserWarning, stacklevel=3)
    for lname, layer in quant_layers(model):
        q, w = layer.weight_quantizer, layer.quant_param("weight")
        if q is None or w is None or not w.numel() or w.is_meta:
            continue
        zeros = float((q.infer(w.detach()) == 0).float().mean())
        if zeros > MOSTLY_ZERO:
            warnings.warn(f"{lname}: {zeros:.0%} of its quantized weights are 0 ({q.config()}, "
                          f"max |w| = {float(w.detach().abs().max()):.3g}); leave delta / "
                          "upper_bound out of the config to fit the grid to the weights",
                          UserWarning, stacklevel=3)


def _activation_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """The activation quantizers whose family calibrates (``Quantizer.calibrates``)."""
    out = []
    for lname, layer in quant_layers(model):
        for role in ("input", "output"):
            q = getattr(layer, f"{role}_quantizer")
            if q is not None and q.calibrates:
                out.append((f"{lname}.{role}_quantizer" if lname else f"{role}_quantizer", q))
    out += [(f"{n}.quantizer", m.quantizer) for n, m in model.named_modules()
            if isinstance(m, QuantAct) and m.quantizer is not None and m.quantizer.calibrates]
    return out


def _to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor in it (nested tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch if device is None else batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _run_batch(model: nn.Module, batch: Any, device: torch.device | None) -> None:
    if isinstance(batch, dict):  # HF-style: model(**batch); labels are ignored
        model(**_to_device(batch, device))
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("calibrate: a batch is an empty tuple; give (inputs, ...)")
        _run_batch(model, batch[0], device)
    elif isinstance(batch, Tensor):
        model(_to_device(batch, device))
    else:
        raise TypeError(f"calibrate: a batch is a tensor, a tuple/list whose first item is the "
                        f"input, or a dict of model keyword arguments; got {type(batch).__name__}")


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any]) -> dict[str, tuple[float, float]]:
    """Set every min-max activation range of ``model`` (layers' input/output quantizers and
    :class:`~fewbits.layers.QuantAct`) to the min and max its input takes over ``batches``,
    widened to hold 0: ``[min(lo, 0), max(hi, 0)]`` (the grid of a min-max quantizer always
    holds zero, as Jacob et al.'s nudging and the learned-range projection require; activations
    all in ``[0.5, 1]`` get ``[0, 1]``, never a grid that clips every value).

    ``batches`` yields input tensors, tuples/lists whose first item is the input (a
    ``DataLoader`` of ``(x, y)``), or dicts of keyword arguments, run as ``model(**batch)`` (a
    HuggingFace tokenizer's output); tensors, nested ones included, are moved to the model's
    device. The forwards run in evaluation mode with the activation quantizers passing values
    through unquantized (the float activations are observed, as Brevitas' calibration does), so
    batch-norm statistics, INQ counters, weights and every other state stay as they were; the
    training flag is restored. LSQ activation steps start from the first batch as the first
    training forward would (the paper's ``2 * mean|x| / sqrt(Q_P)``; LSQ+: the range); fixed
    grids (fixed point, pow2, binary) have nothing to set. Returns ``{quantizer name: (min,
    max)}`` of the ranges set (LSQ: its grid's ends; empty if none). Raises ``ValueError`` for
    an empty ``batches`` or a per-channel activation quantizer, ``TypeError`` for another batch.

        >>> from fewbits.layers import QuantLinear
        >>> net = QuantLinear(2, 2, input_quantizer="min_max")
        >>> calibrate(net, [{"x": torch.tensor([[0.5, 1.0]])}])
        {'input_quantizer': (0.0, 1.0)}
    """
    targets = _activation_quantizers(model)
    for name, q in targets:
        if getattr(q, "per_channel", False):
            raise ValueError(f"{name}: per-channel activation ranges cannot be calibrated")
    seen: dict[str, list[float]] = {}
    hooks = []
    for name, q in targets:
        def observe(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor, name: str = name
                    ) -> Tensor:
            if name not in seen:  # LSQ: the paper's start, from the first batch
                mod.calibrate_start(args[0])
            lo, hi = (float(v) for v in torch.aminmax(args[0].detach().float()))
            r = seen.setdefault(name, [0.0, 0.0])  # the range holds zero
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
            return args[0]  # observe the float activations

        hooks.append(q.register_forward_hook(observe))
    p = next(iter(model.parameters()), None)
    device, was, n = (p.device if p is not None else None), model.training, 0
    model.eval()
    try:
        for batch in batches:
            _run_batch(model, batch, device)
            n += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if n == 0:
        raise ValueError("calibrate: batches is empty; give at least one batch of inputs")
    out = {}
    for name, q in targets:
        if name in seen:  # min-max: the range becomes [lo, hi]; LSQ: its grid's ends
            out[name] = q.calibrate_end(*seen[name])
    return out
