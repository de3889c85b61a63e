"""docs/QUANTIZERS.md covers every registered quantizer, with a plot its script draws."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from fewbits.quantizers import list_quantizers

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "QUANTIZERS.md"


def _script():
    spec = importlib.util.spec_from_file_location("make_quantizer_plots",
                                                  ROOT / "docs" / "make_quantizer_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list_quantizers())
def test_every_quantizer_has_a_section_and_a_committed_plot(name):
    text = DOC.read_text()
    assert re.search(rf"^## `{name}`$", text, re.M), f"no '## `{name}`' section"
    assert f"(img/quantizers/{name}.png)" in text
    png = ROOT / "docs" / "img" / "quantizers" / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 60_000


def test_the_script_draws_every_registered_quantizer(tmp_path):
    written = _script().main(["--out", str(tmp_path), "--points", "33", "--dpi", "20"])
    assert sorted(p.name for p in written) == sorted(f"{n}.png" for n in list_quantizers())
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_the_curves_are_the_library_s():
    m = _script()
    x, y, g = m.curves("fixed_point", points=13)  # n=3, delta=0.25 on [-1.5, 1.5]
    assert torch.equal(x, torch.linspace(-1.5, 1.5, 13))
    assert y.tolist() == [-0.75, -0.75, -0.75, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75,
                          0.75, 0.75, 0.75]
    assert g.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]  # x = +-0.75 is inside
    _, y, g = m.curves("binary_tanh", points=5)  # -2, -1, 0, 1, 2
    assert y.tolist() == [-1, -1, -1, 1, 1] and g.tolist() == [0, 0, 1, 0, 0]


def test_an_unillustrated_quantizer_is_an_error():
    with pytest.raises(KeyError, match="add it to ILLUSTRATIONS"):
        _script().curves("no_such_quantizer")
