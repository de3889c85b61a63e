"""The package version, in one place: ``fewbits.__version__``, the files fewbits writes and
``pyproject.toml`` (``[tool.setuptools.dynamic]``) all read it from here."""

__all__ = ["__version__"]

__version__ = "0.1.0"
