"""Options declared once: the train CLI is generated from fewbits.config's dataclasses."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from fewbits import config
from fewbits.cli import build_parser, config_from_args
from fewbits.config import ConfigError, QuantConfig, TrainConfig
from fewbits.models import QuantConfig as ModelsQuantConfig

ROOT = Path(__file__).resolve().parents[1]


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    return p


def test_every_field_is_one_flag_and_every_flag_one_field():
    dests = [a.dest for a in _train_parser()._actions if a.dest != "help"]
    assert sorted(dests) == sorted(f.name for f in fields(TrainConfig))
    assert len(dests) == len(set(dests))


def test_quant_options_are_the_train_options_of_the_same_declaration():
    train = {f.name: f for f in fields(TrainConfig)}
    for f in fields(QuantConfig):
        assert train[f.name].metadata is f.metadata  # one declaration, not a copy
    assert ModelsQuantConfig is QuantConfig
    assert config.QUANT_KEYS == tuple(f.name for f in fields(QuantConfig))


def test_no_flags_gives_the_dataclass_defaults():
    assert config_from_args(build_parser().parse_args(["train"])) == TrainConfig()


def test_seed_command_parses():
    ns = build_parser(prog="classification.py").parse_args(
        ["train", "-c", "cudnn", "--net", "cifar10_fp_connect_resnet23_prediction",
         "--monitor-path", "m", "--model-save-path", "m", "-d", "0"])
    assert config_from_args(ns) == TrainConfig(
        context="cudnn", net="cifar10_fp_connect_resnet23_prediction", monitor_path="m",
        model_save_path="m", device_id=0)


def test_resume_keys_come_from_the_field_metadata():
    assert set(config.RESUME_KEYS) == {"net", "dataset", "batch_size", "accum_steps", "seed",
                                       "optimizer", "type_config", "augment", "synthetic_size"}


@pytest.mark.parametrize("kw,match", [
    ({"momentum": 1.0}, r"--momentum must be in \[0, 1\)"),
    ({"learning_rate": float("inf")}, "-l/--learning-rate must be > 0"),
    ({"epochs": 0}, "--epochs must be > 0"),
    ({"threads": 0}, "--threads must be an integer >= 1"),
    ({"optimizer": "lamb"}, "--optimizer: 'lamb' is not one of adam, sgd"),
    ({"inq_selection": "first"}, "--inq-selection: 'first' is not one of largest_abs, random"),
    ({"bit_width": 33}, r"--bit-width must be in \[1, 32\]"),
    ({"delta": 0.0}, "--delta must be > 0"),
])
def test_declared_checks_name_the_flag(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_quant_config_checks_and_defaults():
    assert QuantConfig().delta == config.SEED_DELTA and QuantConfig(delta=None).delta == 2**-4
    assert TrainConfig().delta is None  # the net's default
    with pytest.raises(ValueError, match="--bit-width"):
        QuantConfig(bit_width=0)


@pytest.mark.parametrize("literal", ["234375", "5000, 6000, 7000", "5000,6000,7000,8000"])
def test_defaults_are_written_once(literal):
    hits = [p for p in (ROOT / "fewbits").rglob("*.py") if literal in p.read_text()]
    assert len(hits) <= 1, hits
