"""The one evaluation loop (fewbits.train.evaluate) and its result type (EvalResult)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewbits.data import ArrayDataset
from fewbits.train import EvalResult, evaluate


def _dataset(n: int = 23, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 3, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    return ArrayDataset(images, labels, ("a", "b", "c", "d"), "tiny")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(9, 4), nn.Dropout(0.5))


def test_result_arithmetic_and_json_keys():
    r = EvalResult(wrong=3, total=12, seconds=0.5, dataset="d", net="n", file="f")
    assert (r.error, r.accuracy, r.images_per_second) == (0.25, 0.75, 24.0)
    assert r.to_dict() == {"error": 0.25, "accuracy": 0.75, "wrong": 3, "total": 12,
                           "images_per_second": 24.0, "seconds": 0.5, "dataset": "d",
                           "net": "n", "file": "f", "fast_path": None}
    assert EvalResult(0, 5, 0.0).images_per_second > 0  # an instant loop: no division by zero


@pytest.mark.parametrize("wrong, total, seconds, match", [
    (0, 0, 1.0, "no images were evaluated"),
    (6, 5, 1.0, "0 <= wrong <= total"),
    (-1, 5, 1.0, "0 <= wrong <= total"),
    (1, 5, -1.0, "seconds >= 0"),
    (1, 5, float("nan"), "seconds >= 0"),
])
def test_result_refuses_impossible_counts(wrong, total, seconds, match):
    with pytest.raises(ValueError, match=match):
        EvalResult(wrong, total, seconds)


@pytest.mark.parametrize("batch_size", [1, 4, 23, 100])
def test_counts_equal_a_direct_count_for_any_batch_size(batch_size):
    ds, net = _dataset(), _net().eval()
    with torch.no_grad():
        expected = int((net(ds.images.float() / 255).argmax(1) != ds.labels).sum())
    r = evaluate(net, ds, "cpu", batch_size)
    assert (r.wrong, r.total, r.dataset) == (expected, 23, "tiny")
    assert 0 < expected < 23  # the check can fail both ways


def test_any_callable_is_evaluated_like_its_module():
    ds, net = _dataset(), _net()
    as_module = evaluate(net, ds, batch_size=5)
    as_function = evaluate(lambda x: net.eval()(x), ds, batch_size=5)  # no eval() by the loop
    assert (as_function.wrong, as_function.total) == (as_module.wrong, as_module.total)


def test_training_mode_and_rng_are_left_as_they_were():
    ds, net = _dataset(), _net()
    net.train()
    torch.manual_seed(1)
    before = torch.get_rng_state()
    evaluate(net, ds, batch_size=4)  # dropout would differ run to run in train mode
    assert net.training and torch.equal(torch.get_rng_state(), before)
    r1 = evaluate(net, ds, batch_size=4)
    r2 = evaluate(lambda x: net(x) + torch.rand(x.shape[0], 4), ds, batch_size=4)  # draws
    assert torch.equal(torch.get_rng_state(), before) and r1.total == r2.total == 23


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate(_net(), _dataset(), batch_size=0)


def test_a_batch_norm_folded_file_is_evaluated_on_the_binary_engine(tmp_path, trained):
    """``fewbits export --fold-bn`` files run only on the binary engine: ``evaluate_packed``
    (``fewbits eval``) takes them there, with the predictions of the unfolded file."""
    from fewbits.cli import evaluate_packed
    from fewbits.data import load_dataset
    from fewbits.export import export_packed

    m = trained("mnist_binary_net_lenet", width=16)
    plain, folded = tmp_path / "plain.fewbits", tmp_path / "folded.fewbits"
    export_packed(m, plain)
    export_packed(m, folded, fold_bn=True)
    ds = load_dataset("synthetic", "test", n=64, shape=(1, 28, 28), num_classes=10)
    want = evaluate_packed(plain, ds, batch_size=16)
    for fast in (False, True):
        got = evaluate_packed(folded, ds, batch_size=16, fast=fast)
        assert got.fast_path == "binary"
        assert (got.wrong, got.total) == (want.wrong, want.total)
