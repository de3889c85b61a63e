"""The model zoo: the seed's CIFAR-10 ResNet-23 in every family, and small MNIST networks.

Architectures are data: ``RESNET23_UNITS`` is the stage table, and a family's
:class:`~fewbits.models.families.Recipe` says what follows each convolution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers import QuantAct, QuantConv2d, QuantLinear
from ..quantizers import get
from .families import FAMILIES, Family, QuantConfig, family
from .registry import register_model

__all__ = ["MLP", "NNABLA_NO_FC_BIAS", "PAPER_MLPS", "RESNET23_UNITS", "LeNet", "NNablaBatchNorm2d",
           "ResNet23"]

#: ResNet-23 units: (channels, downsample after the unit). 32 -> 16 -> 8 -> 4.
RESNET23_UNITS: tuple[tuple[int, bool], ...] = (
    (64, False), (64, True), (64, False), (64, True), (64, False), (64, True), (64, False),
)


#: Families whose final affine NNabla's example builds without a bias (``models.py``:
#: ``min_max_quantized_affine(..., with_bias=False)``); ``ResNet23(nnabla=True)`` follows it.
NNABLA_NO_FC_BIAS: tuple[str, ...] = ("min_max",)


class NNablaBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose evaluation forward is NNabla's test-mode batch norm, operation
    for operation in the input's dtype (``BatchNormalization::forward_impl_global`` in
    ``src/nbla/function/generic/batch_normalization.cpp``; ``eps`` = 1e-5,
    ``PF.batch_normalization``'s default; a correctly rounded square root, as ``std::sqrt``)::

        y = ((x - mean) * gamma) / sqrt(var + eps) + beta

    ``nn.BatchNorm2d`` folds the same formula into ``x * scale + shift``; the two differ in the
    last bit, which moves an activation quantized right after batch norm (``fp_net``,
    ``pow2_net``, ``min_max``) across a rounding boundary of its grid. Networks imported from
    NNabla (:mod:`fewbits.nnabla`) use this module; training mode (batch statistics) is the
    parent's. Shapes: ``(N, C, H, W)`` in and out; no gradient change (autograd of the formula).

        >>> bn = NNablaBatchNorm2d(2).eval()
        >>> bn(torch.ones(1, 2, 1, 1)).flatten().tolist()
        [0.9999949932098389, 0.9999949932098389]
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.running_mean is None or self.running_var is None:
            return super().forward(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x - self.running_mean.reshape(shape)
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        v = self.running_var.reshape(shape) + self.eps
        # std::sqrt is correctly rounded; torch.sqrt of float32 on the CPU is not always (1 ulp
        # off, e.g. at 0.33475357): the square root in float64, rounded once, is.
        y = y / (torch.sqrt(v.double()).to(v.dtype) if v.dtype == torch.float32 else v.sqrt())
        return y + self.bias.reshape(shape) if self.bias is not None else y


def _ops(ops: tuple[str, ...], channels: int, fam: Family, cfg: QuantConfig,
         dim: int = 2, bn2d: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    bn = bn2d if dim == 2 else nn.BatchNorm1d
    make = {
        "bn": lambda: bn(channels),
        "relu": lambda: nn.ReLU(inplace=False),
        "q": lambda: QuantAct(fam.act(cfg)),
        "uq": lambda: _unsigned_act(fam, cfg),
        "btanh": lambda: QuantAct("binary_tanh"),
    }
    return nn.Sequential(*(make[o]() for o in ops))


def _unsigned_act(fam: Family, cfg: QuantConfig) -> nn.Module:
    spec = fam.act(cfg)
    if spec is None or "signed" not in get(spec).config():
        raise ValueError(f"family {fam.name!r}: recipe op 'uq' needs a signed/unsigned "
                         f"activation quantizer, got {spec!r}")
    return QuantAct({**spec, "signed": False})


def _merge(op: str, fam: Family, cfg: QuantConfig) -> nn.Module:
    if op == "relu":
        return nn.ReLU()
    return _unsigned_act(fam, cfg) if op == "uq" else QuantAct("binary_tanh")


class _Base(nn.Module):
    def __init__(self, fam: Family, cfg: QuantConfig) -> None:
        super().__init__()
        self.family, self.cfg = fam.name, cfg
        self._fam = fam
        self.bn2d: type[nn.Module] = nn.BatchNorm2d

    def conv(self, cin: int, cout: int, k: int) -> QuantConv2d:
        return QuantConv2d(cin, cout, k, padding=k // 2, bias=False,
                           weight_quantizer=self._fam.weight(self.cfg))

    def linear(self, cin: int, cout: int, hidden: bool = False, bias: bool = True) -> QuantLinear:
        # Hidden layers feed batch norm, which cancels a bias: leave it out, as for convs.
        return QuantLinear(cin, cout, bias=bias and not hidden,
                           weight_quantizer=self._fam.weight(self.cfg),
                           bias_quantizer=None if hidden else self._fam.bias(self.cfg))


class _ResUnit(nn.Module):
    def __init__(self, net: _Base, c: int, down: bool, fam: Family, cfg: QuantConfig) -> None:
        super().__init__()
        r, bn = fam.recipe, net.bn2d
        self.conv1, self.post1 = net.conv(c, c // 2, 1), _ops(r.inner, c // 2, fam, cfg, 2, bn)
        self.conv2 = net.conv(c // 2, c // 2, 3)
        self.post2 = _ops(r.inner, c // 2, fam, cfg, 2, bn)
        self.conv3, self.post3 = net.conv(c // 2, c, 1), _ops(r.last, c, fam, cfg, 2, bn)
        self.merge = _merge(r.merge, fam, cfg)
        self.pool = nn.MaxPool2d(2, 2) if down else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.post1(self.conv1(x))
        h = self.post2(self.conv2(h))
        h = self.post3(self.conv3(h))
        return self.pool(self.merge(h + x))


class ResNet23(_Base):
    """The seed's CIFAR-10 ResNet-23: stem 3x3 conv, 7 bottleneck units (``RESNET23_UNITS``),
    global 4x4 average pool, affine to ``num_classes``. Input: float images in ``[0, 1]``.
    The float network has 97,482 trainable parameters.

    ``nnabla=True`` computes what the NNabla example's network computes, for networks imported
    from its parameter files (:mod:`fewbits.nnabla`): batch norm in NNabla's operation order
    (:class:`NNablaBatchNorm2d`) and no bias on the final affine of the families in
    :data:`NNABLA_NO_FC_BIAS`."""

    def __init__(self, fam: Family, cfg: QuantConfig, num_classes: int = 10,
                 in_channels: int = 3, units: tuple[tuple[int, bool], ...] = RESNET23_UNITS,
                 nnabla: bool = False):
        super().__init__(fam, cfg)
        if nnabla:
            self.bn2d = NNablaBatchNorm2d
        c0 = units[0][0]
        self.stem = self.conv(in_channels, c0, 3)
        self.stem_post = _ops(fam.recipe.stem, c0, fam, cfg, 2, self.bn2d)
        self.units = nn.Sequential(*(_ResUnit(self, c, d, fam, cfg) for c, d in units))
        self.fc = self.linear(units[-1][0], num_classes,
                              bias=not (nnabla and fam.name in NNABLA_NO_FC_BIAS))

    def forward(self, x: Tensor) -> Tensor:
        h = self.units(self.stem_post(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class LeNet(_Base):
    """LeNet-5 style MNIST net: conv5x5(20) -> pool -> conv5x5(50) -> pool -> fc(500) -> fc.

    Each conv/fc is followed by the family's ``inner`` recipe (batch norm and activation)."""

    def __init__(self, fam: Family, cfg: QuantConfig, num_classes: int = 10,
                 in_channels: int = 1, width: int = 500) -> None:
        super().__init__(fam, cfg)
        r = fam.recipe.inner
        self.conv1, self.post1 = self.conv(in_channels, 20, 5), _ops(r, 20, fam, cfg)
        self.conv2, self.post2 = self.conv(20, 50, 5), _ops(r, 50, fam, cfg)
        self.fc1 = self.linear(50 * 7 * 7, width, hidden=True)
        self.post3 = _ops(r, width, fam, cfg, dim=1)
        self.fc2 = self.linear(width, num_classes)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(self.post1(self.conv1(x)))
        h = self.pool(self.post2(self.conv2(h)))
        return self.fc2(self.post3(self.fc1(torch.flatten(h, 1))))


