"""Reads of the `windows` table: single records, frontiers, per-pipeline summaries, the
unfinished and waiting groups the dispatch reads, and which windows are due a recheck."""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from core.records import ACTIVE, FINISHED, WindowKind, WindowRecord, WindowStatus
from core.store.engine import StoreConnections
from core.store.schema import WINDOWS, UTCDateTime, _aware, _record_from_values, _to_record, _values


@dataclass(frozen=True)
class UnfinishedGroup:
    """Unfinished windows of one pipeline and kind that share a status and an attempt count:
    what the dispatch safety net reads of every pipeline at once (`StateStore.unfinished`)."""

    pipeline: str
    kind: WindowKind
    status: WindowStatus
    attempts: int
    count: int
    oldest_finished_at: datetime | None
    """The earliest `finished_at` of the group (a failed window's retry delay runs from it)."""


def recheck_due(horizons: Sequence[timedelta], now: datetime) -> sa.ColumnElement[bool]:
    """Finished windows waiting for a recheck at `now`: past the horizon after the last one
    they passed (`horizons`, the pipeline's `recheck`, oldest first; not empty)."""
    now = _aware(now, "now")
    return sa.and_(
        WINDOWS.c.status.in_(_values(FINISHED)),
        sa.or_(
            *(
                sa.and_(WINDOWS.c.rechecks_done == index, WINDOWS.c.window_end <= now - horizon)
                for index, horizon in enumerate(horizons)
            )
        ),
    )


@dataclass
class PipelineSummary:
    """One pipeline's windows at a glance (`StateStore.pipeline_summaries`)."""

    pipeline: str
    counts: dict[WindowStatus, int] = field(default_factory=dict)
    """Windows by status; statuses with none are absent."""
    complete_through: datetime | None = None
    """End of the newest window such that it and every window before it succeeded or were
    skipped; None when no such window exists."""

    @property
    def backlog(self) -> int:
        """Windows still to run: neither finished (succeeded, skipped) nor dead."""
        done = FINISHED | {WindowStatus.DEAD}
        return sum(count for status, count in self.counts.items() if status not in done)

    @property
    def dead(self) -> int:
        return self.counts.get(WindowStatus.DEAD, 0)


# --- engine -------------------------------------------------------------------------------------


DISPATCHABLE = frozenset({WindowStatus.PENDING, WindowStatus.FAILED})
"""What a dispatch acts on: pending windows to queue, failed ones to retry or bury."""

RUNNABLE_READS_PER_STATEMENT = 250
"""(pipeline, kind) reads per statement of `runnable_many`: SQLite refuses a compound SELECT of
more than 500 terms (a batch of 1,000 pipelines with backfills would ask for 2,000)."""


_GET = sa.select(WINDOWS).where(
    WINDOWS.c.pipeline == sa.bindparam("key_pipeline"),
    WINDOWS.c.window_start == sa.bindparam("key_start", type_=UTCDateTime()),
)
"""One record by its key (`StoreQueries.get`), built once."""

_WAITING = (
    sa.select(WINDOWS.c.pipeline, WINDOWS.c.kind, WINDOWS.c.status)
    .where(WINDOWS.c.status.in_(_values(DISPATCHABLE)))
    .distinct()
)
"""The (pipeline, kind, status) of dispatchable windows (`StoreQueries.waiting`), to narrow to
some pipelines."""

_PG_WAITING = _WAITING.where(
    WINDOWS.c.pipeline == sa.any_(sa.bindparam("pipelines", type_=postgresql.ARRAY(sa.String())))
)
"""`_WAITING` for the pipelines of one array parameter: one statement for any number of them
(PostgreSQL reads `IN (a, b)` as `= ANY('{a,b}')` too: the same plan)."""


