"""Model zoo: ``list_models``, ``create_model``, ``register_model`` and the family table."""

from .families import FAMILIES, Family, QuantConfig, Recipe, family
from .nets import MLP, PAPER_MLPS, RESNET23_UNITS, LeNet, ResNet23
from .registry import (
    ModelInfo,
    create_model,
    is_model,
    list_models,
    model_info,
    register_factory,
    register_model,
)

__all__ = [
    "FAMILIES",
    "MLP",
    "PAPER_MLPS",
    "RESNET23_UNITS",
    "Family",
    "LeNet",
    "ModelInfo",
    "QuantConfig",
    "Recipe",
    "ResNet23",
    "create_model",
    "family",
    "is_model",
    "list_models",
    "model_info",
    "register_factory",
    "register_model",
]
