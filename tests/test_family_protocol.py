"""A quantizer family added from this file alone: one class and one registry call, no edit of
any fewbits module (docs/ARCHITECTURE.md, "Adding a family"). It goes through quantize_ and
training, the packed file, ONNX export run in ONNX Runtime, and compile_for_cpu.

The toy family: ``round(x / step) * step`` clamped to ``k`` in ``[-7, 7]`` (4-bit codes,
PyTorch's round, half to even), identity straight-through gradient, its own custom operator
(``torch.ops.fewbits_toy.steps``) with an ONNX translation the family declares.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import fewbits
from fewbits.export import export_packed, load_packed
from fewbits.export.fold import int8_weight
from fewbits.export.onnx import compare_onnx, to_onnx
from fewbits.ops import straight_through_op
from fewbits.ops.onnx_form import const
from fewbits.quantizers import Codes, Quantizer, get, register_quantizer, unregister_quantizer
from fewbits.runtime.planner import compile_for_cpu

pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(x: Tensor, step: float) -> Tensor:
    """``clamp(round(x / step), -7, 7) * step``."""
    return torch.clamp(torch.round(x / step), -7, 7) * step


def _steps_graph(op: Any, x: Any, step: float) -> Any:
    """The ONNX form, written once over an op namespace (both exporters use it)."""
    k = op.Clip(op.Round(op.Div(x, const(op, step))), const(op, -7.0), const(op, 7.0))
    return op.Mul(k, const(op, step))


def _steps_onnx(x: Any, step: float) -> Any:
    """ONNX Script translation of the operator, for PyTorch's exporter."""
    from onnxscript import opset18

    return _steps_graph(opset18, x, step)


class ToySteps(Quantizer):
    """The whole family: formula and operator (``op``), state, codes, ONNX translation."""

    op = staticmethod(straight_through_op("fewbits_toy::steps", _steps))
    bits = 4
    weight_form = "toy steps as float constants"

    def __init__(self, step: float = 2**-6) -> None:
        super().__init__()
        self.step = float(step)

    def _kwargs(self) -> dict[str, Any]:
        return {"step": self.step}

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x, self.step)

    def encode(self, x: Tensor) -> Codes:
        k = torch.clamp(torch.round(x.detach().float() / self.step), -7, 7)
        return Codes(k.to(torch.int64).reshape(-1) + 7, self.bits, tuple(x.shape))

    def decode(self, codes: Codes) -> Tensor:
        return (codes.codes - 7).float().reshape(codes.shape) * self.step

    @classmethod
    def onnx_translations(cls) -> dict[Any, Any]:
        return {torch.ops.fewbits_toy.steps.default: _steps_onnx}

    def onnx_act(self, op: Any, x: Any) -> tuple[Any, str]:
        return _steps_graph(op, x, self.step), "toy steps"


@pytest.fixture(scope="module")
def toy():
    register_quantizer("toy_steps")(ToySteps)  # the one registry call
    yield "toy_steps"
    unregister_quantizer("toy_steps")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def test_a_family_from_a_test_file_trains_packs_exports_and_deploys(toy, tmp_path):
    m = fewbits.quantize_(_net(), {"weight": toy, "input": toy})
    assert isinstance(m[0].weight_quantizer, ToySteps)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w0 = m[3].weight.detach().clone()
    for _ in range(3):  # the straight-through gradient reaches the latent weights
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    assert not torch.equal(m[3].weight, w0)
    m.eval()
    with torch.no_grad():
        ref = m(x)
        w = m[3].quantized_weight()
    assert torch.equal(w, _steps(m[3].weight, 2**-6))  # the formula the operator runs

    export_packed(m, tmp_path / "toy.fewbits")  # the codes of the family, by its name
    back = load_packed(tmp_path / "toy.fewbits", model=_net())
    with torch.no_grad():
        assert torch.equal(back(x), ref)

    proto, report = to_onnx(m, x)  # the family's own translation of its operator
    assert report.activations and all(k.startswith("steps ") for k in report.activations)
    assert report.weights["3.weight"] == "ToySteps levels as float constants"
    r = compare_onnx(m, proto, x)
    assert r["max_abs"] <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert r["top1_agreement"] == 1.0

    fast = compile_for_cpu(m, backend="ort", input_shape=(1, 6, 6))  # the fused QDQ form
    assert fast.backend == "ort" and torch.allclose(fast(x), ref, atol=1e-5)

    # batch-norm folding asks the family: codes on a grid fold to exact int8 weights
    iw = int8_weight(m[3].weight_quantizer, w)
    assert iw is not None and torch.equal(iw.value().float(), w)


def test_a_family_is_found_by_name_and_refused_once_removed(toy):
    q = get({"name": toy, "step": 0.5})
    assert q.config() == {"name": toy, "step": 0.5} and q.step_levels() is None
    with pytest.raises(ValueError, match="already registered"):
        register_quantizer(toy)(ToySteps)
    with pytest.raises(KeyError, match="no quantizer 'nope'"):
        unregister_quantizer("nope")
    with pytest.raises(ValueError, match="has no fused ONNX form"):  # the protocol's default
        Quantizer.onnx_act(q, None, None)


