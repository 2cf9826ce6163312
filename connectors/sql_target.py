"""A table in PostgreSQL, SQLite (or any SQLAlchemy database) as the target.

One row per source document: `pipeline`, `window_start`, `window_end`, `doc_id`, `doc` (the
whole document as JSON; JSONB on PostgreSQL), and for lineage `source_file` and `file_row`.
Loading a window deletes the window's rows and inserts the staged ones in one transaction, so
a retried, duplicated or `--force`d load replaces instead of adding: the window ends with each
staged document exactly once.

Loads are fenced: beside the table, in the same schema, `windowpipe_ledger` keeps per window
the newest fencing token that loaded it, and a load's transaction starts by moving that token
forward, guarded by `fence <= :fence`. A load whose token is older is refused
(`StaleFenceError`) and changes nothing. See `SqlTarget.load_window` for the timeline.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB

from connectors.base import Manifest, decode_line
from connectors.shared import Lease
from connectors.sql import CompiledCache, _translate, create_engine, lease_engine, read_with
from core.checksum import checksum_text, ids_sum
from core.config import SqlTargetConfig
from core.errors import (
    StagedDataLostError,
    StaleFenceError,
    TerminalError,
    TransientError,
    WindowpipeError,
    one_line,
)
from core.instants import as_utc, format_instant, utc_now
from core.logs import get_logger
from core.ports import StagedLines, TargetAudit
from core.retry import as_time_limit
from core.windows import Window

IDLE_LOAD_SECONDS = 300
"""PostgreSQL ends a load's session that sits idle inside its transaction this long (a frozen
worker), releasing the window's ledger row for the next owner."""

LEDGER_WAIT_SECONDS = 5
"""How long a PostgreSQL load waits for its window's ledger row (`lock_timeout`) before it
looks who holds it and ends an older fence's load of the same window (`take_ledger_row`)."""

LEDGER_WAITS = 6
"""How many such waits a load makes before it gives up (TransientError: the stage retries)."""

LOAD_TAG = "windowpipe-load"
"""First word of a PostgreSQL load's `application_name`: `windowpipe-load FENCE KEY LABEL`."""

LEDGER_TABLE = "windowpipe_ledger"
"""The target's ledger, beside the target table (same schema): per window, the newest fence
that loaded it."""


