"""The quantization families as data: which quantizer each layer role gets, and where
activations are quantized.

A family turns a :class:`QuantConfig` (the seed's command-line options) into quantizer specs for
weights, biases and activations, and names a :class:`Recipe`, the order of the operations that
follow each convolution (the seed's placement, ``docs/QUANTIZERS.md``, "The families").
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..config import QuantConfig
from ..quantizers import INQ_SELECTIONS, get

__all__ = ["FAMILIES", "Family", "QuantConfig", "Recipe", "family"]


@dataclass(frozen=True)
class Recipe:
    """Operations after each conv: ``inner`` (unit conv1/conv2 and hidden layers), ``last``
    (unit conv3, before the residual sum), ``merge`` (on ``h + x``), ``stem``.

    Op names: ``bn`` batch norm, ``relu``, ``q`` the family's activation quantizer, ``uq`` the
    family's activation quantizer made unsigned (on ``[0, max]``: it is the ReLU), ``btanh``
    BinaryNet's binary tanh; ``merge`` is one of ``relu``, ``uq``, ``btanh``.
    """

    inner: tuple[str, ...]
    last: tuple[str, ...]
    merge: str
    stem: tuple[str, ...]


STANDARD = Recipe(("bn", "relu"), ("bn",), "relu", ("bn", "relu"))
QUANT_NET = Recipe(("bn", "q", "relu"), ("bn", "q"), "relu", ("bn", "q", "relu"))
BINARY_NET = Recipe(("bn", "btanh"), ("bn",), "btanh", ("bn", "btanh"))
MIN_MAX = Recipe(("relu", "bn", "q"), ("bn", "q"), "relu", ("bn", "q", "relu"))
#: LSQ as Esser et al. 2020 place it: each layer's input quantized unsigned after the ReLU. The
#: unsigned quantizer on [0, Q_P * s] is the ReLU (``uq`` replaces it), so at 2 bits all four
#: levels carry information (signed before the ReLU, as ``fp_net``, the ReLU left two); the
#: residual branch is summed in float and the sum goes through ``uq`` (it feeds the next unit).
LSQ_NET = Recipe(("bn", "uq"), ("bn",), "uq", ("bn", "uq"))


@dataclass(frozen=True)
class Family:
    """A quantization family: spec builders for each role plus the recipe."""

    name: str
    recipe: Recipe = STANDARD
    weight_only: bool = True
    doc: str = ""

    def weight(self, c: QuantConfig) -> dict[str, Any] | None:
        return _WEIGHT[self.name](c)

    def bias(self, c: QuantConfig) -> dict[str, Any] | None:
        return _BIAS.get(self.name, lambda c: None)(c)

    def act(self, c: QuantConfig) -> dict[str, Any] | None:
        return _ACT.get(self.name, lambda c: None)(c)

    def activation(self, c: QuantConfig) -> dict[str, Any] | None:
        """The activation quantizer the network applies: :meth:`act`, or BinaryNet's binary
        tanh, which lives in the recipe (``None`` for weight-only families)."""
        r = self.recipe
        if "btanh" in (*r.inner, *r.last, *r.stem, r.merge):
            return {"name": "binary_tanh"}
        return self.act(c)

    def specs(self, c: QuantConfig) -> dict[str, dict[str, Any] | None]:
        """The quantizer spec of each role (``weight``, ``bias``, ``input``) under ``c``."""
        return {"weight": self.weight(c), "bias": self.bias(c), "input": self.activation(c)}

    def ignored(self, c: QuantConfig, names: Any) -> list[str]:
        """Those of the options ``names`` that change none of the family's quantizers
        (``bit_width`` on ``binary_connect``): neither its default nor another valid value
        (:func:`_other`) gives specs that differ from those of ``c``. Callers refuse them
        rather than ignore a user's setting in silence."""
        base = self.specs(c)
        out = []
        for name in names:
            alts = []
            for v in (_DEFAULTS[name], _other(name, c)):
                try:
                    alts.append(replace(c, **{name: v}))
                except ValueError:  # invalid with the other options (ql_min 6 under ql_max 6)
                    pass
            # no valid other value (a_min_max under a_ema): counted as used
            if alts and all(self.specs(alt) == base for alt in alts):
                out.append(name)
        return out

    def bits(self, c: QuantConfig) -> tuple[int | str, int | str]:
        """(weight bits, activation bits) for reports; ``32`` = float."""

        w = get(self.weight(c))
        a = get(self.activation(c))
        return (w.bits if w else 32), (a.bits if a else 32)


#: Options whose unset value (None) follows ``stochastic`` (:func:`_bc`).
_FOLLOWS_STOCHASTIC = ("clip_weights", "uniform_init", "glorot_lr_scale")
_DEFAULTS = {f.name: getattr(QuantConfig(), f.name) for f in fields(QuantConfig)}


def _other(name: str, c: QuantConfig) -> Any:
    """A valid value of option ``name`` other than the one ``c`` holds (a probe for
    :meth:`Family.ignored`)."""
    v = getattr(c, name)
    if isinstance(_DEFAULTS[name], bool) or name in _FOLLOWS_STOCHASTIC:
        return not v  # None (follow --stochastic) -> True
    if name == "inq_selection":
        return next(s for s in INQ_SELECTIONS if s != v)
    if name == "delta":
        return (v or 2**-4) * 2
    if isinstance(_DEFAULTS[name], tuple):
        return (1,) if tuple(v) != (1,) else (2,)
    return 5 if v != 5 else 6  # bit_width, upper_bound, ql_min, ql_max


