"""The errors a person can fix: each ends ``fastssl-train`` with one message and an exit code, no traceback.

``fastssl-train`` prints ``fastssl-train <command>: error: <message>`` and exits with ``exit_code`` (2 for
a bad option, as argparse, else 1); ``--debug`` or ``FASTSSL_DEBUG=1`` shows the traceback instead. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "RunError", "TrainingError", "UserError"]


class UserError(Exception):
    """An error in what the user gave or in the state of their files, not in fastssl."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """An option's value (or a combination of options) that cannot work; the message names the option."""

    exit_code = 2


class DataError(UserError, ValueError):
    """The data set cannot be used (missing, empty, unreadable folder)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit this run (architecture, config), or not a checkpoint."""


class RunError(UserError, RuntimeError):
    """The run folder cannot be used now (another run holds it)."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (a non-finite loss, no readable image): stopped, the last checkpoint kept."""
