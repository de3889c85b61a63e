"""Smoke tests of the benchmark scripts, so that they cannot rot: each runs its ``main`` on one
tiny round (batch 2) and the result is checked for shape and sanity, not for speed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import _common as C  # noqa: E402
import quantizer_ops  # noqa: E402
import train_step  # noqa: E402

HAVE_BREVITAS = importlib.util.find_spec("brevitas") is not None


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # main() sets the thread count of this process


def test_train_step_main_tiny(threads, capsys):
    res = train_step.main(["--batch", "2", "--rounds", "1", "--warmup", "0", "--threads", "1",
                           "--nets", "fp_net", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["args"]["batch"] == 2
    d = res["devices"]["cpu"]
    train = d["train"]
    assert list(train) == [C.FLOAT_NET, "cifar10_fp_net_resnet23_prediction"]
    fl, fp = train[C.FLOAT_NET], train["cifar10_fp_net_resnet23_prediction"]
    assert fl["ratio"] == pytest.approx(1.0) and fl["mem_ratio"] == pytest.approx(1.0)
    assert fp["kind"] == "weight+act" and fp["time_target"] == 1.5 and fp["mem_target"] == 1.3
    assert fp["ms"] > 0 and fp["ratio"] > 0 and len(fp["times_s"]) == 1
    # fp_net stores a bool mask per activation quantizer: more memory than float, not less
    assert fp["peak_bytes"] > fl["peak_bytes"] > 0
    assert isinstance(fp["time_ok"], bool) and isinstance(fp["mem_ok"], bool)
    if HAVE_BREVITAS:
        b = d["brevitas"]["fixed_point_const"]
        assert b["fewbits_net"] == "cifar10_fp_net_resnet23_prediction"
        assert b["ratio"] > 0 and b["brevitas_ms"] > 0
        assert "binary_connect" not in d["brevitas"]  # its fewbits net was not selected
    data = d["data"]
    assert 0 < data["share_of_float_step"] < 1 and data["pipeline_ms"] > 0
    text = train_step.format_report(res)
    assert "fp_net" in text and "x float" in text


def test_train_step_rejects_unknown_nets(threads):
    with pytest.raises(SystemExit, match="matches none"):
        train_step.main(["--nets", "no_such_family", "--rounds", "1"])


def test_brevitas_twin_has_the_same_shape():
    if not HAVE_BREVITAS:
        pytest.skip("brevitas is a benchmark extra (pip install brevitas)")
    import brevitas.nn as bnn

    from fewbits.layers import QuantAct, quant_layers
    from fewbits.models import create_model

    torch.manual_seed(0)
    ours = create_model("cifar10_binary_connect_resnet23_prediction")
    torch.manual_seed(0)
    twin = C.brevitas_twin("binary_connect")
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in ours.parameters())
    assert twin.units[1].conv1.weight.equal(ours.units[1].conv1.weight)  # weights copied
    assert twin(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # activations are quantized exactly where the fewbits family quantizes them
    fp = create_model("cifar10_fp_net_resnet23_prediction")
    twin = C.brevitas_twin("fixed_point_const")
    n_act = sum(isinstance(m, QuantAct) for m in fp.modules())
    assert n_act == sum(isinstance(m, bnn.QuantIdentity) for m in twin.modules()) > 0
    assert not list(quant_layers(twin)) and not any(isinstance(m, QuantAct)
                                                   for m in twin.modules())
    with pytest.raises(ValueError, match="known: .*binary_weight"):
        C.brevitas_twin("ternary")


def test_ratios_use_the_adjacent_reference():
    # float 1, a 2 (float around it: 1 and 3), float 3, b 3 (float 3 and 1), float 1
    t = C.Timings({"float": [2.0], "a": [2.0], "b": [3.0]}, "float",
                  {"float": [2.0], "a": [2.0], "b": [2.0]})
    assert t.ratios() == {"float": [1.0], "a": [1.0], "b": [1.5]}
    calls = []
    fns = {"r": lambda: calls.append("r"), "x": lambda: calls.append("x"),
           "y": lambda: calls.append("y")}
    tm = C.interleave(fns, rounds=2, warmup=0, ref="r")
    assert calls == ["r", "x", "r", "y", "r", "r", "y", "r", "x", "r"]
    assert len(tm.times["x"]) == len(tm.near["y"]) == 2


def test_quantizer_ops_main_tiny(threads, capsys):
    res = quantizer_ops.main(["--shape", "2,3,4,4", "--rounds", "1", "--threads", "1",
                              "--only", "fixed_point,binary_tanh"])
    assert set(res) == {"relu", "new:fixed_point", "new:binary_tanh"}
    assert all(r["ms"] > 0 for r in res.values())
    assert "fixed_point" in capsys.readouterr().out


def _model_file(path, name, seed):
    from fewbits import checkpoint
    from fewbits.models import create_model

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_file(path, checkpoint.model_file_payload(create_model(name).eval()))
    return path


def test_deploy_main_tiny(tmp_path):
    # a subprocess: OpenVINO's worker threads must not live on in the test process (a SIGTERM
    # raised there later, as the CLI interrupt tests do, would crash it)
    out_json = tmp_path / "deploy.json"
    run = _model_file(tmp_path / "run" / "model_best.pt", "cifar10_fp_net_resnet23_prediction", 5)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(BENCH)}
    p = subprocess.run([sys.executable, os.path.join(BENCH, "deploy.py"), "--rounds", "1",
                        "--batch", "2", "--threads", "1", "--nets", "fp_net", "--images", "8",
                        "--run", f"fp_net={run.parent}",
                        "--steps", "0", "--data", "/nonexistent", "--json", str(out_json)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "load before:" in p.stdout and "load average" in p.stdout  # the machine load
    res = json.loads(out_json.read_text())
    assert res["nets"] == {"fp_net": f"trained: {run}"}  # the run folder's model file, not seeds
    assert 0.0 <= res["accuracy"]["fp_net"] <= 1.0
    assert res["images"].startswith("synthetic")
    (cfg,) = res["configs"]
    assert (cfg["threads"], cfg["batch"]) == (1, 2)
    rows = cfg["rows"]
    assert rows["ort float"]["ratio"] == pytest.approx(1.0)  # the baseline divides every row
    assert {"torch float", "ort int8 ptq", "fewbits fp_net ort", "fewbits fp_net int"} <= set(rows)
    assert "ISA paths: integer engine" in p.stdout and res["isa"]["int"][-1] == "generic"
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in rows.values())
    agree = cfg["agreement"]["fewbits fp_net ort"]
    assert 0.0 <= agree["top1_agreement"] <= 1.0 and agree["max_rel_logit_diff"] >= 0
    assert cfg["auto"]["fp_net"] in ("int", "openvino", "ort-checked", "ort", "torch")


def test_deploy_run_option_refuses(tmp_path):
    import deploy

    fams = ["fp_net", "min_max"]
    assert deploy.parse_runs(["min_max=a/b=c"], fams) == {"min_max": "a/b=c"}
    for bad, msg in ((["fp_net"], "FAMILY=PATH"), (["binary_net=x"], "not among --nets"),
                     (["fp_net=x", "fp_net=y"], "twice")):
        with pytest.raises(SystemExit, match=msg):
            deploy.parse_runs(bad, fams)
    with pytest.raises(SystemExit, match="no such file"):
        deploy.trained("fp_net", str(tmp_path / "missing"))
    other = _model_file(tmp_path / "lenet.pt", "mnist_fp_net_mlp", 0)
    with pytest.raises(SystemExit, match="not 'cifar10_fp_net_resnet23_prediction'"):
        deploy.trained("fp_net", str(other))  # another net of the family: refused, not timed


def test_binary_engine_main_tiny(threads, tmp_path, capsys):
    import binary_engine

    path = tmp_path / "b.json"
    assert binary_engine.main(["--batch", "2", "--rounds", "1", "--train-steps", "0",
                               "--check", "2", "--data", str(tmp_path / "none"),
                               "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "uniform noise" in out and "| ort_float | 1.00x" in out
    res = json.loads(path.read_text())
    rows = res["rows"]["2"]
    assert rows["ort_float"]["ratio"] == 1.0
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in rows.values())
    assert set(res["check"]) == set(binary_engine.supported_isas()) >= {"generic"}


def _accuracy_args(tmp_path, runs: str) -> list[str]:
    return ["--section", "mnist_mlp_bc", "--dataset", "synthetic", "--nets",
            "mnist_float_mlp_bc,mnist_binary_connect_mlp_bc", "-i", "8", "-v", "4", "-b", "8",
            "--lr-schedule", "cosine", "--threads", "1", "--runs-dir", str(tmp_path / runs),
            "--results-dir", str(tmp_path / f"{runs}-json"), "--doc",
            str(tmp_path / f"{runs}-RESULTS.md"), "--no-plots"]


class _Stop(Exception):
    pass


def test_accuracy_resumes_an_interrupted_benchmark(threads, tmp_path, monkeypatch, capsys):
    """A benchmark stopped mid-run continues where it was: the finished network is reused
    (not trained again), the part-trained one resumes from its checkpoint, and the result
    is the uninterrupted run's, bit for bit (same final weights)."""
    import accuracy

    real_train = accuracy.train
    trained: list[tuple[str, bool]] = []

    def crash_binary_connect(cfg, **kw):
        trained.append((cfg.net, bool(cfg.resume)))
        if cfg.net == "mnist_binary_connect_mlp_bc" and not cfg.resume:
            def stop(i):
                if i == 6:  # after the checkpoint at 4: the process dies here
                    raise _Stop
            return real_train(cfg, on_step=stop)
        return real_train(cfg, **kw)

    monkeypatch.setattr(accuracy, "train", crash_binary_connect)
    with pytest.raises(_Stop):
        accuracy.main(_accuracy_args(tmp_path, "runs"))
    part = tmp_path / "runs" / "mnist_mlp_bc" / "binary_connect-s0"
    assert (part / "checkpoint.pt").is_file() and not (part / "model_final.pt").exists()
    # --finished-only trains nothing: the finished row is written, the other named unfinished
    assert accuracy.main([*_accuracy_args(tmp_path, "runs"), "--finished-only"]) == 0
    assert len(trained) == 2
    sec = json.loads((tmp_path / "runs-json" / "mnist_mlp_bc.json").read_text())
    assert [r["net"] for r in sec["records"]] == ["mnist_float_mlp_bc"]
    assert not sec["complete"] and sec["unfinished"] == ["binary connect"]
    assert "--finished-only" not in sec["command"] and "--no-plots" not in sec["command"]
    doc = (tmp_path / "runs-RESULTS.md").read_text()
    assert "(partial: the run was cut short)" in doc
    assert "the same command continues them): binary connect." in doc
    assert accuracy.main(_accuracy_args(tmp_path, "runs")) == 0
    assert "resuming" in capsys.readouterr().out
    # float was trained once; binary connect started, crashed, then resumed
    assert trained == [("mnist_float_mlp_bc", False), ("mnist_binary_connect_mlp_bc", False),
                       ("mnist_binary_connect_mlp_bc", True)]

    monkeypatch.setattr(accuracy, "train", real_train)
    once_args = _accuracy_args(tmp_path, "once")
    once_args[once_args.index("--nets") + 1] = "mnist_binary_connect_mlp_bc"
    assert accuracy.main(once_args) == 0
    from fewbits.checkpoint import load_model

    resumed, once = (load_model(tmp_path / d / "mnist_mlp_bc" / "binary_connect-s0" /
                                "model_final.pt").state_dict() for d in ("runs", "once"))
    assert list(resumed) == list(once)
    assert all(torch.equal(resumed[k], once[k]) for k in once)
    sec = json.loads((tmp_path / "runs-json" / "mnist_mlp_bc.json").read_text())
    assert sec["complete"] and sec["kind"] == "mnist_mlp_bc"
    assert [r["net"] for r in sec["records"]] == ["mnist_float_mlp_bc",
                                                  "mnist_binary_connect_mlp_bc"]
    assert all(r["iterations"] == 8 for r in sec["records"])
    doc = (tmp_path / "runs-RESULTS.md").read_text()
    # the paper column and the headline check are written from the measured numbers
    bc = next(r for r in sec["records"] if r["family"] == "binary_connect")
    gap = f"{100 * bc['final_error'] - 1.29:+.2f}"
    assert f"| 1.29 ± 0.08 (det.), 1.18 ± 0.04 (stoch.) | {gap} |" in doc
    assert f"reaches {100 * bc['final_error']:.2f} %" in doc
    assert "python benchmarks/accuracy.py --section mnist_mlp_bc" in doc
    assert "![" not in doc  # --no-plots: no image is drawn or linked


