"""QA 13c of the float stream on integer planes (fewbits.runtime.integer_planes): the bound
proven at compile time may lie far above an image's values (a min-max range its data never
reaches): ``delta`` then swallowed the whole map (every m 0, the layer's outputs its bias
alone), silently, with ``Program.exact`` True. Such an image runs the float layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_integer_planes import _net

from fewbits.runtime.integer import IntegerEngine, supported_int_isas
from fewbits.runtime.integer_planes import upper_bounds
from fewbits.runtime.integer_walk import compile_program


@pytest.mark.parametrize("top", [1e6, 1e9])
def test_a_bound_far_above_the_map_runs_the_float_layer(top: float) -> None:
    m = _net(64, 32)
    with torch.no_grad():  # a range the data never reaches: codes ~0, the sum ~ the qa branch
        m.qb.quantizer.qr_max.fill_(top)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(x).numpy()
    prog = compile_program(m, (3, 8, 8))
    assert prog.exact and prog.planes  # the layer is taken: the bound is ~top
    conv = next(s for s in prog.steps if getattr(s, "dst", None) in prog.planes)
    assert upper_bounds(prog)[conv.src] >= top
    outs = {}
    for isa in supported_int_isas():
        eng = IntegerEngine(prog, isa, planes=True)
        outs[isa] = eng(x).numpy()
        assert list(eng.plane_counts) == [0, 4], isa  # every image on the float layer
        assert np.abs(outs[isa] - ref).max() <= 1e-5 * np.abs(ref).max(), isa
    for isa, got in outs.items():
        assert np.array_equal(got.view(np.int32), outs["generic"].view(np.int32)), isa
