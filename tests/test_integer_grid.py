"""Images of 8-bit pixels (``uint8 / 255``): the integer engine's first layer on their codes
(fewbits.runtime.integer_grid), taken per image where every value is on the grid and the float
layer elsewhere, on every CPU path this machine runs; checked against a NumPy oracle of the
grid and against PyTorch."""

from __future__ import annotations

import numpy as np
import oracle as O
import pytest
import torch
from torch import nn

import fewbits
from fewbits.layers import QuantAct, QuantConv2d, QuantLinear
from fewbits.models import create_model
from fewbits.quantizers import FixedPoint, MinMax
from fewbits.runtime.integer import IntegerEngine, supported_int_isas
from fewbits.runtime.integer_walk import compile_program
from fewbits.runtime.planner import QUANTIZED_RTOL

ISAS_HERE = supported_int_isas()
SHAPE = (3, 8, 8)


def _pixels(seed: int, n: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8).float() / 255


def _engines(model: nn.Module, isa: str) -> tuple[IntegerEngine, IntegerEngine]:
    """(an engine whose first layer on the codes is wrong on purpose, the float-only engine):
    their outputs differ exactly where the codes' layer runs."""
    bad = compile_program(model, SHAPE)
    assert bad.grid is not None
    bad.grid.sacc = bad.grid.sacc * 2  # every sum of the codes' layer doubled
    ref = compile_program(model, SHAPE)
    ref.grid = None
    return IntegerEngine(bad, isa), IntegerEngine(ref, isa)


def _fp_resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("cifar10_fp_net_resnet23_prediction").eval()


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_each_image_takes_the_codes_layer_exactly_where_the_oracle_says(isa: str) -> None:
    bad, ref = _engines(_fp_resnet(), isa)
    rows, want = O.uint8_grid_edge_rows(_pixels(1), 37)
    assert any(want) and not all(want)
    x = torch.from_numpy(np.concatenate(rows))
    got, clean = bad(x), ref(x)  # one call: the engine decides image by image
    for i, on in enumerate(want):
        assert torch.equal(got[i], clean[i]) != on, (O.UINT8_GRID_EDGES[i], on)
        assert torch.equal(bad(torch.from_numpy(rows[i]))[0], got[i])  # alone as in the batch


class _ConcatNet(nn.Module):
    """A concatenation (run in NumPy between native runs): the engine runs the whole batch
    step by step, and takes the codes' layer where every image of the batch is on the grid."""

    def __init__(self) -> None:
        super().__init__()
        fp = lambda: FixedPoint(n=8, delta=2**-6)  # noqa: E731
        self.c1 = QuantConv2d(3, 8, 3, padding=1, bias=False, weight_quantizer=fp())
        self.b1, self.q1 = nn.BatchNorm2d(8), QuantAct(MinMax())
        self.c2 = QuantConv2d(16, 8, 3, padding=1, weight_quantizer=fp())
        self.q2 = QuantAct(MinMax())
        self.fc = QuantLinear(8, 4, weight_quantizer=fp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q1(self.b1(self.c1(x)))
        h = self.q2(self.c2(torch.cat([h, h], 1)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.mark.parametrize("isa", ISAS_HERE)
def test_a_batch_run_step_by_step_takes_the_codes_layer_only_when_all_images_are_on_it(
        isa: str) -> None:
    torch.manual_seed(3)
    bad, ref = _engines(_ConcatNet().eval(), isa)
    x = _pixels(2, 3)
    assert not torch.equal(bad(x), ref(x))
    x[2, 0, 0, 0] = float(np.nextafter(x[2, 0, 0, 0].numpy(), np.float32(2)))
    assert torch.equal(bad(x), ref(x))


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("family", ["fp_net", "min_max"])
def test_codes_layer_agrees_with_pytorch_and_the_float_layer(family: str, isa: str) -> None:
    torch.manual_seed(4)
    m = create_model(f"cifar10_{family}_resnet23_prediction").eval()
    prog = compile_program(m, SHAPE)
    assert prog.grid is not None and prog.grid.wpack8 is not None
    eng = IntegerEngine(prog, isa)
    flt = compile_program(m, SHAPE)
    flt.grid = None
    x = _pixels(5, 16)
    with torch.no_grad():
        want = m(x)
    for got in (eng(x), IntegerEngine(flt, isa)(x)):
        err = float((got - want).abs().max() / want.abs().max())
        assert err < QUANTIZED_RTOL / 2, err
        assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9


def test_a_float_first_layer_has_no_codes_layer_and_runs_as_before() -> None:
    torch.manual_seed(6)
    net = _ConcatNet().eval()
    net.c1.weight_quantizer = None  # float weights: nothing to multiply in integers
    prog = compile_program(net, SHAPE)
    assert prog.grid is None
    x = _pixels(7, 2)
    with torch.no_grad():
        want = net(x)
    got = IntegerEngine(prog, ISAS_HERE[-1])(x)
    assert float((got - want).abs().max() / want.abs().max()) < QUANTIZED_RTOL / 2


@pytest.mark.filterwarnings("ignore")  # quantize_'s notes on the small nets' weights
@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("groups,cin", [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 7), (3, 3),
                                        (3, 6), (2, 2)])
def test_first_layers_of_any_channel_count_and_groups(groups: int, cin: int, isa: str) -> None:
    # a grouped first layer on 3 channels failed ("malformed step"): the codes' channels were
    # padded to a quad, which only an ungrouped layer reads that way
    from fewbits import quantize_

    torch.manual_seed(groups * 10 + cin)
    net = nn.Sequential(nn.Conv2d(cin, 6, 3, padding=1, groups=groups, bias=False),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, bias=False),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4))
    quantize_(net, "fp_net")
    net.eval()
    shape = (cin, 8, 8)
    x = torch.randint(0, 256, (4, *shape)).float() / 255
    with torch.no_grad():
        want = net(x)
    prog = compile_program(net, shape)
    got = IntegerEngine(prog, isa)(x)
    assert float((got - want).abs().max() / want.abs().max()) < QUANTIZED_RTOL / 2
    if groups == 1 and cin in (1, 2, 5):  # a quad of channels would add more than a third:
        assert prog.grid is None  # 1-channel LeNet ran 5-8 % slower on AVX2 with it
        return
    assert prog.grid is not None
    prog.grid.sacc = prog.grid.sacc * 2  # the codes' layer ran: doubling its sums shows
    assert not torch.equal(IntegerEngine(prog, isa)(x), got)


