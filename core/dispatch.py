"""Generation and dispatch: create due windows, then enqueue the runnable ones within caps.

This is what beat runs for each pipeline every `every`, what `windowpipe enqueue` runs after
creating manual windows, and what a finishing window triggers so the next one starts.
Scheduled and manual (backfill) windows have separate caps per pipeline, so a backfill of
10,000 windows never holds up the live windows (apache/airflow#18501).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis

from core.config import PipelineConfig
from core.errors import BadInputError, one_line
from core.instants import format_instant
from core.locks import DispatchLock, acquire_dispatch_locks, release_dispatch_locks
from core.logs import get_logger
from core.records import Stage, WindowKind, WindowRecord, WindowStatus
from core.retry import FAILED_RETRY_BASE, failed_retry_delay
from core.store import StateStore, UnfinishedGroup
from core.transitions import resume_stage
from core.validation import ChainProblem, validate_chain
from core.windows import Window, due_windows

SendChain = Callable[[str, datetime, Stage], str | None]
"""(pipeline, window start, first stage) -> the id of the chain sent to the broker."""

SendChains = Callable[[Sequence[tuple[str, datetime, Stage]]], object]
"""`SendChain` for many windows at once (one producer, one round trip to the broker); raises
if any of them may not have reached it."""


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
    send_batch: SendChains | None = None,
) -> tuple[list[WindowRecord], int]:
    """Enqueue runnable windows up to the pipeline's caps; returns (queued, newly dead).

    One dispatcher per pipeline at a time (`DispatchLock`). The windows are read and claimed
    as `dispatch_batch` does: the active counts of both kinds in one statement, the runnable
    windows in one, every chosen window claimed by one guarded UPDATE (`StateStore.queue_many`:
    each row matches only while in the status read, so a window another dispatcher claimed
    first is left out, not sent, and no window is queued twice), then the chains sent, through
    `send_batch` when given (one producer, one Redis round trip), else one by one. A send that
    fails raises: the windows claimed stay queued, and cleanup sends their messages again once
    they waited `stale_after`.

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
        kinds = waiting if waiting is not None else _EVERY_KIND
        chosen = _choose(store, [pipeline], {pipeline.name: kinds}, now, failed_retry_base)
        claimed = store.queue_many(
            [(r.pipeline, r.window_start, r.status) for rs in chosen.values() for r in rs]
        )
        # Scheduled windows first, each kind oldest first.
        claimed.sort(key=lambda r: (r.kind != WindowKind.SCHEDULED, r.window_start))
        chains = [(r.pipeline, r.window_start, resume_stage(r.status, r.stage)) for r in claimed]
        if send_batch is not None and chains:
            send_batch(chains)
        else:
            for name, start, stage in chains:
                send(name, start, stage)
        if claimed or dead:
            log.info("dispatched", queued=len(claimed), dead=dead)
        return claimed, dead
    finally:
        lock.release()


_EVERY_KIND = tuple((kind, WindowStatus.PENDING) for kind in WindowKind)
"""What `dispatch` looks at when it was not told what waits: every kind of window."""


def _ready(record: WindowRecord, now: datetime, failed_retry_base: timedelta) -> bool:
    """A runnable record may be queued at `now`: pending, or failed past its retry delay."""
    if record.status != WindowStatus.FAILED or record.finished_at is None:
        return True
    return record.finished_at + failed_retry_delay(record.attempts, failed_retry_base) <= now


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
    plan = _plan_tick(store, pipeline, now, last_end)
    created = (
        store.create_windows(pipeline.name, plan.due, kind=WindowKind.SCHEDULED) if plan.due else []
    )
    _check_chain(report, plan, _tail_after(store, plan, created))
    report.queued, report.dead = dispatch(
        store,
        client,
        pipeline,
        send,
        now,
        failed_retry_base=failed_retry_base,
        waiting=_waiting_after(waiting, report),
    )
    return report


@dataclass(frozen=True)
class _TickPlan:
    """What a generation tick creates, decided before creating it (`_plan_tick`)."""

    pipeline: PipelineConfig
    due: list[Window]
    since: datetime
    """Where the chain's tail that the tick validates starts: one window before the frontier.
    Only the tail is validated: reading the whole history every tick grows without bound
    (`windowpipe validate` checks the whole chain)."""
    tail: list[WindowRecord] | None
    """The records from `since` on as read before creating (None: read after creating)."""


