"""Typed errors whose messages tell a user what to change.

The CLI prints these without a traceback and exits non-zero; anything else is a bug.
"""


class FedllmError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(FedllmError):
    """A configuration key or value is not allowed."""


class DataError(FedllmError):
    """A data file is missing or malformed."""


class ModelError(FedllmError):
    """A base model cannot be loaded or does not fit fedllm."""
