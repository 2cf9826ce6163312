"""When beat runs a pipeline's generation: ticks on a grid that meets its windows' due instants.

A window is due at `end + lag` (core/windows.py), so a pipeline's windows fall due at
`start + lag + k * window`. Beat runs generation every `every`; ticks at an arbitrary phase
(beat's start time) make each window wait up to a whole `every` after it is due, the same wait
for every pipeline of a deployment. Ticks at `n * every + phase` (from the Unix epoch, UTC) with
`phase = (start + lag) mod every` land on due instants instead: every one of them when the
window is a multiple of `every`, and every tick is one when `every` is a multiple of the window.

Beat schedules with minute resolution (a crontab), so a phase is rounded up to a whole minute
(never earlier than the due instant); intervals a crontab cannot express (under a minute, or not
dividing an hour or a day) keep beat's plain interval, whose phase is beat's start.
Pure: no clock, no Celery.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MINUTE = 60
HOUR = 3600
DAY = 86400


@dataclass(frozen=True)
class TickGrid:
    """Ticks at `n * every + phase` seconds from the Unix epoch (UTC); `phase` None when the
    grid cannot be expressed in whole minutes and beat's plain interval is used instead."""

    every: int
    """Seconds between ticks."""
    phase: int | None
    """Seconds after each multiple of `every`, a whole number of minutes below `every`."""

    @property
    def aligned(self) -> bool:
        return self.phase is not None

    def next_tick(self, after: datetime) -> datetime | None:
        """The first tick strictly after `after`; None for a plain interval (no fixed grid)."""
        if self.phase is None:
            return None
        seconds = int(after.timestamp())
        cycles = (seconds - self.phase) // self.every + 1
        return datetime.fromtimestamp(cycles * self.every + self.phase, UTC)


def tick_grid(start: datetime, lag: timedelta, every: timedelta) -> TickGrid:
    """The tick grid of a pipeline whose windows start at `start` (on its window grid) and are
    due `lag` after they end, generated every `every`."""
    seconds = every.total_seconds()
    whole = int(seconds)
    if seconds != whole or not _expressible(whole):
        return TickGrid(every=max(whole, 1), phase=None)
    due = start.timestamp() + lag.total_seconds()
    phase = due % whole
    # Rounded up to the minute: a tick before the due instant would find nothing due.
    minutes = -(-phase // MINUTE)
    return TickGrid(every=whole, phase=int(minutes * MINUTE) % whole)


def _expressible(every: int) -> bool:
    """Whether a crontab (minute resolution) can tick every `every` seconds on a fixed grid:
    whole minutes dividing an hour, or whole hours dividing a day."""
    if every % MINUTE or every <= 0:
        return False
    if every <= HOUR:
        return HOUR % every == 0
    return every % HOUR == 0 and DAY % every == 0