def _plan_tick(
    store: StateStore, pipeline: PipelineConfig, now: datetime, last_end: LastEnd | None
) -> _TickPlan:
    """The frontier, the windows due there and the tail's start. With the last scheduled end
    known, the records are read once (or not at all when `last_end.records` holds them): every
    record from one window before that end on holds both the frontier's look-ahead and the
    tail (which starts one window before the frontier, at or after that)."""
    if last_end is None or last_end.value is None:
        frontier = generation_frontier(store, pipeline, last_end)
        since = frontier - pipeline.window if frontier is not None else pipeline.start
        return _TickPlan(pipeline, _due_after(pipeline, now, frontier), since, None)
    read = last_end.records
    if read is None:
        read = store.list_records(pipeline.name, start=last_end.value - pipeline.window)
    ahead = [record for record in read if record.window_start >= last_end.value]
    frontier = _past_existing(last_end.value, ahead, pipeline.max_windows_per_tick)
    since = frontier - pipeline.window
    tail = [record for record in read if record.window_start >= since]
    return _TickPlan(pipeline, _due_after(pipeline, now, frontier), since, tail)


def _tail_after(
    store: StateStore, plan: _TickPlan, created: Sequence[Window]
) -> tuple[list[Window], list[WindowRecord]]:
    """(the windows created, the chain's tail after creating them): what a read after the
    creation would return, the tail read before plus the created windows as fresh pending
    records; read again if there was none, or if another tick created some of the due windows
    meanwhile."""
    name = plan.pipeline.name
    if plan.tail is None or len(created) != len(plan.due):
        return list(created), store.list_records(name, start=plan.since)
    fresh = [WindowRecord(name, w.start, w.end, kind=WindowKind.SCHEDULED) for w in created]
    return list(created), plan.tail + fresh


def _check_chain(
    report: TickReport, plan: _TickPlan, after: tuple[list[Window], list[WindowRecord]]
) -> None:
    """Validate the tail (`_tail_after`) into `report`, logging the first problems."""
    pipeline = plan.pipeline
    report.created, tail = after
    report.problems = validate_chain(
        tail, origin=pipeline.start, size=pipeline.window, since=plan.since
    )
    if report.problems:
        log = get_logger("windowpipe.generation", pipeline=pipeline.name)
        for problem in report.problems[:20]:
            log.warning("chain problem", kind=problem.kind.value, message=problem.message)


def _waiting_after(
    waiting: Collection[tuple[WindowKind, WindowStatus]] | None, report: TickReport
) -> Collection[tuple[WindowKind, WindowStatus]] | None:
    """The pipeline's waiting windows read before the tick, with the windows it created."""
    if waiting is not None and report.created:
        return {*waiting, (WindowKind.SCHEDULED, WindowStatus.PENDING)}
    return waiting


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
    send_batch: SendChains | None = None,
) -> BatchReport:
    """`generation_tick` for each of `pipelines`, with the work of the ticks done together:
    their last scheduled ends read in one statement, their waiting windows in another (a
    pipeline with nothing to dispatch is not dispatched), their records from one window before
    that end in a third (a pipeline with no window due reads nothing more), every due window
    created in one INSERT (`StateStore.create_windows_many`), and the dispatch of them all
    batched (`dispatch_batch`). One pipeline's error (a bad source config, a chain that no
    longer fits, a lost connection) is logged and reported under its name; the others still
    run: a batched statement that fails is tried again a pipeline at a time."""
    report = BatchReport()
    names = [p.name for p in pipelines]
    ends = store.last_window_ends(names, kind=WindowKind.SCHEDULED)
    waiting = store.waiting(names)
    window = {p.name: p.window for p in pipelines}
    records = store.records_from(
        {name: end - window[name] for name, end in ends.items() if end is not None}
    )
    plans: dict[str, _TickPlan] = {}
    for pipeline in pipelines:
        try:
            last_end = LastEnd(ends[pipeline.name], records.get(pipeline.name))
            plans[pipeline.name] = _plan_tick(store, pipeline, now, last_end)
        except Exception as error:
            _failed(report, pipeline.name, error)
    created = _create_due(store, plans, report)
    ticks: dict[str, TickReport] = {}
    for name, plan in plans.items():
        tick = TickReport(name)
        try:
            _check_chain(tick, plan, _tail_after(store, plan, created.get(name, [])))
        except Exception as error:
            _failed(report, name, error)
            continue
        ticks[name] = tick
    dispatched, failed = dispatch_batch(
        store,
        client,
        [plans[name].pipeline for name in ticks],
        send,
        now,
        failed_retry_base=failed_retry_base,
        waiting={name: _waiting_after(waiting[name], tick) or () for name, tick in ticks.items()},
        send_batch=send_batch,
    )
    report.failed.update(failed)
    for name in names:  # in the order given
        if name in ticks and name not in failed:
            ticks[name].queued, ticks[name].dead = dispatched[name]
            report.ticks.append(ticks[name])
    return report