def test_accuracy_without_a_gpu_says_not_run(tmp_path, monkeypatch):
    """The GPU section is written as not run where no GPU is present: nothing is trained on
    the CPU instead and nothing is estimated."""
    import accuracy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trained = []
    monkeypatch.setattr(accuracy, "train", lambda cfg, **kw: trained.append(cfg))
    assert accuracy.main(["--section", "cifar10_gpu", "--title", "CIFAR-10 on a GPU",
                          "--dataset", "synthetic", "--nets", "cifar10_*", "--epochs", "30",
                          "-c", "cudnn", "--parallel", "10", "--runs-dir", str(tmp_path / "r"),
                          "--results-dir", str(tmp_path / "j"),
                          "--doc", str(tmp_path / "R.md")]) == 0
    assert not trained and not (tmp_path / "r").exists()
    doc = (tmp_path / "R.md").read_text()
    assert "## CIFAR-10 on a GPU\n\nNot run: no GPU was available.\n" in doc


def test_accuracy_parallel_trains_each_net_in_its_own_process(threads, tmp_path):
    import accuracy

    args = _accuracy_args(tmp_path, "par")
    args[args.index("-i") + 1] = "4"
    args[args.index("--nets") + 1] = "mnist_float_mlp_bc"  # one child: the mechanism, cheaply
    args.remove("--no-plots")  # the one test that draws the plots
    assert accuracy.main([*args, "--parallel", "2"]) == 0
    doc = (tmp_path / "par-RESULTS.md").read_text()
    for png in ("mnist_mlp_bc_curves.png", "mnist_mlp_bc_weights.png"):
        assert f"(img/{png})" in doc and (tmp_path / "img" / png).stat().st_size > 0
    out = tmp_path / "par" / "mnist_mlp_bc"
    assert (out / "float-s0" / "model_final.pt").is_file()
    assert "done: mnist_float_mlp_bc" in (out / "float-s0.log").read_text()  # its child's log
    sec = json.loads((tmp_path / "par-json" / "mnist_mlp_bc.json").read_text())
    assert sec["complete"] and [r["iterations"] for r in sec["records"]] == [4]


def test_accuracy_reuses_a_run_saved_before_the_paper_options_and_no_other():
    """A finished run counts for the benchmark's row only when it trained as the row asks:
    binary connect's stochastic option and the paper's latent-weight options, resolved (unset,
    they follow stochastic; absent from a run saved before they existed, off)."""
    from _papers import paper_options

    old = {"clip_weights": False}  # config.json of a run made before --stochastic existed
    det = {"stochastic": False, "clip_weights": None, "uniform_init": None,
           "glorot_lr_scale": None}
    stoch = {**det, "stochastic": True}
    assert paper_options(old) == paper_options(det) == (False,) * 4
    assert paper_options(stoch) == (True,) * 4
    assert paper_options({"stochastic": True, "clip_weights": False}) != paper_options(stoch)
    assert paper_options({**stoch, "glorot_lr_scale": False}) == (True, True, True, False)
