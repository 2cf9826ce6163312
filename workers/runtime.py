"""The per-process runtime of a worker: store, Redis client and connectors, built once.

Built lazily in the process that runs tasks (after the prefork pool forks), so no socket or
engine is shared between processes, and closed when that process shuts down.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import redis
from celery import Signature, chain, signals

from connectors.registry import close_all, connector_for, forget_all
from core.instants import format_instant
from core.keys import dispatch_recent_key, dispatch_requested_key
from core.records import STAGE_ORDER, Stage
from core.runner import Runtime
from core.store import StateStore
from workers.celery_app import process_app, process_config

_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, built on first use."""
    global _runtime
    if _runtime is None:
        config = process_config()
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


@signals.worker_process_shutdown.connect  # a pool process ends (prefork)
@signals.worker_shutdown.connect  # the worker ends (solo and thread pools run tasks here)
def _close_at_shutdown(**_: Any) -> None:
    """Close this process's connectors (SDK sessions, engines), state store and Redis client:
    best effort, the process is ending."""
    global _runtime
    close_all()
    if _runtime is not None:
        with contextlib.suppress(Exception):
            _runtime.store.dispose()
        with contextlib.suppress(Exception):
            _runtime.redis.close()
        _runtime = None


def send_chain(
    pipeline: str,
    window_start: datetime,
    first_stage: Stage,
    *,
    retry: int = 0,
    countdown: float | None = None,
) -> str:
    """Send the chain of a window from `first_stage` on; arguments are identifiers only."""
    signatures = _stage_signatures(pipeline, window_start, first_stage, retry)
    result = chain(*signatures).apply_async(countdown=countdown)
    return str(result.id)


def send_chains(chains: Sequence[tuple[str, datetime, Stage]]) -> list[str]:
    """`send_chain` for many windows (pipeline, window start, first stage) at once, as a
    generation batch dispatches them: one producer taken from the pool for all of them, and
    their messages (with their task-sent events) written to Redis in one pipeline by kombu's
    publish batch, instead of a pool acquire and two round trips each.

    Each message is the one `send_chain` sends: the first stage's task, carrying the other
    stages as its `chain` (the last one first, as Celery's `chain` puts them), so the worker
    sends each next stage when one succeeds. It is published as the first stage's signature
    with that `chain` option because `chain(...).apply_async(producer=...)` drops the producer
    (Celery's `chain.run` takes it and does not pass it on).

    Raises if the batch could not be written: which of its messages reached the broker is then
    unknown (kombu's `BatchPublishError`), so the caller treats every one as maybe unsent;
    cleanup sends a queued window's message again once it waited `stale_after`. A message sent
    twice is harmless: a stage runs only for the worker that claims it (window lock, fence).
    """
    app = process_app()
    with app.producer_or_acquire() as producer:
        # kombu >= 5.7 batches publishes on Redis; an older kombu publishes each at once.
        batch = producer.batch() if hasattr(producer, "batch") else contextlib.nullcontext()
        with batch:
            results = []
            for pipeline, start, stage in chains:
                first, *rest = _stage_signatures(pipeline, start, stage)
                chained = {"chain": rest[::-1]} if rest else {}
                results.append(first.apply_async(producer=producer, **chained))
    return [str(result.id) for result in results]


def _stage_signatures(
    pipeline: str, window_start: datetime, first_stage: Stage, retry: int = 0
) -> list[Signature]:
    """The signatures of a window's stages from `first_stage` on, in order (the first one told
    its `retry`, if any); arguments are identifiers only."""
    app = process_app()
    start = format_instant(window_start)
    stages = STAGE_ORDER[STAGE_ORDER.index(first_stage) :]
    signatures = []
    for index, stage in enumerate(stages):
        kwargs = {"retry": retry} if index == 0 and retry else {}
        signatures.append(
            app.signature(f"windowpipe.{stage.value}", (pipeline, start), kwargs, immutable=True)
        )
    return signatures


DISPATCH_SPACING_MS = 250
"""Least time between two dispatches a pipeline's finishing windows ask for. When windows
finish faster than this, one dispatch serves all of them instead of one each; a freed slot
waits at most this long for its next window."""


DISPATCH_REQUEST_TTL_SECONDS = 10
"""How long a dispatch request stands without its dispatch starting. If its message was lost
(a Redis wipe, a frozen worker's prefetch), the next finishing window asks again after this."""


def request_dispatch(pipeline: str) -> None:
    """Ask the control queue to dispatch a pipeline's next windows (a window just finished).

    Only when the pipeline has a window to dispatch (pending or failed, `StateStore.waiting`):
    a live pipeline whose window finished before the next one is due asks for nothing, instead
    of a control task that finds nothing to do. A window that starts waiting after this read is
    dispatched by whoever made it wait:
        t0  window A's audit commits `succeeded`
        t1  A's worker reads the pipeline's waiting windows: none, so no request
        t2  generation creates window B (pending) and dispatches it in the same tick; a
            recheck making a window pending, `windowpipe enqueue` and a retried stage
            dispatch or send their windows themselves too; cleanup's safety net covers a
            lost message
    A window waiting behind a full cap is read at t1 (A's own commit came first), so A's
    finish asks for it as before.

    At most one request waits per pipeline: the flag is cleared when the dispatch starts, so a
    window finishing after that asks again, and a burst of finishing windows asks once. A
    request right after a dispatch started is delayed until `DISPATCH_SPACING_MS` have passed.
    The flag expires, so a request lost with its message (a Redis restart) is asked again.
    """
    rt = runtime()
    client = rt.redis
    if client.exists(dispatch_requested_key(pipeline)):
        return  # a request waits already (a burst of finishing windows): no store read
    if not rt.store.waiting([pipeline])[pipeline]:
        return
    if client.set(dispatch_requested_key(pipeline), 1, nx=True, ex=DISPATCH_REQUEST_TTL_SECONDS):
        wait_ms = client.pttl(dispatch_recent_key(pipeline))
        countdown = wait_ms / 1000 if wait_ms > 0 else None
        process_app().send_task("windowpipe.dispatch", (pipeline,), countdown=countdown)


def dispatch_started(pipeline: str) -> None:
    """Clear the pipeline's dispatch request: from now on a finishing window asks again."""
    pipe = runtime().redis.pipeline(transaction=False)
    pipe.delete(dispatch_requested_key(pipeline))
    pipe.set(dispatch_recent_key(pipeline), 1, px=DISPATCH_SPACING_MS)
    pipe.execute()
