"""Models outside the zoo: registry metadata, create_model's spec, package.module:factory on the
command line, and INQ schedules that fit the run."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from fewbits.cli import main
from fewbits.export import export_packed, load_packed, packed_info
from fewbits.models import (
    create_model,
    list_models,
    model_info,
    register_factory,
    register_model,
)
from fewbits.quantizers import INQ
from fewbits.train import ConfigError, TrainConfig, inq_schedule, train

FACTORY = textwrap.dedent('''
    from torch import nn
    import fewbits

    def net(num_classes=10, in_channels=3, width=8):
        m = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(width, num_classes))
        return fewbits.quantize_(m, "binary_weight", skip=["0"])

    def float_net(num_classes=10, in_channels=3, width=8):
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, num_classes))

    def min_max_net(num_classes=10, in_channels=3, width=8):  # ranges start from the weights
        return fewbits.quantize_(float_net(num_classes, in_channels, width), "min_max")

    not_callable = 3
''')
TINY = ["--dataset", "synthetic", "--synthetic-size", "16", "-b", "8", "--no-progress",
        "--no-plot"]


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    name = f"fewbits_own_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_every_zoo_model_declares_its_metadata_where_it_is_registered():
    for name in list_models():
        info = model_info(name)
        assert info.family and info.dataset in ("cifar10", "mnist")
        assert info.input_shape == {"cifar10": (3, 32, 32), "mnist": (1, 28, 28)}[info.dataset]
        assert create_model(name, **({"width": 8} if "width" in info.defaults else {})) \
            .fewbits_spec["kwargs"].keys() == info.defaults.keys()
    assert model_info("cifar10_resnet23_prediction").family == "float"
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        model_info("nope")


def test_create_model_attaches_the_spec_of_a_user_registered_model(tmp_path):
    @register_model(name="test_own_mlp", input_shape=(1, 4, 4), dataset="digits",
                    family="binary_connect")
    def build(hidden=6):
        import fewbits

        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, hidden),
                                torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
        return fewbits.quantize_(m, "binary_connect")

    info = model_info("test_own_mlp")
    assert (info.input_shape, info.dataset, info.defaults) == ((1, 4, 4), "digits",
                                                               {"hidden": 6})
    m = create_model("test_own_mlp", hidden=5).eval()
    assert m.fewbits_spec == {"name": "test_own_mlp", "kwargs": {"hidden": 5}}
    export_packed(m, tmp_path / "own.fewbits")  # refused before issue 10
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(load_packed(tmp_path / "own.fewbits")(x), m(x))


def test_register_factory_errors(own_module):
    with pytest.raises(ValueError, match="expected package.module:factory"):
        register_factory("no_colon")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod_x'"):
        register_factory("no_such_mod_x:net")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        register_factory(f"{own_module}:nope")
    with pytest.raises(ValueError, match="is not callable"):
        register_factory(f"{own_module}:not_callable")
    assert register_factory(f"{own_module}:net") == register_factory(f"{own_module}:net")


def test_train_export_eval_an_own_architecture_from_the_command_line(own_module, tmp_path,
                                                                     capsys):
    run, f = tmp_path / "run", tmp_path / "own.fewbits"
    assert main(["train", "--net", f"{own_module}:net", "-i", "2", "-v", "2", "-m", str(run),
                 *TINY, "--model-arg", "width=4"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "-o", str(f), "--model", f"{own_module}:net"]) == 0
    capsys.readouterr()
    assert main(["info", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == f"{own_module}:net"
    assert main(["eval", str(f), "--model", f"{own_module}:net", "--dataset", "synthetic",
                 "--json"]) == 0
    # the file records its training data (synthetic, 16 images): the test split is a fifth
    assert json.loads(capsys.readouterr().out)["total"] == 3
    # --fast on a user's architecture: loaded into the factory's model, then the planner
    assert main(["eval", str(f), "--model", f"{own_module}:net", "--fast", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 3
    assert main(["eval", str(run), "--model", f"{own_module}:net", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["net"] == f"{own_module}:net"


def test_eval_a_file_exported_from_python_into_a_factory_model(own_module, tmp_path, capsys):
    import importlib

    mod = importlib.import_module(own_module)
    m = mod.net().eval()
    f = tmp_path / "py.fewbits"
    export_packed(m, f)
    assert packed_info(f).model == "torch.nn.modules.container.Sequential"
    assert main(["info", str(f)]) == 0
    assert "Sequential" in capsys.readouterr().out
    assert main(["eval", str(f), "--dataset", "synthetic"]) == 1
    assert "not registered" in capsys.readouterr().err
    for factory in ("net", "float_net"):  # a quantized or a float instance
        assert main(["eval", str(f), "--model", f"{own_module}:{factory}", "--dataset",
                     "synthetic", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["total"] == 200


def test_inq_schedule_that_never_starts_is_refused_and_fractions_fit_the_run(tmp_path, capsys):
    base = dict(net="mnist_inq_mlp", dataset="synthetic", synthetic_size=16, batch_size=8,
                max_iter=4, val_interval=4, progress=False, plot=False,
                model_args={"width": 8, "depth": 1})
    with pytest.raises(ConfigError, match=r"starts after the run's 4 iterations.*"
                       r"0\.5,0\.75"):
        train(TrainConfig(**base, monitor_path=str(tmp_path / "a")))
    with pytest.warns(UserWarning, match="ends after the run's 4"):
        train(TrainConfig(**base, monitor_path=str(tmp_path / "b"), inq_iterations=(1, 9)))
    res = train(TrainConfig(**base, monitor_path=str(tmp_path / "c"),
                            inq_iterations=(0.5, 1.0)))
    qs = [m for m in res.model.modules() if isinstance(m, INQ)]
    assert qs and all(q.inq_iterations == (2, 3) and bool(q.mask.all()) for q in qs)
    # fractions are of optimizer iterations, whatever --accum-steps is (INQ counts steps)
    res = train(TrainConfig(**base, monitor_path=str(tmp_path / "c2"), accum_steps=2,
                            inq_iterations=(0.5, 1.0)))
    qs = [m for m in res.model.modules() if isinstance(m, INQ)]
    assert qs and all(q.inq_iterations == (2, 3) and bool(q.mask.all()) for q in qs)
    assert inq_schedule((0.5, 0.75, 0.875, 0.9375, 1.0), 400) == (200, 300, 350, 375, 399)
    assert inq_schedule((5000, 6000), 400) == (5000, 6000)
    with pytest.raises(ConfigError, match="fractions must increase"):
        inq_schedule((0.9, 0.5), 100)
    with pytest.raises(ConfigError, match="two on the same iteration"):
        inq_schedule((0.9375, 1.0), 10)
    with pytest.raises(ConfigError, match=r"must lie in \(0, 1\]"):
        TrainConfig(inq_iterations=(0.5, 2.0))
    assert main(["train", "--net", "mnist_inq_mlp", "-i", "4", "-v", "4", "-m",
                 str(tmp_path / "d"), *TINY, "--model-arg", "width=8", "--model-arg",
                 "depth=1"]) == 2
    assert "--inq-iterations 0.5,0.75,0.875,0.9375,1.0" in capsys.readouterr().err


@pytest.mark.parametrize("net, flags, names", [
    ("{own}:float_net", ["--bit-width", "3"], "--bit-width"),
    ("{own}:net", ["--delta", "0.125", "--ql-min", "-8"], "--delta, --ql-min"),
    ("mnist_float_lenet", ["--bit-width", "3"], "--bit-width"),
    ("mnist_binary_connect_lenet", ["--bit-width", "3", "--clip-weights"], "--bit-width"),
    ("mnist_inq_lenet", ["--delta", "0.125"], "--delta"),
    ("mnist_fp_connect_lenet", ["--a-min-max"], "--a-min-max"),
    # another value of each alone would be invalid (ql_min >= ql_max): still ignored
    ("mnist_fp_connect_lenet", ["--ql-min", "5", "--ql-max", "6"], "--ql-min, --ql-max"),
])
def test_quantization_options_a_net_would_ignore_are_refused(net, flags, names, own_module,
                                                              tmp_path, capsys):
    """Before, ``--bit-width 3`` on a float factory trained a float model without a word."""
    net = net.format(own=own_module)
    assert main(["train", "--net", net, "-i", "1", "-m", str(tmp_path / "r"), *TINY,
                 *flags]) != 0
    err = capsys.readouterr().err
    assert f"{names}: {net} would ignore it" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").glob("*.pt"))


@pytest.mark.parametrize("net, flags", [
    ("mnist_fp_connect_lenet", ["--bit-width", "6", "--delta", "0.015625"]),
    ("mnist_binary_connect_lenet", ["--clip-weights"]),
    ("mnist_min_max_lenet", ["--a-min-max", "--a-ema", "--ql-min", "0"]),
])
def test_quantization_options_a_net_uses_are_taken(net, flags, tmp_path):
    assert main(["train", "--net", net, "-i", "1", "-v", "1", "-m", str(tmp_path / "r"),
                 *TINY, *flags, "--no-first-validation"]) == 0


def test_family_config_refuses_an_option_the_family_does_not_use():
    import fewbits

    with pytest.raises(ValueError, match="family 'pow2_connect' does not use ql_max"):
        fewbits.family_config("pow2_connect", ql_max=15)
    assert fewbits.family_config("pow2_connect", bit_width=5)["weight"]["n"] == 5
    # a used option at its family default is a setting, not an ignored one (the example's)
    assert fewbits.family_config("fp_connect", bit_width=8)["weight"]["n"] == 8
    assert fewbits.family_config("inq", bit_width=4)["weight"]["num_bits"] == 4
    with pytest.raises(ValueError, match="does not use bit_width"):
        fewbits.family_config("min_max", bit_width=8)
    with pytest.raises(ValueError, match="does not use ql_min, ql_max"):
        fewbits.family_config("fp_connect", ql_min=5, ql_max=6)
    assert fewbits.family_config("min_max", ql_min=5, ql_max=6)["weight"]["ql_max"] == 6
    # None is QuantConfig's "not set" (the family default): not a setting to refuse, so one
    # call serves every family (before: "family 'binary_connect' does not use bit_width")
    for name in ("binary_connect", "float", "min_max", "fp_connect"):
        assert fewbits.family_config(name, bit_width=None, delta=None) == \
            fewbits.family_config(name)


def test_export_onnx_of_a_factory_model_takes_input_shape_and_info_explains_checkpoints(
        own_module, tmp_path, capsys):
    run, onnx_path = tmp_path / "run", tmp_path / "own.onnx"
    assert main(["train", "--net", f"{own_module}:net", "-i", "1", "-v", "1", "-m", str(run),
                 *TINY, "--no-first-validation"]) == 0
    capsys.readouterr()
    # a factory declares no input shape: the ONNX export asks for one, naming the flag
    assert main(["export", str(run), "--onnx", str(onnx_path), "--model",
                 f"{own_module}:net"]) != 0
    assert "--input-shape C,H,W" in capsys.readouterr().err
    assert main(["export", str(run), "--onnx", str(onnx_path), "--model", f"{own_module}:net",
                 "--input-shape", "3,8,8"]) == 0
    out = capsys.readouterr().out
    assert onnx_path.exists() and "top-1 agreement 100.0%" in out
    with pytest.raises(SystemExit):
        main(["export", str(run), "--onnx", str(onnx_path), "--input-shape", "3,8"])
    assert "three positive integers" in capsys.readouterr().err
    for path in (run, run / "model_best.pt"):
        assert main(["info", str(path)]) == 2
        assert f"fewbits export {path} -o model.fewbits" in capsys.readouterr().err


def test_a_run_of_a_factory_whose_ranges_start_from_its_weights_is_rebuilt(own_module, tmp_path,
                                                                           capsys):
    """Before, a checkpoint's model was first built on the meta device, where min-max ranges
    taken from the converted weights failed: "cannot rebuild model ...: Tensor.item() cannot be
    called on meta tensors" for eval and export of the README's own-model recipe."""
    run, net = tmp_path / "run", f"{own_module}:min_max_net"
    assert main(["train", "--net", net, "-i", "1", "-v", "1", "-m", str(run), *TINY,
                 "--no-first-validation"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--model", net, "--dataset", "synthetic", "--json"]) == 0
    total = json.loads(capsys.readouterr().out)["total"]
    assert main(["export", str(run), "--model", net, "-o", str(tmp_path / "m.fewbits")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m.fewbits"), "--model", net, "--dataset", "synthetic",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == total


def test_a_file_of_an_unregistered_model_names_the_flag_of_the_command_that_read_it(tmp_path,
                                                                                     capsys):
    """Before, ``fewbits export FILE --onnx`` told the user to run ``fewbits eval``."""
    import fewbits

    m = fewbits.quantize_(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)),
                          "fp_connect")
    export_packed(m, tmp_path / "m.fewbits")
    for cmd in (["export", str(tmp_path / "m.fewbits"), "--onnx", str(tmp_path / "m.onnx")],
                ["eval", str(tmp_path / "m.fewbits"), "--dataset", "synthetic"]):
        assert main(cmd) == 1
        err = capsys.readouterr().err
        assert "--model package.module:factory" in err and "fewbits eval FILE" not in err


def test_model_and_fast_flags_without_effect_are_refused(own_module, tmp_path, capsys):
    """--model on a run of another net, on a folded file, or naming a factory that cannot
    build, and --fast on a run folder: one error line each, never ignored or a traceback."""
    run, packed, folded = tmp_path / "run", tmp_path / "p.fewbits", tmp_path / "f.fewbits"
    assert main(["train", "-n", "mnist_binary_net_lenet", "-i", "1", "-v", "1", "-m",
                 str(run), *TINY, "--no-first-validation", "--model-arg", "width=8"]) == 0
    assert main(["export", str(run), "-o", str(packed)]) == 0
    assert main(["export", str(run), "-o", str(folded), "--fold-bn"]) == 0
    capsys.readouterr()
    other = f"{own_module}:net"
    cases = [
        (["eval", str(run), "--model", other], "was trained as mnist_binary_net_lenet"),
        (["export", str(run), "--model", other, "-o", str(tmp_path / "x.fewbits")],
         "was trained as mnist_binary_net_lenet"),
        (["eval", str(folded), "--model", other], "folded for the binary engine"),
        (["eval", str(packed), "--model", "torch.nn:Linear"], "cannot build it"),
        (["eval", str(run), "--fast"], "--fast runs a packed model"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fewbits: error: ") and message in err, (argv, err)
    assert not (tmp_path / "x.fewbits").exists()