def _failed(report: BatchReport, pipeline: str, error: Exception) -> None:
    """Log a pipeline's error (call it in the `except` block) and report it under its name."""
    report.failed[pipeline] = _logged(pipeline, error)


def _create_due(
    store: StateStore, plans: dict[str, _TickPlan], report: BatchReport
) -> dict[str, list[Window]]:
    """Create the due windows of every plan in one INSERT; if that fails, a pipeline at a time,
    so one pipeline's bad row fails that pipeline alone (its plan is dropped from `plans`).
    Returns the windows created per pipeline."""
    due = {name: plan.due for name, plan in plans.items() if plan.due}
    if not due:
        return {}
    try:
        return store.create_windows_many(due, kind=WindowKind.SCHEDULED)
    except Exception as error:
        get_logger("windowpipe.generation").warning(
            "creating a batch's windows in one statement failed; creating them per pipeline",
            error=one_line(f"{type(error).__name__}: {error}"),
            pipelines=len(due),
        )
    created: dict[str, list[Window]] = {}
    for name, windows in due.items():
        try:
            created[name] = store.create_windows(name, windows, kind=WindowKind.SCHEDULED)
        except Exception as error:
            _failed(report, name, error)
            del plans[name]
    return created


def dispatch_batch(
    store: StateStore,
    client: redis.Redis,
    pipelines: Sequence[PipelineConfig],
    send: SendChain,
    now: datetime,
    *,
    waiting: Mapping[str, Collection[tuple[WindowKind, WindowStatus]]],
    failed_retry_base: timedelta = FAILED_RETRY_BASE,
    send_batch: SendChains | None = None,
) -> tuple[dict[str, tuple[list[WindowRecord], int]], dict[str, str]]:
    """`dispatch` for each of `pipelines` (with its `waiting` windows, as `dispatch` takes
    them), the round trips of all done together; returns ((queued, newly dead) per pipeline,
    the one-line error of each pipeline that failed).

    The same guards as `dispatch`, taken for many pipelines at once: the pipelines' dispatch
    locks in one Redis round trip (`acquire_dispatch_locks`; a pipeline whose lock another
    dispatcher holds is dispatched alone afterwards, through `DispatchLock`, which waits for
    it), their active counts and runnable windows in one statement each, and every chosen
    window claimed by one guarded UPDATE (`StateStore.queue_many`: each row matches only
    while in the status read, so a window another dispatcher claimed first is left out and
    not sent, and no window is queued twice). Then the claimed windows' chains are sent,
    through `send_batch` when given (one producer, one Redis pipeline). A window that loses
    a race is left for the next dispatch (a finishing window's, the next tick's, cleanup's):
    fewer than the free slots may be queued this time, never more.

    If a read or the claim fails, nothing was claimed: each pipeline is dispatched alone
    instead, so one pipeline's error fails only that one. If sending the chains fails, their
    windows stay queued without a message, as when `send` fails in `dispatch`: those
    pipelines are reported failed, and cleanup sends the messages of windows queued longer
    than `stale_after` again.
    """
    results: dict[str, tuple[list[WindowRecord], int]] = {p.name: ([], 0) for p in pipelines}
    failed: dict[str, str] = {}
    todo = [p for p in pipelines if waiting.get(p.name)]
    held: dict[str, str] = {}
    # Redis away: each pipeline alone then, failing on its own (as `dispatch` would).
    with suppress(redis.RedisError):
        held = acquire_dispatch_locks(client, [p.name for p in todo]) if todo else {}
    mine = [p for p in todo if p.name in held]
    alone = [p for p in todo if p.name not in held]
    dead: dict[str, int] = {}
    try:
        try:
            dead = _bury_exhausted(store, mine, waiting, failed)
            mine = [p for p in mine if p.name not in failed]
            chosen = _choose(store, mine, waiting, now, failed_retry_base)
            claimed = store.queue_many(
                [(r.pipeline, r.window_start, r.status) for rs in chosen.values() for r in rs]
            )
        except Exception as error:
            get_logger("windowpipe.dispatch").warning(
                "dispatching a batch together failed; dispatching its pipelines one by one",
                error=one_line(f"{type(error).__name__}: {error}"),
                pipelines=len(mine),
            )
            _release(client, held)
            held = {}
            alone = [p for p in todo if p.name not in failed]
            claimed = []
        claimed.sort(key=lambda r: (r.pipeline, r.window_start))
        for record in claimed:
            results[record.pipeline][0].append(record)
        chains = [(r.pipeline, r.window_start, resume_stage(r.status, r.stage)) for r in claimed]
        _send_all(chains, send, send_batch, failed)
    finally:
        _release(client, held)
    for name, count in dead.items():
        results[name] = (results[name][0], count)
    by_themselves = {p.name for p in alone}  # `dispatch` logs their dispatch itself
    for pipeline in mine:
        queued, buried = results[pipeline.name]
        if pipeline.name not in failed.keys() | by_themselves and (queued or buried):
            get_logger("windowpipe.dispatch", pipeline=pipeline.name).info(
                "dispatched", queued=len(queued), dead=buried
            )
    for pipeline in alone:
        try:
            queued, buried = dispatch(
                store,
                client,
                pipeline,
                send,
                now,
                failed_retry_base=failed_retry_base,
                waiting=waiting[pipeline.name],
                send_batch=send_batch,
            )
        except Exception as error:
            failed[pipeline.name] = _logged(pipeline.name, error)
            continue
        results[pipeline.name] = (queued, buried + dead.get(pipeline.name, 0))
    return results, failed


