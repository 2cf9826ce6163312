"""What every stage task does around `core.runner.run_stage`: chain control and retries."""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task

from core.instants import parse_instant
from core.records import Stage
from core.runner import Outcome, run_stage
from workers.runtime import request_dispatch, runtime, send_chain


def execute_stage(task: Task, stage: Stage, pipeline: str, window_start: str, retry: int) -> Any:
    """Run the stage; end the chain unless the stage says it goes on; re-send on retry.

    Retries send a fresh chain from this stage with a countdown instead of `task.retry()`, so
    a retry can never drop the rest of the chain (celery/celery#6631): the record says where
    the window is, and the new chain starts there.
    """
    start = parse_instant(window_start)
    # Every line logged during the stage (connector retries too) names the window.
    with structlog.contextvars.bound_contextvars(
        pipeline=pipeline, window=window_start, stage=stage.value
    ):
        result = run_stage(runtime(), stage, pipeline, start, retry)
    if not result.continues_chain:
        task.request.chain = None
    if result.outcome == Outcome.RETRY:
        send_chain(pipeline, start, stage, retry=retry + 1, countdown=result.retry_in)
    elif result.outcome == Outcome.FINISHED:
        request_dispatch(pipeline)
    return result.summary()
