"""The recheck task: compare finished windows that reached a recheck horizon with the source.

Runs on its own queue (`recheck`), so a backlog of rechecks never holds up the stage queues
of live windows; beat sends it per pipeline that has `recheck` horizons. Windows that drifted
go back to pending (manual, under the backfill cap) and a dispatch is asked for at once. One
run per pipeline at a time (`core.locks.RecheckLock`): a run sent while the last one still goes
is skipped.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from connectors.registry import connector_for
from core.instants import utc_now
from core.locks import RecheckLock
from core.recheck import Fingerprint, recheck_due
from core.windows import Window
from workers.celery_app import process_config
from workers.runtime import request_dispatch, runtime


@shared_task(name="windowpipe.recheck")
def recheck(pipeline: str) -> dict[str, Any]:
    """Recheck the pipeline's windows due at a horizon (at most `max_rechecks_per_tick`)."""
    rt = runtime()
    settings = process_config().pipeline(pipeline)
    source = connector_for("source", settings)

    def fingerprint(window: Window) -> Fingerprint:
        result: Fingerprint = source.fingerprint(window)
        return result

    lock = RecheckLock(rt.redis, pipeline)
    if not lock.acquire():
        return {"pipeline": pipeline, "skipped": "the previous recheck run is still going"}
    try:
        report = recheck_due(
            rt.store,
            pipeline,
            settings.recheck,
            fingerprint,
            utc_now(),
            limit=settings.max_rechecks_per_tick,
        )
    finally:
        lock.release()
    if report.drifted:
        request_dispatch(pipeline)
    return report.summary()
