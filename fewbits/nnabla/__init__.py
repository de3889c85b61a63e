"""Bring networks trained with Sony NNabla's CIFAR-10 quantization example over to fewbits.

:func:`read_parameters` reads NNabla's parameter files (``nn.save_parameters`` ``.h5``,
``.nnp`` archives, the ``.protobuf`` form) without NNabla; :func:`load_parameters` maps them
onto a ``cifar10_<family>_resnet23_prediction`` built with ``nnabla=True`` (NNabla's batch-norm
order, its final affine), checking every name, shape, value and stored derived copy. The CLI
is ``fewbits import-nnabla`` (README, "Coming from NNabla").

    >>> from fewbits.models import create_model
    >>> model = create_model("cifar10_fp_net_resnet23_prediction", nnabla=True)
    >>> report = load_parameters("monitor.fpnet/params_040000.h5", model)  # doctest: +SKIP
"""

from .files import (
    MAX_ELEMENTS,
    MAX_FILE_BYTES,
    MAX_NAME_LENGTH,
    MAX_NDIM,
    MAX_PARAMETERS,
    NNablaImportError,
    decode_parameter_protobuf,
    read_parameters,
)
from .mapping import (
    LAYER_SCOPES,
    NNABLA_INQ_BITS,
    ImportReport,
    expected_parameters,
    file_iteration,
    load_parameters,
)

__all__ = [
    "LAYER_SCOPES",
    "MAX_ELEMENTS",
    "MAX_FILE_BYTES",
    "MAX_NAME_LENGTH",
    "MAX_NDIM",
    "MAX_PARAMETERS",
    "NNABLA_INQ_BITS",
    "ImportReport",
    "NNablaImportError",
    "decode_parameter_protobuf",
    "expected_parameters",
    "file_iteration",
    "load_parameters",
    "read_parameters",
]
