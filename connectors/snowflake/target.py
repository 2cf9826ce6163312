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
from datetime import UTC, datetime
from typing import Any

from connectors.base import Manifest
from connectors.shared import Lease, lease
from connectors.snowflake import sql
from connectors.snowflake.client import connect, translate
from core.config import SnowflakeTargetConfig, resolve_secret
from core.errors import (
    StagedDataLostError,
    StaleFenceError,
    TerminalError,
    TransientError,
    WindowpipeError,
)
from core.instants import format_instant, utc_now
from core.ports import StagedLines
from core.windows import Window


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

    def connection(self) -> Any:
        """The open connection, connected now if need be. Call with the lock."""
        if self._connection is None:
            self._connection = connect(self.config)
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
        """
        del staging  # Snowflake reads the files itself, through its own stage
        session = self._shared()
        with session.lock:
            try:
                return self._load(self._connection(session), pipeline, manifest, fence)
            except WindowpipeError as error:
                if isinstance(error, TransientError):
                    session.drop()
                raise
            except Exception as error:
                translated = translate(error, "load window")
                if isinstance(translated, TransientError):
                    session.drop()
                raise translated from None

    def _load(self, connection: Any, pipeline: str, manifest: Manifest, fence: int) -> int:
        cursor = connection.cursor()
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
            cursor.execute(sql.BEGIN)
            try:
                recorded = self._record_fence(cursor, pipeline, start, fence, landed, loaded_at)
                if recorded is not None:
                    raise StaleFenceError(
                        f"snowflake target: refused a stale load of window {pipeline} "
                        f"{format_instant(manifest.window_start)}: its fence {fence} is "
                        f"older than fence {recorded}, which loaded the window last"
                    )
                cursor.execute(sql.delete_window_sql(self.names.table), (pipeline, start))
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
        did, else the recorded fence that refuses this load."""
        ledger = self.names.ledger
        cursor.execute(
            sql.advance_fence_sql(ledger), (fence, rows, loaded_at, pipeline, start, fence)
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
