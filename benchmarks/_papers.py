"""The papers' own MNIST MLPs beside fewbits' results: published test errors and what differs.

Used by ``benchmarks/accuracy.py``: a section whose nets all end in ``_mlp_bc`` (or
``_mlp_bnn``) gets a "paper %" column and the notes of :func:`paper_notes`.

    >>> paper_kind(["mnist_float_mlp_bc", "mnist_inq_mlp_bc"])
    'mnist_mlp_bc'
    >>> paper_kind(["mnist_float_lenet"]) is None
    True
"""

from __future__ import annotations

from typing import Any

__all__ = ["FIRST", "PAPERS", "paper_kind", "paper_notes", "paper_options", "paper_row"]

# The papers' own MNIST MLPs: each family's published test error (%) where one exists, with
# its source; the section's kind comes from the nets' registry suffix (`_mlp_bc`, `_mlp_bnn`).
_BC = "BinaryConnect (Courbariaux, Bengio, David 2015), Table 2"
_BNN = "BinaryNet (Courbariaux, Hubara et al. 2016), Table 1"
PAPERS: dict[str, dict[str, Any]] = {
    "mnist_mlp_bc": {
        "net": "BinaryConnect's permutation-invariant MLP: 3 hidden layers of 1024 units, each "
               "fc -> batch norm -> ReLU (binary tanh in binary_net), output fc -> batch norm",
        "epochs": "the authors' script (BinaryConnect mnist.py) trains 250 epochs",
        "rows": {
            "float": ("1.30 ± 0.04", 1.30, f"{_BC}, no regularizer"),
            "binary_connect": ("1.29 ± 0.08 (det.), 1.18 ± 0.04 (stoch.)", 1.29, _BC),
            # BinaryNet's number is for its own, wider net: shown, no gap taken.
            "binary_net": ("0.96 / 1.40 (3 x 4096 net)", None,
                           f"{_BNN}, 0.96 % Theano / 1.40 % Torch7 on its own 3 x 4096 MLP "
                           "with dropout"),
        },
    },
    "mnist_mlp_bnn": {
        "net": "BinaryNet's MLP (Theano version): 3 hidden layers of 4096 units, dropout 0.2 "
               "on the input and 0.5 after each hidden layer, output fc -> batch norm",
        "epochs": "the authors' script (BinaryNet Train-time/mnist.py) trains 1000 epochs",
        "rows": {
            "binary_net": ("0.96 (Theano) / 1.40 (Torch7)", 0.96, _BNN),
        },
    },
}
#: Sections shown first in RESULTS.md, in this order (results at a real budget lead).
FIRST = ("mnist_mlp_bc", "mnist_mlp_bnn", "cifar10_gpu")


def paper_row(kind: str, family: str, label: str) -> tuple[str, float | None, str | None]:
    """``(shown text, number the gap is taken to, source)`` of a result row; a binary connect
    row trained with ``stochastic=true`` (its label says so) is held to the stochastic number."""
    if kind == "mnist_mlp_bc" and family == "binary_connect" and "stochastic" in label:
        return "1.18 ± 0.04 (stoch.)", 1.18, _BC
    return PAPERS[kind]["rows"].get(family, ("—", None, None))


def paper_options(c: dict[str, Any]) -> tuple[bool, ...]:
    """A run's binary connect options that change how it trains, as the run used them:
    ``stochastic`` and the paper's latent-weight options, which follow it when unset (None);
    an option absent from ``c`` (a run saved before it existed) was off.

        >>> paper_options({"stochastic": True, "clip_weights": None, "uniform_init": False})
        (True, True, False, False)
    """
    st = bool(c.get("stochastic"))
    return st, *(k in c and (st if c[k] is None else bool(c[k]))
                 for k in ("clip_weights", "uniform_init", "glorot_lr_scale"))


def paper_kind(nets: list[str]) -> str | None:
    for kind in PAPERS:
        suffix = kind.removeprefix("mnist")
        if nets and all(n.startswith("mnist_") and n.endswith(suffix) for n in nets):
            return kind
    return None


def paper_notes(s: dict[str, Any], summary: list[dict[str, Any]]) -> list[str]:
    """What the reader must know to compare a paper section with the papers: the network,
    the budget against the papers', the differences of method, and the headline check."""
    info = PAPERS[s["kind"]]
    rows = {r["family"]: r for r in summary if not r["extra"]}
    epochs = s.get("epochs")
    out = [f"Network: {info['net']}. Budget: {epochs:g} epoch(s) per network, where "
           f"{info['epochs']}; every number here is therefore a short-budget result, not a "
           "reproduction of the paper's." if epochs else f"Network: {info['net']}.",
           "Method differences from the papers: softmax cross-entropy instead of their square "
           "hinge (L2-SVM) loss; Adam with the learning-rate schedule above instead of their "
           "exponentially decaying rate; their latent-weight training (weights uniform in "
           "[-1, 1], clipped to [-1, 1], each layer's updates scaled by 1/H with H its Glorot "
           "bound over 2) only in the rows trained with stochastic=true, where fewbits turns "
           "it on (the deterministic rows keep PyTorch's initialisation and the seed's "
           "unclipped, unscaled updates); training "
           "on all 60000 images and reporting the final model's error on the 10000 test "
           "images (the papers keep 10000 for validation and report the test error at the "
           "best validation epoch); one seed. Paper numbers: "
           + "; ".join(f"{f.replace('_', ' ')}: {src}" for f, (_, _, src)
                       in info["rows"].items()) + "."]
    bc = rows.get("binary_connect")
    if s["kind"] == "mnist_mlp_bc" and bc is not None:
        said = []
        extras = [r for r in summary if r["extra"] and r["family"] == "binary_connect"]
        for r in [bc, *extras]:
            _, value, _ = paper_row(s["kind"], "binary_connect", "" if r is bc else r["label"])
            gap = 100 * r["error"] - value
            said.append(f"{'binary connect (deterministic)' if r is bc else r['label']} "
                        f"reaches {100 * r['error']:.2f} %, {gap:+.2f} points from the paper's "
                        f"{value:.2f} %: {'within' if abs(gap) <= 0.3 else 'not within'} 0.3 "
                        "points")
        text = "; ".join(said)
        if any("stochastic" in r["label"] for r in extras):
            text += (". The stochastic row is evaluated with sign(w), the 1-bit network, "
                     "after batch norm's statistics are re-estimated under it (--bn-recalibrate, "
                     "on with stochastic=true); the paper's 1.18 % is measured with the "
                     "real-valued weights at test time (the authors' binary_connect.py "
                     "computes the test forward with W when stochastic)")
        else:
            text += (". The stochastic variant (1.18 %) is not in this run (add --extra "
                     "'binary connect (stochastic)=mnist_binary_connect_mlp_bc:stochastic=true')")
        out.append(text[0].upper() + text[1:] + ".")
    return out
