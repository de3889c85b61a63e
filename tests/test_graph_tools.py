"""PyTorch's graph tools on every family's quantizers: exact, or a clear error, never wrong.

The matrix: the nine families x {weight quantizer, activation quantizer} x {eager,
``torch.compile(fullgraph=True)``, ``torch.export.export``, ``torch.jit.trace``,
``torch.onnx.export`` with ``dynamo=True`` and ``dynamo=False``}. Each cell states its outcome
(:data:`EXPECTED`) and the test checks WHICH one happens: ``"equal"`` = the tool's result equals
eager to the bit, on the capture input and on a second input (so nothing was baked in as a
constant), and for ``torch.compile`` the gradients too; ``"raise"`` = the tool refuses with an
error naming fewbits' own exporter. A silent wrong result fails either way.

ONNX: the quantizers are custom operators (:mod:`fewbits.ops`). The dynamo exporter, once
``fewbits.export.onnx.onnx_translations()`` registered their exact ONNX functions
(each family's, gathered by ``family_translations``), exports every cell, equal to eager
bit for bit (ties included); the TorchScript exporter has no translation and refuses, naming
``fewbits.export.onnx``. INQ weights are plain ``where(mask, fixed, w)`` after training fixed
them, which ONNX holds exactly: those cells export with both and must match.

A weight cell probes ``x * quantized_weight`` (an exact product in every runtime), an activation
cell the quantizer's output itself, so that no convolution rounding hides or fakes a difference.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from fewbits import functional as fq
from fewbits.layers import QuantAct, QuantLinear
from fewbits.models import FAMILIES, QuantConfig

TOOLS = ["compile", "export", "jit_trace", "onnx_dynamo", "onnx_legacy"]
FAMS = sorted(set(FAMILIES) - {"float"})
_CFG = QuantConfig(inq_iterations=(0, 1))


def _act_spec(fam: str):
    """The family's activation quantizer; weight-only families: their weight quantizer on
    activations where it is defined for any tensor (INQ and binary_weight need a weight)."""
    f = FAMILIES[fam]
    if f.act(_CFG) is not None:
        return f.act(_CFG)
    if fam == "binary_net":
        return "binary_tanh"
    w = f.weight(_CFG)
    return None if w["name"] in ("inq", "binary_weight") else w


class WeightProbe(nn.Module):
    def __init__(self, spec) -> None:
        super().__init__()
        self.layer = QuantLinear(8, 4, bias=False, weight_quantizer=spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.layer.quantized_weight()


def _model(fam: str, role: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if role == "weight":
        m = WeightProbe(FAMILIES[fam].weight(_CFG))
        if fam == "inq":  # two training forwards: every weight fixed to its power of two
            m.train()
            m(torch.ones(4, 8))
            m(torch.ones(4, 8))
        xs = (torch.randn(4, 8), torch.randn(4, 8))
    else:
        m = QuantAct(_act_spec(fam))
        xs = tuple(torch.randn(2, 3, 4, 4) * s for s in (2.0, 0.5))
        xs[0].view(-1)[:6] = torch.tensor([0.0, -0.0, 0.03125, -0.09375, 1.0, -1.0])  # ties
    return m.eval(), xs[0], xs[1]


CELLS = [(f, r) for f in FAMS for r in ("weight", "act") if r == "weight" or _act_spec(f)]
#: outcome per (family, role, tool): "equal" or "raise" (see the module doc).
EXPECTED = {(f, r, t): ("raise" if t == "onnx_legacy" else "equal") for f, r in CELLS
            for t in TOOLS}
EXPECTED[("inq", "weight", "onnx_legacy")] = "equal"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return (t.detach() + 0.0).contiguous().view(torch.int32)  # -0 folded onto +0


def _assert_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and torch.equal(_bits(got), _bits(want)), (
        f"{what}: differs from eager (max |diff| {(got - want).abs().max().item()})")


def _onnx(m: nn.Module, x: torch.Tensor, dynamo: bool):
    import onnxruntime as ort

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            from fewbits.export.onnx import cached_exporter_registry, onnx_translations

            onnx_translations()  # registers fewbits' exact translations with the exporter
            with cached_exporter_registry():  # the exporter's registry built once, not per cell
                prog = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
            prog.save(f)
        else:
            torch.onnx.export(m, (x,), f, dynamo=False)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda t: torch.from_numpy(np.asarray(sess.run(None, {name: t.numpy()})[0]))


def _capture(tool: str, m: nn.Module, x: torch.Tensor):
    if tool == "compile":
        # each cell is a new model of the same layer classes: without a reset, dynamo's
        # recompile limit for QuantConv2d.forward is reached after a few cells
        torch._dynamo.reset()
        return torch.compile(m, fullgraph=True)
    if tool == "export":
        return torch.export.export(m, (x,)).module()
    if tool == "jit_trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.trace(m, (x,))
    return _onnx(m, x, dynamo=tool == "onnx_dynamo")


def _grads(m: nn.Module, fwd, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    for p in m.parameters():
        p.grad = None
    fwd(x).square().sum().backward()
    return [x.grad] + [p.grad for p in m.parameters() if p.grad is not None]


@pytest.mark.parametrize("fam,role", CELLS, ids=[f"{f}-{r}" for f, r in CELLS])
def test_graph_tool_matrix(fam, role):
    m, x, x2 = _model(fam, role)
    eager = [m(x).detach(), m(x2).detach()]
    outcome = {}
    for tool in TOOLS:
        try:
            run = _capture(tool, m, x)
            got = [run(x), run(x2)]
        except Exception as e:  # which outcome is the point of the test
            chain, err = [], e
            while err is not None:
                chain.append(str(err))
                err = err.__cause__ or err.__context__
            assert "fewbits.export.onnx" in " ".join(chain), (
                f"{fam}/{role}/{tool}: raised without naming the fix: {e!r}"[:2000])
            outcome[tool] = "raise"
            continue
        for g, w in zip(got, eager, strict=True):
            _assert_equal(g, w, f"{fam}/{role}/{tool}")
        if tool == "compile":  # the registered autograd formulas, compiled
            for g, w in zip(_grads(m, run, x), _grads(m, m, x), strict=True):
                _assert_equal(g, w, f"{fam}/{role}/compile gradient")
        outcome[tool] = "equal"
    assert outcome == {t: EXPECTED[(fam, role, t)] for t in TOOLS}


def test_jit_trace_of_the_issue_example_is_exact():
    """Issue 14's example: the trace used to replay an uninitialised buffer (1e14 errors)."""
    from fewbits.layers import QuantConv2d

    c = QuantConv2d(3, 4, 3, bias=False,
                    weight_quantizer={"name": "fixed_point", "n": 4, "delta": 2**-5}).eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = torch.jit.trace(c, x)
    assert "fewbits::fixed_point" in str(tr.inlined_graph)
    assert torch.equal(tr(x), c(x))


