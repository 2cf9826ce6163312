"""Celery beat's schedule, built from the pipelines in the config.

Generation: pipelines sharing an `every` interval are taken `generation_batch` at a time (by
name), one `windowpipe.generate_batch` job per group, so beat schedules and the control
workers receive tens of tasks a minute for a thousand pipelines instead of a thousand. A
recheck job at `every` for each pipeline with `recheck` horizons, plus the stale-lock cleanup.
"""

from __future__ import annotations

from typing import Any

from core.config import Config
from core.queues import CONTROL_QUEUE, RECHECK_QUEUE


def build_schedule(config: Config) -> dict[str, dict[str, Any]]:
    """The `beat_schedule` mapping for `config`."""
    schedule: dict[str, dict[str, Any]] = {}
    by_every: dict[float, list[str]] = {}
    for name, pipeline in sorted(config.pipelines.items()):
        by_every.setdefault(pipeline.every.total_seconds(), []).append(name)
    size = config.settings.generation_batch
    for every, names in sorted(by_every.items()):
        for first in range(0, len(names), size):
            group = names[first : first + size]
            # A pipeline alone keeps the entry name it always had.
            entry = f"generate:{group[0]}" if len(group) == 1 else f"generate:{every:g}s:{group[0]}"
            schedule[entry] = {
                "task": "windowpipe.generate_batch",
                "schedule": every,
                "args": (group,),
                "options": {"queue": CONTROL_QUEUE, "expires": every},
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
