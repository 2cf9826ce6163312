"""Control tasks: generation (beat, per group of pipelines; per pipeline on demand), dispatch,
and the stale-lock cleanup.

Generation and cleanup record each completed run (`core.control_runs`), so `windowpipe status`
shows when the control work last ran and on which worker.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from core.control_runs import record_run, record_runs
from core.dispatch import dispatch as dispatch_windows
from core.dispatch import generation_batch, generation_tick
from core.instants import utc_now
from core.keys import CLEANUP_RAN_KEY, generate_ran_key
from core.recovery import cleanup as cleanup_stale
from workers.celery_app import process_config
from workers.runtime import dispatch_started, runtime, send_chain, send_chains


@shared_task(name="windowpipe.generate", bind=True)
def generate(self: Task, pipeline: str) -> dict[str, Any]:
    """Create the pipeline's due windows, validate its chain, enqueue runnable windows."""
    rt, config = runtime(), process_config()
    report = generation_tick(
        rt.store,
        rt.redis,
        config.pipeline(pipeline),
        send_chain,
        utc_now(),
        failed_retry_base=config.settings.failed_retry_base,
    )
    record_run(rt.redis, generate_ran_key(pipeline), utc_now(), str(self.request.hostname or ""))
    return report.summary()


@shared_task(name="windowpipe.generate_batch", bind=True)
def generate_batch(self: Task, pipelines: list[str]) -> dict[str, Any]:
    """`generate` for each of `pipelines` in one task (what beat sends): one pipeline's failure
    is logged and reported by name, and does not stop the others. Pipelines no longer in the
    config (a schedule older than the config) are reported as failed too."""
    rt, config = runtime(), process_config()
    known = [config.pipelines[name] for name in pipelines if name in config.pipelines]
    report = generation_batch(
        rt.store,
        rt.redis,
        known,
        send_chain,
        utc_now(),
        failed_retry_base=config.settings.failed_retry_base,
        send_batch=send_chains,
    )
    for name in pipelines:
        if name not in config.pipelines:
            report.failed[name] = "not in the config"
    record_runs(
        rt.redis,
        [generate_ran_key(tick.pipeline) for tick in report.ticks],
        utc_now(),
        str(self.request.hostname or ""),
    )
    return report.summary()


@shared_task(name="windowpipe.dispatch")
def dispatch(pipeline: str) -> dict[str, Any]:
    """Enqueue the pipeline's runnable windows up to its caps (after a window finished).

    Its waiting windows are read first (one query), so a dispatch that finds none is over
    before taking the dispatch lock or counting active windows (see `core.dispatch.dispatch`).
    """
    dispatch_started(pipeline)
    rt, config = runtime(), process_config()
    queued, dead = dispatch_windows(
        rt.store,
        rt.redis,
        config.pipeline(pipeline),
        send_chain,
        utc_now(),
        failed_retry_base=config.settings.failed_retry_base,
        waiting=rt.store.waiting([pipeline])[pipeline],
        send_batch=send_chains,
    )
    return {"pipeline": pipeline, "queued": len(queued), "dead": dead}


@shared_task(name="windowpipe.cleanup", bind=True)
def cleanup(self: Task) -> dict[str, Any]:
    """Release locks of dead owners, requeue windows nobody is working on, and dispatch every
    pipeline with runnable windows and room (the safety net for lost dispatch messages)."""
    rt, config = runtime(), process_config()
    report = cleanup_stale(rt.store, rt.redis, config, send_chain, utc_now())
    record_run(rt.redis, CLEANUP_RAN_KEY, utc_now(), str(self.request.hostname or ""))
    return report.summary()
