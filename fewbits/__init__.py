"""fewbits: train neural networks whose weights and activations live in very few bits."""

__version__ = "0.1.0"
