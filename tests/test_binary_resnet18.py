"""The binary engine on a torchvision-named ResNet (examples/resnet18_binary.py): strided
binary convolutions, 1x1 downsampling, the 3x3/2 max pool with padding and the float residual
stream, against PyTorch on every CPU path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_binary_engine import _converted, _dyadic, isa  # noqa: F401  (isa: a fixture)
from torch import nn

from fewbits.runtime.binary import BinaryEngine, binary_plan

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resnet18_binary.py"


def _resnet(layers: tuple[int, ...] = (1, 1, 1, 1)) -> nn.Module:
    spec = importlib.util.spec_from_file_location("resnet18_binary", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(3)
    return _converted(mod.ResNet(layers, num_classes=10))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _resnet()


@pytest.mark.parametrize("size", [16, 19])  # 19: odd maps, strided borders on both sides
def test_resnet_equals_pytorch(isa: str, resnet: nn.Module, size: int) -> None:  # noqa: F811
    x = _dyadic(3, (3, size, size), seed=size)  # k/256 x 8-bit weights: exact stem sums
    engine = BinaryEngine.from_model(resnet, input_shape=(3, size, size))
    assert engine.isa == isa
    ops = [(s.op, s.stride, s.float_out) for s in engine.plan]
    assert ops[:2] == [("stem", 2, True), ("poolf", 2, False)] and ops[-1][0] == "headm"
    assert ("bconv", 2, True) in ops  # the 1x1 stride-2 downsampling, kept as a float map
    assert ("bconv", 2, False) in ops  # a strided 3x3 conv straight to bits
    with torch.no_grad():
        ref = resnet(x)
    out = engine(x)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    # batch norm is PyTorch's fma, the sums are exact: only the head's float order differs
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_resnet_random_images_within_tolerance(resnet: nn.Module) -> None:
    """Float images: the stem's float sums are in another order than PyTorch's, so a float
    map value within rounding of 0 may binarize the other way; the logits stay close."""
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = BinaryEngine.from_model(resnet, input_shape=(3, 16, 16), isa="generic")(x)
    with torch.no_grad():
        ref = resnet(x)
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_resnet_buffers_never_overwrite_what_a_step_reads(resnet: nn.Module) -> None:
    plan = binary_plan(resnet, input_shape=(3, 16, 16))
    for s in plan:
        assert s.dst not in (s.src, s.res) or s.dst < 0
        assert s.fdst not in (s.fsrc, s.fres) or s.fdst < 0
    assert max(s.fdst for s in plan) <= 2  # reused: three float maps at most


def test_max_pool_options_refused_or_run() -> None:
    from fewbits.runtime.binary_ops import max_pool_geometry as _max_pool

    class P(nn.Module):
        def __init__(self, **kw: object) -> None:
            super().__init__()
            self.kw = kw

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.max_pool2d(x, **self.kw)

    import torch.fx as fx

    def geo(**kw: object) -> tuple[int, int, int] | None:
        g = fx.symbolic_trace(P(**kw)).graph
        return _max_pool(None, next(n for n in g.nodes if n.op == "call_function"))

    assert geo(kernel_size=3, stride=2, padding=1) == (3, 2, 1)
    assert geo(kernel_size=2) == (2, 2, 0)
    assert _max_pool(nn.MaxPool2d(3, 2, 1), None) == (3, 2, 1)
    for bad in ({"kernel_size": 3, "dilation": 2}, {"kernel_size": 2, "ceil_mode": True},
                {"kernel_size": (2, 3)}):
        with pytest.raises(ValueError, match="not covered.*max pooling"):
            geo(**bad)


def test_folded_files_refuse_float_maps(resnet: nn.Module) -> None:
    from fewbits.runtime.binary_file import _only_thresholds

    with pytest.raises(ValueError, match="float maps.*without fold_bn"):
        _only_thresholds(binary_plan(resnet, input_shape=(3, 16, 16)))


def test_malformed_program_refused_by_the_c_side(resnet: nn.Module) -> None:
    """The C program checks that each step has the buffers and tables its op reads."""
    engine = BinaryEngine.from_model(resnet, input_shape=(3, 16, 16), isa="generic")
    x = _dyadic(1, (3, 16, 16))
    good = engine(x)
    for field, bad in (("src", -5), ("fsrc", -1), ("beta", None)):
        i = next(i for i, s in enumerate(engine.plan)
                 if (s.op, field) in (("bconv", "src"), ("poolf", "fsrc")) or
                 (field == "beta" and s.float_out))
        old = getattr(engine._layers[i], field)
        setattr(engine._layers[i], field, bad)
        with pytest.raises(RuntimeError, match="malformed program"):
            engine(x)
        setattr(engine._layers[i], field, old)
    assert torch.equal(engine(x), good)


def test_refusals_name_value_kinds_in_words() -> None:
    # a refusal said "flatten of a pooledf value" (internal names); every kind the graph
    # reader makes has words
    import re
    from pathlib import Path

    from fewbits.runtime import binary_graph as bg

    src = Path(bg.__file__).read_text()
    made = set(re.findall(r'_V\("(\w+)"', src)) | set(re.findall(r'kind == "(\w+)"', src))
    assert made and made <= set(bg._KIND_WORDS)
    for kind in made:
        said = bg._V(kind, 1, 1, 1).said
        assert "_" not in said and said != kind and "pooledf" not in said