def target_table(name: str, metadata: sa.MetaData) -> sa.Table:
    """The target table's shape (created if missing)."""
    schema, _, table = name.rpartition(".")
    return sa.Table(
        table,
        metadata,
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("doc_id", sa.Text, nullable=False),
        sa.Column("doc", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
        sa.Column("source_file", sa.Text),
        sa.Column("file_row", sa.Integer),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index(f"ix_{table}_window", "pipeline", "window_start"),
        schema=schema or None,
    )


def ledger_table(target_name: str, metadata: sa.MetaData) -> sa.Table:
    """The ledger's shape (created if missing), in the schema of the target table `target_name`.

    `row_count`, not `rows`: ROWS is reserved in Snowflake, whose ledger has the same columns.
    """
    schema, _, _ = target_name.rpartition(".")
    return sa.Table(
        LEDGER_TABLE,
        metadata,
        sa.Column("pipeline", sa.String(200), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("fence", sa.BigInteger, nullable=False),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        schema=schema or None,
    )


def record_fence(
    conn: sa.Connection,
    ledger: sa.Table,
    *,
    pipeline: str,
    window_start: datetime,
    fence: int,
    rows: int,
    loaded_at: datetime,
    dialect_upsert: bool = True,
) -> int | None:
    """Move the window's ledger row to `fence` if `fence` is newer than the recorded one (or no
    row exists yet), inside the caller's transaction. Returns None when it did (the row is now
    locked by this transaction until it ends), else the recorded fence that refuses this one.

    PostgreSQL and SQLite: one `INSERT ... ON CONFLICT DO UPDATE ... WHERE fence <= :fence
    RETURNING`. Other databases (or `dialect_upsert=False`): a guarded UPDATE, then an INSERT
    if no row exists; an INSERT that loses a race with another first load of the window
    raises TransientError (the retry then finds the row and applies the guard).
    """
    values = {
        "pipeline": pipeline,
        "window_start": window_start,
        "fence": fence,
        "row_count": rows,
        "loaded_at": loaded_at,
    }
    key = (ledger.c.pipeline == pipeline, ledger.c.window_start == window_start)
    name = conn.dialect.name
    if dialect_upsert and name in ("postgresql", "sqlite"):
        statements = _ledger_statements(ledger, name)
        if conn.execute(statements.upsert, values).first() is not None:
            return None
        # Refused: the row exists with a fence at least ours (ON CONFLICT locked it, so this
        # read sees the value that refused us).
        held = conn.execute(statements.fence, {"pipeline": pipeline, "window_start": window_start})
        return int(held.scalar_one())
    update = (
        sa.update(ledger)
        .where(*key, ledger.c.fence <= fence)
        .values(fence=fence, row_count=rows, loaded_at=loaded_at)
    )
    if conn.execute(update).rowcount == 1:
        return None
    recorded = conn.execute(
        sa.select(ledger.c.fence).where(*key).with_for_update()
    ).scalar_one_or_none()
    if recorded is not None:
        return int(recorded)
    try:
        conn.execute(sa.insert(ledger).values(**values))
    except sa.exc.IntegrityError:
        raise TransientError(
            f"sql target: another load of window {pipeline} {_utc_text(window_start)} "
            "recorded its fence first; retrying applies the guard to it"
        ) from None
    return None


@dataclass(frozen=True)
class _LedgerStatements:
    """`record_fence`'s statements for one ledger and dialect, built once: parameters
    `pipeline`, `window_start`, `fence`, `row_count`, `loaded_at`."""

    upsert: sa.Executable
    fence: sa.Executable


_LEDGER_STATEMENTS = "windowpipe_ledger_statements"
"""Key of a ledger `Table.info` under which its statements are kept, per dialect name."""


def _ledger_statements(ledger: sa.Table, dialect: str) -> _LedgerStatements:
    """The ledger's upsert and fence read for `dialect` ("postgresql" or "sqlite"), built on
    first use and kept with the `Table` (each target holds its own)."""
    kept: dict[str, _LedgerStatements] = ledger.info.setdefault(_LEDGER_STATEMENTS, {})
    statements = kept.get(dialect)
    if statements is None:
        insert = postgresql.insert(ledger) if dialect == "postgresql" else sqlite.insert(ledger)
        excluded = insert.excluded
        upsert = insert.on_conflict_do_update(
            index_elements=[ledger.c.pipeline, ledger.c.window_start],
            set_={
                "fence": excluded.fence,
                "row_count": excluded.row_count,
                "loaded_at": excluded.loaded_at,
            },
            where=ledger.c.fence <= excluded.fence,
        ).returning(ledger.c.fence)
        fence = sa.select(ledger.c.fence).where(
            ledger.c.pipeline == sa.bindparam("pipeline"),
            ledger.c.window_start == sa.bindparam("window_start"),
        )
        statements = _LedgerStatements(upsert, fence)
        kept[dialect] = statements
    return statements


def window_key(table: str, pipeline: str, window_start: datetime) -> str:
    """A short name of (target table, pipeline, window) that a load's session tag carries: 16
    hex digits (PostgreSQL keeps 63 bytes of `application_name`; pipeline names run to 200)."""
    text = f"{table}\0{pipeline}\0{_utc_text(window_start)}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class LoadTag:
    """How a PostgreSQL load names its session for the length of its transaction.

    `application_name` = `windowpipe-load FENCE KEY LABEL`: KEY is a hash of (target table,
    pipeline, window start), the identity another load of the same window compares; LABEL is
    `pipeline@window start` for people reading `pg_stat_activity`, cut to the 63 bytes the server
    keeps. Set with `set_config(..., true)`, i.e. `SET LOCAL`: it ends with the transaction, so
    a connection a shared pool hands to another load (or to anything else) never carries a
    stale tag.
    """

    def __init__(self, table: str, pipeline: str, window_start: datetime, fence: int) -> None:
        self.key = window_key(table, pipeline, window_start)
        self.fence = fence
        label = f"{pipeline}@{_utc_text(window_start)}"
        text = f"{LOAD_TAG} {fence} {self.key} {label}".encode()[:63]
        self.text = text.decode("utf-8", errors="ignore")

    def apply(self, conn: sa.Connection, *, savepoint: str) -> None:
        """Tag this transaction, bound its ledger wait (`LEDGER_WAIT_SECONDS`) and its idle time
        (`IDLE_LOAD_SECONDS`), every setting local to the transaction, then set `savepoint`:
        one round trip, a simple query of two statements (which takes no parameters, so the
        values are quoted by psycopg as literals for this connection)."""
        from psycopg import sql

        raw = conn.connection.driver_connection
        tag, wait, idle = (
            # `%` doubled: the driver still reads the text for placeholders.
            sql.Literal(value).as_string(raw).replace("%", "%%")
            for value in (self.text, f"{LEDGER_WAIT_SECONDS}s", f"{IDLE_LOAD_SECONDS}s")
        )
        conn.exec_driver_sql(
            f"SELECT set_config('application_name', {tag}, true),"
            f" set_config('lock_timeout', {wait}, true),"
            f" set_config('idle_in_transaction_session_timeout', {idle}, true);"
            f" SAVEPOINT {savepoint}"
        )


_TERMINATE_OLDER_LOADS = sa.text(
    "SELECT pid, application_name, pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE usename = current_user AND datname = current_database()"
    " AND pid <> pg_backend_pid()"
    " AND split_part(application_name, ' ', 1) = :prefix"
    " AND split_part(application_name, ' ', 3) = :key"
    " AND CASE WHEN split_part(application_name, ' ', 2) ~ '^[0-9]{1,18}$'"
    " THEN split_part(application_name, ' ', 2)::bigint END < :fence"
)
"""End every backend of this role and database whose tag names an older fence of the same
window (the server evaluates the filter and the termination in one statement, so a backend
whose transaction ended meanwhile, and with it its tag, is not touched)."""


def take_ledger_row(
    conn: sa.Connection, ledger: sa.Table, tag: LoadTag, **record: Any
) -> int | None:
    """`record_fence` on PostgreSQL, for a load it tags `tag` (`LoadTag.apply`): a load frozen
    with the window's ledger row cannot make this one wait longer than
    `LEDGER_WAITS * LEDGER_WAIT_SECONDS`.

    The upsert runs in a savepoint under `lock_timeout`. When the wait runs out, the backends
    tagged as an older fence of this window are terminated (same role, same database; an
    unrelated session, or a newer fence, is never touched) and the upsert is tried again.
    Then `lock_timeout` goes back to the session's default, so the rest of the load waits as
    before (on a user's lock on the target table, say).

    Timeline, A (fence 3) frozen inside its load, B (fence 5) loading the same window:
        t0  A moves the ledger row to 3 (row locked) and freezes: between statements (idle in
            transaction), mid-COPY (the server waits for data; `idle_in_transaction_session_
            timeout` does not apply), or with its whole worker stopped
        t1  A's Redis lock expires; cleanup requeues; B claims (fence 5), waits on the row
        t2  `LEDGER_WAIT_SECONDS` later B's wait runs out: B's savepoint rolls back (its
            transaction lives on), B terminates the backend tagged `windowpipe-load 3 <same
            window>`; the server rolls A's transaction back and frees the row
        t3  B's upsert takes the row (3 <= 5), B loads and commits: the window holds B's rows
        t4  A wakes: its connection is gone (TransientError); its retry's guard sees 5 > 3
            and is refused (StaleFenceError). Nothing of A's load was committed.
    If the row is held by a newer fence (B is the stale one), nothing is terminated: B waits
    its turn and the guard then refuses it. Why the tag and not `pg_blocking_pids` alone: once
    the wait ran out, B no longer waits, so nobody blocks it; and every older fence of this
    window is fenced out anyway, so ending one that does not hold the row yet loses nothing.
    """
    # The savepoint by hand rather than `begin_nested()`: set with the tag, and released with
    # the reset of `lock_timeout`, a round trip each. ROLLBACK TO keeps it for the next try.
    tag.apply(conn, savepoint=_LEDGER_SAVEPOINT)
    for _ in range(LEDGER_WAITS):
        try:
            recorded = record_fence(conn, ledger, **record)
        except sa.exc.OperationalError as error:
            if getattr(error.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {_LEDGER_SAVEPOINT}")
            ended = conn.execute(
                _TERMINATE_OLDER_LOADS, {"prefix": LOAD_TAG, "key": tag.key, "fence": tag.fence}
            ).all()
            get_logger("windowpipe.sql_target").warning(
                "waited on the window's ledger row; ended older loads holding it",
                fence=tag.fence,
                ended=[f"{pid} ({name})" for pid, name, _ in ended],
            )
            continue
        conn.exec_driver_sql(
            f"RELEASE SAVEPOINT {_LEDGER_SAVEPOINT}; SET LOCAL lock_timeout TO DEFAULT"
        )
        return recorded
    raise TransientError(
        f"sql target: the ledger row of window {record['pipeline']} "
        f"{_utc_text(record['window_start'])} stayed locked by a load that is not older than "
        f"fence {tag.fence} for {LEDGER_WAITS * LEDGER_WAIT_SECONDS}s"
    )


_LEDGER_SAVEPOINT = "windowpipe_ledger"
"""The savepoint around a PostgreSQL load's ledger upsert (`take_ledger_row`)."""

_LOCK_NOT_AVAILABLE = "55P03"
"""PostgreSQL's SQLSTATE for a lock wait that ran past `lock_timeout`."""


def _utc_text(value: datetime) -> str:
    """An instant as text; a naive one (SQLite's columns) is UTC."""
    return format_instant(as_utc(value))


def stale_fence_error(pipeline: str, window_start: datetime, fence: int, recorded: int) -> str:
    """The one-line message of a refused load (the same for every target)."""
    return (
        f"refused a stale load of window {pipeline} {_utc_text(window_start)}: "
        f"its fence {fence} is older than fence {recorded}, which loaded the window last"
    )


def _translate_target(error: sa.exc.SQLAlchemyError, action: str) -> WindowpipeError:
    """Like the source's translation, except that SQLite reports a missing table or column as
    an OperationalError, which retrying cannot fix."""
    translated = _translate(error, action, "sql target")
    detail = str(getattr(error, "orig", error))
    if isinstance(translated, TransientError) and detail.startswith(_SQLITE_MISSING):
        return TerminalError(str(translated))
    return translated


_SQLITE_MISSING = ("no such table", "no such column")
"""SQLite's messages for a missing object (OperationalError, but terminal)."""


_COPY_COLUMNS = (
    "pipeline",
    "window_start",
    "window_end",
    "doc_id",
    "doc",
    "source_file",
    "file_row",
    "loaded_at",
)


def _copy_field(value: str) -> str:
    """`value` as a field of COPY's text format: backslash, tab, newline and CR escaped."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return (
            value.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return value


def _copy_into_postgresql(
    conn: sa.Connection, table: sa.Table, chunks: Iterator[tuple[str, int]]
) -> int:
    """Stream rows with `COPY ... FROM STDIN` on the transaction's own connection; `chunks`
    are (COPY text of some rows, how many rows).

    An INSERT per row (what executemany does on psycopg) spent most of a load's time in round
    trips; COPY streams them. Same transaction as the DELETE before it, so still atomic. The
    rows' text is built here rather than by psycopg's `write_row` (a Python call and a tuple
    per row, and the window's three instants adapted on every row).
    """
    import psycopg

    preparer = conn.dialect.identifier_preparer
    columns = ", ".join(preparer.quote(name) for name in _COPY_COLUMNS)
    statement = f"COPY {preparer.format_table(table)} ({columns}) FROM STDIN"
    raw = conn.connection.driver_connection
    assert raw is not None, "a connection inside a transaction has a driver connection"
    loaded = 0
    try:
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            for text, rows in chunks:
                copy.write(text)  # encoded in the connection's client encoding
                loaded += rows
    except psycopg.OperationalError as error:
        raise as_time_limit(error, "sql target: load window") or TransientError(
            one_line(f"sql target: load window failed: {error}")
        ) from None
    except psycopg.Error as error:
        raise TerminalError(one_line(f"sql target: load window failed: {error}")) from None
    return loaded


@dataclass(frozen=True)
class _TargetStatements:
    """A target table's per-window statements, built once and compiled once into `cache`
    (`record_fence`'s too, which keeps its statements with the ledger's `Table`), parameters
    bound at execution: `pipeline` and `start` (the window's start as the column stores it)."""

    table: sa.Table
    ledger: sa.Table
    cache: CompiledCache
    delete: sa.Executable
    count: sa.Executable
    ids: sa.Executable
    """The window's ids, read back to be hashed here (databases that hash none themselves)."""
    held: sa.Executable
    """The window's ledger row: its fence and row count."""
    audit: sa.Executable
    """PostgreSQL: the window's row count, `PG_ID_HASH_SUM` and its ledger row (fence and
    row count, NULL if none) in one statement."""


def _target_statements(table: sa.Table, ledger: sa.Table) -> _TargetStatements:
    pipeline: sa.BindParameter[str] = sa.bindparam("pipeline")
    start: sa.BindParameter[datetime] = sa.bindparam("start")
    window = (table.c.pipeline == pipeline, table.c.window_start == start)
    held = sa.select(ledger.c.fence, ledger.c.row_count)
    ledger_row = sa.and_(ledger.c.pipeline == pipeline, ledger.c.window_start == start)
    rows = (
        sa.select(
            sa.func.count().label("row_count"),
            sa.literal_column(f"coalesce({PG_ID_HASH_SUM}, 0)").label("id_sum"),
        )
        .select_from(table)
        .where(*window)
        .subquery()
    )
    audit = sa.select(rows.c.row_count, rows.c.id_sum, ledger.c.fence, ledger.c.row_count)
    return _TargetStatements(
        table=table,
        ledger=ledger,
        cache={},
        delete=sa.delete(table).where(*window),
        count=sa.select(sa.func.count()).select_from(table).where(*window),
        ids=sa.select(table.c.doc_id).where(*window),
        held=held.where(ledger_row),
        audit=audit.select_from(rows.outerjoin(ledger, ledger_row)),
    )


class SqlTarget:
    """Loads windows into a SQL table, idempotently per window."""

    def __init__(self, config: SqlTargetConfig) -> None:
        self.config = config
        self._lease: Lease[sa.Engine] | None = None
        self._statements: _TargetStatements | None = None
        self._lock = threading.Lock()

    def _connect(self) -> tuple[sa.Engine, _TargetStatements]:
        """The process's engine for this URL (`lease_engine`, shared by every target on it),
        and this target's table and ledger (created if missing on first use) with their
        statements (`_TargetStatements`)."""
        with self._lock:
            if self._lease is None:
                self._lease = lease_engine(
                    self.config.url, self.config.password_env, "sql target", _target_engine
                )
            engine = self._lease.client
            if self._statements is None:
                metadata = sa.MetaData()
                table = target_table(self.config.table, metadata)
                ledger = ledger_table(self.config.table, metadata)
                for created in (table, ledger):
                    _create_if_missing(engine, created)
                self._statements = _target_statements(table, ledger)
            return engine, self._statements

    def _instant(self, engine: sa.Engine, value: datetime) -> datetime:
        # SQLite keeps no zone: store and compare naive UTC there.
        if engine.dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def _fence_and_clear(
        self,
        conn: sa.Connection,
        statements: _TargetStatements,
        pipeline: str,
        window_start: datetime,
        fence: int,
        rows: int,
        at: datetime,
    ) -> int:
        """Inside the caller's transaction, as a load and an empty load both begin: move the
        window's ledger row to `fence` for `rows` loaded `at` (`_take_fence`; on PostgreSQL
        tagged, so a frozen older fence cannot hold the row for long) and delete the window's
        rows; how many went. `StaleFenceError` when a newer fence holds the ledger."""
        engine = conn.engine
        start = self._instant(engine, window_start)
        tag = None
        if engine.dialect.name == "postgresql":  # SQLite targets are single-writer
            tag = LoadTag(self.config.table, pipeline, window_start, fence)
        _take_fence(conn, statements.ledger, pipeline, start, fence, rows, at, tag=tag)
        deleted = conn.execute(statements.delete, {"pipeline": pipeline, "start": start})
        return int(deleted.rowcount or 0)

    def load_window(
        self, pipeline: str, manifest: Manifest, staging: StagedLines, fence: int
    ) -> int:
        """Replace the window's rows with the manifest's documents in one transaction, fenced.

        The transaction's first statement moves the window's ledger row to `fence`, guarded by
        `fence <= :fence` (`record_fence`); then the window's rows are deleted and the staged
        ones inserted (COPY on PostgreSQL). If the guard matches nothing, the transaction rolls
        back and this raises `StaleFenceError`. Taking the ledger row first serialises two
        loads of one window: on PostgreSQL the later one waits on the row lock, on SQLite at
        `BEGIN IMMEDIATE`, and re-checks the guard when the first ends.

        Timeline, A paused with fence 3 while B takes the window over with fence 5:

        A first:  A moves the ledger row to 3 (row locked), then freezes (SIGSTOP, GC) inside
                  its transaction; its Redis lock expires, cleanup requeues, B claims the
                  window (fence 5) and waits on A's ledger row. A wakes and commits its rows
                  (ledger 3). B's guard re-checks 3 < 5: B deletes A's rows, inserts its own
                  and commits (ledger 5). The window holds B's rows once; A's record commit is
                  refused by the state store (its fence is 5 now).
        B first:  A freezes before its transaction; B claims (fence 5), loads and commits
                  (ledger 5). A wakes: its guard 5 < 3 matches nothing, A rolls back and
                  raises StaleFenceError. The window holds B's rows once.

        Also raises TerminalError, committing nothing, if the staged files hold a different
        number of documents than the manifest lists."""
        engine, statements = self._connect()
        start = self._instant(engine, manifest.window_start)
        end = self._instant(engine, manifest.window_end)
        loaded_at = self._instant(engine, utc_now())
        loaded = 0
        try:
            with engine.execution_options(**_WRITE).begin() as conn:
                conn.execution_options(compiled_cache=statements.cache)
                # Committed only if the staged files hold exactly `manifest.rows` (below).
                self._fence_and_clear(
                    conn,
                    statements,
                    pipeline,
                    manifest.window_start,
                    fence,
                    manifest.rows,
                    loaded_at,
                )
                if engine.dialect.name == "postgresql":
                    chunks = self._copy_chunks(manifest, staging, pipeline, start, end, loaded_at)
                    loaded = _copy_into_postgresql(conn, statements.table, chunks)
                else:
                    batches = self._row_batches(manifest, staging, pipeline, start, end, loaded_at)
                    for rows in batches:
                        conn.execute(sa.insert(statements.table), rows)
                        loaded += len(rows)
                if loaded != manifest.rows:
                    # Raised inside the transaction: nothing of this load is committed. The
                    # stage does not hold what extract wrote: the next attempt extracts again.
                    raise StagedDataLostError(
                        f"sql target: the staged files of run {manifest.run} hold {loaded} "
                        f"rows but the manifest lists {manifest.rows}"
                    )
        except sa.exc.SQLAlchemyError as error:
            raise _translate_target(error, "load window") from None
        return loaded

    def _row_batches(
        self,
        manifest: Manifest,
        staging: StagedLines,
        pipeline: str,
        start: datetime,
        end: datetime,
        loaded_at: datetime,
    ) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        for staged in manifest.files:
            for number, line in enumerate(
                staging.iter_lines(staged.path, sha256=staged.sha256), start=1
            ):
                if not line.strip():
                    continue
                item = decode_line(line)
                batch.append(
                    {
                        "pipeline": pipeline,
                        "window_start": start,
                        "window_end": end,
                        "doc_id": str(item["id"]),
                        "doc": item["doc"],
                        "source_file": staged.path,
                        "file_row": number,
                        "loaded_at": loaded_at,
                    }
                )
                if len(batch) >= self.config.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _copy_chunks(
        self,
        manifest: Manifest,
        staging: StagedLines,
        pipeline: str,
        start: datetime,
        end: datetime,
        loaded_at: datetime,
    ) -> Iterator[tuple[str, int]]:
        """What `_row_batches` yields, as COPY text (columns in `_COPY_COLUMNS` order), with
        the row count of each chunk. `doc` is the staged document re-serialized by orjson, as
        the INSERT path's JSON serializer does."""
        head = f"{_copy_field(pipeline)}\t{start.isoformat()}\t{end.isoformat()}\t"
        tail = f"\t{loaded_at.isoformat()}\n"
        lines: list[str] = []
        for staged in manifest.files:
            middle = f"\t{_copy_field(staged.path)}\t"
            for number, line in enumerate(
                staging.iter_lines(staged.path, sha256=staged.sha256), start=1
            ):
                if not line.strip():
                    continue
                item = decode_line(line)
                # JSON text holds no raw tab, newline or CR: only backslashes need escaping.
                doc = orjson.dumps(item["doc"]).decode()
                if "\\" in doc:
                    doc = doc.replace("\\", "\\\\")
                lines.append(f"{head}{_copy_field(str(item['id']))}\t{doc}{middle}{number}{tail}")
                if len(lines) >= self.config.batch_size:
                    yield "".join(lines), len(lines)
                    lines = []
        if lines:
            yield "".join(lines), len(lines)

    def clear_window(self, pipeline: str, window: Window, fence: int) -> int:
        """A fenced empty load: in one transaction, move the window's ledger row to `fence`
        with 0 rows (`record_fence`, the same guard as `load_window`) and delete the window's
        rows; how many went. Refused with `StaleFenceError`, changing nothing, when a newer
        fence loaded the window.

        Timeline, A loading with fence 3 while B (fence 5) finds the window empty at the
        source: A holds the ledger row and freezes; B's clear waits on it. A commits its rows
        (ledger 3); B's guard sees 3 < 5, deletes them and commits (ledger 5, 0 rows). Or B
        clears first (ledger 5); A's guard refuses 3 and A rolls back. The window ends empty.
        """
        engine, statements = self._connect()
        try:
            with engine.execution_options(**_WRITE).begin() as conn:
                conn.execution_options(compiled_cache=statements.cache)
                cleared_at = self._instant(engine, utc_now())
                return self._fence_and_clear(
                    conn, statements, pipeline, window.start, fence, 0, cleared_at
                )
        except sa.exc.SQLAlchemyError as error:
            raise _translate_target(error, "clear window") from None

    def audit_window(self, pipeline: str, window: Window) -> TargetAudit:
        """The window's rows, their ids' checksum and its ledger row, read in one snapshot: one
        statement on PostgreSQL (`_TargetStatements.audit`: the server sums the ids' hashes,
        `PG_ID_HASH_SUM`, and one row comes back), elsewhere a read transaction
        (`_window_ids_checksum`, then the ledger row)."""
        engine, statements = self._connect()
        window_of = {"pipeline": pipeline, "start": self._instant(engine, window.start)}
        try:
            with engine.connect() as conn:
                if engine.dialect.name == "postgresql":
                    found = read_with(conn, statements.cache).execute(statements.audit, window_of)
                    count, total, fence, held_rows = found.one()
                    rows, checksum = int(count), checksum_text(int(total))
                    held = (fence, held_rows) if fence is not None else None
                else:
                    conn.execution_options(compiled_cache=statements.cache)
                    with conn.begin():
                        rows, checksum = _window_ids_checksum(conn, statements, window_of)
                        held = conn.execute(statements.held, window_of).first()
        except sa.exc.SQLAlchemyError as error:
            raise _translate_target(error, "audit window") from None
        return TargetAudit(
            rows=rows,
            checksum=checksum,
            ledger_fence=int(held[0]) if held is not None else None,
            ledger_rows=int(held[1]) if held is not None else None,
        )

    def count_window(self, pipeline: str, window: Window) -> int:
        """Rows the table holds for the window."""
        engine, statements = self._connect()
        window_of = {"pipeline": pipeline, "start": self._instant(engine, window.start)}
        try:
            with engine.connect() as conn:
                counted = read_with(conn, statements.cache).execute(statements.count, window_of)
                return int(counted.scalar_one())
        except sa.exc.SQLAlchemyError as error:
            raise _translate_target(error, "count window") from None

    def close(self) -> None:
        """Give the engine back (the last target using it disposes of its connections); it is
        leased again on next use."""
        with self._lock:
            held, self._lease, self._statements = self._lease, None, None
        if held is not None:
            held.release()


def _target_engine(url: sa.URL) -> sa.Engine:
    """A target's engine: JSON through orjson; on SQLite, loads begin with `BEGIN IMMEDIATE`."""
    engine = create_engine(
        url, None, "sql target", json_serializer=lambda value: orjson.dumps(value).decode()
    )
    if engine.dialect.name == "sqlite":
        _begin_sqlite_writes_immediately(engine)
    return engine


def _take_fence(
    conn: sa.Connection,
    ledger: sa.Table,
    pipeline: str,
    start: datetime,
    fence: int,
    rows: int,
    loaded_at: datetime,
    *,
    tag: LoadTag | None,
) -> None:
    """`record_fence` inside the caller's transaction, or `StaleFenceError` (naming the
    ledger's fence) raised inside it, so that it rolls back and nothing changes. With a `tag`
    (PostgreSQL), the transaction is tagged and a frozen older fence of the window cannot hold
    the ledger row for long (`take_ledger_row`)."""
    record: dict[str, Any] = {
        "pipeline": pipeline,
        "window_start": start,
        "fence": fence,
        "rows": rows,
        "loaded_at": loaded_at,
    }
    if tag is not None:
        recorded = take_ledger_row(conn, ledger, tag, **record)
    else:
        recorded = record_fence(conn, ledger, **record)
    if recorded is not None:
        raise StaleFenceError(
            "sql target: " + stale_fence_error(pipeline, start, fence, recorded),
            recorded=recorded,
        )


PG_ID_HASH_SUM = "sum(('x' || substr(md5(doc_id), 1, 16))::bit(64)::bigint)"
"""PostgreSQL's sum of `core.checksum.id_hash` over a window's rows (as signed bigints: the
same sum modulo 2**64)."""

ID_READ_BATCH = 10_000
"""Ids read back per fetch where the database hashes none itself (`_window_checksum`)."""


def _window_ids_checksum(
    conn: sa.Connection, statements: _TargetStatements, window_of: dict[str, Any]
) -> tuple[int, str]:
    """The window's row count and the checksum of its ids (`core.checksum`), where the
    database hashes none itself (SQLite, DuckDB): the ids are read back in batches and hashed
    here, one id per row over the wire, the cost of a count that returns the column, and no
    function to register per connection. (PostgreSQL sums the hashes itself: `audit_window`.)
    """
    rows = total = 0
    result = conn.execution_options(yield_per=ID_READ_BATCH).execute(statements.ids, window_of)
    for batch in result.scalars().partitions():
        rows += len(batch)
        total += ids_sum(batch)
    return rows, checksum_text(total)


def _create_if_missing(engine: sa.Engine, table: sa.Table) -> None:
    try:
        table.create(engine, checkfirst=True)
    except sa.exc.IntegrityError:
        pass  # another worker created it a moment ago
    except sa.exc.ProgrammingError as error:
        if "already exists" not in str(error):
            raise _translate(error, "create table", "sql target") from None
    except sa.exc.SQLAlchemyError as error:
        raise _translate(error, "create table", "sql target") from None


_WRITE = {"windowpipe_sqlite_begin": "BEGIN IMMEDIATE"}
"""Execution options of a load's transaction: on SQLite it takes the write lock at BEGIN."""


def _begin_sqlite_writes_immediately(engine: sa.Engine) -> None:
    """Let SQLAlchemy, not the sqlite3 module, begin SQLite transactions, and begin a load's
    with `BEGIN IMMEDIATE`.

    The sqlite3 module's own BEGIN is deferred: two loads of one window would both read the
    ledger under a shared lock, then one would fail to upgrade ("database is locked") instead
    of waiting. With the write lock taken at BEGIN, the second load waits there (up to the
    busy timeout) and then sees the first one's fence. Reads still begin deferred.
    """

    @sa.event.listens_for(engine, "connect")
    def _driver_autocommit(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("windowpipe_sqlite_begin", "BEGIN"))
