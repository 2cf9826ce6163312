"""The error kinds windowpipe distinguishes, and what each one means for a window."""

from __future__ import annotations


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
