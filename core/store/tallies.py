"""The metrics' reads of the `windows` table: one statement per metric family for every
pipeline (`core.metrics` shapes the numbers; see its docstring for what each one measures)."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from core.records import FINISHED, Stage, WindowStatus
from core.store.queries import recheck_due
from core.store.schema import WINDOWS

ROW_COLUMNS: tuple[tuple[Stage, str], ...] = (
    (Stage.PRECHECK, "source_count"),
    (Stage.EXTRACT, "staged_count"),
    (Stage.LOAD, "target_count"),
)
"""Which record count each stage's rows are: precheck counts the source, extract stages the
documents, load leaves them in the target (the audit checks the three agree)."""

UNFINISHED = tuple(sorted(set(WindowStatus) - FINISHED))
"""Statuses of windows whose data is not (yet) complete in the target."""


def seconds_between(dialect: str, start: Any, end: Any) -> sa.ColumnElement[Any]:
    """`end - start` in seconds, in SQL. PostgreSQL stores `timestamptz`; SQLite stores the UTC
    wall time as text, which `julianday` reads."""
    if dialect == "postgresql":
        return sa.func.extract("epoch", end - start)
    return (sa.func.julianday(end) - sa.func.julianday(start)) * 86400.0


FAR_FUTURE = datetime(9999, 12, 31, tzinfo=UTC)
"""Stands for "no bound" where SQL needs an instant (a pipeline with no unfinished window)."""

ACTIVE = (WindowStatus.QUEUED.value, WindowStatus.RUNNING.value)
"""The statuses of a stage's backlog; the partial index ix_windows_active_stage (migration
0004) holds exactly these windows, and KEDA's query counts them per stage."""


def configured_pipelines(dialect: str, names: Iterable[str]) -> sa.TableValuedAlias:
    """The pipeline names as a one-column table (`value`), passed as one JSON parameter: the
    driving table of the per-pipeline index lookups in `frontier_query`."""
    text = json.dumps(sorted(names))
    if dialect == "postgresql":
        rows = sa.func.json_array_elements_text(sa.cast(sa.literal(text), postgresql.JSON))
    else:
        rows = sa.func.json_each(sa.literal(text))
    return rows.table_valued("value").alias("configured")


def frontier_query(dialect: str, names: Iterable[str]) -> sa.Select[Any]:
    """(pipeline, first unfinished window's start, complete_through) of each pipeline in
    `names`, in one statement: per pipeline, the oldest window not succeeded or skipped
    through the (pipeline, status) index, then the newest window before it through the
    (pipeline, window_start) index; nothing of the history is scanned.

    On SQLite the first column is written `+window_start`: for a bare `min(window_start)` its
    planner walks the (pipeline, window_start) index from the oldest window instead, through
    the whole history (measured: 100 ms instead of 0.1 ms with 500,000 windows)."""
    configured = configured_pipelines(dialect, names)
    start: Any = WINDOWS.c.window_start
    if dialect == "sqlite":
        start = sa.literal_column("+windows.window_start", type_=WINDOWS.c.window_start.type)
    first = (
        sa.select(sa.func.min(start))
        .where(
            WINDOWS.c.pipeline == configured.c.value,
            WINDOWS.c.status.in_([s.value for s in UNFINISHED]),
        )
        .scalar_subquery()
    )
    frontier = sa.select(
        configured.c.value.label("pipeline"), first.label("first_unfinished")
    ).subquery("frontier")
    bound = sa.func.coalesce(
        frontier.c.first_unfinished, sa.literal(FAR_FUTURE, WINDOWS.c.window_start.type)
    )
    newest_before = (
        sa.select(WINDOWS.c.window_end)
        .where(WINDOWS.c.pipeline == frontier.c.pipeline, WINDOWS.c.window_start < bound)
        .order_by(WINDOWS.c.window_start.desc())
        .limit(1)
        .scalar_subquery()
    )
    return sa.select(
        frontier.c.pipeline,
        sa.type_coerce(frontier.c.first_unfinished, WINDOWS.c.window_start.type),
        newest_before,
    )


