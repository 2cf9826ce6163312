"""The durable state store: one record per (pipeline, window) in SQLite or PostgreSQL.

Every change of a record is ONE guarded statement, `UPDATE windows SET ... WHERE pipeline = ?
AND window_start = ? AND status IN (...) [AND fence = ?] RETURNING ...`, so when two processes
race for the same window exactly one statement matches and the other learns why it lost
(wrong state, a newer fencing token, no such record). Nothing is cached: the database is the
truth, and a worker, beat and the CLI may all hold a `StateStore` on the same database.

Instants are stored as UTC and always come back timezone-aware UTC, on both backends.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine, Row, make_url

from core.errors import BadInputError, InvalidTransitionError, LostOwnershipError
from core.instants import format_instant, utc_now
from core.records import ACTIVE, FINISHED, Stage, WindowKind, WindowRecord, WindowStatus
from core.transitions import (
    BURY,
    CLAIM,
    ENQUEUE,
    REBUILD_RESET,
    RECHECK_RERUN,
    REFENCE,
    REQUEUE_LOST,
    RESEND,
    RESET,
    RESTART_FROM_PRECHECK,
    Move,
    Rule,
    move_for,
)
from core.validation import RebuildPlan
from core.windows import Window

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
"""How long a SQLite writer waits for another process's write lock before giving up."""

INSERT_CHUNK_ROWS = 1000
"""Rows per multi-row INSERT: 9 parameters a row stays far below both backends' limits."""

MIGRATION_LOCK_KEY = 0x77696E646F77
"""PostgreSQL advisory lock key held while migrating ("window" in ASCII)."""

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
"""Alembic's script location: the migrations ship inside the package."""

_T = TypeVar("_T")

_SQLITE_BEGIN = "windowpipe_sqlite_begin"
"""Execution option naming the SQLite BEGIN mode of a connection's next transaction."""


class _Unguarded:
    """No guard on the stage column (the default of `StateStore._move_one`)."""


_UNGUARDED = _Unguarded()


class UTCDateTime(sa.TypeDecorator[datetime]):
    """An instant stored as UTC and returned aware UTC; naive datetimes are refused.

    PostgreSQL keeps it in `timestamptz`; SQLite has no time zones, so it stores the naive UTC
    wall time (as fixed-width text, which also sorts and compares correctly).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _aware(value, "instant").astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


METADATA = sa.MetaData()
"""The state store's schema (created by the alembic migrations, never by `create_all`)."""


def _in_list(column: str, values: Collection[str]) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


