"""fewbits.recalibrate_bn: batch norm's running statistics re-estimated with the quantizers in
inference form (stochastic binary connect: sign(w)), against a torch computation of the sign
network's batch statistics in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewbits import recalibrate_bn
from fewbits.layers import QuantLinear

STOCH = {"name": "binary_connect", "stochastic": True, "clip_weights": True,
         "uniform_init": True}


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(QuantLinear(6, 5, weight_quantizer=STOCH), nn.BatchNorm1d(5),
                        nn.ReLU(), nn.Dropout(0.5), QuantLinear(5, 4, weight_quantizer=STOCH),
                        nn.BatchNorm1d(4, momentum=0.3))
    net.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics gathered under random weight draws
            net(torch.randn(16, 6))
    return net


def _oracle(net: nn.Sequential, batches: list[torch.Tensor]) -> list[tuple]:
    """Image-weighted mean of each batch's mean and unbiased variance at each batch norm, the
    sign network in float64, each batch normalised with its own statistics (training mode)."""
    def sign(w):
        return torch.where(w >= 0, 1.0, -1.0).double()

    layers = [(net[0], net[1]), (net[4], net[5])]
    sums = [[0, 0] for _ in layers]
    n = sum(len(x) for x in batches)
    for x in batches:
        h = x.double()
        for j, (fc, bn) in enumerate(layers):
            h = h @ sign(fc.weight).T + fc.bias.double()
            sums[j][0] = sums[j][0] + len(x) * h.mean(0)
            sums[j][1] = sums[j][1] + len(x) * h.var(0, unbiased=True)
            h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps)
            h = (h * bn.weight.double() + bn.bias.double()).relu()
    return [(m / n, v / n) for m, v in sums]


def test_statistics_are_the_sign_networks_and_nothing_else_changes():
    net = _net()
    net[3].eval()  # a module's own flag comes back as it was
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    torch.manual_seed(1)
    data = [torch.randn(8, 6), (torch.randn(8, 6), torch.zeros(8)), [torch.randn(9, 6)]]
    stale = net[1].running_mean.clone()
    assert recalibrate_bn(net, data, 20) == 20  # the last batch cut to 4 images
    xs = [data[0], data[1][0], data[2][0][:4]]
    for (mean, var), bn in zip(_oracle(net, xs), (net[1], net[5]), strict=True):
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
        assert int(bn.num_batches_tracked) == 3
    assert not torch.allclose(net[1].running_mean, stale)
    assert all(torch.equal(v, params[k]) for k, v in net.named_parameters())
    assert [m.training for m in net] == [True, True, True, False, True, True]
    assert (net[1].momentum, net[5].momentum) == (0.1, 0.3)
    # reproducible: the same images give the same statistics
    before = {k: v.clone() for k, v in net.state_dict().items()}
    recalibrate_bn(net, iter(xs), 20)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_bad_arguments_raise():
    net = _net()
    for n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            recalibrate_bn(net, [torch.randn(4, 6)], n)
    with pytest.raises(ValueError, match="no batch norm with running statistics"):
        recalibrate_bn(nn.Sequential(nn.Linear(6, 2), nn.BatchNorm1d(2, affine=False,
                                     track_running_stats=False)), [torch.randn(4, 6)], 4)
    with pytest.raises(ValueError, match="held 4 images, fewer than n=5"):
        recalibrate_bn(net, [torch.randn(4, 6)], 5)
    with pytest.raises(TypeError, match="got dict"):
        recalibrate_bn(net, [{"x": torch.randn(4, 6)}], 4)
    assert net[0].training and net[1].momentum == 0.1  # restored on error too
