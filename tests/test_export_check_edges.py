"""Edges of the check ``to_onnx`` makes of every graph against PyTorch (QA of issue 22's
merge): what the model returns (masks), and what export leaves of the caller's model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewbits.export.onnx import compare_onnx, to_onnx
from fewbits.runtime.agreement import check_outputs, leaf_error

pytest.importorskip("onnxruntime")


class _Masks(nn.Module):
    """Logits, a bool mask and an integer index: the leaves a model may return."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 5)
        self.bn = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.drop(self.bn(self.fc(x)))
        return y, y > 0, y.argmax(1)


def test_a_bool_output_is_checked_not_crashed_on() -> None:
    """``abs()`` of a bool mask raised NotImplementedError: a correct graph was refused with a
    crash. A mask is compared exactly: one flip is the whole range."""
    torch.manual_seed(0)
    x = torch.rand(4, 8)
    proto, _ = to_onnx(_Masks().eval(), x)  # checked against PyTorch, accepted
    assert proto.graph.output[1].type.tensor_type.elem_type == 9  # BOOL
    mask = torch.tensor([[True, False], [False, False]])
    assert leaf_error(mask, mask.clone()) == 0.0
    assert check_outputs(~mask, mask, 1e-3) is not None


def test_export_gives_a_model_in_train_mode_back_in_train_mode() -> None:
    """Exporting mid-training switched the caller's model to eval for good: training went on
    with frozen batch-norm statistics and no dropout, silently. The graph is the eval form."""
    torch.manual_seed(0)
    m = _Masks().train()
    m.drop.eval()  # a module the caller keeps in eval stays so
    x = torch.rand(4, 8)
    proto, _ = to_onnx(m, x)
    assert m.training and m.bn.training and not m.drop.training
    assert compare_onnx(m, proto, x)["max_rel"] < 1e-5  # eval form, deterministic
    assert m.training and m.bn.training


def test_an_inf_in_the_reference_does_not_hide_other_differences() -> None:
    """An inf in PyTorch's output made the range inf: every other difference scored 0, and -inf
    or a finite value in its place passed, so the check accepted any graph. Non-finite values
    must match exactly; the finite ones are measured on their own range."""
    inf, nan = float("inf"), float("nan")
    ref = torch.tensor([[inf, 1.0, 2.0], [nan, -inf, 3.0]])
    assert leaf_error(ref.clone(), ref) == 0.0  # the model's own inf and NaN, reproduced
    for wrong in ([[inf, 5.0, -7.0], [nan, -inf, 3.0]], [[-inf, 1.0, 2.0], [nan, -inf, 3.0]],
                  [[1e30, 1.0, 2.0], [nan, -inf, 3.0]], [[inf, 1.0, 2.0], [-inf, nan, 3.0]]):
        assert check_outputs(torch.tensor(wrong), ref, 0.08) is not None, wrong
    assert leaf_error(torch.tensor([[inf, 1.0, 2.003]]), ref[:1]) == pytest.approx(1.5e-3, rel=0.01)


def test_cli_refuses_a_wrong_graph_naming_its_flags(tmp_path, broken_fuse, capsys) -> None:
    """``fewbits export --onnx --fuse`` of a graph ONNX Runtime runs wrong: exit 1, nothing
    written, and the message names the command line's way out (it named ``check=False`` and
    ``fuse=False`` only); ``--no-check`` writes it."""
    from fewbits.cli import main
    from fewbits.export import export_packed
    from fewbits.models import create_model

    torch.manual_seed(0)
    packed, out = tmp_path / "m.fewbits", tmp_path / "m.onnx"
    export_packed(create_model("mnist_fp_net_mlp", width=8).eval(), packed)
    assert main(["export", str(packed), "--onnx", str(out), "--fuse"]) == 1
    err = capsys.readouterr().err
    assert "graph is wrong" in err and "without --fuse" in err and "--no-check" in err, err
    assert not out.exists()
    assert main(["export", str(packed), "--onnx", str(out), "--fuse", "--no-check"]) == 0
    assert out.exists()
