"""Fixtures shared by the test modules.

``one_thread``: one intra-op thread for a module (``pytestmark =
pytest.mark.usefixtures("one_thread")``); ``trained``: a small model whose state moved away
from its initial values (weights, ranges, INQ masks, batch-norm statistics); ``broken_fuse``:
a fused ONNX pass gone wrong (logits 1.5 times too large), for the export check.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from fewbits.models import create_model, model_info

# Under pytest-xdist each worker gets its share of the cores as intra-op threads: two workers
# of two threads each on two cores wait on each other at every op.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ[
        "PYTEST_XDIST_WORKER_COUNT"])))

#: Families beyond the seed's nine (issue 25). The matrices that run every family or every zoo
#: net (graph tools, ONNX, deployment, training every net ...) take them only with
#: FEWBITS_TEST_ALL_FAMILIES=1: they add ~7 minutes on two cores, beyond the suite's budget;
#: tests/test_lowbit.py takes them through quantize_, training, state dicts and packed files
#: in a few seconds. CI does not set the variable: run it by hand after changing a family.
NEW_FAMILIES = ("ternary", "lsq")
#: Matrices over families that are cheap enough to keep every family in.
_CHEAP = {"test_converted_layers_compute_the_family_quantizer_of_the_original_weights",
          "test_a_converted_model_trains_every_quantized_parameter",
          "test_float_checkpoint_loads_strictly_and_restarts_weight_state",
          "test_torch_func_grad_and_vmap_match_autograd",
          # the new families' own cheap cases (18 tests, ~1.3 s): without them the plain
          # "ternary" and "lsq" specs were never run through the NaN/inf refusal, the packed
          # round trip, the codes/affine/config checks or the docs check by default
          "test_nonfinite_input_is_refused",
          "test_quantize_train_state_dict_and_packed_file_round_trip",
          "test_every_quantizer_works_in_a_layer_and_round_trips",
          "test_every_quantizer_has_a_section_and_a_committed_plot",
          "test_affine_form_is_the_grid_of_uniform_quantizers_only",
          "test_bits_declared_and_codes_decode_to_forward",
          "test_config_and_state_dict_round_trip",
          # the zoo lsq nets' activation placement (5 nets, ~1 s)
          "test_lsq_nets_quantize_activations_unsigned_in_place_of_the_relu"}


def _new_family_case(item: pytest.Item) -> bool:
    spec = getattr(item, "callspec", None)
    if spec is None or item.originalname in _CHEAP:
        return False
    for v in spec.params.values():
        if isinstance(v, str) and (v in NEW_FAMILIES
                                   or any(f"_{f}_" in v for f in NEW_FAMILIES)):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FEWBITS_TEST_ALL_FAMILIES") == "1":
        return
    kept, gone = [], []
    for item in items:
        (gone if _new_family_case(item) else kept).append(item)
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = kept


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


@pytest.fixture
def broken_fuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused ONNX pass (``fewbits.export.onnx.fuse_graph``) made wrong: its graph's first
    output is multiplied by 1.5, as a broken graph pass would leave it."""
    import numpy as np
    from onnx import helper, numpy_helper

    import fewbits.export.onnx as export_onnx_module

    real = export_onnx_module.fuse_graph

    def broken(proto, *args, **kwargs):
        real(proto, *args, **kwargs)
        g = proto.graph
        last = next(n for n in g.node if g.output[0].name in n.output)
        last.output[0] = "raw"
        g.initializer.append(numpy_helper.from_array(np.float32(1.5), "k"))
        g.node.append(helper.make_node("Mul", ["raw", "k"], [g.output[0].name]))

    monkeypatch.setattr(export_onnx_module, "fuse_graph", broken)
