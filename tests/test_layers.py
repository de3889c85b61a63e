"""Quantized layers: equal to their torch parents without quantizers, state round trips."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from fewbits import QuantAct, QuantConv2d, QuantLinear, apply_weight_constraints
from fewbits.functional import binary_connect, fixed_point_quantize
from fewbits.quantizers import list_quantizers

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _pair(kind, device, seed=0):
    torch.manual_seed(seed)
    if kind == "conv":
        parent = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True, dilation=1, groups=1)
        x = torch.randn(4, 3, 9, 9)
    else:
        parent = nn.Linear(7, 5)
        x = torch.randn(4, 7)
    torch.manual_seed(seed)
    child = (QuantConv2d(3, 5, 3, stride=2, padding=1, bias=True) if kind == "conv"
             else QuantLinear(7, 5))
    return parent.to(device), child.to(device), x.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_without_quantizers_a_layer_equals_its_torch_parent(kind, device):
    parent, child, x = _pair(kind, device)
    assert isinstance(child, type(parent))
    assert torch.equal(parent.weight, child.weight) and torch.equal(parent.bias, child.bias)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = parent(x1), child(x2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(parent.weight.grad, child.weight.grad)
    assert torch.equal(parent.bias.grad, child.bias.grad)
    assert set(parent.state_dict()) == set(child.state_dict())


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_weight_is_what_the_forward_uses(device):
    torch.manual_seed(0)
    layer = QuantConv2d(2, 3, 3, padding=1, weight_quantizer="binary_connect",
                        input_quantizer={"name": "fixed_point", "n": 4, "delta": 0.25},
                        output_quantizer="binary_tanh").to(device)
    x = torch.randn(2, 2, 5, 5, device=device)
    xq = fixed_point_quantize(x, n=4, delta=0.25)
    ref = torch.nn.functional.conv2d(xq, binary_connect(layer.weight), layer.bias, padding=1)
    ref = torch.where(ref > 0, 1.0, -1.0)
    assert torch.equal(layer(x), ref)
    assert torch.equal(layer.quantized_weight().abs(), torch.ones_like(layer.weight))


def test_weight_gradient_is_the_straight_through_estimate():
    torch.manual_seed(0)
    layer = QuantLinear(4, 3, bias=False, weight_quantizer={"name": "fixed_point", "n": 3,
                                                            "delta": 0.25})
    with torch.no_grad():
        layer.weight[0, 0] = 5.0  # outside [-0.75, 0.75]: the STE blocks its gradient
    x = torch.randn(6, 4)
    layer(x).sum().backward()
    expect = x.sum(0).expand(3, 4).clone()
    expect[0, 0] = 0.0
    assert torch.allclose(layer.weight.grad, expect)


@pytest.mark.parametrize("name", list_quantizers())
def test_every_quantizer_works_in_a_layer_and_round_trips(name):
    torch.manual_seed(0)
    spec = {"name": name, "inq_iterations": [0, 1]} if name == "inq" else name
    act_ok = name not in ("inq",)
    kw = {"weight_quantizer": spec}
    if act_ok:
        kw["input_quantizer"] = spec if name not in ("binary_weight",) else None
    layer = QuantConv2d(3, 4, 3, padding=1, **kw)
    x = torch.randn(2, 3, 6, 6)
    layer.train()
    y = layer(x)
    y.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    other = QuantConv2d(3, 4, 3, padding=1, **kw)
    other.load_state_dict(torch.load(buf))
    layer.eval()
    other.eval()
    assert torch.equal(layer(x), other(x))


def test_binary_weight_on_a_bias_is_refused_clearly():
    with pytest.raises(ValueError, match="output-channel axis"):
        QuantLinear(3, 2, weight_quantizer="binary_weight", bias_quantizer="binary_weight")


def test_unknown_quantizer_name_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*fixed_point"):
        QuantLinear(3, 2, weight_quantizer="fixed-point")


def test_nan_in_weights_raises_naming_the_function():
    layer = QuantLinear(3, 2, weight_quantizer="pow2")
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="pow2_quantize: x contains NaN"):
        layer(torch.randn(1, 3))


def test_weight_constraints_clip_only_when_asked():
    a = QuantLinear(3, 2, weight_quantizer={"name": "binary_connect", "clip_weights": True})
    b = QuantLinear(3, 2, weight_quantizer="binary_connect")
    for layer in (a, b):
        with torch.no_grad():
            layer.weight.fill_(3.0)
    model = nn.Sequential(a, b)
    apply_weight_constraints(model)
    assert torch.all(a.weight == 1.0) and torch.all(b.weight == 3.0)


def test_quant_act_none_is_identity():
    x = torch.randn(5)
    assert QuantAct(None)(x) is x