class StoreQueries(StoreConnections):
    """The reads of `StateStore`: each one statement on the `windows` table."""

    def get(self, pipeline: str, window_start: datetime) -> WindowRecord | None:
        """The record of one window, or None."""
        params = {"key_pipeline": pipeline, "key_start": _aware(window_start)}
        rows = self._hot_rows("get", _GET, params, write=False)
        return _record_from_values(rows[0]) if rows else None

    def list_records(
        self,
        pipeline: str | None = None,
        *,
        statuses: Collection[WindowStatus] | None = None,
        kind: WindowKind | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int | None = None,
    ) -> list[WindowRecord]:
        """Records ordered by pipeline and window start, filtered by every argument given.

        `start`/`end` select the windows whose start lies in `[start, end)`.
        """
        query = sa.select(WINDOWS).order_by(WINDOWS.c.pipeline, WINDOWS.c.window_start)
        if pipeline is not None:
            query = query.where(WINDOWS.c.pipeline == pipeline)
        if statuses is not None:
            query = query.where(WINDOWS.c.status.in_(_values(statuses)))
        if kind is not None:
            query = query.where(WINDOWS.c.kind == WindowKind(kind).value)
        if start is not None:
            query = query.where(WINDOWS.c.window_start >= _aware(start, "start"))
        if end is not None:
            query = query.where(WINDOWS.c.window_start < _aware(end, "end"))
        if limit is not None:
            query = query.limit(limit)
        return self._records(query)

    def records_from(self, starts: Mapping[str, datetime]) -> dict[str, list[WindowRecord]]:
        """For each pipeline of `starts`, its records starting at or after its start, oldest
        first (`list_records(pipeline, start=...)` for many pipelines in one statement)."""
        found: dict[str, list[WindowRecord]] = {name: [] for name in starts}
        if not starts:
            return found
        params: dict[str, Any] = {}
        for at, (name, start) in enumerate(starts.items()):
            params |= {f"pipeline_{at}": name, f"start_{at}": _aware(start, "start")}
        with self._reading() as conn:
            for row in conn.execute(_records_from_query(len(starts)), params):
                record = _to_record(row)
                found[record.pipeline].append(record)
        return found

    def last_window_end(self, pipeline: str, *, kind: WindowKind | None = None) -> datetime | None:
        """The latest window end stored for `pipeline` (of one kind, if given), or None."""
        query = sa.select(sa.func.max(WINDOWS.c.window_end)).where(WINDOWS.c.pipeline == pipeline)
        if kind is not None:
            query = query.where(WINDOWS.c.kind == WindowKind(kind).value)
        with self._reading() as conn:
            value: datetime | None = conn.execute(query).scalar_one()
        return value

    def last_window_ends(
        self, pipelines: Sequence[str], *, kind: WindowKind | None = None
    ) -> dict[str, datetime | None]:
        """`last_window_end` of each of `pipelines`, in one statement: a `max()` per pipeline,
        each one step of the (pipeline, kind, window_end) index whatever the history (a
        GROUP BY would read every window of the pipelines)."""
        names = list(dict.fromkeys(pipelines))
        if not names:
            return {}
        params: dict[str, Any] = {f"pipeline_{at}": name for at, name in enumerate(names)}
        if kind is not None:
            params["kind"] = WindowKind(kind).value
        with self._reading() as conn:
            row = conn.execute(_last_ends_query(len(names), kind is not None), params).one()
        return dict(zip(names, row, strict=True))

    def waiting(self, pipelines: Sequence[str]) -> dict[str, set[tuple[WindowKind, WindowStatus]]]:
        """For each of `pipelines`, the (kind, status) pairs of its pending and failed windows
        (what a dispatch may queue or bury), in one statement through the (pipeline, status)
        index: it reads those windows only, never the history. A pipeline with none maps to
        an empty set."""
        names = list(dict.fromkeys(pipelines))
        found: dict[str, set[tuple[WindowKind, WindowStatus]]] = {name: set() for name in names}
        if not names:
            return found
        if self.dialect == "postgresql":
            rows = self._hot_rows("waiting", _PG_WAITING, {"pipelines": names}, write=False)
        else:
            query = _WAITING.where(WINDOWS.c.pipeline.in_(names))
            with self._reading() as conn:
                rows = conn.execute(query).all()
        for pipeline, kind, status in rows:
            found[pipeline].add((WindowKind(kind), WindowStatus(status)))
        return found

    def counts_by_status(self, pipeline: str | None = None) -> dict[str, int]:
        """How many records are in each status (every status listed, zeros included)."""
        query = sa.select(WINDOWS.c.status, sa.func.count()).group_by(WINDOWS.c.status)
        if pipeline is not None:
            query = query.where(WINDOWS.c.pipeline == pipeline)
        with self._reading() as conn:
            found = {status: count for status, count in conn.execute(query).tuples()}
        return {status.value: int(found.get(status.value, 0)) for status in WindowStatus}

    def pipeline_summaries(self) -> dict[str, PipelineSummary]:
        """Every pipeline's windows by status and where its complete prefix ends, in one
        statement (grouped by pipeline and status), whatever the number of pipelines.

        The complete prefix is as `core.metrics.read_frontiers` reads it: the
        end of the newest window starting before the oldest window not succeeded or skipped
        (of the newest window, when every one is).
        """
        unfinished = _values(set(WindowStatus) - FINISHED)
        firsts = (
            sa.select(
                WINDOWS.c.pipeline.label("pipeline"),
                sa.func.min(WINDOWS.c.window_start).label("first_unfinished"),
            )
            .where(WINDOWS.c.status.in_(unfinished))
            .group_by(WINDOWS.c.pipeline)
            .subquery("firsts")
        )
        in_prefix = sa.or_(
            firsts.c.first_unfinished.is_(None),
            WINDOWS.c.window_start < firsts.c.first_unfinished,
        )
        query = (
            sa.select(
                WINDOWS.c.pipeline,
                WINDOWS.c.status,
                sa.func.count(),
                sa.func.max(WINDOWS.c.window_end).filter(in_prefix),
            )
            .select_from(WINDOWS.outerjoin(firsts, firsts.c.pipeline == WINDOWS.c.pipeline))
            .group_by(WINDOWS.c.pipeline, WINDOWS.c.status)
        )
        summaries: dict[str, PipelineSummary] = {}
        with self._reading() as conn:
            rows = conn.execute(query).tuples().all()
        for pipeline, status, count, prefix_end in rows:
            summary = summaries.setdefault(pipeline, PipelineSummary(pipeline))
            summary.counts[WindowStatus(status)] = int(count)
            through = summary.complete_through
            if prefix_end is not None and (through is None or prefix_end > through):
                summary.complete_through = prefix_end
        return summaries

    def count_active(self, pipeline: str, kind: WindowKind) -> int:
        """How many windows of `kind` are queued or running (for the pipeline's caps)."""
        query = sa.select(sa.func.count()).where(
            WINDOWS.c.pipeline == pipeline,
            WINDOWS.c.kind == WindowKind(kind).value,
            WINDOWS.c.status.in_(_values(ACTIVE)),
        )
        with self._reading() as conn:
            return int(conn.execute(query).scalar_one())

    def runnable(
        self, pipeline: str, kind: WindowKind, *, max_attempts: int, limit: int
    ) -> list[WindowRecord]:
        """Windows of `kind` that may be queued: pending, or failed with attempts left; oldest
        first."""
        query = _runnable_read(pipeline, WindowKind(kind).value, max_attempts, limit)
        return self._records(query)

    def count_active_many(self, pipelines: Sequence[str]) -> dict[tuple[str, WindowKind], int]:
        """`count_active` of every kind of each of `pipelines` in one statement (through the
        (pipeline, status) index: the active windows only); a (pipeline, kind) with none is
        left out."""
        names = list(dict.fromkeys(pipelines))
        if not names:
            return {}
        query = (
            sa.select(WINDOWS.c.pipeline, WINDOWS.c.kind, sa.func.count())
            .where(WINDOWS.c.pipeline.in_(names), WINDOWS.c.status.in_(_values(ACTIVE)))
            .group_by(WINDOWS.c.pipeline, WINDOWS.c.kind)
        )
        with self._reading() as conn:
            rows = conn.execute(query).tuples().all()
        return {(name, WindowKind(kind)): int(count) for name, kind, count in rows}

    def runnable_many(
        self, wanted: Sequence[tuple[str, WindowKind, int, int]]
    ) -> dict[tuple[str, WindowKind], list[WindowRecord]]:
        """`runnable(pipeline, kind, max_attempts=, limit=)` for each `(pipeline, kind,
        max_attempts, limit)` of `wanted`, in one statement per `RUNNABLE_READS_PER_STATEMENT`
        of them (a UNION ALL of the same limited reads, so a backfill of 10,000 pending windows
        is read `limit` rows at a time as before); each list oldest first, every one of `wanted`
        in the result."""
        found: dict[tuple[str, WindowKind], list[WindowRecord]] = {
            (name, WindowKind(kind)): [] for name, kind, _, _ in wanted
        }
        if not wanted:
            return found
        with self._reading() as conn:
            for first in range(0, len(wanted), RUNNABLE_READS_PER_STATEMENT):
                chunk = wanted[first : first + RUNNABLE_READS_PER_STATEMENT]
                params: dict[str, Any] = {}
                for at, (name, kind, max_attempts, limit) in enumerate(chunk):
                    params |= {
                        f"pipeline_{at}": name,
                        f"kind_{at}": WindowKind(kind).value,
                        f"attempts_{at}": max_attempts,
                        f"limit_{at}": limit,
                    }
                for row in conn.execute(_runnable_union(len(chunk)), params):
                    record = _to_record(row)
                    found[(record.pipeline, record.kind)].append(record)
        return found

    def unfinished(self) -> list[UnfinishedGroup]:
        """Every pipeline's pending, queued, running and failed windows, counted per pipeline,
        kind, status and attempts, in one query (one round trip for 1,000 pipelines, and a few
        rows per pipeline that has unfinished windows; finished ones are not returned)."""
        waiting = (WindowStatus.PENDING, WindowStatus.FAILED, *ACTIVE)
        columns = (WINDOWS.c.pipeline, WINDOWS.c.kind, WINDOWS.c.status, WINDOWS.c.attempts)
        query = (
            sa.select(*columns, sa.func.count(), sa.func.min(WINDOWS.c.finished_at))
            .where(WINDOWS.c.status.in_(_values(waiting)))
            .group_by(*columns)
        )
        with self._reading() as conn:
            rows = conn.execute(query).tuples().all()
        return [
            UnfinishedGroup(
                pipeline=pipeline,
                kind=WindowKind(kind),
                status=WindowStatus(status),
                attempts=int(attempts),
                count=int(count),
                oldest_finished_at=oldest,  # min() keeps the column's type: aware UTC
            )
            for pipeline, kind, status, attempts, count, oldest in rows
        ]

    def stale_candidates(self, older_than: datetime) -> list[WindowRecord]:
        """Queued or running records of every pipeline not updated since `older_than`."""
        query = (
            sa.select(WINDOWS)
            .where(
                WINDOWS.c.status.in_(_values(ACTIVE)),
                WINDOWS.c.updated_at < _aware(older_than, "older_than"),
            )
            .order_by(WINDOWS.c.pipeline, WINDOWS.c.window_start)
        )
        return self._records(query)

    def due_rechecks(
        self, pipeline: str, horizons: Sequence[timedelta], now: datetime, *, limit: int
    ) -> list[WindowRecord]:
        """Finished windows that reached their next recheck horizon, oldest first.

        Window k is due when it has passed `rechecks_done` horizons and `window_end +
        horizons[rechecks_done] <= now`. One indexed range per horizon, so the cost follows the
        windows due, not the pipeline's history.
        """
        if not horizons:
            return []
        query = (
            sa.select(WINDOWS)
            .where(WINDOWS.c.pipeline == pipeline, recheck_due(horizons, now))
            .order_by(WINDOWS.c.window_end)
            .limit(limit)
        )
        return self._records(query)

    def count_due_rechecks(
        self, pipeline: str, horizons: Sequence[timedelta], now: datetime
    ) -> int:
        """How many finished windows wait for a recheck now (for the metrics)."""
        if not horizons:
            return 0
        query = sa.select(sa.func.count()).where(
            WINDOWS.c.pipeline == pipeline, recheck_due(horizons, now)
        )
        with self._reading() as conn:
            return int(conn.execute(query).scalar_one())

    def recheck_tally(self, pipeline: str) -> tuple[int, int]:
        """`(rechecks done, windows that ever drifted)` of a pipeline, for the metrics: an
        index-only count per `rechecks_done` value and a partial index on drifted windows."""
        done = sa.select(WINDOWS.c.rechecks_done, sa.func.count()).where(
            WINDOWS.c.pipeline == pipeline, WINDOWS.c.rechecks_done > 0
        )
        drifted = sa.select(sa.func.count()).where(
            WINDOWS.c.pipeline == pipeline, WINDOWS.c.drift.is_not(None)
        )
        with self._reading() as conn:
            total = sum(
                int(k) * int(n) for k, n in conn.execute(done.group_by(WINDOWS.c.rechecks_done))
            )
            return total, int(conn.execute(drifted).scalar_one())


