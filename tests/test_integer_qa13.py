"""Users' models on the integer engine after concatenations, spatial means and unquantized max
pools became runnable (QA session 13): global averages of a global average's output or of
the images, and ``torch.cat`` called with keywords. Every engine output equals PyTorch's
(power-of-two grids, 8-bit pixel images: every code is PyTorch's) or the model is refused by
name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trained import trained_looking

import fewbits
from fewbits.layers import QuantAct
from fewbits.quantizers import FixedPoint
from fewbits.runtime.integer import IntegerEngine, supported_int_isas


def _images(n: int = 4, shape: tuple[int, ...] = (3, 10, 10)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, *shape), generator=g) / 255


def _matches_pytorch(m: nn.Module, isa: str | None = None, atol: float = 1e-6) -> None:
    """``m``'s engine (``isa``; the best one here by default) on 8-bit pixel images: exact,
    and within ``atol`` of the logits' range of PyTorch's."""
    eng = IntegerEngine.from_model(m, (3, 10, 10), isa=isa)
    x = _images()
    with torch.no_grad():
        ref = m(x)
    assert eng.exact
    torch.testing.assert_close(eng(x), ref, rtol=0, atol=atol * float(ref.abs().max()))


class _Net(nn.Module):
    """conv, batch norm, ReLU, then ``how`` up to a linear layer."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(8)
        self.qa, self.qb = (QuantAct(FixedPoint(n=8, delta=2**-4)) for _ in range(2))
        self.c = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(3 if how in ("mean_images", "gap_images") else
                            6 if how == "cat_pooled" else 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.a(x)))
        if self.how == "mean_of_mean":  # the second mean is of a (N, C, 1, 1) map
            return self.fc(h.mean((2, 3), keepdim=True).mean((2, 3)))
        if self.how == "gap_of_gap":
            return self.fc(F.adaptive_avg_pool2d(F.adaptive_avg_pool2d(h, 1), 1).flatten(1))
        if self.how == "cat_pooled":  # pooled features quantized, concatenated, 1x1 conv
            pa = self.qa(h.mean((2, 3), keepdim=True))
            pb = self.qb(torch.relu(self.b(x)).mean((2, 3), keepdim=True))
            return self.fc(self.c(torch.cat([pa, pb], 1)).flatten(1))
        if self.how == "mean_images":
            return self.fc(x.mean((2, 3)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))  # "gap_images"


def _net(how: str) -> nn.Module:
    torch.manual_seed(0)
    return trained_looking(fewbits.quantize_(_Net(how), "fp_net"), 0)


@pytest.mark.parametrize("isa", supported_int_isas())
@pytest.mark.parametrize("how", ["mean_of_mean", "gap_of_gap", "cat_pooled"])
def test_a_global_average_s_output_is_read_as_a_map_of_its_channels(isa: str,
                                                                    how: str) -> None:
    # the global average's (N, C, 1, 1) buffer was read as NHWC by the next step: a second
    # mean averaged the C channels into one (logits off by 4x, engine.exact True), and a
    # concatenation of two quantized pooled maps crashed in NumPy at run time
    m = _net(how)
    _matches_pytorch(m, isa)


@pytest.mark.parametrize("how", ["mean_images", "gap_images"])
def test_a_global_average_of_the_images_is_refused(how: str) -> None:
    # the images are NCHW, the engine's average reads NHWC: it averaged along rows of
    # pixels and returned wrong logits with engine.exact True
    with pytest.raises(ValueError, match="global average pooling needs a .* feature map"):
        IntegerEngine.from_model(_net(how), (3, 10, 10))


_CATS = {"keywords": lambda a, b: torch.cat(tensors=[a, b], dim=1),
         "concat": lambda a, b: torch.concat((a, b), -3),
         "concatenate": lambda a, b: torch.concatenate([a, b], axis=1)}


