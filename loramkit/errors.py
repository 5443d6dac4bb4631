"""Errors a user can cause. The CLI prints them as one line and exits 1; anything else is a bug."""

from __future__ import annotations


class LoramError(Exception):
    """Base class: the message says what is wrong and what to do."""


class BundleError(LoramError):
    """A bundle is missing, corrupted, tampered with, or of an unsupported version."""


class UnsupportedModelError(LoramError):
    """The base model's architecture is not one loramkit knows how to prune."""


class AdapterError(LoramError):
    """An adapter cannot be recovered: foreign, mismatched shapes, or not plain LoRA."""


class BaseModelError(LoramError):
    """A base model directory is missing files or does not match the bundle."""


class OutputExistsError(LoramError):
    """Refuse to overwrite an existing output unless asked to."""


class DiskFullError(LoramError):
    """The disk (or quota) filled up while writing an output; nothing partial is left."""


class OutputBusyError(LoramError):
    """Another loramkit process is writing the same output right now."""