class MLP(_Base):
    """A permutation-invariant MNIST MLP: ``depth`` hidden layers of ``width`` units, each
    fc -> the family's ``inner`` recipe (batch norm, activation), then the output fc.

    Options for the papers' own networks (registered as ``mnist_<family>_mlp_bc`` and
    ``mnist_<family>_mlp_bnn``, see :data:`PAPER_MLPS`): ``out_bn`` puts batch norm after the
    output fc (both papers do; the fc then has no bias, which batch norm would cancel),
    ``dropout_in`` / ``dropout_hidden`` are dropout probabilities on the input and after each
    hidden layer (BinaryNet's MNIST MLP: 0.2 / 0.5). Shapes: ``(N, C, H, W)`` with
    ``C * H * W == in_features`` (or ``(N, in_features)``) -> ``(N, num_classes)`` logits.
    """

    def __init__(self, fam: Family, cfg: QuantConfig, num_classes: int = 10,
                 in_features: int = 784, width: int = 1024, depth: int = 3,
                 out_bn: bool = False, dropout_in: float = 0.0,
                 dropout_hidden: float = 0.0) -> None:
        super().__init__(fam, cfg)
        for name, p in (("dropout_in", dropout_in), ("dropout_hidden", dropout_hidden)):
            if not 0.0 <= float(p) < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        if dropout_in:
            layers.append(nn.Dropout(dropout_in))
        cin = in_features
        for _ in range(depth):
            layers += [self.linear(cin, width, hidden=True),
                       _ops(fam.recipe.inner, width, fam, cfg, dim=1)]
            if dropout_hidden:
                layers.append(nn.Dropout(dropout_hidden))
            cin = width
        self.body = nn.Sequential(*layers)
        self.fc = self.linear(cin, num_classes, hidden=out_bn)
        self.out_bn = nn.BatchNorm1d(num_classes) if out_bn else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.out_bn(self.fc(self.body(x)))


