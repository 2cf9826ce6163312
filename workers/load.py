"""The load stage: load the manifest's files into the target, replacing the window's rows."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from core.records import Stage
from workers.stage_task import execute_stage


@shared_task(name="windowpipe.load", bind=True, acks_late=True, reject_on_worker_lost=True)
def load(self: Task, pipeline: str, window_start: str, retry: int = 0) -> Any:
    """Load the manifest's files into the target, replacing the window's rows."""
    return execute_stage(self, Stage.LOAD, pipeline, window_start, retry)
