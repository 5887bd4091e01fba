"""Errors reported to users as one message and exit code 2, without a traceback: library code
raises them, the CLI prints them (and under ``mlflow run`` ends the run FAILED with the message).
"""

from __future__ import annotations


class FmnistError(Exception):
    """A problem the user can fix (bad option, missing data, malformed definition)."""

    exit_code = 2


class DataError(FmnistError):
    """The dataset is missing, truncated or invalid."""


class ConfigError(FmnistError):
    """An option or an experiment definition is invalid (``key``: the setting, when one is)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class NoSpace(FmnistError):
    """A disk filled up while the command wrote ``path``; ``needed``: bytes it needs, if known."""

    def __init__(self, path: str, needed: int | None = None) -> None:
        need = f"at least {needed / 1e6:.0f} MB" if needed else "space for it"
        super().__init__(
            f"The disk holding {path} is full: the command could not write it and stopped. "
            f"Free {need} on that disk (or point TMPDIR, MLFLOW_TRACKING_URI or the artifact "
            "location at another one), then run the same command again: it goes on from the "
            "last checkpoint, and a search from its study."
        )


class TrainingDiverged(FmnistError):
    """The loss became NaN or infinite: the run or trial fails for good."""
