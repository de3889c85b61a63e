"""Model zoo: every registered model builds, forwards, trains every parameter, re-creates."""

from __future__ import annotations

import pytest
import torch

from fewbits.models import FAMILIES, create_model, list_models, model_info, register_model

# The seed's ten networks, named as its command names them (FAMILIES has grown past them).
SEED_FAMILIES = ["binary_connect", "binary_net", "binary_weight", "fp_connect", "fp_net",
                 "pow2_connect", "pow2_net", "inq", "min_max"]
SEED_NETS = ["cifar10_resnet23_prediction"] + [
    f"cifar10_{f}_resnet23_prediction" for f in SEED_FAMILIES
]


def _input(name, n=4):
    return torch.rand(n, *model_info(name).input_shape)


def _small(name):
    return {"width": 16} if "width" in model_info(name).defaults else {}


def test_the_ten_seed_networks_are_registered():
    assert len(SEED_NETS) == 10
    assert set(SEED_NETS) <= set(list_models())
    assert list_models("mnist_*_lenet") == sorted(f"mnist_{f}_lenet" for f in FAMILIES)


def test_float_resnet23_has_the_seed_parameter_count():
    m = create_model("cifar10_resnet23_prediction")
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 97_482


@pytest.mark.parametrize("name", list_models())
def test_every_model_forwards_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    kw = _small(name)
    if model_info(name).family == "inq":
        kw["inq_iterations"] = [0, 5]  # half the weights fixed on the first forward
    m = create_model(name, **kw)
    m.train()
    x = _input(name)
    y = m(x)
    assert y.shape == (4, 10) and torch.isfinite(y).all()
    torch.nn.functional.cross_entropy(y, torch.tensor([1, 2, 3, 4])).backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        # INQ's fixed weights get zero gradient by design; min-max ranges only get one where
        # values fall outside them.
        if model_info(name).family != "inq" and not pname.endswith(("qr_min", "qr_max")):
            assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", [*SEED_NETS, "mnist_min_max_lenet", "mnist_inq_mlp",
                                  "mnist_fp_net_mlp_bc", "mnist_binary_net_mlp_bnn"])
def test_spec_re_creates_an_equal_model(name):
    torch.manual_seed(0)
    m = create_model(name, **_small(name))
    spec = m.fewbits_spec
    assert spec["name"] == name
    m2 = create_model(spec["name"], **spec["kwargs"])
    m2.load_state_dict(m.state_dict())
    m.eval()
    m2.eval()
    x = _input(name)
    assert torch.equal(m(x), m2(x))


def test_the_papers_mlps_are_built_with_their_registered_options():
    """A registered net's defaults are what it builds with (not its class's): the papers'
    MLPs have their own widths, output batch norm and dropout."""
    from torch import nn

    from fewbits.layers import QuantAct, QuantLinear

    assert list_models("mnist_*_mlp_bc") == sorted(f"mnist_{f}_mlp_bc" for f in FAMILIES)
    bc = create_model("mnist_binary_connect_mlp_bc")
    linears = [m for m in bc.modules() if isinstance(m, QuantLinear)]
    assert [m.out_features for m in linears] == [1024, 1024, 1024, 10]
    assert all(m.bias is None for m in linears)  # every fc feeds batch norm
    assert isinstance(bc.out_bn, nn.BatchNorm1d) and bc.out_bn.num_features == 10
    assert not any(isinstance(m, nn.Dropout) for m in bc.modules())
    assert bc.fewbits_spec["kwargs"]["out_bn"] is True
    bnn = create_model("mnist_binary_net_mlp_bnn", depth=1)  # the width stays the paper's
    assert [m.out_features for m in bnn.modules() if isinstance(m, QuantLinear)] == [4096, 10]
    assert [m.p for m in bnn.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.5]
    assert [m.quantizer.name for m in bnn.modules() if isinstance(m, QuantAct)] == ["binary_tanh"]
    assert isinstance(bnn.out_bn, nn.BatchNorm1d)
    # the plain MLP keeps its output bias and no batch norm after it
    assert create_model("mnist_float_mlp", width=8).fc.bias is not None
    with pytest.raises(ValueError, match="dropout_hidden must be a probability"):
        create_model("mnist_float_mlp_bnn", width=8, dropout_hidden=1.0)


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet99'.*cifar10_resnet23_prediction"):
        create_model("resnet99")


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="unknown model options \\['bitwidth'\\]"):
        create_model("cifar10_fp_connect_resnet23_prediction", bitwidth=4)