def _runnable_read(pipeline: Any, kind: Any, max_attempts: Any, limit: Any) -> sa.Select[Any]:
    """A pipeline's windows of one kind that may be queued (pending, or failed with attempts
    left), oldest first, at most `limit`: for values (`runnable`) or bound parameters
    (`runnable_many`)."""
    retryable = sa.and_(
        WINDOWS.c.status == WindowStatus.FAILED.value, WINDOWS.c.attempts < max_attempts
    )
    return (
        sa.select(WINDOWS)
        .where(
            WINDOWS.c.pipeline == pipeline,
            WINDOWS.c.kind == kind,
            sa.or_(WINDOWS.c.status == WindowStatus.PENDING.value, retryable),
        )
        .order_by(WINDOWS.c.window_start)
        .limit(limit)
    )


@functools.cache
def _runnable_union(parts: int) -> sa.Select[Any]:
    """`StateStore.runnable_many`'s statement for `parts` (pipeline, kind) reads, with bound
    `pipeline_<i>`, `kind_<i>`, `attempts_<i>` and `limit_<i>`: built once per size (building
    50 subqueries costs more than running them)."""
    selects = [
        _runnable_read(
            sa.bindparam(f"pipeline_{at}"),
            sa.bindparam(f"kind_{at}"),
            sa.bindparam(f"attempts_{at}"),
            sa.bindparam(f"limit_{at}", type_=sa.Integer()),
        ).subquery()
        for at in range(parts)
    ]
    # Each limited read in its own subquery: SQLite refuses ORDER BY/LIMIT on the members of
    # a compound SELECT themselves.
    union = sa.union_all(*(sa.select(part) for part in selects)).subquery()
    return sa.select(union).order_by(union.c.pipeline, union.c.kind, union.c.window_start)


