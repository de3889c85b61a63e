"""fewbits: train neural networks whose weights and activations live in very few bits, and ship
them in their small form.

Layers of the library, each small:

* :mod:`fewbits.functional` - quantizer formulas as straight-through autograd functions;
* :mod:`fewbits.quantizers` - quantizer modules with state and bit widths (``get`` resolves specs);
* :mod:`fewbits.layers` - ``QuantConv2d`` / ``QuantLinear`` drop-in layers;
* :mod:`fewbits.models` - the model zoo (``list_models``, ``create_model``);
* :mod:`fewbits.convert` - ``quantize_`` any PyTorch model, ``calibrate`` activation ranges;
* :mod:`fewbits.batch_norm` - ``recalibrate_bn``: batch-norm statistics under inference weights.
"""

from . import functional, layers, models, quantizers
from ._version import __version__
from .batch_norm import recalibrate_bn
from .convert import calibrate, family_config, quantize_
from .layers import QuantAct, QuantConv2d, QuantLinear, apply_weight_constraints
from .models import create_model, list_models, register_model

__all__ = [
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "__version__",
    "apply_weight_constraints",
    "calibrate",
    "create_model",
    "family_config",
    "functional",
    "layers",
    "list_models",
    "models",
    "quantize_",
    "quantizers",
    "recalibrate_bn",
    "register_model",
]
