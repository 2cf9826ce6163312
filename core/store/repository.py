"""The repository API: `StateStore`, one instance per database URL (see `core.store`)."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url

from core.errors import InvalidTransitionError, LostOwnershipError
from core.instants import format_instant, utc_now
from core.records import FINISHED, Stage, WindowKind, WindowRecord, WindowStatus
from core.store.moves import (
    _GUARDED_UPDATES,
    _SQLITE_INSERT_NEW,
    _UNGUARDED,
    _checked_taken,
    _guarded_update,
    _move_values,
    _new_row,
    _pg_insert_new,
    _sources,
    _status_in,
    _Unguarded,
    _UpdateShape,
)
from core.store.queries import (
    StoreQueries,
)
from core.store.schema import (
    MIGRATIONS_DIR,
    WINDOWS,
    _aware,
    _key,
    _record_from_values,
    _to_record,
    _values,
)
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
    Move,
    move_for,
)
from core.validation import RebuildPlan
from core.windows import Window

INSERT_CHUNK_ROWS = 1000
"""Rows per multi-row INSERT: 9 parameters a row stays far below both backends' limits."""

MIGRATION_LOCK_KEY = 0x77696E646F77
"""PostgreSQL advisory lock key held while migrating ("window" in ASCII)."""

_T = TypeVar("_T")


class RecordNotFoundError(InvalidTransitionError, LookupError):
    """The window record a change was asked for does not exist."""


@dataclass(frozen=True)
class RebuildCounts:
    """What `apply_rebuild` changed."""

    deleted: int
    reset: int
    created: int


class StateStore(StoreQueries):
    """Window records in one SQLite or PostgreSQL database; one engine per instance."""

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
        return self.create_windows_many({pipeline: windows}, kind)[pipeline]

    def _insert_new(
        self, conn: Connection, rows: Sequence[tuple[str, Window]], kind: WindowKind
    ) -> set[tuple[str, datetime]]:
        """Insert pending records for the `(pipeline, window)` rows not stored yet; returns
        the (pipeline, start) of each row created.

        Chunks of `INSERT_CHUNK_ROWS`, each ONE statement with `ON CONFLICT DO NOTHING`:
        on PostgreSQL an `INSERT ... SELECT FROM unnest(pipelines, starts, ends)` with three
        array parameters, on SQLite a multi-row VALUES built by SQLAlchemy's
        "insertmanyvalues".
        """
        now = utc_now()
        created: set[tuple[str, datetime]] = set()
        params: dict[str, Any] | list[dict[str, Any]]
        for chunk in _chunks(rows, INSERT_CHUNK_ROWS):
            if self.dialect == "postgresql":
                statement, params = _pg_insert_new(chunk, kind, now)
            else:
                statement = _SQLITE_INSERT_NEW
                params = [_new_row(name, window, kind, now) for name, window in chunk]
            created.update(
                (name, _aware(start)) for name, start in conn.execute(statement, params).tuples()
            )
        return created

    # --- reading ------------------------------------------------------------------------------

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
            new_rows = [(pipeline, window) for window in windows]
            created = len(self._insert_new(conn, new_rows, WindowKind.SCHEDULED))
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
        builds it nor computes its cache key again; on PostgreSQL it is also compiled once and
        run on psycopg directly (`StoreConnections._hot_rows`). The key is unique, so at
        most one row matches.
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
        rows = self._hot_rows(shape, statement, params, write=True)
        return _record_from_values(rows[0]) if rows else None

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

    # --- many pipelines at once (a generation batch) ------------------------------------------

    def create_windows_many(
        self, windows: Mapping[str, Sequence[Window]], kind: WindowKind = WindowKind.SCHEDULED
    ) -> dict[str, list[Window]]:
        """`create_windows` for many pipelines in one transaction and one INSERT per
        `INSERT_CHUNK_ROWS` rows: for each pipeline of `windows`, the windows this call
        created, oldest first ([] when all existed).

        The same `INSERT ... ON CONFLICT DO NOTHING`, so it is idempotent and safe to race with
        `create_windows` and with itself; rows go in sorted by (pipeline, start), so two
        concurrent callers take the key's index entries in one order and never deadlock. All or
        nothing: if the statement fails, no window of any pipeline was created (a caller that
        wants one pipeline's bad row not to hold up the others retries per pipeline).
        """
        unique = {}
        for pipeline, wanted in windows.items():
            _require_pipeline(pipeline)
            unique[pipeline] = _unique_by_start(wanted)
        rows = [(pipeline, window) for pipeline in sorted(unique) for window in unique[pipeline]]
        created: set[tuple[str, datetime]] = set()
        if rows:
            with self._writing() as conn:
                created = self._insert_new(conn, rows, WindowKind(kind))
        return {
            pipeline: [w for w in wanted if (pipeline, w.start) in created]
            for pipeline, wanted in unique.items()
        }

    def queue_many(
        self, claims: Sequence[tuple[str, datetime, WindowStatus]]
    ) -> list[WindowRecord]:
        """`queue(pipeline, start, expect=[status])` for many windows in ONE guarded UPDATE:
        each `(pipeline, window_start, status)` is claimed (ENQUEUE) only while its record is
        still in that status; returns the records claimed, as updated (in no order).

        A window left out of the result was claimed by someone else first (or moved on), just as
        `queue` returns None for it: each row's guard is its own, and PostgreSQL checks it again
        against the row as committed when a concurrent writer held it (so a row two enqueuers
        race for is claimed by exactly one). `status` must be one ENQUEUE starts from (pending,
        failed, or a finished one). All or nothing: if it fails, no window changed.
        """
        for _, _, status in claims:
            if WindowStatus(status) not in ENQUEUE.sources:
                raise ValueError(f"ENQUEUE does not start from {WindowStatus(status).value}")
        if not claims:
            return []  # no connection: on SQLite that would take the write lock
        statement = _enqueue_many()
        claimed: list[WindowRecord] = []
        # More than a chunk: one transaction, so a failing chunk leaves none claimed.
        connection = self._one_statement if len(claims) <= INSERT_CHUNK_ROWS else self._writing
        with connection() as conn:
            for chunk in _chunks(sorted(claims), INSERT_CHUNK_ROWS):
                rows = [
                    (name, _aware(start), WindowStatus(status).value)
                    for name, start, status in chunk
                ]
                result = conn.execute(statement, {"claims": rows, "now": utc_now()})
                claimed.extend(_to_record(row) for row in result)
        return claimed

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


@functools.cache
def _enqueue_many() -> sa.Update:
    """`StateStore.queue_many`'s UPDATE (built once), with an expanding `claims` parameter of
    (pipeline, window start, status read) rows and `now`."""
    keyed = sa.tuple_(WINDOWS.c.pipeline, WINDOWS.c.window_start, WINDOWS.c.status)
    return (
        sa.update(WINDOWS)
        .where(keyed.in_(sa.bindparam("claims", expanding=True)))
        .values(**_move_values(ENQUEUE, sa.bindparam("now", type_=WINDOWS.c.updated_at.type)))
        .returning(*WINDOWS.c)
    )


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