class _Cat(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.c, self.fc = nn.Conv2d(12, 6, 1), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(_CATS[self.how](self.a(x), self.b(x)))
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


@pytest.mark.parametrize("how", sorted(_CATS))
def test_a_concatenation_written_with_keywords_or_another_name_runs(how: str) -> None:
    # torch.cat(tensors=[a, b], dim=1) crashed the walk (IndexError, no node named: the
    # planner took it for a broken candidate); torch.concat / concatenate were refused
    torch.manual_seed(0)
    m = fewbits.quantize_(_Cat(how), "fp_net").eval()
    _matches_pytorch(m)


class _Pooled(nn.Module):
    """Open layers max-pooled before the quantizer that reads them: ``how`` ``"functional"``
    (``F.max_pool2d`` then a clamp), ``"cat"`` (a concatenation pooled, ReLU after it),
    ``"cat_twice"`` (one branch concatenated twice, then pooled)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bna, self.bnb = nn.BatchNorm2d(8), nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c = nn.Conv2d({"functional": 8, "cat": 12, "cat_twice": 16}[how], 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.bna(self.a(x)), self.bnb(self.b(x))
        if self.how == "functional":
            h = torch.clamp(F.max_pool2d(a, 3, 2, 1), -0.25, 0.5)
        elif self.how == "cat":
            h = torch.relu(self.pool(torch.cat([a, b], 1)))
        else:
            h = self.pool(torch.relu(torch.cat([b, a, b], 1)))
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


@pytest.mark.parametrize("isa", supported_int_isas())
@pytest.mark.parametrize("how", ["functional", "cat", "cat_twice"])
def test_max_pools_of_open_layers_and_concatenations_run(isa: str, how: str) -> None:
    # refused before: F.max_pool2d did not keep the epilogue open as nn.MaxPool2d does (the
    # clamp after it then read a float map), and a pooled concatenation of open layers was
    # refused as "concatenation of quantized maps only", naming the pool
    torch.manual_seed(0)
    m = _Pooled(how)
    for bn in (m.bna, m.bnb):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    fewbits.quantize_(m, "fp_net")
    m.eval()
    _matches_pytorch(m, isa)


class _CatOf(nn.Module):
    """``"nested"``: a concatenation of a concatenation and a branch, ReLU after it, read by
    a quantized conv; ``"mean"``: a concatenation of open layers read by a mean (no
    quantizer); ``"two_readers"``: read by two quantized convs; ``"branch_read_twice"``: a
    branch concatenated and read by a conv too (SqueezeNet's bypass, DenseNet's growth)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b, self.d = (nn.Conv2d(3, c, 3, padding=1) for c in (8, 4, 4))
        self.c, self.e = nn.Conv2d(16 if how == "nested" else 12, 6, 1), nn.Conv2d(12, 6, 1)
        self.f = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(12 if how == "mean" else 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a(x))
        h = torch.cat([a, self.b(x)], 1)
        if self.how == "nested":
            h = torch.relu(torch.cat([h, self.d(x)], 1))
        elif self.how == "mean":
            return self.fc(h.mean((2, 3)))
        elif self.how == "two_readers":
            return self.fc((self.c(h) + self.e(h)).mean((2, 3)))
        elif self.how == "branch_read_twice":
            return self.fc(torch.relu(self.c(h) + self.f(a)).mean((2, 3)))
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


@pytest.mark.parametrize("isa", supported_int_isas())
@pytest.mark.parametrize("how", ["nested", "mean", "two_readers", "branch_read_twice"])
@pytest.mark.parametrize("family", ["fp_net", "min_max"])
def test_concatenations_not_closed_by_one_quantizer_run(isa: str, how: str,
                                                        family: str) -> None:
    # refused before ("concatenation of quantized (C, H, W) maps only"): a nested cat; an
    # open cat read by a mean or by two layers; a branch read by the cat and by a layer. The
    # engine now concatenates the float maps (PyTorch's values, copied) where it cannot close
    # the branches on one grid; each quantized reader quantizes the concatenation
    torch.manual_seed(0)
    m = fewbits.quantize_(_CatOf(how), family).eval()
    # min-max: the codes are PyTorch's; only float rounding of the last sums differs
    _matches_pytorch(m, isa, atol=1e-5)


class _Keywords(nn.Module):
    """Every tensor given as ``input=``; pooled by ``torch.flatten`` of the adaptive average
    or by ``torch.mean``."""

    def __init__(self, mean: bool) -> None:
        super().__init__()
        self.mean = mean
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.relu(input=self.c(torch.clamp(input=self.a(x), min=-0.5, max=1.0)))
        if self.mean:
            return self.fc(torch.mean(input=g, dim=(2, 3)))
        return self.fc(torch.flatten(input=F.adaptive_avg_pool2d(g, 1), start_dim=1))


@pytest.mark.parametrize("mean", [False, True])
def test_tensors_given_as_input_keywords_run(mean: bool) -> None:
    # torch.relu(input=h), torch.clamp(input=h, ...), torch.flatten(input=h, ...) crashed the
    # walk with an IndexError naming no node; torch.mean(input=h, dim=...) was refused
    torch.manual_seed(0)
    m = fewbits.quantize_(_Keywords(mean), "fp_net").eval()
    _matches_pytorch(m)


def test_an_average_pool_of_an_unquantized_map_is_refused_for_that_reason() -> None:
    # QA 13d: quantize_ leaves the map before an nn.AvgPool2d float (the quantizer sits on the
    # next layer's input); the refusal blamed the divisor ("with a fixed divisor only")
    class AvgNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(8 * 5 * 5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(torch.relu(self.bn(self.c(x)))).flatten(1))

    m = trained_looking(fewbits.quantize_(AvgNet(), "min_max"), 0)
    with pytest.raises(ValueError, match=r"pool \(AvgPool2d\): average pooling of an "
                                         "unquantized map .*put an activation quantizer"):
        IntegerEngine.from_model(m, (3, 10, 10))
