"""The per-process runtime of a worker: store, Redis client and connectors, built once.

Built lazily in the process that runs tasks (after the prefork pool forks), so no socket or
engine is shared between processes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import redis
from celery import chain, signals

from connectors.registry import connector_for, forget_all
from core.instants import format_instant
from core.records import STAGE_ORDER, Stage
from core.runner import Runtime
from core.store import StateStore
from workers.celery_app import app, config

_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, built on first use."""
    global _runtime
    if _runtime is None:
        store = StateStore(config.settings.state_url)
        store.migrate()
        client = redis.Redis.from_url(config.settings.redis_url)
        _runtime = Runtime(config, store, client, connector_for)
    return _runtime


@signals.worker_process_init.connect
def _fresh_after_fork(**_: Any) -> None:
    global _runtime
    _runtime = None
    forget_all()


def send_chain(
    pipeline: str,
    window_start: datetime,
    first_stage: Stage,
    *,
    retry: int = 0,
    countdown: float | None = None,
) -> str:
    """Send the chain of a window from `first_stage` on; arguments are identifiers only."""
    start = format_instant(window_start)
    stages = STAGE_ORDER[STAGE_ORDER.index(first_stage) :]
    signatures = []
    for index, stage in enumerate(stages):
        kwargs = {"retry": retry} if index == 0 and retry else {}
        signatures.append(
            app.signature(f"windowpipe.{stage.value}", (pipeline, start), kwargs, immutable=True)
        )
    result = chain(*signatures).apply_async(countdown=countdown)
    return str(result.id)


def request_dispatch(pipeline: str) -> None:
    """Ask the control queue to dispatch a pipeline's next windows (a window just finished)."""
    app.send_task("windowpipe.dispatch", (pipeline,))