def _bw(c: QuantConfig, default: int = 8) -> int:
    return int(c.bit_width) if c.bit_width is not None else default


def _fp(c: QuantConfig) -> dict[str, Any]:
    return {"name": "fixed_point", "sign": True, "n": _bw(c), "delta": c.delta,
            "ste_fine_grained": c.ste_fine_grained}


def _pow2(c: QuantConfig, with_zero: bool) -> dict[str, Any]:
    return {"name": "pow2", "sign": True, "with_zero": with_zero, "n": _bw(c),
            "m": c.upper_bound, "ste_fine_grained": c.ste_fine_grained}


def _mm(c: QuantConfig, weight: bool) -> dict[str, Any]:
    if weight:
        mode, lo, hi = ("batch" if c.p_min_max else "learnable"), -2.0, 2.0
    else:
        mode = "learnable" if not c.a_min_max else ("ema" if c.a_ema else "batch")
        lo, hi = -6.0, 6.0
    return {"name": "min_max", "ql_min": c.ql_min, "ql_max": c.ql_max, "init_min": lo,
            "init_max": hi, "mode": mode, "ste_fine_grained": c.ste_fine_grained}


def _bc(c: QuantConfig) -> dict[str, Any]:
    # stochastic and the paper's latent-weight training only when asked: the deterministic
    # spec stays the seed's, key for key. Unset (None), the paper's options follow stochastic.
    def on(v: bool | None) -> bool:
        return c.stochastic if v is None else v

    return {"name": "binary_connect", "clip_weights": on(c.clip_weights),
            **({"stochastic": True} if c.stochastic else {}),
            **{k: True for k in _FOLLOWS_STOCHASTIC[1:] if on(getattr(c, k))}}


def _lsq(c: QuantConfig) -> dict[str, Any]:
    return {"name": "lsq", "bits": _bw(c, 4), "signed": True}  # weights: signed


def _lsq_act(c: QuantConfig) -> dict[str, Any]:
    # no "signed": quantize_ makes it unsigned where the layer reads a ReLU's output (the
    # paper's placement) and signed elsewhere (LSQ's default); the zoo nets (LSQ_NET) use it
    # unsigned after batch norm, in place of the ReLU ("uq")
    return {"name": "lsq", "bits": _bw(c, 4)}


_WEIGHT = {
    "float": lambda c: None,
    "binary_connect": lambda c: _bc(c),
    "binary_net": lambda c: _bc(c),
    "binary_weight": lambda c: {"name": "binary_weight"},
    "fp_connect": _fp,
    "fp_net": _fp,
    "pow2_connect": lambda c: _pow2(c, with_zero=False),
    "pow2_net": lambda c: _pow2(c, with_zero=False),
    "inq": lambda c: {"name": "inq", "num_bits": _bw(c, 4), "inq_iterations":
                      list(c.inq_iterations), "selection": c.inq_selection},
    "min_max": lambda c: _mm(c, weight=True),
    "ternary": lambda c: {"name": "ternary", "mode": "twn", "per_channel": True},
    "lsq": lambda c: _lsq(c),
}
# Biases of the final affine: quantized where the seed's layer quantizes them.
_BIAS = {
    "fp_connect": _fp, "fp_net": _fp,
    "pow2_connect": lambda c: _pow2(c, with_zero=False),
    "pow2_net": lambda c: _pow2(c, with_zero=False),
    "min_max": lambda c: _mm(c, weight=True),
}
_ACT = {
    "fp_net": _fp,
    "pow2_net": lambda c: _pow2(c, with_zero=True),
    "min_max": lambda c: _mm(c, weight=False),
    "lsq": _lsq_act,
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("float", doc="float32 reference"),
        Family("binary_connect", doc="1-bit weights sign(W) (Courbariaux et al. 2015)"),
        Family("binary_net", BINARY_NET, False, "1-bit weights and activations"),
        Family("binary_weight", doc="1-bit weights with per-channel scale (XNOR-Net BWN)"),
        Family("fp_connect", doc="n-bit fixed-point weights"),
        Family("fp_net", QUANT_NET, False, "n-bit fixed-point weights and activations"),
        Family("pow2_connect", doc="n-bit power-of-two weights"),
        Family("pow2_net", QUANT_NET, False, "n-bit power-of-two weights and activations"),
        Family("inq", doc="incremental network quantization to powers of two (Zhou et al.)"),
        Family("min_max", MIN_MAX, False, "min-max (zero-point) 8-bit weights and activations"),
        Family("ternary", doc="ternary weights {-a, 0, +a} per output channel (TWN, Li & Liu "
               "2016)"),
        Family("lsq", LSQ_NET, False, "n-bit signed weights and unsigned post-ReLU activations "
               "with learned steps (LSQ, Esser et al. 2020; default 4 bits)"),
    ]
}


def family(name: str) -> Family:
    """Look up a family; unknown names raise ``ValueError`` listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
