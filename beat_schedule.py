"""Celery beat's schedule, built from the pipelines in the config.

Generation: pipelines sharing a tick grid (`every` and its phase, core/ticks.py) are taken
`generation_batch` at a time (by name), one `windowpipe.generate_batch` job per group, so beat
schedules and the control workers receive tens of tasks a minute for a thousand pipelines
instead of a thousand. A grid's ticks fall on its pipelines' due instants (a crontab), so a
window is generated at the tick it falls due, not up to an `every` later. A recheck job at
`every` for each pipeline with `recheck` horizons, plus the stale-lock cleanup.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from core.config import Config
from core.queues import CONTROL_QUEUE, RECHECK_QUEUE
from core.ticks import HOUR, MINUTE, TickGrid, tick_grid


def build_schedule(config: Config) -> dict[str, dict[str, Any]]:
    """The `beat_schedule` mapping for `config`."""
    schedule: dict[str, dict[str, Any]] = {}
    by_grid: dict[TickGrid, list[str]] = {}
    for name, pipeline in sorted(config.pipelines.items()):
        grid = tick_grid(pipeline.start, pipeline.lag, pipeline.every)
        by_grid.setdefault(grid, []).append(name)
    size = config.settings.generation_batch
    for grid, names in sorted(by_grid.items(), key=lambda item: (item[0].every, item[1][0])):
        for first in range(0, len(names), size):
            group = names[first : first + size]
            # A pipeline alone keeps the entry name it always had.
            entry = (
                f"generate:{group[0]}" if len(group) == 1 else f"generate:{grid.every}s:{group[0]}"
            )
            schedule[entry] = {
                "task": "windowpipe.generate_batch",
                "schedule": beat_ticks(grid),
                "args": (group,),
                "options": {"queue": CONTROL_QUEUE, "expires": grid.every},
            }
    for name, pipeline in sorted(config.pipelines.items()):
        if pipeline.recheck:
            schedule[f"recheck:{name}"] = {
                "task": "windowpipe.recheck",
                "schedule": pipeline.every.total_seconds(),
                "args": (name,),
                "options": {"queue": RECHECK_QUEUE, "expires": pipeline.every.total_seconds()},
            }
    schedule["cleanup-stale-locks"] = {
        "task": "windowpipe.cleanup",
        "schedule": config.settings.cleanup_every.total_seconds(),
        "args": (),
        "options": {
            "queue": CONTROL_QUEUE,
            "expires": config.settings.cleanup_every.total_seconds(),
        },
    }
    return schedule


def beat_ticks(grid: TickGrid) -> crontab | float:
    """Beat's schedule for `grid`: a UTC crontab on its ticks, or the plain interval (seconds)
    when the grid has no phase. celery-redbeat stores both kinds as they are."""
    if grid.phase is None:
        return float(grid.every)
    minutes = grid.phase // MINUTE
    if grid.every <= HOUR:
        step = grid.every // MINUTE
        if step == 1:
            return crontab(minute="*")
        return crontab(minute=str(minutes) if step == 60 else f"{minutes}-59/{step}")
    hours = grid.every // HOUR
    first_hour, minute = divmod(minutes, 60)
    hour = str(first_hour) if hours == 24 else f"{first_hour}-23/{hours}"
    return crontab(minute=str(minute), hour=hour)
