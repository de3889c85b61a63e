"""Fixtures shared by the test modules.

``one_thread``: one intra-op thread for a module (``pytestmark =
pytest.mark.usefixtures("one_thread")``); ``trained``: a small model whose state moved away
from its initial values (weights, ranges, INQ masks, batch-norm statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from fewbits.models import create_model, model_info


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    # On the shared, loaded 2-core machine two intra-op threads wait on each other at every op
    # when another process holds a core (up to 25x slower); the setting is restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_briefly(name: str, *, shape: tuple[int, ...] = (1, 28, 28), batch: int = 16,
                  steps: int = 2, **kw) -> nn.Module:
    """``create_model(name, **kw)`` after ``steps`` Adam steps on ``batch`` random images, in
    eval mode. INQ nets fix their weights at once (``inq_iterations=[0, 1]``) unless told."""
    torch.manual_seed(0)
    if model_info(name).family == "inq":
        kw.setdefault("inq_iterations", [0, 1])
    m = create_model(name, **kw)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.rand(batch, *shape)
    y = torch.arange(batch) % 10
    m.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


@pytest.fixture
def trained() -> Callable[..., nn.Module]:
    """:func:`train_briefly`, as a fixture."""
    return train_briefly
