"""The precheck stage: count the window in the source; an empty window is skipped."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from core.records import Stage
from workers.stage_task import execute_stage


@shared_task(name="windowpipe.precheck", bind=True, acks_late=True, reject_on_worker_lost=True)
def precheck(self: Task, pipeline: str, window_start: str, retry: int = 0) -> Any:
    """Count the window in the source; an empty window is skipped."""
    return execute_stage(self, Stage.PRECHECK, pipeline, window_start, retry)
