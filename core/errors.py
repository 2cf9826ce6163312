"""The error kinds windowpipe distinguishes, and what each one means for a window."""

from __future__ import annotations

import re

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


class LockLostError(LostOwnershipError):
    """This worker's window lock expired or was wiped under it (a renewal found it gone or
    someone else's): the stage stops at its next check, and if no newer owner claimed the
    window meanwhile, puts it back in the queue without a new attempt."""


class InvalidTransitionError(WindowpipeError):
    """A state change was requested from a state that does not allow it."""


class StaleFenceError(LostOwnershipError):
    """The target refused a load: it has already recorded a newer fencing token for the window
    (a paused worker woke up after another worker took the window over, or the state store is
    behind the target: restored from a backup, rebuilt, or its clock behind).

    `recorded` is the target's fence that refused this one, when the target said: the runner
    raises the window's fence above it if the store still holds this owner's fence."""

    def __init__(self, message: str, recorded: int | None = None) -> None:
        super().__init__(message)
        self.recorded = recorded


class StagedDataLostError(TerminalError):
    """A window's staged files or manifest are missing or corrupt: loading cannot succeed until
    extract runs again, so the window's next attempt goes back to extract."""


class StageTimeLimitError(TransientError):
    """The stage ran past its soft time limit: this attempt failed transiently. Never retried
    inside the step (the hard limit is near); the stage is re-sent like any transient failure."""


TIME_LIMIT_ERRORS: tuple[type[BaseException], ...] = (SoftTimeLimitExceeded,)
"""What Celery's pool raises inside a task at its soft time limit. Connectors must not translate
these into TerminalError: they re-raise them (or raise StageTimeLimitError)."""


ONE_LINE_LIMIT = 300
"""The most characters `one_line` keeps of an error text (a record's `error`, a log line)."""

_URL_CREDENTIALS = re.compile(r"(?<=//)[^/@\s]+@")
"""The `user:password@` of a URL, masked in error texts."""


def one_line(text: object, limit: int = ONE_LINE_LIMIT) -> str:
    """`text` as one line: white space folded, credentials in URLs masked (`//***@host`), and
    at most `limit` characters (cut with `…`)."""
    line = _URL_CREDENTIALS.sub("***@", " ".join(str(text).split()))
    return line if len(line) <= limit else line[: limit - 1] + "…"


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (database drivers add hints and URLs below
    it); the exception's type name when the message is empty."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
