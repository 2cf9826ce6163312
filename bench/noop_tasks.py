"""The bare chain's four no-op tasks, registered on any Celery app (bench 1's baseline apps)."""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import Celery

from bench.common import NOOP_DONE_KEY, NOOP_LAST_KEY, STAGE_QUEUES


def _summary(stage: str, pipeline: str, window_start: str) -> dict[str, Any]:
    # The same small dict a windowpipe stage returns.
    return {"outcome": "done", "stage": stage, "pipeline": pipeline, "window_start": window_start}


def register_noop_tasks(app: Celery, redis_url: str) -> None:
    """The four no-op tasks `bench.noop.<stage>` on the stage queues; the audit counts and
    timestamps each finished chain in Redis."""
    app.conf.task_routes = {
        **(app.conf.task_routes or {}),
        **{f"bench.noop.{queue}": {"queue": queue} for queue in STAGE_QUEUES},
    }
    client: list[redis.Redis] = []

    for stage in STAGE_QUEUES[:-1]:

        def noop(pipeline: str, window_start: str, stage: str = stage) -> dict[str, Any]:
            return _summary(stage, pipeline, window_start)

        app.task(name=f"bench.noop.{stage}")(noop)

    @app.task(name=f"bench.noop.{STAGE_QUEUES[-1]}")
    def audit(pipeline: str, window_start: str) -> dict[str, Any]:
        if not client:
            client.append(redis.Redis.from_url(redis_url))
        pipe = client[0].pipeline()
        pipe.incr(NOOP_DONE_KEY)
        pipe.set(NOOP_LAST_KEY, repr(time.time()))
        pipe.execute()
        return _summary(STAGE_QUEUES[-1], pipeline, window_start)
