"""The orchestration baseline: a bare Celery chain of four no-op tasks on the stage queues.

`celery -A bench.noop_app worker -Q <stage>` with the same broker, result backend and task
settings as windowpipe's app (`workers.celery_app.celery_settings` of the same config file),
so the only difference measured is windowpipe's work around each task.

The last task records when it finished in Redis (`NOOP_DONE_KEY`, `NOOP_LAST_KEY`), which
is how the bench knows a chain completed without polling a result per chain.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import Celery

from bench.common import NOOP_DONE_KEY, NOOP_LAST_KEY, STAGE_QUEUES
from core.config import load_config
from workers.celery_app import celery_settings

config = load_config()
settings = config.settings
windowpipe_settings = celery_settings(config)

SHARED_SETTINGS = (
    "broker_url",
    "result_backend",
    "broker_transport_options",
    "result_backend_transport_options",
    "broker_connection_retry_on_startup",
    "task_serializer",
    "result_serializer",
    "accept_content",
    "task_acks_late",
    "task_reject_on_worker_lost",
    "worker_prefetch_multiplier",
    "task_track_started",
    "task_send_sent_event",
    "worker_send_task_events",
    "result_expires",
    "result_extended",
    "worker_hijack_root_logger",
)
"""windowpipe's app settings that shape how a task message travels; the baseline uses them."""


app = Celery("bench-noop")
app.conf.update({name: windowpipe_settings[name] for name in SHARED_SETTINGS})
app.conf.task_default_queue = "control"
app.conf.task_routes = {f"bench.noop.{queue}": {"queue": queue} for queue in STAGE_QUEUES}

_redis: redis.Redis | None = None


def _client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(settings.redis_url)
    return _redis


def _summary(stage: str, pipeline: str, window_start: str) -> dict[str, Any]:
    # The same small dict a windowpipe stage returns.
    return {"outcome": "done", "stage": stage, "pipeline": pipeline, "window_start": window_start}


@app.task(name="bench.noop.precheck")
def precheck(pipeline: str, window_start: str) -> dict[str, Any]:
    return _summary("precheck", pipeline, window_start)


@app.task(name="bench.noop.extract")
def extract(pipeline: str, window_start: str) -> dict[str, Any]:
    return _summary("extract", pipeline, window_start)


@app.task(name="bench.noop.load")
def load(pipeline: str, window_start: str) -> dict[str, Any]:
    return _summary("load", pipeline, window_start)


@app.task(name="bench.noop.audit")
def audit(pipeline: str, window_start: str) -> dict[str, Any]:
    client = _client()
    pipe = client.pipeline()
    pipe.incr(NOOP_DONE_KEY)
    pipe.set(NOOP_LAST_KEY, repr(time.time()))
    pipe.execute()
    return _summary("audit", pipeline, window_start)