def test_the_nine_families_answer_the_protocol_as_their_classes_did():
    """What the isinstance chains of export decided, now answered by each family."""
    from fewbits.quantizers import (
        INQ,
        BinaryConnect,
        BinarySigmoid,
        BinaryTanh,
        BinaryWeight,
        FixedPoint,
        MinMax,
        Pow2,
    )

    uniform = {c for c in (INQ, BinaryConnect, BinarySigmoid, BinaryTanh, BinaryWeight,
                           FixedPoint, MinMax, Pow2) if c.uniform}
    assert uniform == {FixedPoint, MinMax}
    assert BinaryTanh().step_levels() == (-1.0, 1.0)
    assert BinarySigmoid().step_levels() == (0.0, 1.0)
    assert FixedPoint().step_levels() is None and Pow2().int_grid() is None
    assert {BinaryConnect.weight_form, BinaryWeight.weight_form} == {"binarized float constant"}
    assert {Pow2.weight_form, INQ.weight_form} == {"power-of-two float constant"}
    w = torch.tensor([[0.5, -0.25, 0.0], [1.0, 1.0, -3.0]])
    k, s = Pow2().integer_weight(w)  # the default: exact multiples of the smallest magnitude
    assert k.tolist() == [[2, -1, 0], [1, 1, -3]] and s.tolist() == [0.25, 1.0]
    assert Pow2().integer_weight(torch.tensor([[1.0, 1.5, 0.7]])) is None
    k, s = FixedPoint(n=4, delta=0.5).integer_weight(torch.tensor([[0.5, -1.0], [0.0, 3.0]]))
    assert k.tolist() == [[1, -2], [0, 6]] and s.tolist() == [0.5, 0.5]
    assert FixedPoint(n=4, delta=0.5).integer_weight(w) is None  # 0.25 is off its grid


class ToyRanged(ToySteps):
    """ToySteps whose step calibration sets, with a schedule and statistics to share: what
    calibrate, the training checks and DDP ask a family, answered without fewbits edits."""

    calibrates = True

    def calibrate_start(self, x: Tensor) -> None:
        self.first = x.detach().clone()

    def calibrate_end(self, lo: float, hi: float) -> tuple[float, float]:
        self.step = max(-lo, hi) / 7
        return -7 * self.step, 7 * self.step

    def schedule(self) -> tuple[int, ...]:
        return (5, 50)

    def sync_statistics(self, gather: Any) -> None:
        self.gather = gather


def test_calibration_schedules_and_ddp_statistics_ask_the_family():
    from fewbits import distributed
    from fewbits.config import ConfigError
    from fewbits.layers import QuantLinear
    from fewbits.train.model import check_inq

    m = QuantLinear(3, 2, input_quantizer=ToyRanged())
    q = m.input_quantizer
    out = fewbits.calibrate(m, [torch.tensor([[-1.0, 0.5, 3.5]]), torch.tensor([[0.0, -7.0, 1]])])
    assert out == {"input_quantizer": (-7.0, 7.0)} and q.step == 1.0  # the family set it
    assert torch.equal(q.first, torch.tensor([[-1.0, 0.5, 3.5]]))  # the first batch only
    with pytest.raises(ConfigError, match=r"ToyRanged schedule \[5, 50\] starts after"):
        check_inq(m, 3)
    with pytest.warns(UserWarning, match="ToyRanged schedule .* ends after the run's 10"):
        check_inq(m, 10)
    distributed.sync_quantizers(m, distributed.DistInfo(rank=0, world_size=2))
    assert q.gather.func is distributed.gather_in_rank_order  # told how to exchange
    plain = QuantLinear(3, 2, input_quantizer=ToySteps())
    assert fewbits.calibrate(plain, [torch.ones(1, 3)]) == {}  # a family that does not calibrate
    with pytest.raises(ValueError, match="has no grid that calibration sets"):
        plain.input_quantizer.calibrate_end(0.0, 1.0)


def _family_classes(cls: type = Quantizer) -> set[str]:
    out = set()
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("fewbits.quantizers"):
            out.add(sub.__name__)
        out |= _family_classes(sub)
    return out


def test_no_module_outside_quantizers_asks_a_family_by_isinstance():
    """Export, folding, calibration, DDP and training ask the family (a protocol method or
    attribute), never ``isinstance(q, MinMax)``: a new family would be missed there."""
    import ast
    import re
    from pathlib import Path

    names = _family_classes()
    assert {"MinMax", "INQ", "LSQ", "BinaryTanh"} <= names  # the walk sees the families
    pkg = Path(fewbits.__file__).parent
    maybe = re.compile(r"isinstance\([^)]*\b(" + "|".join(sorted(names)) + r")\b")
    found = []
    for path in sorted(pkg.rglob("*.py")):
        text = path.read_text()
        if "quantizers" in path.relative_to(pkg).parts or not maybe.search(text):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance" \
                    and len(node.args) == 2:
                asked = {getattr(n, "id", getattr(n, "attr", "")) for n in ast.walk(node.args[1])}
                if asked & names:
                    found.append(f"{path.relative_to(pkg)}:{node.lineno}")
    assert not found, f"isinstance on a family's class outside quantizers: {found}"