def _release(client: redis.Redis, held: Mapping[str, str]) -> None:
    """Release the batch's dispatch locks; if Redis is away, they expire on their own."""
    try:
        release_dispatch_locks(client, held)
    except redis.RedisError as error:
        get_logger("windowpipe.dispatch").warning(
            "releasing dispatch locks failed; they expire", error=one_line(str(error))
        )


def _logged(pipeline: str, error: Exception) -> str:
    """Log a pipeline's failed generation with its traceback (call it in the `except` block);
    returns the error in one line."""
    message = one_line(f"{type(error).__name__}: {error}")
    get_logger("windowpipe.generation", pipeline=pipeline).exception(
        "generation failed", error=message
    )
    return message


def _bury_exhausted(
    store: StateStore,
    pipelines: Sequence[PipelineConfig],
    waiting: Mapping[str, Collection[tuple[WindowKind, WindowStatus]]],
    failed: dict[str, str],
) -> dict[str, int]:
    """`mark_dead_exhausted` for each pipeline with a failed window waiting (rare: a statement
    each); a pipeline whose statement fails goes into `failed`."""
    dead = {}
    for pipeline in pipelines:
        if any(status == WindowStatus.FAILED for _, status in waiting[pipeline.name]):
            try:
                dead[pipeline.name] = store.mark_dead_exhausted(
                    pipeline.name, pipeline.max_attempts
                )
            except Exception as error:
                failed[pipeline.name] = _logged(pipeline.name, error)
    return dead


def _choose(
    store: StateStore,
    pipelines: Sequence[PipelineConfig],
    waiting: Mapping[str, Collection[tuple[WindowKind, WindowStatus]]],
    now: datetime,
    failed_retry_base: timedelta,
) -> dict[tuple[str, WindowKind], list[WindowRecord]]:
    """The windows `dispatch` would queue for each pipeline and waiting kind, up to the free
    slots of its cap (two statements for all of them)."""
    active = store.count_active_many([p.name for p in pipelines])
    free: dict[tuple[str, WindowKind], int] = {}
    for pipeline in pipelines:
        for kind in {kind for kind, _ in waiting[pipeline.name]}:
            room = _cap(pipeline, kind) - active.get((pipeline.name, kind), 0)
            if room > 0:
                free[(pipeline.name, kind)] = room
    by_name = {p.name: p for p in pipelines}
    candidates = store.runnable_many(
        [
            (name, kind, by_name[name].max_attempts, room * 4)
            for (name, kind), room in sorted(free.items())
        ]
    )
    return {
        key: [r for r in records if _ready(r, now, failed_retry_base)][: free[key]]
        for key, records in candidates.items()
    }


def _send_all(
    chains: Sequence[tuple[str, datetime, Stage]],
    send: SendChain,
    send_batch: SendChains | None,
    failed: dict[str, str],
) -> None:
    """Send the chains (pipeline, window start, first stage) of claimed windows: all at once
    through `send_batch` if given (its failure fails every pipeline with a chain in it: which
    messages reached the broker is unknown), else one by one, a pipeline whose send fails
    failing alone (its later windows are not sent either, as in `dispatch`)."""
    if send_batch is not None and chains:
        try:
            send_batch(chains)
        except Exception as error:
            for name in dict.fromkeys(name for name, _, _ in chains):
                failed[name] = _logged(name, error)
        return
    for name, start, stage in chains:
        if name in failed:
            continue
        try:
            send(name, start, stage)
        except Exception as error:
            failed[name] = _logged(name, error)
