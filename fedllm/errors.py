"""Typed errors whose messages tell a user what to change.

The CLI prints these without a traceback and exits non-zero; anything else is a bug.
"""


# how a refused state-store file is fixed: the device writes each of them again
MOVE_ASIDE = ("move it aside (the device writes it again: the global adapter at its next round, a personal one "
              "when it next personalises)")


class FedllmError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(FedllmError):
    """A configuration key or value is not allowed."""


class DataError(FedllmError):
    """A data file is missing or malformed."""


class ModelError(FedllmError):
    """A base model cannot be loaded or does not fit fedllm."""
