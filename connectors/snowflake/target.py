"""The Snowflake target: `COPY INTO` from a Snowflake stage over the windowpipe stage.

The Snowflake stage (`config.stage`, external over the S3 bucket + prefix, or over a `local`
stage directory) sees the same relative paths as the manifest, so the target loads exactly the
manifest's files by name, never whatever else lies in the window's directory. See
`connectors.snowflake.sql` for the statements and why they are idempotent and fenced.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from connectors.base import Manifest
from connectors.shared import Lease, lease
from connectors.snowflake import sql
from connectors.snowflake.client import connect, translate
from connectors.sql_target import window_key
from core.checksum import checksum_text, ids_sum
from core.config import SnowflakeTargetConfig, resolve_secret
from core.errors import (
    StagedDataLostError,
    StaleFenceError,
    TerminalError,
    TransientError,
    WindowpipeError,
)
from core.instants import format_instant, utc_now
from core.logs import get_logger
from core.ports import StagedLines, TargetAudit
from core.windows import Window

_T = TypeVar("_T")


def _ntz(value: datetime) -> datetime:
    """The naive UTC instant a TIMESTAMP_NTZ column holds."""
    return value.astimezone(UTC).replace(tzinfo=None)


class _Session:
    """A Snowflake session shared by every target of a process with the same connection
    (`_session_key`), opened on first use; `lock` serializes its use, since a session has one
    transaction at a time. After a transient failure it is dropped and the next use opens a
    new one."""

    def __init__(self, config: SnowflakeTargetConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self._connection: Any = None
        self.tags_loads = False
        """Whether the server accepts a per-load QUERY_TAG (`sql.PROBE_QUERY_TAG`), probed
        once per connection."""

    def connection(self) -> Any:
        """The open connection, connected now if need be. Call with the lock."""
        if self._connection is None:
            connection = connect(self.config)
            self.tags_loads = _accepts_query_tag(connection.cursor())
            self._connection = connection
        return self._connection

    def drop(self) -> None:
        """Close the connection (a new one opens on next use). Call with the lock."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # the session is gone either way
                connection.close()

    def close(self) -> None:
        with self.lock:
            self.drop()


def _session_key(config: SnowflakeTargetConfig) -> tuple[Any, ...]:
    """What a session is bound to: the login (account, user, secret or key), role and
    warehouse, where it connects, and its current database and schema, which the landing
    table (a session's temporary table) and COPY rely on. Targets in one schema share a
    session whatever their tables."""
    return (
        "snowflake",
        config.account,
        config.user,
        resolve_secret(config.password_env),
        config.private_key_path,
        config.role,
        config.warehouse,
        config.host,
        config.port,
        config.protocol,
        config.database,
        config.schema_,
        config.login_timeout,
        config.network_timeout,
    )


