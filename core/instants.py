"""Parsing and printing of durations (`15m`) and UTC instants (`2026-11-01T00:00:00Z`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """Parse `90s`, `15m`, `1h`, `1d`, `1w` into a timedelta; anything else raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration like '15m', '1h' or '1d', got {text!r}")
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"expected a duration like '15m', '1h' or '1d', got {text!r}")
    amount, unit = int(match.group(1)), match.group(2)
    return timedelta(seconds=amount * _UNIT_SECONDS[unit])


def format_duration(value: timedelta) -> str:
    """Print a timedelta in the largest unit that divides it exactly (`15m`, `1d`)."""
    seconds = int(value.total_seconds())
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_instant(text: str) -> datetime:
    """Parse an ISO 8601 instant that carries an offset (`Z` or `+02:00`) into aware UTC.

    Naive instants are refused: a window boundary must never depend on the machine's zone.
    """
    if isinstance(text, datetime):
        value = text
    else:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"expected an ISO 8601 instant like 2026-11-01T00:00:00Z, got {text!r}"
            )
        try:
            value = datetime.fromisoformat(text.strip().replace("z", "Z"))
        except ValueError:
            raise ValueError(
                f"expected an ISO 8601 instant like 2026-11-01T00:00:00Z, got {text!r}"
            ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"instant {text!s} has no UTC offset; add 'Z' or '+00:00'")
    return value.astimezone(UTC)


def as_utc(value: datetime) -> datetime:
    """`value` as an aware UTC instant, where a naive one means UTC: what SQLite's columns, a
    zone-less date in a document and some drivers hand back. Returned as it is when already UTC.
    """
    if value.tzinfo is UTC:
        return value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_instant(value: datetime) -> str:
    """Print an aware instant as ISO 8601 UTC with a `Z` suffix."""
    if value.tzinfo is None:
        raise ValueError("cannot format a naive datetime as a UTC instant")
    value = value.astimezone(UTC)
    text = value.isoformat(timespec="microseconds" if value.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def utc_now() -> datetime:
    """The current instant, aware UTC. The only place core reads the clock."""
    return datetime.now(UTC)
