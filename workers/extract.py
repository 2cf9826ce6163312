"""The extract stage: stream the window's documents to the staging area, with a manifest."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from core.records import Stage
from workers.stage_task import execute_stage


@shared_task(name="windowpipe.extract", bind=True, acks_late=True, reject_on_worker_lost=True)
def extract(self: Task, pipeline: str, window_start: str, retry: int = 0) -> Any:
    """Stream the window's documents to the staging area, with a manifest."""
    return execute_stage(self, Stage.EXTRACT, pipeline, window_start, retry)