class SnowflakeTarget:
    """Loads windows into a Snowflake table, idempotently per window.

    Its session is leased on first use from `connectors.shared`: one per process for every
    target with the same login, role, warehouse, database and schema (`_session_key`), so
    sessions grow with processes, not pipelines. Its lock serializes the loads of those
    targets within a process (a prefork process runs one task at a time anyway). This
    target's table and ledger are created if missing on its first use.
    """

    def __init__(self, config: SnowflakeTargetConfig) -> None:
        self.config = config
        self.names = sql.Names.of(config.database, config.schema_, config.table, config.stage)
        self._lease: Lease[_Session] | None = None
        self._tables_ready = False
        self._lease_lock = threading.Lock()

    # -- session --

    def _shared(self) -> _Session:
        with self._lease_lock:
            if self._lease is None:
                config = self.config
                self._lease = lease(_session_key(config), lambda: _Session(config), _Session.close)
            return self._lease.client

    def _connection(self, session: _Session) -> Any:
        """The session's connection, this target's tables ensured on first use. Call with the
        session's lock."""
        connection = session.connection()
        if not self._tables_ready:
            try:
                cursor = connection.cursor()
                cursor.execute(sql.create_table_sql(self.names.table))
                cursor.execute(sql.create_ledger_sql(self.names.ledger))
            except Exception as error:
                session.drop()
                raise translate(error, "create table") from None
            self._tables_ready = True
        return connection

    # -- the Target contract --

    def load_window(
        self, pipeline: str, manifest: Manifest, staging: StagedLines, fence: int
    ) -> int:
        """Replace the window's rows with the manifest's files in one transaction, fenced.

        Inside the transaction, before touching the rows, the window's ledger row moves to
        `fence`, guarded by `fence <= ?`; if that changes no row, the transaction rolls back and
        this raises `StaleFenceError`. Snowflake holds the ledger UPDATE's table lock until
        COMMIT, so a second load of the window waits at its own ledger UPDATE, then sees the
        first one's fence.

        Timeline, A paused with fence 3 while B takes the window over with fence 5:

        A first:  A has moved the ledger to 3 inside its transaction and freezes; its Redis
                  lock expires, B claims (fence 5) and waits on the ledger's lock. A wakes and
                  commits its rows (ledger 3); B's UPDATE then runs: 3 < 5, B replaces A's rows
                  and commits (ledger 5). A's record commit is refused by the state store.
        B first:  A freezes before its transaction (say, during its COPY into the landing
                  table); B loads and commits (ledger 5). A wakes: its UPDATE matches nothing
                  (5 < 3 is false) and the row exists, so A rolls back and raises
                  StaleFenceError. Either way the window holds B's rows once.

        Also raises TerminalError if Snowflake loaded a different number of rows than the
        manifest says the files hold (nothing is committed then).

        Two timelines fakesnow cannot show (DuckDB takes no table locks and enforces primary
        keys), argued from Snowflake's documented behaviour:

        Ledger per table: pipeline P loads ORDERS and its worker freezes inside the
                  transaction, holding the lock its ledger UPDATE took. Pipeline Q loads
                  REFUNDS in the same schema: its UPDATE goes to REFUNDS_WINDOWPIPE_LEDGER, a
                  table P never touched, and commits at once. (With one ledger per schema, Q
                  waited for P's lock, up to LOCK_TIMEOUT, 12 h by default.) Only loads into
                  ORDERS wait for P, and they wait on the table's own lock anyway.
        Duplicate ledger rows: the ledger holds two rows for the window, fences 3 and 7 (a
                  hand-made copy, or two first loads racing past the NOT EXISTS check before
                  either committed). A stale load with fence 5: a per-row `fence <= 5` guard
                  matches the row of 3 and lets it replace the rows of 7. The guard here is
                  `5 >= MAX(fence)` of the window, false: refused. Fence 8 then moves both
                  rows to 8. (tests/test_targets.py shows this one on fakesnow with the key
                  dropped, as Snowflake treats it.)
        """
        del staging  # Snowflake reads the files itself, through its own stage
        return self._in_session(
            "load window", lambda session: self._load(session, pipeline, manifest, fence)
        )

    def _in_session(self, action: str, work: Callable[[_Session], _T]) -> _T:
        """`work(session)` holding the shared session's lock, the SDK's errors translated;
        after a transient failure the session is dropped (the next use opens a new one)."""
        session = self._shared()
        with session.lock:
            try:
                return work(session)
            except WindowpipeError as error:
                if isinstance(error, TransientError):
                    session.drop()
                raise
            except Exception as error:
                translated = translate(error, action)
                if isinstance(translated, TransientError):
                    session.drop()
                raise translated from None

    def _load(self, session: _Session, pipeline: str, manifest: Manifest, fence: int) -> int:
        cursor = self._connection(session).cursor()
        landing = sql.quote_identifier(f"WINDOWPIPE_LANDING_{uuid.uuid4().hex[:16]}")
        start, end = _ntz(manifest.window_start), _ntz(manifest.window_end)
        loaded_at = _ntz(utc_now())
        cursor.execute(sql.create_landing_sql(landing))
        try:
            landed = 0
            paths = [staged.path for staged in manifest.files]
            for statement in sql.copy_statements(landing, self.names.stage, paths):
                landed += _rows_loaded(cursor.execute(statement))
            if landed != manifest.rows:
                # The stage does not hold what extract wrote: the next attempt extracts again.
                raise StagedDataLostError(
                    f"snowflake target: COPY loaded {landed} rows but the manifest of run "
                    f"{manifest.run} lists {manifest.rows}"
                )
            try:
                self._begin_window_write(
                    session, cursor, pipeline, manifest.window_start, fence, landed, loaded_at
                )
                cursor.execute(
                    sql.insert_window_sql(self.names.table, landing),
                    (start, end, pipeline, loaded_at),
                )
                inserted = _first_int(cursor.fetchone())
                cursor.execute(sql.COMMIT)
            except BaseException:
                _rollback(cursor)
                raise
        finally:
            _drop_quietly(cursor, landing)
        return inserted if inserted is not None else landed

    def _record_fence(
        self,
        cursor: Any,
        pipeline: str,
        start: datetime,
        fence: int,
        rows: int,
        loaded_at: datetime,
    ) -> int | None:
        """Move the window's ledger row to `fence` inside the open transaction; None when it
        did, else the recorded fence that refuses this load (the window's newest)."""
        ledger = self.names.ledger
        cursor.execute(
            sql.advance_fence_sql(ledger),
            (fence, rows, loaded_at, pipeline, start, fence, pipeline, start),
        )
        if _first_int(cursor.fetchone()):
            return None
        cursor.execute(
            sql.insert_fence_sql(ledger),
            (pipeline, start, fence, rows, loaded_at, pipeline, start),
        )
        if _first_int(cursor.fetchone()):
            return None
        cursor.execute(sql.recorded_fence_sql(ledger), (pipeline, start))
        recorded = _first_int(cursor.fetchone())
        if recorded is None:
            # Neither updated nor inserted, yet no row: the statements disagree with each
            # other; never load unfenced.
            raise TerminalError(
                f"snowflake target: the ledger {ledger} took no fence for this window"
            )
        return recorded

    def clear_window(self, pipeline: str, window: Window, fence: int) -> int:
        """A fenced empty load: in one transaction, move the window's ledger row to `fence`
        with 0 rows (the guard of `load_window`) and delete the window's rows; how many went.

        Timeline, A loading with fence 3 while B (fence 5) finds the window empty: A holds
        the ledger's lock inside its transaction and freezes; B's ledger UPDATE waits for it.
        A commits (ledger 3); B's guard sees 3 <= 5, deletes A's rows, commits (ledger 5, 0
        rows). Or B first (ledger 5): A's UPDATE then matches nothing (newest fence 5 > 3),
        A rolls back with StaleFenceError. The window ends empty either way.
        """
        return self._in_session(
            "clear window", lambda session: self._clear(session, pipeline, window, fence)
        )

    def _clear(self, session: _Session, pipeline: str, window: Window, fence: int) -> int:
        cursor = self._connection(session).cursor()
        try:
            deleted = self._begin_window_write(
                session, cursor, pipeline, window.start, fence, 0, _ntz(utc_now())
            )
            cursor.execute(sql.COMMIT)
        except BaseException:
            _rollback(cursor)
            raise
        return deleted

    def _begin_window_write(
        self,
        session: _Session,
        cursor: Any,
        pipeline: str,
        window_start: datetime,
        fence: int,
        rows: int,
        at: datetime,
    ) -> int:
        """Open the window's fenced transaction, as a load and an empty load both do: tag the
        session (where the server takes a QUERY_TAG), BEGIN, move the ledger to `fence` for
        `rows` (`_take_ledger_lock`, `StaleFenceError` when a newer fence holds it) and delete
        the window's rows; how many went. The caller commits, or rolls back on any error."""
        start = _ntz(window_start)
        key = window_key(self.names.table, pipeline, window_start)
        if session.tags_loads:
            cursor.execute(sql.set_load_tag_sql(key, fence))
        cursor.execute(sql.BEGIN)
        recorded = self._take_ledger_lock(
            cursor, key, lambda: self._record_fence(cursor, pipeline, start, fence, rows, at), fence
        )
        if recorded is not None:
            raise _stale(pipeline, window_start, fence, recorded)
        cursor.execute(sql.delete_window_sql(self.names.table), (pipeline, start))
        return _first_int(cursor.fetchone()) or 0

    def audit_window(self, pipeline: str, window: Window) -> TargetAudit:
        """The window's rows, their ids' checksum (ids read back, `ID_FETCH_ROWS` at a time,
        hashed here) and its newest ledger row."""
        return self._in_session(
            "audit window", lambda session: self._audit(session, pipeline, window)
        )

    def _audit(self, session: _Session, pipeline: str, window: Window) -> TargetAudit:
        cursor = self._connection(session).cursor()
        key = (pipeline, _ntz(window.start))
        cursor.execute(sql.window_ids_sql(self.names.table), key)
        rows = total = 0
        while batch := cursor.fetchmany(ID_FETCH_ROWS):
            rows += len(batch)
            total += ids_sum([str(row[0]) for row in batch])
        cursor.execute(sql.ledger_row_sql(self.names.ledger), key)
        held = cursor.fetchone()
        return TargetAudit(
            rows=rows,
            checksum=checksum_text(total),
            ledger_fence=_first_int(held),
            ledger_rows=int(held[1]) if held and held[1] is not None else None,
        )

    def _take_ledger_lock(
        self, cursor: Any, key: str, record_fence: Callable[[], int | None], fence: int
    ) -> int | None:
        """`record_fence()` inside the open transaction; when its wait for the ledger's table
        lock runs out (`LOCK_TIMEOUT`), end the holder if its tag names an older fence of the
        same window, and try again (at most `TAKEOVER_TRIES` times in all).

        Argued from Snowflake's documentation; fakesnow has one writer and implements neither
        `ALTER SESSION`, `LOCK_TIMEOUT` waits nor `SYSTEM$ABORT_TRANSACTION`, so only the path
        without a wait runs in the tests. Timeline, A (fence 3) frozen inside its load's
        transaction, B (fence 5) loading the same window:
            t0  A tags its session (`QUERY_TAG` = `windowpipe-load 3 KEY`), begins, runs its
                ledger UPDATE (the ledger's table lock is A's until A's transaction ends) and
                freezes; or A's client dies and the transaction is left detached, which
                Snowflake keeps for hours
            t1  A's Redis lock expires; cleanup requeues; B claims (fence 5), tags its session,
                begins, and its ledger UPDATE waits on A's lock
            t2  `LOCK_TIMEOUT` later the UPDATE fails (error 625, naming the statement and the
                transaction that hold the lock); B's transaction stays open (Snowflake rolls
                back the failed statement only). B reads the holding statement's QUERY_TAG
                from `QUERY_HISTORY_BY_USER`: `windowpipe-load 3 KEY`, the same window and an
                older fence, so B runs `SYSTEM$ABORT_TRANSACTION(A's transaction)`; a holder
                without such a tag (another window's load, anything else) is never ended
            t3  B's UPDATE runs again, takes the lock (3 <= 5), B loads and commits
            t4  A wakes: its transaction is gone (its statements fail: TransientError) and its
                retry is refused by the ledger (5 > 3)
        A wait behind another window's load of the same table (the ledger is per table) ends
        the same way without the abort: B waits again, and after `TAKEOVER_TRIES` waits gives up
        (TransientError, the stage retries later)."""
        from snowflake.connector import errors

        for _ in range(TAKEOVER_TRIES):
            try:
                return record_fence()
            except errors.Error as error:
                if getattr(error, "errno", None) != sql.LOCK_WAIT_ERRNO:
                    raise
                holder = sql.lock_holder(str(getattr(error, "raw_msg", None) or error))
            if holder is None:
                continue
            cursor.execute(sql.QUERY_TAG_OF, (holder.statement,))
            row = cursor.fetchone()
            if sql.is_older_load(row[0] if row else None, key, fence):
                cursor.execute(sql.ABORT_TRANSACTION, (holder.transaction,))
                get_logger("windowpipe.snowflake_target").warning(
                    "ended an older load of the window holding the ledger",
                    fence=fence,
                    transaction=holder.transaction,
                )
        raise TransientError(
            f"snowflake target: the ledger stayed locked by another load for "
            f"{TAKEOVER_TRIES} waits of {sql.LOCK_TIMEOUT_SECONDS}s"
        )

    def count_window(self, pipeline: str, window: Window) -> int:
        """Rows the table holds for the window."""
        session = self._shared()
        with session.lock:
            try:
                cursor = self._connection(session).cursor()
                cursor.execute(
                    sql.count_window_sql(self.names.table), (pipeline, _ntz(window.start))
                )
                return _first_int(cursor.fetchone()) or 0
            except WindowpipeError:
                raise
            except Exception as error:
                translated = translate(error, "count window")
                if isinstance(translated, TransientError):
                    session.drop()
                raise translated from None

    def close(self) -> None:
        """Give the session back (the last target using it closes it); leased again on next
        use."""
        with self._lease_lock:
            held, self._lease = self._lease, None
        if held is not None:
            held.release()


