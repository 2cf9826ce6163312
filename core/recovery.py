"""Stale-lock cleanup (README: "Locks and stale windows"): put lost windows back to run.

A window is lost when its record says work is in flight but nobody is doing it:
- `running` and its lock is gone, for longer than one lock TTL: the worker died inside the
  stage. That attempt ran and failed, so it counts: the window is queued for a new attempt
  (attempts + 1), or failed once it has none left.
- `queued` for longer than `stale_after` with no lock held: its message may be lost (a Redis
  restart emptied the broker, a worker died before it started the stage) or may simply be
  waiting behind a backlog. Cleanup cannot tell the two apart on every broker, and need not:
  it sends the message again WITHOUT using an attempt. A duplicate is harmless, since a stage
  runs only after claiming the record (the second message finds the stage done or taken).
  So waiting never kills a window, however long the backlog.
- `pending`, or `failed` past its retry delay, while its pipeline has room under its cap: the
  message that should have dispatched it (generation, a finishing window's request, `enqueue`)
  died with the broker. Cleanup dispatches such pipelines itself (`dispatch_waiting`), so no
  window waits for the next generation tick (`every`, up to an hour) after a Redis wipe.
Locks whose owner process is dead on this host are released first. Requeued windows resume
from their recorded stage; every stage is idempotent, so a requeue that races a slow but live
worker costs time, never correctness (fencing refuses the loser's commit, in the state store
and in the target's ledger).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis

from core.config import Config
from core.dispatch import SendChain, dispatch_waiting
from core.instants import format_instant
from core.keys import window_lock_key
from core.locks import HeldLock, force_release, held_locks
from core.logs import get_logger
from core.records import WindowRecord, WindowStatus
from core.store import StateStore
from core.transitions import resume_stage


@dataclass
class CleanupReport:
    released: list[HeldLock] = field(default_factory=list)
    requeued: list[tuple[WindowRecord, str]] = field(default_factory=list)
    failed: list[tuple[WindowRecord, str]] = field(default_factory=list)
    dispatched: dict[str, int] = field(default_factory=dict)
    """Pipelines the safety net dispatched, with how many windows each queued."""

    def summary(self) -> dict[str, list[str]]:
        return {
            "released": [f"{h.pipeline} {format_instant(h.window_start)}" for h in self.released],
            "requeued": [
                f"{r.pipeline} {format_instant(r.window_start)}: {why}" for r, why in self.requeued
            ],
            "failed": [
                f"{r.pipeline} {format_instant(r.window_start)}: {why}" for r, why in self.failed
            ],
            "dispatched": [f"{name}: {count} queued" for name, count in self.dispatched.items()],
        }


def stale_windows(
    store: StateStore, client: redis.Redis, config: Config, now: datetime
) -> list[tuple[WindowRecord, str]]:
    """Windows in flight that nobody works on, each with the reason."""
    settings = config.settings
    running_grace = settings.lock_ttl
    found = []
    for record in store.stale_candidates(older_than=now - running_grace):
        if record.pipeline not in config.pipelines:
            continue
        if client.exists(window_lock_key(record.pipeline, record.window_start)):
            continue
        idle = now - (record.updated_at or now)
        if record.status == WindowStatus.RUNNING:
            found.append((record, f"running at {record.stage} but its lock is gone"))
        elif record.status == WindowStatus.QUEUED and idle >= settings.stale_after:
            found.append(
                (record, f"queued at {record.stage} for {_seconds(idle)} with no worker on it")
            )
    return found


def cleanup(
    store: StateStore, client: redis.Redis, config: Config, send: SendChain, now: datetime
) -> CleanupReport:
    """Release dead owners' locks, requeue (or fail, if out of attempts) lost windows, then
    dispatch every pipeline that has runnable windows and room (`dispatch_waiting`)."""
    log = get_logger("windowpipe.cleanup")
    report = CleanupReport()
    for held in held_locks(client):
        if held.owner_is_dead_here() and force_release(client, held):
            report.released.append(held)
            log.warning(
                "released lock of a dead owner",
                pipeline=held.pipeline,
                window=format_instant(held.window_start),
                owner=held.owner,
            )
    for record, reason in stale_windows(store, client, config, now):
        pipeline = config.pipelines[record.pipeline]
        context = {"pipeline": record.pipeline, "window": format_instant(record.window_start)}
        if record.status == WindowStatus.QUEUED:
            touched = store.touch_queued(
                record.pipeline, record.window_start, fence=record.fence, stage=record.stage
            )
            if touched is None:
                continue  # claimed meanwhile: its message was not lost after all
            send(record.pipeline, record.window_start, resume_stage(record.status, record.stage))
            report.requeued.append((record, f"{reason}; message sent again, no attempt used"))
            log.warning("sent a waiting window's message again", reason=reason, **context)
            continue
        if record.attempts >= pipeline.max_attempts:
            try:
                store.transition(
                    record.pipeline,
                    record.window_start,
                    WindowStatus.FAILED,
                    expect=[record.status],
                    fence=record.fence,
                    error=(
                        f"worker lost during attempt {record.attempts} of "
                        f"{pipeline.max_attempts} ({reason})"
                    ),
                )
                report.failed.append((record, reason))
                log.warning("lost window failed: attempts exhausted", reason=reason, **context)
            except Exception as error:  # raced with a live worker: leave it to that worker
                log.info("lost window changed meanwhile", error=str(error), **context)
            continue
        requeued = store.queue(
            record.pipeline, record.window_start, expect=[record.status], fence=record.fence
        )
        if requeued is None:
            continue
        send(record.pipeline, requeued.window_start, resume_stage(requeued.status, requeued.stage))
        report.requeued.append((record, reason))
        log.warning("requeued lost window", reason=reason, stage=str(requeued.stage), **context)
    report.dispatched = dispatch_waiting(
        store,
        client,
        config.pipelines,
        send,
        now,
        failed_retry_base=config.settings.failed_retry_base,
    )
    return report


def _seconds(value: timedelta) -> str:
    return f"{int(value.total_seconds())}s"