def test_compiled_graph_keeps_the_nan_check_without_graph_breaks():
    """No .item() in the graph (fullgraph=True compiles), yet NaN input still raises."""
    q = torch.compile(lambda t: fq.fixed_point_quantize(t, n=4, delta=0.25), fullgraph=True)
    assert torch.equal(q(torch.tensor([0.3, 9.0])), torch.tensor([0.25, 1.75]))
    with pytest.raises(ValueError, match="fixed_point_quantize: x contains NaN"):
        q(torch.tensor([0.3, float("nan")]))
    with fq.finite_checks(False):  # the mode is part of the graph: recompiled, no check
        assert q(torch.tensor([0.3, float("nan")])).isnan().any()


def test_checks_outside_the_operators_hold_in_compiled_graphs():
    """Quantizer state (INQ weights, min-max batch statistics) is checked in graphs too: a
    device-side assertion (RuntimeError), no .item() graph break."""
    from fewbits.quantizers import MinMax

    m = QuantLinear(4, 2, weight_quantizer={"name": "inq", "inq_iterations": [5]}).eval()
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="INQ: w contains NaN or inf"):
        torch.compile(m, fullgraph=True)(torch.ones(1, 4))
    q = MinMax(mode="batch", ql_max=15).train()
    ref = MinMax(mode="batch", ql_max=15).train()
    x = torch.randn(3, 5)
    assert torch.equal(torch.compile(q, fullgraph=True)(x), ref(x))
    assert torch.equal(q.qr_min, ref.qr_min) and torch.equal(q.qr_max, ref.qr_max)
    with pytest.raises(RuntimeError, match="MinMax: x contains NaN or inf"):
        torch.compile(q, fullgraph=True)(torch.tensor([1.0, float("inf")]))


_NO_GRAD_CAPTURE_SPECS = [
    {"name": "fixed_point", "sign": True, "n": 4, "delta": 0.25},
    {"name": "pow2", "sign": True, "with_zero": True, "n": 4},
    "binary_tanh",
    {"name": "min_max", "ql_max": 15, "init_min": -1.0, "init_max": 1.0, "mode": "ema"},
]


@pytest.mark.parametrize("tool", ["export", "jit_trace"])
@pytest.mark.parametrize("spec", _NO_GRAD_CAPTURE_SPECS, ids=lambda s: str(s)[:20])
def test_graph_captured_from_an_input_without_grad_keeps_the_gradient(spec, tool):
    """A graph captured from an input that does not require grad (an inference input, or a
    capture under torch.no_grad) and then trained through must give eager's gradient: the
    gradient mask is not left out of the graph (it was: dx = dy everywhere, silently)."""
    q = QuantAct(spec).eval()
    x = torch.randn(64) * 3
    g = _capture(tool, q, x)
    want = x.clone().requires_grad_(True)
    q(want).sum().backward()
    got = x.clone().requires_grad_(True)
    g(got).sum().backward()
    _assert_equal(got.grad, want.grad, f"{spec}/{tool} gradient")


def test_inq_training_compiles_fullgraph_like_eager():
    """INQ's schedule fixes weights in training: its level computation no longer reads max|w|
    on the host inside a compiled graph (it raised "Could not guard on data-dependent
    expression" under fullgraph=True); five steps equal eager, bit for bit."""
    torch._dynamo.reset()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    outs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = QuantLinear(16, 4, weight_quantizer={"name": "inq", "num_bits": 4,
                                                  "inq_iterations": [0, 2, 4]}).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        f = torch.compile(m, fullgraph=True) if compiled else m
        rec = []
        for _ in range(5):
            opt.zero_grad()
            y = f(x)
            y.square().sum().backward()
            opt.step()
            rec += [y.detach().clone(), m.weight.detach().clone()]
        outs.append(rec)
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