ID_FETCH_ROWS = 10_000
"""Ids fetched per round trip when the audit reads a window's ids back."""


def _stale(pipeline: str, window_start: datetime, fence: int, recorded: int) -> StaleFenceError:
    return StaleFenceError(
        f"snowflake target: refused a stale load of window {pipeline} "
        f"{format_instant(window_start)}: its fence {fence} is older than fence {recorded}, "
        "which loaded the window last",
        recorded=recorded,
    )


TAKEOVER_TRIES = 3
"""How many `LOCK_TIMEOUT` waits a load makes for the ledger before it gives up."""


def _accepts_query_tag(cursor: Any) -> bool:
    """Whether the server takes `ALTER SESSION SET QUERY_TAG` (Snowflake does; fakesnow 0.12
    answers "not implemented"). Without tags a load never ends another one."""
    from snowflake.connector import errors

    try:
        cursor.execute(sql.PROBE_QUERY_TAG)
    except errors.ProgrammingError:
        return False
    return True


def _rows_loaded(cursor: Any) -> int:
    """The sum of `rows_loaded` over a COPY's result (one row per file)."""
    names = [column[0].lower() for column in cursor.description or ()]
    if "rows_loaded" not in names:
        return 0
    at = names.index("rows_loaded")
    return sum(int(row[at] or 0) for row in cursor.fetchall())


def _first_int(row: Any) -> int | None:
    return int(row[0]) if row and row[0] is not None else None


def _rollback(cursor: Any) -> None:
    with contextlib.suppress(Exception):  # the original error matters; a dead session rolls back
        cursor.execute(sql.ROLLBACK)


def _drop_quietly(cursor: Any, landing: str) -> None:
    with contextlib.suppress(Exception):  # temporary: it goes with the session anyway
        cursor.execute(sql.drop_landing_sql(landing))
