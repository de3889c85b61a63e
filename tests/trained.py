"""Networks as training leaves them, for tests of the inference engines: one recipe that
several test files share (batch-norm statistics and min-max ranges of a trained net, so that
grids have their own scales and zero points and no value sits on an exact tie by accident),
and a user's small binary CNN (:class:`BinaryStemNet`)."""

from __future__ import annotations

import torch
from torch import nn

from fewbits.layers import QuantAct
from fewbits.quantizers import MinMax


def trained_looking(m: nn.Module, seed: int) -> nn.Module:
    """Batch-norm statistics and min-max ranges as training leaves them: every grid has its
    own scale and zero point (residual sums then have no common grid)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                mod.weight.copy_(torch.randn(c, generator=g).abs() + 0.3)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.3)
            if isinstance(mod, MinMax) and mod.qr_min.numel() == 1:
                mod.qr_min.fill_(-float(torch.rand((), generator=g)) * 3 - 0.1)
                mod.qr_max.fill_(float(torch.rand((), generator=g)) * 6 + 0.5)
    return m.eval()


class BinaryStemNet(nn.Module):
    """A user's CNN: a stem of ``cin`` -> ``cout`` channels (kernel ``k``, stride ``s``,
    padding ``p``), one binary 3x3 conv (padding ``p2``), a pooled classifier."""

    def __init__(self, cin: int, cout: int, k: int, s: int, p: int | str, p2: int | str = 1
                 ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, k, s, p, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act = QuantAct("binary_tanh")
        self.conv2 = nn.Conv2d(cout, 40, 3, padding=p2, bias=False)
        self.bn2 = nn.BatchNorm2d(40)
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.act(self.bn2(self.conv2(h)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))
