"""Fast CPU paths: XNOR / popcount convolutions are exact on +-1 data (both backends), int8 layers
reproduce the rebuilt network (bit for bit where the float network is itself exact), and the
inference-only quantizers compute the very values of the training ones."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from fewbits.export import export_packed, load_packed
from fewbits.export.runtime import (
    _FastAct,
    _inplace_bn,
    _int8_weight,
    compile_for_cpu,
    pack_signs,
    xnor_backend,
    xnor_conv2d,
)
from fewbits.layers import QuantAct, QuantConv2d
from fewbits.models import create_model
from fewbits.quantizers import BinaryTanh, FixedPoint, MinMax

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = ["torch"] + (["c"] if shutil.which("cc") or shutil.which("gcc") else [])


def _pm1(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)


def test_c_kernel_builds_where_a_compiler_exists():
    assert xnor_backend() == ("c" if "c" in BACKENDS else "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_signs_bit_order(backend):
    x = torch.tensor([1.0, -1.0, 1.0, 1.0] + [-1.0] * 60 + [1.0]).reshape(1, 65, 1, 1)
    words = pack_signs(x, backend)
    assert words.shape == (1, 1, 1, 2)
    assert words[0, 0, 0].tolist() == [0b1101, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,h,w,o,k,pad,stride", [
    (2, 3, 5, 7, 4, 3, 1, 1),     # channels far below a word, zero padding on every side
    (3, 64, 6, 6, 8, 1, 0, 1),    # one full word
    (2, 70, 9, 8, 5, 3, 1, 2),    # two words, the second partial; stride 2
    (1, 130, 4, 5, 3, 2, 0, 1),   # three words, even kernel
    (2, 32, 4, 4, 6, 3, 2, 1),    # padding wider than the kernel reach on corners
])
def test_xnor_conv_equals_float_conv_exactly(backend, n, c, h, w, o, k, pad, stride):
    x, wt = _pm1(n, c, h, w, seed=1), _pm1(o, c, k, k, seed=2)
    ref = nn.functional.conv2d(x, wt, padding=pad, stride=stride)
    got = xnor_conv2d(x, wt, padding=pad, stride=stride, backend=backend)
    assert torch.equal(got, ref)


def test_xnor_rejects_non_binary_weights():
    with pytest.raises(ValueError, match="\\+-1"):
        xnor_conv2d(_pm1(1, 2, 3, 3), torch.full((1, 2, 1, 1), 0.5))


@pytest.mark.parametrize("name,kind", [
    ("mnist_fp_net_lenet", "int8"),
    ("mnist_fp_net_mlp", "int8"),
    ("mnist_binary_net_lenet", "xnor"),
])
def test_exact_families_compile_to_identical_logits(name, kind, tmp_path, trained):
    # fixed point with delta = 2^-k and +-1 values: the float network's convs are exact sums
    # too, so the integer path must agree bit for bit
    m = trained(name, width=32)
    export_packed(m, tmp_path / "m.fewbits")
    fast = compile_for_cpu(tmp_path / "m.fewbits")
    assert fast.kind == kind
    assert next(iter(fast.plan.values())) == "float"  # the first layer sees float pixels
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_packed(tmp_path / "m.fewbits")(x)
    assert torch.equal(fast(x), ref)
    assert torch.equal(compile_for_cpu(m)(x), ref)  # from the live model: the same


def test_binary_net_resnet23_compiles_to_identical_logits():
    m = create_model("cifar10_binary_net_resnet23_prediction").eval()
    fast = compile_for_cpu(m)
    assert fast.kind == "xnor"
    assert sum(v == "xnor" for v in fast.plan.values()) == 21  # every unit conv
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fast(x), m(x))


def test_min_max_int8_agrees_to_float_rounding(tmp_path, trained):
    m = trained("mnist_min_max_lenet", width=32)
    fast = compile_for_cpu(m)
    assert fast.kind == "int8"
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(x)
    got = fast(x)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_weight_only_family_has_no_integer_path(tmp_path, trained):
    m = trained("mnist_fp_connect_lenet", width=16)
    fast = compile_for_cpu(m)
    assert fast.kind is None and set(fast.plan.values()) == {"float"}
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fast(x), m(x))


class _Wide(nn.Module):
    """ReLU of a sum of three 8-bit fixed-point tensors (levels 0..381) into a fixed-point conv."""

    def __init__(self) -> None:
        super().__init__()
        fp = {"name": "fixed_point", "n": 8, "delta": 2**-4}
        self.a, self.b, self.c = QuantAct(fp), QuantAct(fp), QuantAct(fp)
        self.relu = nn.ReLU()
        self.conv = QuantConv2d(2, 3, 3, padding=1, bias=False,
                                weight_quantizer={"name": "fixed_point", "n": 8,
                                                  "delta": 2**-4})

    def forward(self, x):
        return self.conv(self.relu(self.a(x) + self.b(2 * x) + self.c(3 * x)))


def test_wide_grid_falls_back_to_float_when_a_value_leaves_the_window():
    torch.manual_seed(0)
    m = _Wide().eval()
    fast = compile_for_cpu(m)
    assert fast.plan == {"conv": "int8"}
    small = torch.rand(2, 2, 5, 5) * 2  # sums <= 12 < 255 * 2^-4: int8 path
    big = torch.full((2, 2, 5, 5), 7.0)  # 7 + 7.94 + 7.94 > 15.94: float path
    with torch.no_grad():
        assert torch.equal(fast(small), m(small))
        assert fast.fallbacks == 0
        assert torch.equal(fast(big), m(big))
        assert fast.fallbacks == 1


def test_fast_activations_equal_the_quantizers():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 4,
                   (torch.arange(-300, 300) + 0.5) / 16,  # fixed-point ties
                   torch.tensor([0.0, -0.0, 100.0, -100.0])])
    mm = MinMax(init_min=-1.37, init_max=2.9)
    scale, _, lo, _ = mm.grid(torch.zeros(()))
    x = torch.cat([x, lo + scale * (torch.arange(0, 255) + 0.5)])  # min-max ties
    for q in (FixedPoint(n=8, delta=2**-4), FixedPoint(sign=False, n=4, delta=0.3),
              FixedPoint(n=5, delta=0.1), mm, BinaryTanh()):
        q.eval()
        with torch.no_grad():
            assert torch.equal(_FastAct(q)(x), q(x)), q


@pytest.mark.parametrize("shape", [(5, 24, 7, 9), (1, 24, 1, 1), (130, 24)])
def test_inplace_batch_norm_is_batch_norm_to_the_bit(shape):
    g = torch.Generator().manual_seed(0)
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(24).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=g)
        bn.running_var.uniform_(0.2, 3, generator=g)
        bn.weight.uniform_(-1.5, 1.5, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
        fast = _inplace_bn(bn)
        assert fast is not None
        x = torch.randn(*shape, generator=g) * 5
        layouts = [x] + ([x.contiguous(memory_format=torch.channels_last)] if x.dim() == 4
                         else [])
        for t in layouts:
            y = t.clone()
            assert fast(y).data_ptr() == y.data_ptr()  # in place
            assert torch.equal(y, bn(t))


def test_int8_weight_forms():
    w = torch.tensor([[0.5, -0.25, 0.0], [1.0, 0.125, -2.0]])  # INQ-like powers of two
    k, s = _int8_weight(w, None)
    assert torch.equal(k.float() * s[:, None], w)
    alpha = torch.tensor([[0.3], [0.7]]) * torch.tensor([[1.0, -1.0, 1.0]])  # +-alpha per row
    k, s = _int8_weight(alpha, None)
    assert set(k.unique().tolist()) == {-1, 1}
    assert torch.allclose(k.float() * s[:, None], alpha)
    assert _int8_weight(torch.tensor([[0.1, 0.2, 0.33]]), None) is None  # no int8 grid