def tally_query(dialect: str, bounds: Sequence[float]) -> sa.Select[Any]:
    """Per (pipeline, status): the count, and, used from the succeeded group only, the
    "at or below" count of each bound, the count and sum of the chain durations, and the row
    sums. One pass over the table for every pipeline; windows without both instants are left
    out of the durations."""
    duration = seconds_between(dialect, WINDOWS.c.started_at, WINDOWS.c.finished_at)
    timed = sa.and_(WINDOWS.c.started_at.is_not(None), WINDOWS.c.finished_at.is_not(None))
    columns: list[Any] = [WINDOWS.c.pipeline, WINDOWS.c.status, sa.func.count()]
    for bound in bounds:
        columns.append(sa.func.sum(sa.case((sa.and_(timed, duration <= bound), 1), else_=0)))
    columns.append(sa.func.sum(sa.case((timed, 1), else_=0)))
    columns.append(sa.func.coalesce(sa.func.sum(sa.case((timed, duration), else_=None)), 0.0))
    for _stage, column in ROW_COLUMNS:
        columns.append(sa.func.coalesce(sa.func.sum(WINDOWS.c[column]), 0))
    return sa.select(*columns).group_by(WINDOWS.c.pipeline, WINDOWS.c.status)


def backlog_query() -> sa.Select[Any]:
    """(pipeline, stage, status, count) of the windows queued or running at a stage: an
    index-only read of ix_windows_active_stage, which holds only those.

    The Kubernetes ScaledObjects count the same windows per stage (deploy/kubernetes/keda.yaml,
    checked by tests/test_kubernetes.py)."""
    return (
        sa.select(WINDOWS.c.pipeline, WINDOWS.c.stage, WINDOWS.c.status, sa.func.count())
        .where(WINDOWS.c.status.in_(ACTIVE), WINDOWS.c.stage.is_not(None))
        .group_by(WINDOWS.c.pipeline, WINDOWS.c.stage, WINDOWS.c.status)
    )


def unfinished_query(audit_prefix: str) -> sa.Select[Any]:
    """(pipeline, most attempts of a window still being retried, audit failures) over the
    windows not succeeded or skipped, through the (pipeline, status) index.

    A dead window is not being retried: it counts in `windowpipe_dead_windows`, not in the
    attempts, so one dead window does not also raise the "retrying" alert. An audit failure is
    a window failed (or dead) by the audit finding the counts differ: the runner records it
    with an error starting `audit_prefix` and sends the window back to precheck, which tells it
    apart from an audit stage that could not reach the target (that keeps its stage).
    """
    audit_failed = sa.and_(
        WINDOWS.c.status.in_([WindowStatus.FAILED.value, WindowStatus.DEAD.value]),
        WINDOWS.c.error.like(f"{audit_prefix}%"),
        WINDOWS.c.stage == Stage.PRECHECK.value,
    )
    retrying = WINDOWS.c.status != WindowStatus.DEAD.value
    return (
        sa.select(
            WINDOWS.c.pipeline,
            sa.func.max(sa.case((retrying, WINDOWS.c.attempts), else_=None)),
            sa.func.sum(sa.case((audit_failed, 1), else_=0)),
        )
        .where(WINDOWS.c.status.in_([s.value for s in UNFINISHED]))
        .group_by(WINDOWS.c.pipeline)
    )


def recheck_tally_query() -> sa.Select[Any]:
    """(pipeline, recheck horizons passed, windows that ever drifted) of every pipeline."""
    return sa.select(
        WINDOWS.c.pipeline,
        sa.func.sum(WINDOWS.c.rechecks_done),
        sa.func.sum(sa.case((WINDOWS.c.drift.is_not(None), 1), else_=0)),
    ).group_by(WINDOWS.c.pipeline)


def due_rechecks_query(
    names: Collection[str], horizons: Sequence[timedelta], now: datetime
) -> sa.Select[Any]:
    """(pipeline, finished windows waiting for a recheck at `now`) of the pipelines `names`,
    which share the recheck `horizons`, through the recheck index."""
    return (
        sa.select(WINDOWS.c.pipeline, sa.func.count())
        .where(WINDOWS.c.pipeline.in_(sorted(names)), recheck_due(horizons, now))
        .group_by(WINDOWS.c.pipeline)
    )


def read_frontiers(conn: Connection, names: Iterable[str]) -> dict[str, Frontier]:
    """The frontier of each pipeline in `names`, in one statement (`frontier_query`)."""
    names = list(names)
    if not names:
        return {}
    rows = conn.execute(frontier_query(conn.dialect.name, names)).tuples()
    return {name: Frontier(first, end) for name, first, end in rows}


@dataclass(frozen=True)
class Frontier:
    """Where a pipeline's complete prefix ends."""

    first_unfinished: datetime | None
    """Start of the oldest window not succeeded or skipped; None when there is none."""
    complete_through: datetime | None
    """End of the newest window before it (of the newest window, when every one finished);
    None when the first window is not finished, or there is no window."""
