"""The audit stage: source, staged and target counts must agree."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from core.records import Stage
from workers.stage_task import execute_stage


@shared_task(name="windowpipe.audit", bind=True, acks_late=True, reject_on_worker_lost=True)
def audit(self: Task, pipeline: str, window_start: str, retry: int = 0) -> Any:
    """Source, staged and target counts must agree."""
    return execute_stage(self, Stage.AUDIT, pipeline, window_start, retry)
