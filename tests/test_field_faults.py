"""Faults that users of other quantization tools hit, restated as inputs to fewbits (issue 12).

Each test holds one kind of fault: the input of the report and the other members of its kind.
"""

from __future__ import annotations

import pytest

from fewbits import list_models
from fewbits.train import ConfigError, TrainConfig, train

# --------------------------------------------------------------------------- -b 1 and batch norm


@pytest.mark.parametrize("net", list_models("mnist_*"))
def test_batch_size_one_with_feature_batch_norm_names_the_option(net, tmp_path):
    # BatchNorm1d after a linear layer sees one value per channel with one image: PyTorch
    # raises mid-run; fewbits refuses at setup, naming -b.
    cfg = TrainConfig(net=net, dataset="synthetic", synthetic_size=4, batch_size=1, max_iter=1,
                      val_interval=1, monitor_path=str(tmp_path), progress=False, plot=False,
                      model_args={"width": 8})
    with pytest.raises(ConfigError, match=r"-b/--batch-size 1: .*batch norm.*-b 2"):
        train(cfg)


def test_batch_size_one_trains_where_batch_norm_has_a_feature_map(tmp_path):
    # Conv batch norm over a 32x32 map has 1024 values per channel: -b 1 is fine there.
    cfg = TrainConfig(net="cifar10_min_max_resnet23_prediction", dataset="synthetic",
                      synthetic_size=4, batch_size=1, max_iter=1, val_interval=1,
                      monitor_path=str(tmp_path), progress=False, plot=False,
                      validate_first=False)
    assert train(cfg).iterations == 1
