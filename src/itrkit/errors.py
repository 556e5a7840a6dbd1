"""User-facing errors: one line, naming the file, id or key at fault.

The CLI catches :class:`ItrkitError`, prints ``error: <message>`` and exits with status 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ItrkitError(Exception):
    """A problem with the user's input (data, config, store, checkpoint)."""

    def __init__(self, message: str) -> None:
        # Keep messages to one line: they are printed as-is by the CLI.
        super().__init__(" ".join(str(message).split()))


class DataError(ItrkitError):
    """Bad or missing data: images, captions, ids, splits."""


class ConfigError(ItrkitError):
    """Unknown key, wrong type or out-of-range value in a config."""


class StoreError(ItrkitError):
    """A feature store that does not match the dataset or is damaged."""


class CheckpointError(ItrkitError):
    """A checkpoint that is missing, truncated or fails its checksum."""


class NonFiniteLossError(ItrkitError):
    """A NaN or Inf loss during training."""
