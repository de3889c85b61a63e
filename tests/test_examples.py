"""examples/resnet18_binary.py runs end to end on a tiny generated image folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "resnet18_binary.py"


def _load():
    spec = importlib.util.spec_from_file_location("resnet18_binary", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 128, (32, 32, 3)) + 100 * c
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.png")


def test_resnet18_example_trains_calibrates_exports_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBITS_DATA", str(tmp_path / "cache"))
    _image_folder(tmp_path / "data")
    mod = _load()
    names = [n for n, m in mod.resnet18(10).named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert names[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]  # torchvision's names
    assert "layer2.0.downsample.0" in names
    out = tmp_path / "r18.fewbits"
    r = mod.main(["--data-dir", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "4",
                  "-o", str(out)])
    assert r["identical_logits"] and out.stat().st_size == r["file_bytes"]
    assert 0.0 <= r["accuracy"] <= 1.0
    assert r["ratio"] > 25  # binary weights: ~1 bit instead of 32
    m = mod.binary_resnet18(2)
    assert type(m.conv1).__name__ == "QuantConv2d" and m.conv1.weight_quantizer.name == \
        "fixed_point"
    assert m.layer3[1].conv2.weight_quantizer.name == "binary_weight"
    assert m.fc.input_quantizer.name == "min_max"

