"""Generation and dispatch: create due windows, then enqueue the runnable ones within caps.

This is what beat runs for each pipeline every `every`, what `windowpipe enqueue` runs after
creating manual windows, and what a finishing window triggers so the next one starts.
Scheduled and manual (backfill) windows have separate caps per pipeline, so a backfill of
10,000 windows never holds up the live windows (apache/airflow#18501).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis

from core.config import PipelineConfig
from core.errors import BadInputError, one_line
from core.instants import format_instant
from core.locks import DispatchLock
from core.logs import get_logger
from core.records import Stage, WindowKind, WindowRecord, WindowStatus
from core.retry import FAILED_RETRY_BASE, failed_retry_delay
from core.store import StateStore, UnfinishedGroup
from core.transitions import resume_stage
from core.validation import ChainProblem, validate_chain
from core.windows import Window, due_windows

SendChain = Callable[[str, datetime, Stage], str | None]
"""(pipeline, window start, first stage) -> the id of the chain sent to the broker."""


@dataclass
class TickReport:
    """What one generation tick did, for logs and the task result."""

    pipeline: str
    created: list[Window] = field(default_factory=list)
    problems: list[ChainProblem] = field(default_factory=list)
    queued: list[WindowRecord] = field(default_factory=list)
    dead: int = 0

    def summary(self) -> dict[str, object]:
        return {
            "pipeline": self.pipeline,
            "created": len(self.created),
            "problems": [p.message for p in self.problems],
            "queued": [format_instant(r.window_start) for r in self.queued],
            "dead": self.dead,
        }


@dataclass(frozen=True)
class LastEnd:
    """The end of a pipeline's last scheduled window (None: no such window), read beforehand:
    `StateStore.last_window_ends` reads it for many pipelines in one statement."""

    value: datetime | None
    records: Sequence[WindowRecord] | None = None
    """The pipeline's records from one window before `value` on, oldest first, if read already
    (`StateStore.records_from`, many pipelines in one statement): a tick then reads none."""


def generation_frontier(
    store: StateStore, pipeline: PipelineConfig, last_end: LastEnd | None = None
) -> datetime | None:
    """Where the next scheduled window starts: the end of the last scheduled window, moved past
    windows that already exist there (a backfill or a forced re-run may have created them as
    manual windows); None on the first run. `last_end`, when given, saves reading that end.

    Manual windows further ahead, after a hole, do not move it: the schedule never skips a
    window because a backfill ran beyond it.
    """
    if last_end is None:
        last_end = LastEnd(store.last_window_end(pipeline.name, kind=WindowKind.SCHEDULED))
    cursor = last_end.value or pipeline.start
    ahead = store.list_records(pipeline.name, start=cursor, limit=pipeline.max_windows_per_tick)
    cursor = _past_existing(cursor, ahead, pipeline.max_windows_per_tick)
    if last_end.value is None and cursor == pipeline.start:
        return None
    return cursor


def _past_existing(cursor: datetime, ahead: Sequence[WindowRecord], limit: int) -> datetime:
    """`cursor` moved past the first `limit` of `ahead` (records starting at or after it,
    oldest first) as long as each starts where the one before ended."""
    for record in ahead[:limit]:
        if record.window_start != cursor:
            break
        cursor = record.window_end
    return cursor


def planned_windows(store: StateStore, pipeline: PipelineConfig, now: datetime) -> list[Window]:
    """The windows a generation tick at `now` creates (what `windowpipe plan` prints)."""
    return _due_after(pipeline, now, generation_frontier(store, pipeline))


def _due_after(pipeline: PipelineConfig, now: datetime, frontier: datetime | None) -> list[Window]:
    """The windows due at `now` from `frontier` (`generation_frontier`) on."""
    try:
        return due_windows(
            origin=pipeline.start,
            size=pipeline.window,
            lag=pipeline.lag,
            max_windows=pipeline.max_windows_per_tick,
            now=now,
            last_end=frontier,
        )
    except ValueError as error:
        # Stored windows no longer fit the config: `start` or `window` changed after windows
        # were created. Refuse in one line rather than guess which windows are missing.
        raise BadInputError(
            f"pipeline {pipeline.name}: {error}; did `start` or `window` change after windows "
            f"were created? See `windowpipe validate {pipeline.name}`"
        ) from None


def create_due_windows(store: StateStore, pipeline: PipelineConfig, now: datetime) -> list[Window]:
    """Store the windows that are due at `now` (idempotent); returns the ones created."""
    due = planned_windows(store, pipeline, now)
    return store.create_windows(pipeline.name, due, kind=WindowKind.SCHEDULED) if due else []


def dispatch(
    store: StateStore,
    client: redis.Redis,
    pipeline: PipelineConfig,
    send: SendChain,
    now: datetime,
    *,
    failed_retry_base: timedelta = FAILED_RETRY_BASE,
    waiting: Collection[tuple[WindowKind, WindowStatus]] | None = None,
) -> tuple[list[WindowRecord], int]:
    """Enqueue runnable windows up to the pipeline's caps; returns (queued, newly dead).

    One dispatcher per pipeline at a time (`DispatchLock`); the guarded `queue()` (ENQUEUE)
    makes each window's enqueue happen once even if two dispatchers raced anyway.

    `waiting`, when given, is the (kind, status) pairs of the pipeline's pending and failed
    windows as read just before (`StateStore.waiting`): a kind with none is not looked at,
    failed windows are buried only if there are some, and with none at all the dispatch is
    over before taking its lock. A window that became pending or failed since is no worse off
    than if this dispatch had run a moment earlier: the next one (a finishing window's, the
    next tick's) takes it.
    """
    log = get_logger("windowpipe.dispatch", pipeline=pipeline.name)
    if waiting is not None and not waiting:
        return [], 0
    lock = DispatchLock(client, pipeline.name)
    if not lock.acquire():
        log.info("dispatch already running elsewhere")
        return [], 0
    try:
        dead = 0
        if waiting is None or any(status == WindowStatus.FAILED for _, status in waiting):
            dead = store.mark_dead_exhausted(pipeline.name, pipeline.max_attempts)
        queued: list[WindowRecord] = []
        caps = {
            WindowKind.SCHEDULED: pipeline.max_active_windows,
            WindowKind.MANUAL: pipeline.max_backfill_windows,
        }
        for kind, cap in caps.items():
            if waiting is not None and all(k != kind for k, _ in waiting):
                continue
            free = cap - store.count_active(pipeline.name, kind)
            if free <= 0:
                continue
            candidates = store.runnable(
                pipeline.name, kind, max_attempts=pipeline.max_attempts, limit=free * 4
            )
            for record in candidates:
                if len([r for r in queued if r.kind == kind]) >= free:
                    break
                if record.status == WindowStatus.FAILED and record.finished_at is not None:
                    ready_at = record.finished_at + failed_retry_delay(
                        record.attempts, failed_retry_base
                    )
                    if ready_at > now:
                        continue
                claimed = store.queue(pipeline.name, record.window_start, expect=[record.status])
                if claimed is None:
                    continue
                send(
                    pipeline.name, claimed.window_start, resume_stage(claimed.status, claimed.stage)
                )
                queued.append(claimed)
        if queued or dead:
            log.info("dispatched", queued=len(queued), dead=dead)
        return queued, dead
    finally:
        lock.release()


def generation_tick(
    store: StateStore,
    client: redis.Redis,
    pipeline: PipelineConfig,
    send: SendChain,
    now: datetime,
    *,
    failed_retry_base: timedelta = FAILED_RETRY_BASE,
    last_end: LastEnd | None = None,
    waiting: Collection[tuple[WindowKind, WindowStatus]] | None = None,
) -> TickReport:
    """Beat's job for one pipeline: create due windows, validate the chain, dispatch.

    `last_end` is the end of its last scheduled window and `waiting` its pending and failed
    windows' (kind, status) pairs, if already read (`generation_batch` reads both for many
    pipelines at once; see `dispatch`)."""
    report = TickReport(pipeline.name)
    # Only the tail of the chain is validated (from one window before where this tick began):
    # reading the whole history every tick grows without bound. `windowpipe validate` checks
    # the whole chain.
    frontier: datetime | None
    if last_end is not None and last_end.value is not None:
        frontier, since, tail = _tail_read_once(
            store, pipeline, now, last_end.value, last_end.records, report
        )
    else:
        frontier = generation_frontier(store, pipeline, last_end)
        due = _due_after(pipeline, now, frontier)
        if due:
            report.created = store.create_windows(pipeline.name, due, kind=WindowKind.SCHEDULED)
        since = frontier - pipeline.window if frontier is not None else pipeline.start
        tail = store.list_records(pipeline.name, start=since)
    report.problems = validate_chain(tail, origin=pipeline.start, size=pipeline.window, since=since)
    if report.problems:
        log = get_logger("windowpipe.generation", pipeline=pipeline.name)
        for problem in report.problems[:20]:
            log.warning("chain problem", kind=problem.kind.value, message=problem.message)
    if waiting is not None and report.created:
        waiting = {*waiting, (WindowKind.SCHEDULED, WindowStatus.PENDING)}
    report.queued, report.dead = dispatch(
        store, client, pipeline, send, now, failed_retry_base=failed_retry_base, waiting=waiting
    )
    return report


def _tail_read_once(
    store: StateStore,
    pipeline: PipelineConfig,
    now: datetime,
    last_end: datetime,
    read: Sequence[WindowRecord] | None,
    report: TickReport,
) -> tuple[datetime, datetime, list[WindowRecord]]:
    """`generation_tick`'s frontier, creation and tail with the records read once: every
    record from one window before `last_end` on holds both the frontier's look-ahead and the
    tail (which starts one window before the frontier, at or after that). Creates the due
    windows into `report`; returns (frontier, since, tail). `read`, when given, is those
    records read before (then a tick without due windows reads nothing). The tail is what a
    read after the creation would return: the read records from `since` on plus the created
    windows as fresh pending records; if another tick created some of the due windows
    meanwhile, the tail is read again instead.
    """
    if read is None:
        read = store.list_records(pipeline.name, start=last_end - pipeline.window)
    ahead = [record for record in read if record.window_start >= last_end]
    frontier = _past_existing(last_end, ahead, pipeline.max_windows_per_tick)
    since = frontier - pipeline.window
    due = _due_after(pipeline, now, frontier)
    if due:
        report.created = store.create_windows(pipeline.name, due, kind=WindowKind.SCHEDULED)
        if len(report.created) != len(due):
            return frontier, since, store.list_records(pipeline.name, start=since)
    fresh = [
        WindowRecord(pipeline.name, window.start, window.end, kind=WindowKind.SCHEDULED)
        for window in report.created
    ]
    return frontier, since, [r for r in read if r.window_start >= since] + fresh


def pipelines_to_dispatch(
    unfinished: Iterable[UnfinishedGroup],
    pipelines: Mapping[str, PipelineConfig],
    now: datetime,
    *,
    failed_retry_base: timedelta = FAILED_RETRY_BASE,
) -> list[str]:
    """The pipelines a dispatch would move now, from `StateStore.unfinished()`: those with a
    runnable window (pending, or failed past its retry delay with attempts left) of a kind
    whose cap has room, or a failed window out of attempts (dispatch buries it). Sorted.

    Pure: the safety net (`dispatch_waiting`) reads the store once for every pipeline and
    dispatches only these. A failed group is due when its oldest window is: the others wait
    in `dispatch` itself, which checks each record's own delay.
    """
    active: dict[tuple[str, WindowKind], int] = {}
    runnable: set[tuple[str, WindowKind]] = set()
    bury: set[str] = set()
    for group in unfinished:
        pipeline = pipelines.get(group.pipeline)
        if pipeline is None:
            continue  # a pipeline no longer in the config: nothing runs it
        key = (group.pipeline, group.kind)
        if group.status in (WindowStatus.QUEUED, WindowStatus.RUNNING):
            active[key] = active.get(key, 0) + group.count
        elif group.status == WindowStatus.PENDING:
            runnable.add(key)
        elif group.attempts >= pipeline.max_attempts:
            bury.add(group.pipeline)
        elif group.oldest_finished_at is None or (
            group.oldest_finished_at + failed_retry_delay(group.attempts, failed_retry_base) <= now
        ):
            runnable.add(key)
    with_room = {
        name for name, kind in runnable if active.get((name, kind), 0) < _cap(pipelines[name], kind)
    }
    return sorted(with_room | bury)


def _cap(pipeline: PipelineConfig, kind: WindowKind) -> int:
    """How many windows of `kind` may be active at once (the caps `dispatch` applies)."""
    if kind == WindowKind.SCHEDULED:
        return pipeline.max_active_windows
    return pipeline.max_backfill_windows


def dispatch_waiting(
    store: StateStore,
    client: redis.Redis,
    pipelines: Mapping[str, PipelineConfig],
    send: SendChain,
    now: datetime,
    *,
    failed_retry_base: timedelta = FAILED_RETRY_BASE,
) -> dict[str, int]:
    """The safety net: dispatch every pipeline that has runnable windows and room for them,
    whatever happened to the message that should have done it; returns how many windows each
    dispatched pipeline queued.

    A window is dispatched by generation (every `every`), by a finishing window's request, or
    by `windowpipe enqueue`. Each is one message, and a message can die with the broker:
        t0  a backfill runs 8 windows at a time, `every = "1h"`
        t1  the 8 finish; their dispatch request waits in the control queue
        t2  Redis is wiped: the request is gone, nothing is queued or running
        t3  nothing else asks for a dispatch until generation, up to an hour later
    Cleanup runs this every `cleanup_every`, so the backfill goes on at t2 + `cleanup_every`.
    One read of the store for all pipelines (`StateStore.unfinished`), then `dispatch` only
    for the pipelines that need it: with 1,000 pipelines, an idle deployment costs one query.
    `dispatch`'s own guards apply unchanged (its per-pipeline lock, each window's guarded
    enqueue), so this racing a generation tick or a requested dispatch queues no window twice.
    """
    due = pipelines_to_dispatch(
        store.unfinished(), pipelines, now, failed_retry_base=failed_retry_base
    )
    dispatched = {}
    for name in due:
        queued, _ = dispatch(
            store, client, pipelines[name], send, now, failed_retry_base=failed_retry_base
        )
        dispatched[name] = len(queued)
    return dispatched


@dataclass
class BatchReport:
    """What one generation task over many pipelines did."""

    ticks: list[TickReport] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """Pipeline -> the one-line error its tick raised (the other pipelines went on)."""

    def summary(self) -> dict[str, object]:
        return {
            "pipelines": len(self.ticks) + len(self.failed),
            "created": sum(len(tick.created) for tick in self.ticks),
            "queued": sum(len(tick.queued) for tick in self.ticks),
            "dead": sum(tick.dead for tick in self.ticks),
            "failed": dict(self.failed),
        }


def generation_batch(
    store: StateStore,
    client: redis.Redis,
    pipelines: Sequence[PipelineConfig],
    send: SendChain,
    now: datetime,
    *,
    failed_retry_base: timedelta = FAILED_RETRY_BASE,
) -> BatchReport:
    """`generation_tick` for each of `pipelines`, their last scheduled ends read in one
    statement, their waiting windows in another (a pipeline with nothing to dispatch is
    not dispatched) and their records from one window before that end in a third (a
    pipeline with no window due reads nothing more). One pipeline's error (a bad source
    config, a chain that no longer fits, a lost connection) is logged and reported under its
    name; the others still run."""
    report = BatchReport()
    names = [p.name for p in pipelines]
    ends = store.last_window_ends(names, kind=WindowKind.SCHEDULED)
    waiting = store.waiting(names)
    window = {p.name: p.window for p in pipelines}
    records = store.records_from(
        {name: end - window[name] for name, end in ends.items() if end is not None}
    )
    for pipeline in pipelines:
        try:
            tick = generation_tick(
                store,
                client,
                pipeline,
                send,
                now,
                failed_retry_base=failed_retry_base,
                last_end=LastEnd(ends[pipeline.name], records.get(pipeline.name)),
                waiting=waiting[pipeline.name],
            )
        except Exception as error:
            message = one_line(f"{type(error).__name__}: {error}")
            get_logger("windowpipe.generation", pipeline=pipeline.name).exception(
                "generation failed", error=message
            )
            report.failed[pipeline.name] = message
            continue
        report.ticks.append(tick)
    return report