# The statements of the reads of many pipelines at once, built once per number of pipelines
# with bound values: building 50 subqueries or conditions costs more than running them, and
# a generation batch runs them with the same number of pipelines every tick.


@functools.cache
def _records_from_query(pipelines: int) -> sa.Select[Any]:
    """`StateStore.records_from`'s statement, with bound `pipeline_<i>` and `start_<i>`."""
    return (
        sa.select(WINDOWS)
        .where(
            sa.or_(
                *(
                    sa.and_(
                        WINDOWS.c.pipeline == sa.bindparam(f"pipeline_{at}"),
                        WINDOWS.c.window_start
                        >= sa.bindparam(f"start_{at}", type_=WINDOWS.c.window_start.type),
                    )
                    for at in range(pipelines)
                )
            )
        )
        .order_by(WINDOWS.c.pipeline, WINDOWS.c.window_start)
    )


@functools.cache
def _last_ends_query(pipelines: int, of_kind: bool) -> sa.Select[Any]:
    """`StateStore.last_window_ends`'s statement, with bound `pipeline_<i>` (and `kind`)."""
    columns = []
    for at in range(pipelines):
        query = sa.select(sa.func.max(WINDOWS.c.window_end)).where(
            WINDOWS.c.pipeline == sa.bindparam(f"pipeline_{at}")
        )
        if of_kind:
            query = query.where(WINDOWS.c.kind == sa.bindparam("kind"))
        columns.append(query.scalar_subquery().label(f"end_{at}"))
    return sa.select(*columns)
