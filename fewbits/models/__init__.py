"""Model zoo: ``list_models``, ``create_model``, ``register_model`` and the family table."""

from .families import FAMILIES, Family, QuantConfig, Recipe, family
from .nets import MLP, RESNET23_UNITS, LeNet, ResNet23
from .registry import create_model, is_model, list_models, register_model

__all__ = [
    "FAMILIES",
    "MLP",
    "RESNET23_UNITS",
    "Family",
    "LeNet",
    "QuantConfig",
    "Recipe",
    "ResNet23",
    "create_model",
    "family",
    "is_model",
    "list_models",
    "register_model",
]
