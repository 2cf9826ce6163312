"""Window generation (README: "Window states"): which windows are due, as a pure function.

Windows are half-open `[start, end)`, aligned to `pipeline.start + k * size`. A window is due
once `end + lag <= now`. Generation continues where the last stored window ends (or at the
pipeline's `start`) and never creates more than `max_windows_per_tick`, oldest first.
Nothing here reads the clock, Redis or a database: `now` and the last window are arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.instants import format_duration, format_instant


@dataclass(frozen=True, order=True)
class Window:
    """A half-open time window `[start, end)` in UTC."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        # Stored in UTC: `end - start` between two instants of one zone with DST (ZoneInfo) is
        # wall-clock arithmetic, so a window across a DST change would get the wrong size.
        object.__setattr__(self, "start", _utc(self.start, "window start"))
        object.__setattr__(self, "end", _utc(self.end, "window end"))
        if self.end <= self.start:
            raise ValueError(
                f"window end {format_instant(self.end)} is not after its start "
                f"{format_instant(self.start)}"
            )

    @property
    def size(self) -> timedelta:
        return self.end - self.start

    def contains(self, instant: datetime) -> bool:
        """True when `start <= instant < end`."""
        return self.start <= instant < self.end

    def __str__(self) -> str:
        return f"[{format_instant(self.start)}, {format_instant(self.end)})"


def _require_aware(value: datetime, what: str) -> None:
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} {value.isoformat()} is naive; windowpipe needs UTC instants")


def _utc(value: datetime, what: str) -> datetime:
    """`value` as UTC; naive datetimes are refused.

    Arithmetic on aware datetimes sharing one DST zone is wall-clock arithmetic, so everything
    here is converted to UTC before adding or subtracting sizes.
    """
    _require_aware(value, what)
    return value.astimezone(UTC)


def _require_positive(size: timedelta, what: str = "window size") -> None:
    if not isinstance(size, timedelta):
        raise TypeError(f"{what} must be a timedelta, got {type(size).__name__}")
    if size <= timedelta(0):
        raise ValueError(f"{what} must be longer than zero, got {size}")


def _describe_size(size: timedelta) -> str:
    """`15m` for whole seconds, else the timedelta as Python prints it."""
    if size % timedelta(seconds=1):
        return str(size)
    return format_duration(size)


def is_aligned(instant: datetime, origin: datetime, size: timedelta) -> bool:
    """True when `instant` is `origin + k * size` for some whole k (k may be negative)."""
    _require_positive(size)
    return (_utc(instant, "instant") - _utc(origin, "origin")) % size == timedelta(0)


def align_down(instant: datetime, origin: datetime, size: timedelta) -> datetime:
    """The last boundary `origin + k * size` at or before `instant` (in UTC)."""
    _require_positive(size)
    instant = _utc(instant, "instant")
    return instant - (instant - _utc(origin, "origin")) % size


def due_windows(
    *,
    origin: datetime,
    size: timedelta,
    lag: timedelta,
    max_windows: int,
    now: datetime,
    last_end: datetime | None = None,
) -> list[Window]:
    """The windows a generation tick creates, oldest first.

    - `origin`: the pipeline's `start`; windows are aligned to `origin + k * size`.
    - `last_end`: the end of the last stored window, or None on the first run.
    - A window is due when `window.end + lag <= now`; at most `max_windows` are returned.
    """
    origin = _utc(origin, "pipeline start")
    now = _utc(now, "now")
    _require_positive(size)
    if lag < timedelta(0):
        raise ValueError(f"lag must not be negative, got {lag}")
    if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
        raise ValueError(f"max_windows_per_tick must be a whole number >= 1, got {max_windows!r}")
    if last_end is None:
        cursor = origin
    else:
        last_end = _utc(last_end, "last window end")
        if not is_aligned(last_end, origin, size):
            raise ValueError(
                f"last window end {format_instant(last_end)} is not aligned to "
                f"{format_instant(origin)} + k * {_describe_size(size)}"
            )
        cursor = max(last_end, origin)
    horizon = now - lag
    if cursor + size > horizon:
        return []
    # Jump straight to the count instead of looping over a long gap one window at a time.
    available = (horizon - cursor) // size
    count = min(available, max_windows)
    return [Window(cursor + i * size, cursor + (i + 1) * size) for i in range(count)]


def windows_in_range(
    *, origin: datetime, size: timedelta, start: datetime, end: datetime
) -> list[Window]:
    """The aligned windows that make up `[start, end)`, for manual runs and backfills.

    `start` and `end` must be window boundaries, so a backfill never creates a partial window
    that would overlap a scheduled one.
    """
    origin = _utc(origin, "pipeline start")
    start = _utc(start, "start")
    end = _utc(end, "end")
    _require_positive(size)
    if end <= start:
        raise ValueError(f"end {format_instant(end)} must be after start {format_instant(start)}")
    for name, instant in (("start", start), ("end", end)):
        if not is_aligned(instant, origin, size):
            before = align_down(instant, origin, size)
            raise ValueError(
                f"{name} {format_instant(instant)} is not on a window boundary "
                f"(windows of {_describe_size(size)} from {format_instant(origin)}; the nearest "
                f"boundaries are {format_instant(before)} and {format_instant(before + size)})"
            )
    if start < origin:
        raise ValueError(
            f"start {format_instant(start)} is before the pipeline start {format_instant(origin)}"
        )
    return list(_iter_windows(start, end, size))


def _iter_windows(start: datetime, end: datetime, size: timedelta) -> Iterator[Window]:
    cursor = start
    while cursor < end:
        yield Window(cursor, cursor + size)
        cursor += size
