"""The dataset registry: one table read by load_dataset, the CLI choices and augmentation."""

from __future__ import annotations

import pytest
import torch

from fewbits.cli import build_parser, config_from_args, main
from fewbits.config import TrainConfig
from fewbits.data import DATASETS, ArrayDataset, DatasetSpec, load_dataset, register_dataset


@pytest.fixture
def tiny_dataset():
    def load(split, data_dir, download, size=3):
        x = torch.full((size, 1, 2, 2), 7 if split == "train" else 9, dtype=torch.uint8)
        return ArrayDataset(x, torch.zeros(size, dtype=torch.int64), ("only",), "tiny")

    spec = register_dataset(DatasetSpec("tiny", load, "three blank images",
                                        frozenset({"size"}), augment=True))
    yield spec
    del DATASETS["tiny"]


def test_a_registered_dataset_is_loadable_listed_and_a_cli_choice(tiny_dataset, capsys):
    ds = load_dataset("tiny", "test", size=2)
    assert len(ds) == 2 and int(ds.images[0, 0, 0, 0]) == 9
    with pytest.raises(TypeError, match=r"accepted: \['size'\]"):
        load_dataset("tiny", "train", n=2)
    assert config_from_args(build_parser().parse_args(["train", "--dataset", "tiny"])
                            ).dataset == "tiny"
    assert TrainConfig(dataset="tiny").uses_augment
    assert main(["list", "datasets"]) == 0
    assert "tiny         three blank images" in capsys.readouterr().out


def test_names_are_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(DatasetSpec("mnist", DATASETS["mnist"].load, "again"))


def test_augmentation_default_comes_from_the_registry():
    assert {n for n, d in DATASETS.items() if d.augment} == {"cifar10", "imagefolder"}
    assert TrainConfig(dataset="cifar10").uses_augment
    assert not TrainConfig(dataset="mnist").uses_augment
    assert TrainConfig(dataset="mnist", augment=True).uses_augment
