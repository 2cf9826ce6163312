"""The error kinds windowpipe distinguishes, and what each one means for a window."""

from __future__ import annotations

from billiard.exceptions import SoftTimeLimitExceeded


class WindowpipeError(Exception):
    """Base class of every error windowpipe raises on purpose."""


class BadInputError(WindowpipeError):
    """Bad config, CLI argument or request: reported in one line, exit status 2, nothing written."""


class ConfigError(BadInputError):
    """The config file (or an environment override) is invalid."""


class TransientError(WindowpipeError):
    """A failure worth retrying: connection reset, timeout, throttling (HTTP 429/503)."""


class TerminalError(WindowpipeError):
    """A failure retrying cannot fix: bad credentials, a missing index or table, bad data."""


class LostOwnershipError(WindowpipeError):
    """This worker no longer owns the window (its lock expired and another run took over)."""


class InvalidTransitionError(WindowpipeError):
    """A state change was requested from a state that does not allow it."""


class StaleFenceError(LostOwnershipError):
    """The target refused a load: it has already recorded a newer fencing token for the window
    (a paused worker woke up after another worker took the window over)."""


class StagedDataLostError(TerminalError):
    """A window's staged files or manifest are missing or corrupt: loading cannot succeed until
    extract runs again, so the window's next attempt goes back to extract."""


class StageTimeLimitError(TransientError):
    """The stage ran past its soft time limit: this attempt failed transiently. Never retried
    inside the step (the hard limit is near); the stage is re-sent like any transient failure."""


TIME_LIMIT_ERRORS: tuple[type[BaseException], ...] = (SoftTimeLimitExceeded,)
"""What Celery's pool raises inside a task at its soft time limit. Connectors must not translate
these into TerminalError: they re-raise them (or raise StageTimeLimitError)."""