def test_bit_width_reaches_the_quantizers_and_inq_defaults_to_4():
    m = create_model("cifar10_fp_net_resnet23_prediction", bit_width=5, delta=0.125)
    assert m.stem.weight_quantizer.bits == 5 and m.stem.weight_quantizer.delta == 0.125
    assert m.stem_post[1].quantizer.bits == 5  # bn -> q -> relu
    assert create_model("cifar10_inq_resnet23_prediction").stem.weight_quantizer.bits == 4
    inq6 = create_model("cifar10_inq_resnet23_prediction", bit_width=6)
    assert inq6.fc.weight_quantizer.bits == 6


@pytest.mark.parametrize("name", list_models("*_lsq_*"))
def test_lsq_nets_quantize_activations_unsigned_in_place_of_the_relu(name):
    # Esser et al. 2020: each layer's input unsigned after the ReLU. Signed before the ReLU
    # (fp_net's placement) left 2 of the 4 levels at 2 bits: the ReLU cut the negative ones.
    m = create_model(name, bit_width=2, **_small(name))
    acts = [q.quantizer for q in m.modules() if type(q).__name__ == "QuantAct"]
    assert acts and all(not q.signed and (q.qn, q.qp) == (0, 3) for q in acts)
    assert not any(isinstance(x, torch.nn.ReLU) for x in m.modules())  # the quantizer is it
    weights = [q for q in m.modules() if type(q).__name__ == "LSQ" and q not in acts]
    assert weights and all(q.signed for q in weights)
    ramp = torch.linspace(-2, 5, 71)
    for q in acts:
        q(ramp)  # the step starts from the first batch (training mode)
        y = q(ramp * q.step.detach()) / q.step.detach()
        assert set(torch.round(y).tolist()) == {0.0, 1.0, 2.0, 3.0}
        assert y[ramp < 0].eq(0).all() and y[ramp > 3].eq(3).all()


def test_lsq_lenet_reaches_all_four_activation_levels_at_2_bits():
    torch.manual_seed(0)
    m = create_model("mnist_lsq_lenet", bit_width=2, width=16).train()
    acts = [q for q in m.modules() if type(q).__name__ == "QuantAct"]
    seen = {id(q): set() for q in acts}
    hooks = [q.register_forward_hook(lambda mod, i, o: seen[id(mod)].update(
        torch.round(o / mod.quantizer.step).unique().tolist())) for q in acts]
    m(_input("mnist_lsq_lenet", 8))
    for h in hooks:
        h.remove()
    assert len(seen) == 3 and all(v == {0.0, 1.0, 2.0, 3.0} for v in seen.values()), seen


def test_mnist_nets_default_to_a_delta_that_keeps_their_wide_layers_alive():
    m = create_model("mnist_fp_connect_lenet")
    assert m.fc1.weight_quantizer.delta == 2**-7
    assert m.fc1.quantized_weight().count_nonzero() > 0.5 * m.fc1.weight.numel()
    assert create_model("mnist_fp_connect_lenet", delta=0.25).fc1.weight_quantizer.delta == 0.25


def test_register_model_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda: None, name="cifar10_resnet23_prediction")


def test_family_bits_for_reports():
    from fewbits.models import QuantConfig, family

    c = QuantConfig()
    assert family("binary_net").bits(c) == (1, 1)
    assert family("binary_connect").bits(c) == (1, 32)
    assert family("fp_net").bits(QuantConfig(bit_width=5)) == (5, 5)
    assert family("inq").bits(c) == (4, 32)
    assert family("float").bits(c) == (32, 32)