WINDOWS = sa.Table(
    "windows",
    METADATA,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("pipeline", sa.String(200), nullable=False),
    sa.Column("window_start", UTCDateTime(), nullable=False),
    sa.Column("window_end", UTCDateTime(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("stage", sa.String(16), nullable=True),
    sa.Column("kind", sa.String(16), nullable=False, server_default="scheduled"),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("source_count", sa.BigInteger(), nullable=True),
    sa.Column("staged_count", sa.BigInteger(), nullable=True),
    sa.Column("target_count", sa.BigInteger(), nullable=True),
    sa.Column("rejected_count", sa.BigInteger(), nullable=True),
    sa.Column("fence", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("manifest", sa.Text(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("source_version", sa.Text(), nullable=True),
    sa.Column("rechecks_done", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("checked_at", UTCDateTime(), nullable=True),
    sa.Column("drift", sa.JSON(), nullable=True),
    sa.Column("checksum", sa.String(16), nullable=True),
    sa.Column("target_checksum", sa.String(16), nullable=True),
    sa.Column("load_fence", sa.BigInteger(), nullable=True),
    sa.UniqueConstraint("pipeline", "window_start", name="uq_windows_pipeline_window_start"),
    sa.CheckConstraint(_in_list("status", list(WindowStatus)), name="ck_windows_status"),
    sa.CheckConstraint(
        f"stage IS NULL OR {_in_list('stage', list(Stage))}", name="ck_windows_stage"
    ),
    sa.CheckConstraint(_in_list("kind", list(WindowKind)), name="ck_windows_kind"),
    sa.CheckConstraint("window_end > window_start", name="ck_windows_window_order"),
    sa.Index("ix_windows_pipeline_status", "pipeline", "status"),
    sa.Index("ix_windows_frontier", "pipeline", "kind", "window_end"),
    sa.Index("ix_windows_recheck", "pipeline", "rechecks_done", "window_end"),
    sa.Index(
        "ix_windows_drifted",
        "pipeline",
        sqlite_where=sa.text("drift IS NOT NULL"),
        postgresql_where=sa.text("drift IS NOT NULL"),
    ),
    # KEDA's per-stage count and the exporter's backlog (migration 0004).
    sa.Index(
        "ix_windows_active_stage",
        "stage",
        "status",
        "pipeline",
        sqlite_where=sa.text("status IN ('queued', 'running')"),
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    ),
)
"""One row per (pipeline, window_start); the columns are the fields of `WindowRecord`."""


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


class RecordNotFoundError(InvalidTransitionError, LookupError):
    """The window record a change was asked for does not exist."""


@dataclass(frozen=True)
class RebuildCounts:
    """What `apply_rebuild` changed."""

    deleted: int
    reset: int
    created: int


class StateStore:
    """Window records in one SQLite or PostgreSQL database; one engine per instance."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = _build_engine(url)

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return self._engine.dialect.name

    def dispose(self) -> None:
        """Close every pooled connection (call before a process exits or forks)."""
        self._engine.dispose()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    # --- schema -------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision (alembic `upgrade head`); safe to race.

        The whole upgrade runs in one transaction that first takes a lock (a PostgreSQL
        advisory lock, SQLite's write lock via BEGIN IMMEDIATE), so a second process calling
        this at the same time waits, then finds the schema at head and does nothing.
        """
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self._writing() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    # --- creating windows ---------------------------------------------------------------------

    def create_windows(
        self, pipeline: str, windows: Sequence[Window], kind: WindowKind = WindowKind.SCHEDULED
    ) -> list[Window]:
        """Store `windows` as pending records; returns the ones this call created, oldest first.

        Idempotent and safe to race: existing (pipeline, window_start) rows are left alone
        (`INSERT ... ON CONFLICT DO NOTHING`), inserted in chunks of `INSERT_CHUNK_ROWS` in one
        transaction. Rows go in sorted by start, so two concurrent callers never deadlock.
        Returns [] if every window existed already.
        """
        _require_pipeline(pipeline)
        unique = _unique_by_start(windows)
        with self._writing() as conn:
            created = set(self._insert_new(conn, pipeline, unique, WindowKind(kind)))
        return [window for window in unique if window.start in created]

    def _insert_new(
        self, conn: Connection, pipeline: str, windows: Sequence[Window], kind: WindowKind
    ) -> list[datetime]:
        """Insert pending records for the windows not stored yet; returns their starts.

        Chunks of `INSERT_CHUNK_ROWS`, each ONE statement with `ON CONFLICT DO NOTHING`:
        on PostgreSQL an `INSERT ... SELECT FROM unnest(starts, ends)` with two array
        parameters, on SQLite a multi-row VALUES built by SQLAlchemy's "insertmanyvalues".
        """
        now = utc_now()
        starts: list[datetime] = []
        params: dict[str, Any] | list[dict[str, Any]]
        for chunk in _chunks(windows, INSERT_CHUNK_ROWS):
            if self.dialect == "postgresql":
                statement, params = _pg_insert_new(pipeline, chunk, kind, now)
            else:
                statement = _SQLITE_INSERT_NEW
                params = [_new_row(pipeline, window, kind, now) for window in chunk]
            starts.extend(conn.execute(statement, params).scalars())
        return starts

    # --- reading ------------------------------------------------------------------------------

    def get(self, pipeline: str, window_start: datetime) -> WindowRecord | None:
        """The record of one window, or None."""
        query = sa.select(WINDOWS).where(*_key(pipeline, window_start))
        with self._reading() as conn:
            row = conn.execute(query).one_or_none()
        return _to_record(row) if row is not None else None

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
        query = (
            sa.select(WINDOWS)
            .where(
                sa.or_(
                    *(
                        sa.and_(
                            WINDOWS.c.pipeline == name,
                            WINDOWS.c.window_start >= _aware(start, "start"),
                        )
                        for name, start in starts.items()
                    )
                )
            )
            .order_by(WINDOWS.c.pipeline, WINDOWS.c.window_start)
        )
        for record in self._records(query):
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
        columns = []
        for at, name in enumerate(names):
            query = sa.select(sa.func.max(WINDOWS.c.window_end)).where(WINDOWS.c.pipeline == name)
            if kind is not None:
                query = query.where(WINDOWS.c.kind == WindowKind(kind).value)
            columns.append(query.scalar_subquery().label(f"end_{at}"))
        with self._reading() as conn:
            row = conn.execute(sa.select(*columns)).one()
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
        query = (
            sa.select(WINDOWS.c.pipeline, WINDOWS.c.kind, WINDOWS.c.status)
            .where(
                WINDOWS.c.pipeline.in_(names),
                WINDOWS.c.status.in_(_values(DISPATCHABLE)),
            )
            .distinct()
        )
        with self._reading() as conn:
            for pipeline, kind, status in conn.execute(query).tuples():
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
        retryable = sa.and_(
            WINDOWS.c.status == WindowStatus.FAILED.value, WINDOWS.c.attempts < max_attempts
        )
        query = (
            sa.select(WINDOWS)
            .where(
                WINDOWS.c.pipeline == pipeline,
                WINDOWS.c.kind == WindowKind(kind).value,
                sa.or_(WINDOWS.c.status == WindowStatus.PENDING.value, retryable),
            )
            .order_by(WINDOWS.c.window_start)
            .limit(limit)
        )
        return self._records(query)

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

    # --- guarded changes ----------------------------------------------------------------------

    def transition(
        self,
        pipeline: str,
        window_start: datetime,
        to: WindowStatus,
        *,
        expect: Collection[WindowStatus] | None = None,
        fence: int | None = None,
        **fields: Any,
    ) -> WindowRecord:
        """Apply the move to status `to` (setting `fields` too) in one guarded UPDATE.

        The move is `core.transitions.move_for(to, expect)`: a stage's commit (ADVANCE, SUCCEED,
        SKIP, FAIL) unless `expect` names states only another move leaves. The record must be in
        one of `expect` (default: the move's from-states) and, when `fence` is given, still carry
        that fencing token. Otherwise nothing changes and this raises `LostOwnershipError` (the
        fence moved on), `RecordNotFoundError` or `InvalidTransitionError` (wrong state) - never
        a silent no-op. `fields` the move does not take are a caller's bug (TypeError).
        """
        move = move_for(to, expect)
        sources = _sources(move, expect)
        record = self._move_one(move, pipeline, window_start, sources, fields, fence=fence)
        if record is None:
            raise self._refusal(pipeline, window_start, fence=fence, to=move.to, sources=sources)
        return record

    def claim_stage(
        self, pipeline: str, window_start: datetime, stage: Stage
    ) -> WindowRecord | None:
        """Take a new fencing token and mark the window running at `stage`, in one UPDATE.

        Matches only a queued or running record whose recorded stage is `stage`; returns the
        record as updated (its `fence` is the caller's token), or None when the window is not
        waiting for this stage. One round trip instead of bump, read and transition: this runs
        once per stage of every window.
        """
        return self._move_one(CLAIM, pipeline, window_start, CLAIM.sources, stage=Stage(stage))

    def raise_fence(
        self, pipeline: str, window_start: datetime, *, fence: int, above: int
    ) -> WindowRecord | None:
        """Move a running window's fence from `fence` to `above + 1` (REFENCE), when a
        target's ledger refused `fence` because it recorded `above`, a fence this store never
        issued for the window (restored from a backup, rebuilt, a clock behind).

        Matches only while the record is running with `fence`: then no newer owner claimed
        the window in this store, so the ledger's fence is no owner's that this store knows,
        and the owner goes on above it. None when the fence moved meanwhile (a newer owner
        exists: the caller lost the window) or `above` is not ahead of `fence`. Attempts are
        not touched: nothing failed.
        """
        if above < fence:
            return None
        taken = {"fence": above + 1}
        return self._move_one(REFENCE, pipeline, window_start, REFENCE.sources, taken, fence=fence)

    def queue(
        self,
        pipeline: str,
        window_start: datetime,
        *,
        expect: Collection[WindowStatus],
        kind: WindowKind | None = None,
        fence: int | None = None,
    ) -> WindowRecord | None:
        """Claim a window for a new attempt (ENQUEUE; REQUEUE_LOST when `expect` is running):
        status queued, attempts + 1, error cleared, the chain restarted or resumed as
        `core.transitions.resume_stage` says.

        Returns None when the record is not in one of `expect`: someone else queued it first,
        which is how concurrent enqueuers (beat, the CLI, cleanup) enqueue each window exactly
        once. With `fence`, it matches only while the record still carries that token (cleanup:
        nobody claimed the window since it was found lost).
        """
        move = move_for(WindowStatus.QUEUED, expect, among=(ENQUEUE, REQUEUE_LOST))
        taken = {} if kind is None else {"kind": kind}
        sources = _sources(move, expect)
        return self._move_one(move, pipeline, window_start, sources, taken, fence=fence)

    def touch_queued(
        self, pipeline: str, window_start: datetime, *, fence: int, stage: Stage | None
    ) -> WindowRecord | None:
        """Note that a queued window's message is being sent again, without a new attempt.

        Matches only while the window is still queued at `stage` with fencing token `fence`,
        i.e. nobody claimed it since the caller read it; moves `updated_at` on so the next
        cleanup waits another `stale_after`. Returns None when the window moved meanwhile.
        Attempts are not touched: waiting in a queue, or a message lost with the broker, is not
        work that ran and failed.
        """
        return self._move_one(
            RESEND, pipeline, window_start, RESEND.sources, fence=fence, stage=stage
        )

    def mark_dead_exhausted(self, pipeline: str, max_attempts: int) -> int:
        """Failed windows with `attempts >= max_attempts` become dead (BURY); returns how
        many."""
        statement = (
            sa.update(WINDOWS)
            .where(
                WINDOWS.c.pipeline == pipeline,
                _status_in(BURY.sources),
                WINDOWS.c.attempts >= max_attempts,
            )
            .values(**_move_values(BURY, utc_now()))
        )
        with self._one_statement() as conn:
            return conn.execute(statement).rowcount

    # --- rechecks ------------------------------------------------------------------------------

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
        now = _aware(now, "now")
        due = sa.or_(
            *(
                sa.and_(WINDOWS.c.rechecks_done == index, WINDOWS.c.window_end <= now - horizon)
                for index, horizon in enumerate(horizons)
            )
        )
        query = (
            sa.select(WINDOWS)
            .where(
                WINDOWS.c.pipeline == pipeline,
                WINDOWS.c.status.in_(_values(FINISHED)),
                due,
            )
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

    def record_check(
        self,
        record: WindowRecord,
        *,
        rechecks_done: int,
        drift: dict[str, Any] | None = None,
    ) -> WindowRecord | None:
        """Record that the source was compared with finished window `record` just now.

        Without `drift`: the source still matches; `rechecks_done` and `checked_at` move on.
        With `drift` (RECHECK_RERUN): it is appended to the record's drift history and the
        window is put back to pending as a manual window (chain from precheck, fence + 1, under
        the backfill cap), so the normal chain replaces its rows in the target. Guarded by the
        fence and status read in `record`: None when the window changed meanwhile (nothing
        written).
        """
        if drift is None:
            now = utc_now()
            guards = [
                *_key(record.pipeline, record.window_start),
                WINDOWS.c.fence == record.fence,
                WINDOWS.c.status == record.status.value,
            ]
            values = {"rechecks_done": rechecks_done, "checked_at": now, "updated_at": now}
            return self._update_one(guards, values)
        if record.status not in RECHECK_RERUN.sources:
            return None
        taken = {"rechecks_done": rechecks_done, "drift": [*record.drift, drift]}
        return self._move_one(
            RECHECK_RERUN,
            record.pipeline,
            record.window_start,
            frozenset({record.status}),
            taken,
            fence=record.fence,
        )

    # --- administrative resets (outside the workers' state machine) ---------------------------

    def reset_for_rerun(
        self,
        pipeline: str,
        starts: Collection[datetime],
        *,
        kind: WindowKind = WindowKind.MANUAL,
    ) -> int:
        """Put finished (succeeded, skipped) or dead windows back to pending for `--force`
        (RESET).

        Their chain starts over: stage, results, error and attempts are cleared, and they take
        `kind` so the dispatcher runs them under that kind's cap. Active, pending and failed
        windows are left alone (they run anyway). Returns how many records were reset.
        """
        values = _move_values(RESET, utc_now(), {"kind": kind})
        reset = 0
        with self._writing() as conn:
            for chunk in _chunks(sorted(set(starts)), INSERT_CHUNK_ROWS):
                statement = (
                    sa.update(WINDOWS)
                    .where(
                        WINDOWS.c.pipeline == pipeline,
                        WINDOWS.c.window_start.in_(chunk),
                        _status_in(RESET.sources),
                    )
                    .values(**values)
                )
                reset += conn.execute(statement).rowcount
        return reset

    def apply_rebuild(self, pipeline: str, plan: RebuildPlan) -> RebuildCounts:
        """Apply a `validate --rebuild` plan in one transaction; finished work is never lost.

        Deletes `plan.delete_starts`, puts `plan.reset_starts` back to pending (REBUILD_RESET:
        stage, results and error cleared) and creates `plan.create` as pending windows. Raises
        `InvalidTransitionError` - and changes nothing - if the plan would delete or reset a
        succeeded or skipped record.
        """
        _require_pipeline(pipeline)
        now = utc_now()
        touched = [*plan.delete_starts, *plan.reset_starts]
        with self._writing() as conn:
            _refuse_finished(conn, pipeline, touched)
            # Fences never go back for a (pipeline, window_start): a target's ledger refuses a
            # load whose fence is older than the last one it took for that window, so a
            # record re-created where one was deleted carries the old record's fence on.
            fences: dict[datetime, int] = {}
            for chunk in _chunks(sorted(set(plan.delete_starts)), INSERT_CHUNK_ROWS):
                rows = conn.execute(
                    sa.select(WINDOWS.c.window_start, WINDOWS.c.fence).where(
                        WINDOWS.c.pipeline == pipeline, WINDOWS.c.window_start.in_(chunk)
                    )
                )
                fences.update({start: int(fence) for start, fence in rows.tuples()})
            deleted = 0
            for chunk in _chunks(sorted(set(plan.delete_starts)), INSERT_CHUNK_ROWS):
                deleted += conn.execute(
                    sa.delete(WINDOWS).where(
                        WINDOWS.c.pipeline == pipeline, WINDOWS.c.window_start.in_(chunk)
                    )
                ).rowcount
            reset = 0
            values = _move_values(REBUILD_RESET, now)
            for chunk in _chunks(sorted(set(plan.reset_starts)), INSERT_CHUNK_ROWS):
                reset += conn.execute(
                    sa.update(WINDOWS)
                    .where(
                        WINDOWS.c.pipeline == pipeline,
                        WINDOWS.c.window_start.in_(chunk),
                        _status_in(REBUILD_RESET.sources),
                    )
                    .values(**values)
                ).rowcount
            windows = _unique_by_start(plan.create)
            created = len(self._insert_new(conn, pipeline, windows, WindowKind.SCHEDULED))
            for window in windows:
                if fences.get(window.start):
                    conn.execute(
                        sa.update(WINDOWS)
                        .where(
                            *_key(pipeline, window.start), WINDOWS.c.fence < fences[window.start]
                        )
                        .values(fence=fences[window.start])
                    )
        return RebuildCounts(deleted=deleted, reset=reset, created=created)

    # --- internals ----------------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection for reads that need no snapshot shared between statements (every read
        here is one statement, or, as in `recheck_tally`, independent ones). On PostgreSQL
        in autocommit: no BEGIN and ROLLBACK round trips around the SELECT."""
        if self.dialect == "postgresql":
            with self._autocommit() as conn:
                yield conn
            return
        with self._engine.connect() as conn:
            yield conn

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A connection in a write transaction, committed on success.

        On SQLite the transaction starts with BEGIN IMMEDIATE: it takes the write lock up front
        (waiting up to the busy timeout), instead of failing at its first write when another
        process wrote after this transaction's first read.
        """
        with self._engine.connect() as conn:
            conn.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})
            with conn.begin():
                yield conn

    @contextmanager
    def _one_statement(self) -> Iterator[Connection]:
        """A connection for a write that is one statement, committed when it returns.

        On PostgreSQL the statement runs in autocommit: a single statement is its own
        transaction there, as atomic and as durable, in one round trip instead of three
        (BEGIN, the statement, COMMIT). A guarded UPDATE needs nothing more: its guards and
        its new values are read and written by the one statement. On SQLite, as `_writing`.
        """
        if self.dialect != "postgresql":
            with self._writing() as conn:
                yield conn
            return
        with self._autocommit() as conn:
            yield conn

    @contextmanager
    def _autocommit(self) -> Iterator[Connection]:
        """A connection in autocommit: each statement its own transaction, no BEGIN or
        COMMIT/ROLLBACK round trips (`_reading` and `_one_statement` on PostgreSQL)."""
        with self._engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def _records(self, query: sa.Select[Any]) -> list[WindowRecord]:
        with self._reading() as conn:
            return [_to_record(row) for row in conn.execute(query)]

    def _move_one(
        self,
        move: Move,
        pipeline: str,
        window_start: datetime,
        sources: frozenset[WindowStatus],
        taken: Mapping[str, Any] | None = None,
        *,
        fence: int | None = None,
        stage: Stage | _Unguarded | None = _UNGUARDED,
    ) -> WindowRecord | None:
        """Apply `move` to one record in one guarded UPDATE: the record as updated, or None
        when it is not in one of `sources` (or no longer carries `fence`, or is not at `stage`).

        The hot path of every stage (a claim and a commit per stage of every window): the
        statement is built once per shape and reused with bound values, so SQLAlchemy neither
        builds it nor computes its cache key again.
        """
        taken = _checked_taken(move, taken or {})
        shape = _UpdateShape(
            move.name,
            sources,
            fenced=fence is not None,
            stage=stage if isinstance(stage, _Unguarded) else "null" if stage is None else "equal",
            taken=tuple(sorted(taken)),
        )
        statement = _GUARDED_UPDATES.get(shape)
        if statement is None:
            statement = _GUARDED_UPDATES[shape] = _guarded_update(move, shape)
        params = {
            "key_pipeline": pipeline,
            "key_start": _aware(window_start),
            "now": utc_now(),
            **{f"set_{name}": value for name, value in taken.items()},
        }
        if fence is not None:
            params["guard_fence"] = fence
        if isinstance(stage, Stage):
            params["guard_stage"] = stage.value
        with self._one_statement() as conn:
            row = conn.execute(statement, params).one_or_none()
        return _to_record(row) if row is not None else None

    def _update_one(
        self, guards: Sequence[sa.ColumnElement[bool]], values: Mapping[str, Any]
    ) -> WindowRecord | None:
        """Run one guarded UPDATE of one record; the record as updated, or None if no match."""
        statement = sa.update(WINDOWS).where(*guards).values(**values).returning(*WINDOWS.c)
        with self._one_statement() as conn:
            row = conn.execute(statement).one_or_none()
        return _to_record(row) if row is not None else None

    def _refusal(
        self,
        pipeline: str,
        window_start: datetime,
        *,
        fence: int | None,
        to: WindowStatus | None = None,
        sources: Collection[WindowStatus] = (),
    ) -> InvalidTransitionError | LostOwnershipError:
        """Why a guarded UPDATE matched nothing, as the error to raise."""
        where = _describe(pipeline, window_start)
        current = self.get(pipeline, window_start)
        if current is None:
            return RecordNotFoundError(f"no window record {where}")
        if fence is not None and current.fence != fence:
            return LostOwnershipError(
                f"window {where}: fence is {current.fence} now, this owner holds {fence}"
            )
        allowed = ", ".join(sorted(_values(sources)))
        return InvalidTransitionError(
            f"window {where} is {current.status.value}: cannot go to "
            f"{to.value if to else current.status.value} (only from {allowed})"
        )

    # --- schema revision (read-only) ----------------------------------------------------------

    def schema_revision(self) -> tuple[str | None, str]:
        """`(current, head)`: the schema's alembic revision (None when the database has no
        windowpipe schema) and the newest revision this code ships; changes nothing.

        Read commands call this instead of `migrate()`: no DDL, no alembic version table, and
        no SQLite file is created. A SQLite file is read through a plain connection, without
        this store's WAL switch, so an unmigrated file is left exactly as it was.
        """
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from sqlalchemy.pool import NullPool

        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        if head is None:
            raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
        engine = self._engine
        url = make_url(self.url)
        if self.dialect == "sqlite" and url.database not in (None, "", ":memory:"):
            if not url.query.get("uri") and not Path(url.database).exists():
                return None, head
            engine = sa.create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
        finally:
            if engine is not self._engine:
                engine.dispose()
        return current, head


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


STORE_POOL_SIZE = 1
"""PostgreSQL connections the state store keeps open while idle, per process."""

STORE_POOL_OVERFLOW = 7
"""More connections the state store opens while threads of one process use it at once (a
thread pool worker, `windowpipe status` reading in parallel); closed when returned."""


def _build_engine(url: str) -> Engine:
    """The engine for a SQLite or PostgreSQL URL, set up for many processes sharing it."""
    backend = make_url(url).get_backend_name()
    if backend == "postgresql":
        # No pre-ping: it costs a round trip per checkout, several per stage of every window.
        # A connection dropped by a server restart is invalidated on its first error, and the
        # task fails visibly; the cleanup resumes its window.
        # One connection kept per process (a prefork process runs one task at a time); more
        # are opened while threads use the store at once, and closed when returned.
        return sa.create_engine(
            url, pool_recycle=300, pool_size=STORE_POOL_SIZE, max_overflow=STORE_POOL_OVERFLOW
        )
    if backend == "sqlite":
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        )
        _configure_sqlite(engine)
        return engine
    raise BadInputError(
        f"state_url: unsupported database {backend!r}; the state store needs sqlite or postgresql"
    )


def _configure_sqlite(engine: Engine) -> None:
    """WAL (readers never block the writer), a busy timeout, and BEGIN issued by us.

    pysqlite's own transaction handling delays BEGIN until the first write and cannot say
    IMMEDIATE; switching it off and emitting BEGIN in the `begin` event is SQLAlchemy's
    documented recipe.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
        _enable_wal(cursor)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _enable_wal(cursor: Any) -> None:
    """Switch the database file to WAL (it stays so), waiting out a busy database.

    Changing the journal mode reports "database is locked" at once instead of honouring the
    busy timeout; processes opening a fresh file together (two pool children running their
    first task) hit that, so retry until the busy timeout as any other statement would wait.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# --- rows and values ----------------------------------------------------------------------------


def _to_record(row: Row[Any]) -> WindowRecord:
    data = row._mapping
    return WindowRecord(
        id=data["id"],
        pipeline=data["pipeline"],
        window_start=data["window_start"],
        window_end=data["window_end"],
        status=WindowStatus(data["status"]),
        stage=Stage(data["stage"]) if data["stage"] is not None else None,
        kind=WindowKind(data["kind"]),
        attempts=data["attempts"],
        source_count=data["source_count"],
        staged_count=data["staged_count"],
        target_count=data["target_count"],
        rejected_count=data["rejected_count"],
        fence=data["fence"],
        manifest=data["manifest"],
        error=data["error"],
        created_at=data["created_at"],
        updated_at=data["updated_at"],
        started_at=data["started_at"],
        finished_at=data["finished_at"],
        source_version=data["source_version"],
        rechecks_done=data["rechecks_done"],
        checked_at=data["checked_at"],
        drift=list(data["drift"] or []),
        checksum=data["checksum"],
        target_checksum=data["target_checksum"],
        load_fence=data["load_fence"],
    )


_NEW_ROW_KEY = ["pipeline", "window_start"]

_SQLITE_INSERT_NEW = (
    sqlite.insert(WINDOWS)
    .on_conflict_do_nothing(index_elements=_NEW_ROW_KEY)
    .returning(WINDOWS.c.window_start)
)
"""Executed with a list of `_new_row`s; compiled once, sent as multi-row VALUES."""

_PG_ARRAY_OF_INSTANTS = postgresql.ARRAY(UTCDateTime())


def _pg_insert_new(
    pipeline: str, windows: Sequence[Window], kind: WindowKind, now: datetime
) -> tuple[sa.Executable, dict[str, Any]]:
    """`INSERT ... SELECT ... FROM unnest(:starts, :ends) ON CONFLICT DO NOTHING RETURNING`.

    Two array parameters instead of thousands of scalar ones: psycopg parses a query with
    9,000 placeholders slowly, so this is several times faster for a year of 15m windows.
    """
    bounds = (
        sa.func.unnest(
            sa.bindparam("starts", type_=_PG_ARRAY_OF_INSTANTS),
            sa.bindparam("ends", type_=_PG_ARRAY_OF_INSTANTS),
        )
        .table_valued("window_start", "window_end")
        .render_derived(name="bounds")
    )
    rows = sa.select(
        sa.literal(pipeline, sa.String()),
        bounds.c.window_start,
        bounds.c.window_end,
        sa.literal(WindowStatus.PENDING.value, sa.String()),
        sa.literal(kind.value, sa.String()),
        sa.literal(0, sa.Integer()),
        sa.literal(first_fence(now), sa.BigInteger()),
        sa.literal(now, UTCDateTime()),
        sa.literal(now, UTCDateTime()),
    )
    columns = ["pipeline", "window_start", "window_end", "status", "kind", "attempts", "fence"]
    statement = (
        postgresql.insert(WINDOWS)
        .from_select([*columns, "created_at", "updated_at"], rows)
        .on_conflict_do_nothing(index_elements=_NEW_ROW_KEY)
        .returning(WINDOWS.c.window_start)
    )
    params = {"starts": [w.start for w in windows], "ends": [w.end for w in windows]}
    return statement, params


def first_fence(now: datetime) -> int:
    """A new record's fencing token: the microseconds since the Unix epoch at its creation.

    Each claim adds one, so a window's fences only grow while its record lives. Starting from
    the clock instead of 0 keeps them growing across records too: a window whose record was
    deleted and created again (a new state store, a rebuild) must not start below the fence a
    target's ledger last took for it, or the ledger would refuse every load of it as stale.
    """
    return int(now.timestamp() * 1_000_000)


def _new_row(pipeline: str, window: Window, kind: WindowKind, now: datetime) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "window_start": window.start,
        "window_end": window.end,
        "status": WindowStatus.PENDING.value,
        "kind": kind.value,
        "attempts": 0,
        "fence": first_fence(now),
        "created_at": now,
        "updated_at": now,
    }


@dataclass(frozen=True)
class _UpdateShape:
    """What makes two guarded UPDATEs of one record the same statement."""

    move: str
    sources: frozenset[WindowStatus]
    fenced: bool
    stage: str | _Unguarded
    """"equal" (stage = :guard_stage), "null" (stage IS NULL), or unguarded."""
    taken: tuple[str, ...]


_GUARDED_UPDATES: dict[_UpdateShape, sa.Update] = {}
"""Built statements by shape: a few dozen at most (moves x guards x fields taken)."""


def _guarded_update(move: Move, shape: _UpdateShape) -> sa.Update:
    """The UPDATE … RETURNING of `shape`, with bound parameters for the window's key
    (`key_pipeline`, `key_start`), the guards (`guard_fence`, `guard_stage`), `now` and each
    field taken (`set_<name>`)."""
    now = sa.bindparam("now", type_=UTCDateTime())
    taken = {name: sa.bindparam(f"set_{name}", type_=WINDOWS.c[name].type) for name in shape.taken}
    guards = [
        WINDOWS.c.pipeline == sa.bindparam("key_pipeline"),
        WINDOWS.c.window_start == sa.bindparam("key_start", type_=UTCDateTime()),
        _status_in(shape.sources),
    ]
    if shape.fenced:
        guards.append(WINDOWS.c.fence == sa.bindparam("guard_fence"))
    if shape.stage == "equal":
        guards.append(WINDOWS.c.stage == sa.bindparam("guard_stage"))
    elif shape.stage == "null":
        guards.append(WINDOWS.c.stage.is_(None))
    values = _move_values(move, now, taken)
    return sa.update(WINDOWS).where(*guards).values(**values).returning(*WINDOWS.c)


def _checked_taken(move: Move, taken: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a caller gives a move, as stored (enums as their values); a field the move
    does not take is the caller's bug (TypeError)."""
    unknown = set(taken) - move.takes
    if unknown:
        allowed = ", ".join(sorted(move.takes)) or "nothing"
        raise TypeError(
            f"cannot set {', '.join(sorted(unknown))} on a window record "
            f"({move.name} takes {allowed})"
        )
    checked = dict(taken)
    if checked.get("stage") is not None and not isinstance(checked["stage"], sa.BindParameter):
        checked["stage"] = Stage(checked["stage"]).value
    if "kind" in checked and not isinstance(checked["kind"], sa.BindParameter):
        checked["kind"] = WindowKind(checked["kind"]).value
    return checked


def _move_values(
    move: Move,
    now: datetime | sa.BindParameter[datetime],
    taken: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The SET clause of `move` at `now`: its status, `updated_at`, its field rules as SQL, and
    the fields the caller gave (`taken`, which must be fields the move takes).

    The only place a status is written besides a new record's `pending` (tests check the source
    for that). SQL evaluates every SET expression against the row as it was before the UPDATE,
    so the rules that depend on the old status (`RESUME_STAGE`, `CLEARED_ON_RESTART`) decide and
    apply in the same statement.
    """
    taken = _checked_taken(move, taken or {})
    instant = now if isinstance(now, sa.BindParameter) else sa.literal(now, UTCDateTime())
    values: dict[str, Any] = {"status": move.to.value, "updated_at": now}
    restarts = WINDOWS.c.status.in_(_values(RESTART_FROM_PRECHECK))
    precheck = Stage.PRECHECK.value
    for name, rule in move.sets.items():
        column = WINDOWS.c[name]
        if isinstance(rule, WindowKind):
            values[name] = rule.value
        elif rule == Rule.NOW:
            values[name] = now
        elif rule == Rule.CLEARED:
            values[name] = None
        elif rule == Rule.PLUS_ONE:
            values[name] = column + 1
        elif rule == Rule.ZERO:
            values[name] = 0
        elif rule == Rule.NOW_IF_UNSET:
            values[name] = sa.func.coalesce(column, instant)
        elif rule == Rule.RESUME_STAGE:  # core.transitions.resume_stage, in SQL
            values[name] = sa.case((restarts, precheck), else_=sa.func.coalesce(column, precheck))
        elif rule == Rule.CLEARED_ON_RESTART:
            values[name] = sa.case((restarts, sa.null()), else_=column)
        else:  # pragma: no cover - a Rule added without its SQL
            raise AssertionError(f"no SQL for {rule!r}")
    values.update(taken)
    return values


def _sources(move: Move, expect: Collection[WindowStatus] | None) -> frozenset[WindowStatus]:
    """The statuses a move's UPDATE matches: `expect` (within the move's), else the move's."""
    return move.sources if expect is None else frozenset(WindowStatus(s) for s in expect)


def _status_in(statuses: Collection[WindowStatus]) -> sa.ColumnElement[bool]:
    return WINDOWS.c.status.in_(_values(statuses))


def _refuse_finished(conn: Connection, pipeline: str, starts: Sequence[datetime]) -> None:
    """Raise if any of `starts` is a succeeded or skipped record (a rebuild must keep them)."""
    for chunk in _chunks(sorted(set(starts)), INSERT_CHUNK_ROWS):
        query = sa.select(WINDOWS.c.window_start, WINDOWS.c.status).where(
            WINDOWS.c.pipeline == pipeline,
            WINDOWS.c.window_start.in_(chunk),
            WINDOWS.c.status.in_(_values(FINISHED)),
        )
        finished = conn.execute(query).first()
        if finished is not None:
            raise InvalidTransitionError(
                f"rebuild refused: window {_describe(pipeline, finished[0])} is {finished[1]}; "
                "finished work is never deleted or reset"
            )


def _key(pipeline: str, window_start: datetime) -> tuple[sa.ColumnElement[bool], ...]:
    """The WHERE clauses selecting one record."""
    return (WINDOWS.c.pipeline == pipeline, WINDOWS.c.window_start == _aware(window_start))


def _aware(value: datetime, what: str = "window_start") -> datetime:
    """`value`, refused if naive: a record's identity must never depend on a machine's zone."""
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} {value.isoformat()} is naive; the state store needs UTC")
    return value


DISPATCHABLE = frozenset({WindowStatus.PENDING, WindowStatus.FAILED})
"""What a dispatch acts on: pending windows to queue, failed ones to retry or bury."""


def _values(statuses: Collection[WindowStatus]) -> list[str]:
    return [WindowStatus(s).value for s in statuses]


def _describe(pipeline: str, window_start: datetime) -> str:
    return f"{pipeline} {format_instant(window_start)}"


def _require_pipeline(pipeline: str) -> None:
    if not isinstance(pipeline, str) or not pipeline:
        raise ValueError(f"pipeline must be a non-empty name, got {pipeline!r}")


def _unique_by_start(windows: Sequence[Window]) -> list[Window]:
    """The windows sorted by start, once each; two different windows with one start is an error."""
    by_start: dict[datetime, Window] = {}
    for window in windows:
        if not isinstance(window, Window):
            raise TypeError(f"expected a Window, got {type(window).__name__}")
        seen = by_start.setdefault(window.start, window)
        if seen.end != window.end:
            raise ValueError(f"two different windows start at {format_instant(window.start)}")
    return [by_start[start] for start in sorted(by_start)]


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for offset in range(0, len(items), size):
        yield items[offset : offset + size]