#: The papers' MNIST MLPs, registered in every family as ``mnist_<family>_mlp_<key>``.
#: ``bc``: BinaryConnect (Courbariaux, Bengio, David 2015, section 3.1): 3 hidden layers of
#: 1024 ReLU units with batch norm, output layer followed by batch norm, no dropout.
#: ``bnn``: BinaryNet (Courbariaux, Hubara et al. 2016, Theano version): 3 hidden layers of
#: 4096 units with batch norm and (in the binary_net family) binary tanh, output batch norm,
#: dropout 0.2 on the input and 0.5 after each hidden layer. Both papers train with a square
#: hinge (L2-SVM) loss; fewbits trains with softmax cross-entropy (docs/RESULTS.md says so).
PAPER_MLPS: dict[str, dict[str, Any]] = {
    "bc": {"width": 1024, "depth": 3, "out_bn": True, "dropout_in": 0.0,
           "dropout_hidden": 0.0},
    "bnn": {"width": 4096, "depth": 3, "out_bn": True, "dropout_in": 0.2,
            "dropout_hidden": 0.5},
}


def _register(name: str, arch: type[_Base], fam_name: str, arch_defaults: dict[str, Any],
              input_shape: tuple[int, int, int], dataset: str,
              quant_defaults: dict[str, Any] | None = None) -> None:
    arch_keys = set(arch_defaults)

    def build(**kwargs: Any) -> nn.Module:
        # The registered defaults are the net's (a paper MLP's width and output batch norm),
        # not the class's: build with them, so the model is the one its spec records.
        arch_kw = {**arch_defaults, **{k: kwargs.pop(k) for k in list(kwargs) if k in arch_keys}}
        cfg = QuantConfig.from_kwargs({**(quant_defaults or {}), **kwargs})
        model = arch(family(fam_name), cfg, **arch_kw)
        full = {**arch_kw, **cfg.to_dict()}
        model.fewbits_spec = {"name": name, "kwargs": full}
        return model

    build.__name__ = name
    build.__doc__ = f"{arch.__name__} in the {fam_name} family: {FAMILIES[fam_name].doc}."
    defaults = {**arch_defaults, **QuantConfig.from_kwargs(quant_defaults or {}).to_dict()}
    register_model(build, name=name, input_shape=input_shape, dataset=dataset, family=fam_name,
                   defaults=defaults)


# The MNIST nets' widest layers have fan-in 784-2450, so their initial weights (|w| < 0.036)
# would all round to 0 at the seed's delta = 2**-4 and the layer would be dead from the start.
_MNIST_Q = {"delta": 2**-7}


def _register_all() -> None:
    for fam in FAMILIES:
        cifar = ("cifar10_resnet23_prediction" if fam == "float"
                 else f"cifar10_{fam}_resnet23_prediction")
        _register(cifar, ResNet23, fam, {"num_classes": 10, "in_channels": 3, "nnabla": False},
                  (3, 32, 32),
                  "cifar10")
        _register(f"mnist_{fam}_lenet", LeNet, fam,
                  {"num_classes": 10, "in_channels": 1, "width": 500}, (1, 28, 28), "mnist",
                  _MNIST_Q)
        _register(f"mnist_{fam}_mlp", MLP, fam, {"num_classes": 10, "in_features": 784,
                                                 "width": 1024, "depth": 3}, (1, 28, 28),
                  "mnist", _MNIST_Q)
        for key, arch in PAPER_MLPS.items():
            _register(f"mnist_{fam}_mlp_{key}", MLP, fam,
                      {"num_classes": 10, "in_features": 784, **arch}, (1, 28, 28), "mnist",
                      _MNIST_Q)


_register_all()
