"""Celery beat's schedule, built from the pipelines in the config.

One generation job per pipeline at its `every` interval, a recheck job at the same interval
for each pipeline with `recheck` horizons, plus the stale-lock cleanup.
"""

from __future__ import annotations

from typing import Any

from core.config import Config


def build_schedule(config: Config) -> dict[str, dict[str, Any]]:
    """The `beat_schedule` mapping for `config`."""
    schedule: dict[str, dict[str, Any]] = {
        f"generate:{name}": {
            "task": "windowpipe.generate",
            "schedule": pipeline.every.total_seconds(),
            "args": (name,),
            "options": {"queue": "control", "expires": pipeline.every.total_seconds()},
        }
        for name, pipeline in sorted(config.pipelines.items())
    }
    for name, pipeline in sorted(config.pipelines.items()):
        if pipeline.recheck:
            schedule[f"recheck:{name}"] = {
                "task": "windowpipe.recheck",
                "schedule": pipeline.every.total_seconds(),
                "args": (name,),
                "options": {"queue": "recheck", "expires": pipeline.every.total_seconds()},
            }
    schedule["cleanup-stale-locks"] = {
        "task": "windowpipe.cleanup",
        "schedule": config.settings.cleanup_every.total_seconds(),
        "args": (),
        "options": {"queue": "control", "expires": config.settings.cleanup_every.total_seconds()},
    }
    return schedule