class _GroupedStem(nn.Module):
    """A grouped first layer whose input channels are not a whole number of quads."""

    def __init__(self, cin: int, groups: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, 2 * cin, 3, padding=1, groups=groups)
        self.q1 = QuantAct(MinMax())
        self.fc = nn.Linear(2 * cin, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q1(self.c1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize(("cin", "groups"), [(2, 2), (3, 3), (6, 2), (6, 3)])
def test_a_grouped_first_layer_keeps_its_groups_on_the_codes(cin: int, groups: int,
                                                            isa: str) -> None:
    # padding the codes to a quad of channels (4 for 2, 3; 8 for 6) regrouped them: group 1
    # of a 2-channel depthwise stem read a padding channel (silently wrong logits), 3 groups
    # of 4 channels were a malformed step
    torch.manual_seed(8)
    m = fewbits.quantize_(_GroupedStem(cin, groups), "min_max").eval()
    shape = (cin, 6, 5)
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, 256, (4, *shape), generator=g, dtype=torch.uint8).float() / 255
    with torch.no_grad():
        m.train()
        m(x)
        m.eval()
        want = m(x)
    prog = compile_program(m, shape)
    assert prog.grid is not None
    got = IntegerEngine(prog, isa)(x)
    assert float((got - want).abs().max() / want.abs().max()) < QUANTIZED_RTOL / 2
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_the_planner_checks_the_codes_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    # its probe held no image of 8-bit pixels: compile_for_cpu shipped an integer engine whose
    # first layer on the codes was wrong (as the grouped stems' was), 0.89 of the logits' range
    # off on every decoded image, with no note
    import fewbits.runtime.integer_walk as walk_mod
    from fewbits.runtime import compile_for_cpu
    from fewbits.runtime.integer_grid import grid_layer
    from fewbits.runtime.planner import probe_images

    def wrong(comp: object) -> object:
        g = grid_layer(comp)
        g.sacc = g.sacc * 2
        return g

    x = probe_images(8, (3, 32, 32)).numpy()
    assert [O.on_uint8_grid(r) for r in x] == [False, True] * 4  # both first-layer paths probed
    torch.manual_seed(0)
    m = create_model("cifar10_min_max_resnet23_prediction").eval()
    monkeypatch.setattr(walk_mod, "grid_layer", wrong)
    with pytest.raises(RuntimeError, match="tolerance exceeded on the probe"):
        compile_for_cpu(m, backend="int")
