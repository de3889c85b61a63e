"""Exceptions raised by :mod:`fewbits.data`; each message says what is wrong and how to fix it."""

from __future__ import annotations

__all__ = ["ChecksumError", "CorruptDataError", "DatasetNotFoundError"]


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not on disk and could not (or may not) be downloaded.

    The message names the exact paths where the files are expected and the URL(s) to get them.
    """


class ChecksumError(ValueError):
    """A downloaded file's MD5 differs from the published one (truncated or tampered download)."""


class CorruptDataError(ValueError):
    """A dataset file exists but cannot be parsed (bad magic number, wrong size, bad image...).

    The message names the offending file.
    """
