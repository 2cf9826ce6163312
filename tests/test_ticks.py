"""Generation ticks on a grid that meets the windows' due instants (core/ticks.py), and beat's
crontab for that grid (beat_schedule.py), as celery-redbeat stores and reads it back."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery
from redbeat.decoder import RedBeatJSONDecoder, RedBeatJSONEncoder

from beat_schedule import beat_ticks
from core.instants import parse_duration as _duration
from core.ticks import TickGrid, tick_grid

START = datetime(2026, 1, 1, tzinfo=UTC)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("start", "lag", "every", "grid"),
    [
        (START, "0s", "1m", TickGrid(60, 0)),
        (START, "0s", "5m", TickGrid(300, 0)),
        (START, "2m", "5m", TickGrid(300, 120)),
        (START, "7m", "5m", TickGrid(300, 120)),  # the phase is the lag modulo `every`
        (START + timedelta(minutes=3), "0s", "5m", TickGrid(300, 180)),  # an odd start
        (START, "30s", "1m", TickGrid(60, 0)),  # rounded up to the next whole minute
        (START, "270s", "5m", TickGrid(300, 0)),  # rounded up past `every`: wraps to 0
        (START, "90m", "2h", TickGrid(7200, 5400)),
        (START, "0s", "1d", TickGrid(86400, 0)),
        (START, "0s", "90s", TickGrid(90, None)),  # does not divide an hour: plain interval
        (START, "0s", "7m", TickGrid(420, None)),
        (START, "0s", "30s", TickGrid(30, None)),  # under a minute: plain interval
        (START, "0s", "5h", TickGrid(18000, None)),  # does not divide a day
        (START, "0s", "1s", TickGrid(1, None)),
    ],
)
def test_a_pipelines_ticks_fall_on_its_due_instants_rounded_up_to_a_minute(
    start: datetime, lag: str, every: str, grid: TickGrid
) -> None:
    assert tick_grid(start, _duration(lag), _duration(every)) == grid


@pytest.mark.parametrize(
    ("grid", "after", "tick"),
    [
        (TickGrid(60, 0), "2026-03-01T10:00:00", "2026-03-01T10:01:00"),  # strictly after
        (TickGrid(60, 0), "2026-03-01T10:00:59", "2026-03-01T10:01:00"),
        (TickGrid(300, 120), "2026-03-01T10:00:00", "2026-03-01T10:02:00"),
        (TickGrid(300, 120), "2026-03-01T10:02:00", "2026-03-01T10:07:00"),
        (TickGrid(300, 120), "2026-03-01T10:58:30", "2026-03-01T11:02:00"),
        (TickGrid(7200, 5400), "2026-03-01T00:00:00", "2026-03-01T01:30:00"),
        (TickGrid(7200, 5400), "2026-03-01T23:30:00", "2026-03-02T01:30:00"),
        (TickGrid(86400, 0), "2026-12-31T23:59:00", "2027-01-01T00:00:00"),
    ],
)
def test_the_next_tick_is_the_first_grid_instant_after(
    grid: TickGrid, after: str, tick: str
) -> None:
    assert grid.next_tick(at(after)) == at(tick)


def test_a_plain_interval_has_no_fixed_next_tick() -> None:
    assert TickGrid(90, None).next_tick(START) is None


GRIDS = [TickGrid(60, 0), TickGrid(300, 0), TickGrid(300, 120), TickGrid(900, 600)]
GRIDS += [TickGrid(3600, 1800), TickGrid(7200, 5400), TickGrid(21600, 0), TickGrid(86400, 3600)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.every}s+{g.phase}s")
def test_beats_crontab_stored_by_redbeat_runs_exactly_on_the_grid(grid: TickGrid) -> None:
    """The crontab, encoded and decoded as celery-redbeat keeps it in Redis, is due next at
    the grid's next tick after each of a day's worth of last runs (every 7 minutes)."""
    app = Celery("ticks", set_as_current=False)
    stored = json.dumps(beat_ticks(grid), cls=RedBeatJSONEncoder)
    schedule = json.loads(stored, cls=RedBeatJSONDecoder)
    schedule.app = app
    last = at("2026-03-01T00:00:00")
    for _ in range(24 * 60 // 7):
        schedule.nowfun = lambda: last  # noqa: B023 - read at once, inside this iteration
        due_in = schedule.remaining_estimate(last)
        assert last + due_in == grid.next_tick(last), (grid, last)
        last += timedelta(minutes=7, seconds=13)


def test_a_grid_without_phase_keeps_beats_plain_interval() -> None:
    assert beat_ticks(TickGrid(90, None)) == 90.0
