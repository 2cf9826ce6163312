"""SQL tables through SQLAlchemy (PostgreSQL, SQLite, DuckDB, ...).

The source reads a table with a timestamp column and a unique id column, a window at a time,
by keyset pagination on `(timestamp, id)`: each page is one `LIMIT page_size` query that starts
after the last row of the previous one, so memory stays at one page however big the window,
and rows sharing a timestamp are neither skipped nor repeated at page boundaries.

Timestamps in a column without a time zone (SQLite, PostgreSQL `timestamp without time zone`)
are UTC; such a column is compared with naive UTC bounds, an aware column with aware ones.
"""

from __future__ import annotations

import re
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from functools import partial
from itertools import repeat
from operator import attrgetter, itemgetter
from time import monotonic
from typing import Any

import orjson
import sqlalchemy as sa

from connectors.base import (
    INSTANT_OPTIONS,
    STAGED_LINE,
    Batch,
    Document,
    Rejection,
    encode_body,
    staged_line,
    unencodable_reason,
)
from connectors.shared import Lease, lease
from core.config import SqlSourceConfig, resolve_secret
from core.errors import TerminalError, TransientError, WindowpipeError, one_line
from core.instants import as_utc
from core.recheck import Fingerprint
from core.retry import as_time_limit
from core.windows import Window

POOL_SIZE = 1
"""Connections an engine keeps open while idle. A prefork worker process runs one task at a
time, so one connection per engine serves it; the engine is shared by every pipeline of the
process that connects with the same URL (`lease_engine`)."""

POOL_OVERFLOW = 7
"""Connections an engine opens beyond `POOL_SIZE` while that many are in use at once (a
thread pool worker, `-P threads -c 8`), closed as soon as they are returned. A ninth user
waits for one (up to SQLAlchemy's 30 s pool timeout, then a transient error)."""

POOL_RECYCLE_SECONDS = 300
"""An idle connection older than this is replaced at its next checkout (servers, proxies and
firewalls drop long-idle sessions)."""

IDLE_PING_SECONDS = 5.0
"""A pooled connection that sat idle in the pool longer than this is pinged at checkout
(`checkout_ping_needed`)."""

_IDLE_SINCE = "windowpipe_idle_since"
"""Key of a pooled connection's `info` holding when it was last checked in (monotonic)."""


def checkout_ping_needed(idle_seconds: float | None, has_input: bool) -> bool:
    """Whether a connection checked out of the pool after `idle_seconds` in it (None: never
    checked in, i.e. just opened) is pinged first (a `SELECT 1`, replaced if that fails).

    A connection the server ended while it sat idle (`pg_terminate_backend`, a restart,
    `idle_session_timeout`) has input waiting on its socket (the server's last message, or the
    end of the stream): pinged, found dead, replaced, so a dead pooled connection never reaches
    a connector. One dropped silently (a firewall or proxy forgetting it) shows nothing; only
    one idle longer than `IDLE_PING_SECONDS` is pinged for that. Every other checkout (a
    worker's next task a moment later, the common case) skips the round trip SQLAlchemy's
    `pool_pre_ping` would make each time. A connection that dies unseen between its last use
    and its next query, or while busy, fails that query: SQLAlchemy invalidates it (the pool
    opens a new one on next checkout) and the connector raises TransientError, which the
    stage's retry policy retries.
    """
    if idle_seconds is None:
        return False
    return has_input or idle_seconds > IDLE_PING_SECONDS


def _has_input(dbapi_connection: Any) -> bool:
    """Whether the driver connection's socket has something to read (or is closed); False
    when the driver exposes no socket (SQLite)."""
    fileno = getattr(dbapi_connection, "fileno", None)
    if fileno is None:
        return False
    try:
        descriptor = fileno()
    except Exception:  # closed: the ping finds out how
        return True
    poller = select.poll()
    poller.register(descriptor, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def _ping_stale_connections(engine: sa.Engine) -> None:
    """Ping a connection at checkout when `checkout_ping_needed` says so, instead of at every
    checkout (`pool_pre_ping`); a failed ping replaces the connection, as `pool_pre_ping`
    does (SQLAlchemy's pool opens a new one when a `checkout` listener raises
    `DisconnectionError`)."""
    dialect = engine.dialect

    @sa.event.listens_for(engine.pool, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            record.info[_IDLE_SINCE] = monotonic()

    @sa.event.listens_for(engine.pool, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop(_IDLE_SINCE, None)
        idle = monotonic() - since if since is not None else None
        if not checkout_ping_needed(idle, idle is not None and _has_input(dbapi_connection)):
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            raise sa.exc.DisconnectionError(f"pooled connection failed a ping: {error}") from error


def engine_url(raw_url: str | sa.URL, password_env: str | None, role: str) -> sa.URL:
    """A connector's URL with its password taken from `password_env` (never from the file)."""
    try:
        url = sa.make_url(raw_url)
    except sa.exc.ArgumentError as error:
        raise TerminalError(one_line(f"{role}: bad url: {error}")) from None
    password = resolve_secret(password_env)
    return url.set(password=password) if password is not None else url


def create_engine(
    raw_url: str | sa.URL, password_env: str | None, role: str, **options: Any
) -> sa.Engine:
    """An engine for a connector's URL, its password taken from `password_env` (never from the
    file), with connect timeouts so an unreachable server fails fast and transiently, and a
    small pool (`POOL_SIZE`, `POOL_OVERFLOW`) whose connections are checked at checkout when
    they may have died (`checkout_ping_needed`)."""
    url = engine_url(raw_url, password_env, role)
    try:
        connect_args: dict[str, Any] = {}
        if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = 10
        elif url.get_backend_name() == "sqlite":
            connect_args["timeout"] = 30
        if url.get_backend_name() != "sqlite":
            options = {
                "pool_size": POOL_SIZE,
                "max_overflow": POOL_OVERFLOW,
                "pool_recycle": POOL_RECYCLE_SECONDS,
                **options,
            }
        engine = sa.create_engine(url, connect_args=connect_args, **options)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as error:
        raise TerminalError(one_line(f"{role}: bad url: {error}")) from None
    _ping_stale_connections(engine)
    return engine


def lease_engine(
    raw_url: str, password_env: str | None, role: str, build: Callable[[sa.URL], sa.Engine]
) -> Lease[sa.Engine]:
    """A lease of this process's engine for `role` ("sql source", "sql target") on the URL
    with its password: every pipeline reading (or loading into) the same database through the
    same URL shares one engine and its pool. `build(url)` makes the engine the first time.

    Keyed by role too: a source's and a target's engines differ in their options and event
    hooks (SQLite text decoding, `BEGIN IMMEDIATE`). URLs differing in anything (a query
    option such as `search_path`) get engines of their own.
    """
    url = engine_url(raw_url, password_env, role)
    key = ("sqlalchemy", role, url.render_as_string(hide_password=False))
    return lease(key, lambda: build(url), _dispose)


def _dispose(engine: sa.Engine) -> None:
    engine.dispose()


CompiledCache = dict[Any, Any]
"""A connector's own cache of compiled statements: `compiled_cache` of the connections it
executes its statements on (`Connection.execution_options`).

A connector builds its statements once per table, with bound parameters (building one is most
of its cost: operators, then its cache key, which SQLAlchemy memoizes on the statement), and
keeps their compiled forms beside them. The engine's cache would not keep them: it is an LRU of
500 statements (`query_cache_size`) shared by every pipeline of the process on that URL, and a
worker serving 1,000 pipelines cycles through 2-3 statements a table of 1,000 tables, so each
would be evicted before its table came round again and be compiled anew every window. A
connector's cache holds only its own few statement shapes (bounded), and lives and dies with
its table."""


# --- source -------------------------------------------------------------------------------------

_TERMINAL_SQLSTATE_PREFIXES = ("28", "3D")
"""SQLSTATE classes an OperationalError can carry that retrying cannot fix: bad credentials
(class 28) and a database that does not exist (3D000)."""


_TERMINAL_LOGIN_FAILURE = re.compile(
    r'FATAL:\s+(database "[^"]*" does not exist|role "[^"]*" does not exist'
    r"|password authentication failed|no pg_hba\.conf entry)"
)
"""PostgreSQL refusing a login: psycopg raises these at connect time without a SQLSTATE, so
they are recognized by the server's message (terminal, like SQLSTATE classes 28 and 3D)."""


def _translate(
    error: sa.exc.SQLAlchemyError, action: str, role: str = "sql source"
) -> WindowpipeError:
    """TransientError for a lost or refused connection, TerminalError for everything else.

    A soft time limit raised mid-query reaches here wrapped: psycopg finds the interrupted
    connection busy when the pool rolls it back, and SQLAlchemy raises that OperationalError
    with the time limit in its cause chain. It is `StageTimeLimitError` (transient), never
    terminal. (A time limit outside a driver call is not an SQLAlchemyError: it passes as is.)
    """
    limit = as_time_limit(error, f"{role}: {action}")
    if limit is not None:
        return limit
    detail = str(error.orig) if isinstance(error, sa.exc.DBAPIError) else str(error)
    message = one_line(f"{role}: {action} failed: {type(error).__name__}: {detail}")
    if isinstance(error, sa.exc.DBAPIError):
        sqlstate = str(getattr(error.orig, "sqlstate", "") or "")
        refused_login = _TERMINAL_LOGIN_FAILURE.search(detail) is not None
        if sqlstate.startswith(_TERMINAL_SQLSTATE_PREFIXES) or refused_login:
            return TerminalError(message)
        if error.connection_invalidated or isinstance(
            error, sa.exc.OperationalError | sa.exc.InterfaceError
        ):
            return TransientError(message)
    if isinstance(error, sa.exc.TimeoutError | sa.exc.DisconnectionError):
        return TransientError(message)
    return TerminalError(message)


def json_value(value: Any) -> Any:
    """A column value as JSON-able data: instants as ISO UTC with `Z` (naive means UTC),
    Decimal as exact text, bytes as UTF-8 text. Raises UnicodeError for text that is not
    UTF-8."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        if not value.isascii():
            value.encode("utf-8")  # lone surrogates: undecodable bytes the driver let through
        return value
    if isinstance(value, datetime):
        return _instant_text(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8")
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(item) for item in value]
    return str(value)  # Decimal, UUID, intervals: their text form is exact


_PLAIN: frozenset[type] = frozenset({type(None), bool, int, float, str})
"""Column value types that are JSON as they are (the common case, checked first for speed).
Text is checked for UTF-8 by orjson when the body is serialized (it refuses lone surrogates);
only then does a row take the slow path through `json_value`."""


_EXACT_DATETIME: frozenset[type] = frozenset({datetime})
_UTC_ONLY: set[Any] = {UTC}
_UTC_OR_NAIVE: frozenset[Any] = frozenset({UTC, None})
_TZINFO = attrgetter("tzinfo")
_INSTANT_JSON = partial(orjson.dumps, option=INSTANT_OPTIONS)
"""A UTC or naive instant as its quoted `format_instant` text, printed by orjson."""
_UNQUOTED = itemgetter(slice(1, -1))


def _instant_text(value: datetime) -> str:
    """`format_instant(as_utc(value))`, without converting a value that is UTC already."""
    offset = value.utcoffset()
    if offset is None:
        value = value.replace(tzinfo=UTC)
    elif offset:
        value = value.astimezone(UTC)
    # isoformat() prints microseconds only when not zero, as format_instant does.
    return value.isoformat()[:-6] + "Z"


def _lenient_text(raw: bytes) -> str:
    # SQLite returns TEXT as it was stored; decoding strictly would fail the whole page on one
    # bad row. Undecodable bytes become lone surrogates, which json_value turns into a
    # `not UTF-8` rejection of that row only.
    return raw.decode("utf-8", "surrogateescape")


def read_with(conn: sa.Connection, cache: CompiledCache) -> sa.Connection:
    """`conn` set up for a connector's read of one statement: compiled into the connector's
    `cache`, and on PostgreSQL in autocommit. A statement is its own snapshot there whatever
    the transaction around it, so a one-statement read in a transaction of its own would only
    add a BEGIN and a ROLLBACK round trip (a third of a fingerprint's)."""
    conn.execution_options(compiled_cache=cache)
    if conn.dialect.name == "postgresql":
        conn.execution_options(isolation_level="AUTOCOMMIT")
    return conn


@dataclass(frozen=True)
class _SourceStatements:
    """A source table's statements, built once and compiled once into `cache`, parameters
    bound at execution: `start` and `end` the window's bounds as the column compares them,
    `last_ts` and `last_id` the previous page's last row."""

    table: sa.Table
    cache: CompiledCache
    count: sa.Executable
    fingerprint: sa.Executable | None
    """None when `version_column` names no column of the table (`fingerprint` raises)."""
    first_page: sa.Executable
    next_page: sa.Executable
    probe: sa.Executable
    """The window's first `probe_rows` rows, read in autocommit: all of a small window."""
    probe_rows: int


PROBE_ROWS = 100
"""A window of fewer rows is read by one statement in autocommit (its own snapshot), without
the BEGIN, SET and COMMIT round trips of the paged transaction. A bigger window reads these
rows twice (the probe's are set aside): at most this many, so a window of a few thousand rows
does not pay a whole page (`page_size`, 5,000 by default) again to save three round trips."""


def _source_statements(table: sa.Table, config: SqlSourceConfig) -> _SourceStatements:
    ts, key = table.c[config.timestamp_column], table.c[config.id_column]
    start = sa.bindparam("start", type_=ts.type)
    end = sa.bindparam("end", type_=ts.type)
    last_ts = sa.bindparam("last_ts", type_=ts.type)
    last_id = sa.bindparam("last_id", type_=key.type)
    in_window = (ts >= start, ts < end)
    column = config.version_column
    fingerprint = None
    if column is None or column in table.c:
        newest = sa.func.max(table.c[column]) if column is not None else sa.null()
        fingerprint = sa.select(sa.func.count(), newest).select_from(table).where(*in_window)
    ordered = sa.select(table).order_by(ts, key)
    pages = ordered.limit(config.page_size)
    probe_rows = min(PROBE_ROWS, config.page_size)
    return _SourceStatements(
        table=table,
        cache={},
        count=sa.select(sa.func.count()).select_from(table).where(*in_window),
        fingerprint=fingerprint,
        first_page=pages.where(*in_window),
        # After the last row, as the database compares it. `ts >= last` rather than a
        # row-value `(ts, id) > (...)`: SQLite seeks an index with the former but scans from
        # the window start with the latter.
        next_page=pages.where(ts >= last_ts, ts < end, sa.or_(ts > last_ts, key > last_id)),
        probe=ordered.limit(probe_rows).where(*in_window),
        probe_rows=probe_rows,
    )


class SqlSource:
    """A table with a timestamp column and a unique id column, read a window at a time.

    The engine is leased on first use (`lease_engine`: one per process for every source on
    the same URL) and the table reflected once per instance (once per pipeline in a worker
    process, through the registry). A document's id is the id column's value as text, its
    body the whole row as an object of column name to value. Its statements are built once
    per table too, and compiled once into a cache of its own (`CompiledCache`).
    """

    def __init__(self, config: SqlSourceConfig) -> None:
        self.config = config
        self._lease: Lease[sa.Engine] | None = None
        self._statements: _SourceStatements | None = None
        self._lock = threading.Lock()
        self.driver_rows = True
        """Read PostgreSQL pages (through psycopg) as the driver's tuples rather than
        SQLAlchemy `Row`s, applying the result processors SQLAlchemy would (the same values,
        without a `Row` per row). False reads them as every other database does; the tests
        compare the two."""

    # -- connection and table --

    def _connect(self) -> tuple[sa.Engine, _SourceStatements]:
        with self._lock:
            if self._lease is None:
                self._lease = lease_engine(
                    self.config.url, self.config.password_env, "sql source", _source_engine
                )
            engine = self._lease.client
            if self._statements is None:
                self._statements = _source_statements(self._reflect(engine), self.config)
            return engine, self._statements

    def _reflect(self, engine: sa.Engine) -> sa.Table:
        schema, _, name = self.config.table.rpartition(".")
        try:
            table = sa.Table(name, sa.MetaData(), autoload_with=engine, schema=schema or None)
        except sa.exc.NoSuchTableError:
            raise TerminalError(f"sql source: table {self.config.table!r} does not exist") from None
        except sa.exc.SQLAlchemyError as error:
            raise _translate(error, f"reading table {self.config.table!r}") from error
        for role, column in (
            ("timestamp_column", self.config.timestamp_column),
            ("id_column", self.config.id_column),
        ):
            if column not in table.c:
                raise TerminalError(
                    f"sql source: table {self.config.table!r} has no column {column!r} ({role})"
                )
        if not isinstance(table.c[self.config.timestamp_column].type, sa.DateTime):
            raise TerminalError(
                f"sql source: column {self.config.timestamp_column!r} of "
                f"{self.config.table!r} is not a timestamp column"
            )
        return table

    def _bounds(self, table: sa.Table, window: Window) -> tuple[datetime, datetime]:
        """The window's bounds as the column compares them: naive UTC for a naive column."""
        column_type = table.c[self.config.timestamp_column].type
        if getattr(column_type, "timezone", False):
            return window.start, window.end
        return (
            window.start.astimezone(UTC).replace(tzinfo=None),
            window.end.astimezone(UTC).replace(tzinfo=None),
        )

    # -- the Source contract --

    def count(self, window: Window) -> int:
        """How many rows have `start <= timestamp < end`."""
        engine, statements = self._connect()
        start, end = self._bounds(statements.table, window)
        try:
            with engine.connect() as conn:
                found = read_with(conn, statements.cache).execute(
                    statements.count, {"start": start, "end": end}
                )
                return int(found.scalar_one())
        except sa.exc.SQLAlchemyError as error:
            raise _translate(error, f"count on {self.config.table!r}") from error

    def fingerprint(self, window: Window) -> Fingerprint:
        """The window's row count and, with `version_column`, that column's max, in one query."""
        engine, statements = self._connect()
        if statements.fingerprint is None:
            raise TerminalError(
                f"sql source: table {self.config.table!r} has no column "
                f"{self.config.version_column!r} (version_column)"
            )
        start, end = self._bounds(statements.table, window)
        try:
            with engine.connect() as conn:
                found = read_with(conn, statements.cache).execute(
                    statements.fingerprint, {"start": start, "end": end}
                )
                count, version = found.one()
        except sa.exc.SQLAlchemyError as error:
            raise _translate(error, f"fingerprint on {self.config.table!r}") from error
        return Fingerprint(int(count), _version_text(version))

    def iter_batches(self, window: Window) -> Iterator[Batch]:
        """Every row of the window once, `page_size` rows per batch, ordered by (ts, id).

        On PostgreSQL the pages are read in one REPEATABLE READ transaction: one snapshot,
        like a point in time in Elasticsearch. Its session time zone is UTC (`SET LOCAL`, for
        this transaction only): the driver then hands out instants in UTC, which print without
        a conversion per row (the instants are the same in any time zone). A window that fits
        in its first page (most do) is read by that one statement alone, in autocommit (its own
        snapshot), without the BEGIN, SET and COMMIT round trips, its few instants converted
        one by one: a window of fewer than `PROBE_ROWS` rows. A bigger window sets the probe's
        rows aside (nothing of them yielded) and is read from its start in the transaction.
        """
        engine, statements = self._connect()
        start, end = self._bounds(statements.table, window)
        page_size = self.config.page_size
        first = {"start": start, "end": end}
        try:
            with engine.connect() as conn:
                conn.execution_options(compiled_cache=statements.cache)
                if engine.dialect.name == "postgresql":
                    reader = read_with(conn, statements.cache)
                    names, rows = self._page(reader, statements, first, probe=True)
                    if len(rows) < statements.probe_rows:
                        if rows:
                            yield self._batch(names, *self._key_at(names), rows)
                        return
                    conn.rollback()  # autocommit: ends SQLAlchemy's transaction, not a round trip
                    conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    if engine.dialect.name == "postgresql":
                        conn.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")
                    bounds = first
                    while True:
                        names, rows = self._page(conn, statements, bounds)
                        if not rows:
                            break
                        ts_at, id_at = self._key_at(names)
                        yield self._batch(names, ts_at, id_at, rows)
                        if len(rows) < page_size:
                            break
                        last_ts, last_id = rows[-1][ts_at], rows[-1][id_at]
                        bounds = {"last_ts": last_ts, "end": end, "last_id": last_id}
        except sa.exc.SQLAlchemyError as error:
            raise _translate(error, f"reading {self.config.table!r}") from error

    def _page(
        self,
        conn: sa.Connection,
        statements: _SourceStatements,
        bounds: dict[str, Any],
        *,
        probe: bool = False,
    ) -> tuple[list[str], Sequence[Sequence[Any]]]:
        """One page's column names and rows: the first page for bounds `start` and `end` (the
        probe's rows with `probe`), the one after a row for `last_ts`, `last_id` and `end`. On
        PostgreSQL through psycopg the rows are the driver's tuples (`driver_rows`)."""
        if probe:
            query = statements.probe
        else:
            query = statements.next_page if "last_ts" in bounds else statements.first_page
        result = conn.execute(query, bounds)
        names = [str(name) for name in result.keys()]  # noqa: SIM118
        dialect = conn.dialect
        if dialect.name == "postgresql" and dialect.driver == "psycopg" and self.driver_rows:
            types = [column.type for column in statements.table.columns]
            return names, _driver_rows(result, types, dialect)
        return names, result.fetchall()

    def _key_at(self, names: list[str]) -> tuple[int, int]:
        """Where the timestamp and id columns are in a page's rows."""
        return names.index(self.config.timestamp_column), names.index(self.config.id_column)

    def _batch(
        self, names: list[str], ts_at: int, id_at: int, rows: Sequence[Sequence[Any]]
    ) -> Batch:
        """One page as documents, each carrying its serialized body and its staged line.

        A page is converted column by column (`_page_documents`: C loops over the page, no
        Python per row but the `Document`); a page where that meets a row to reject or a
        value orjson refuses is done again row by row (`_row_batch`), which says what every
        row becomes. Both print the timestamp column once, for the body and the line's `ts`.
        """
        try:
            documents = self._page_documents(names, ts_at, id_at, rows)
        except (UnicodeError, orjson.JSONEncodeError):
            documents = None
        if documents is not None:
            return Batch(documents=documents)
        return self._row_batch(names, ts_at, id_at, rows)

    def _page_documents(
        self, names: list[str], ts_at: int, id_at: int, rows: Sequence[Sequence[Any]]
    ) -> list[Document] | None:
        """`_row_batch`'s documents for a page none of whose rows it rejects, built a column
        at a time; None when a document is over `max_document_bytes`. Raises UnicodeError or
        JSONEncodeError for a value `_row_batch` handles row by row."""
        columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
        ids = list(map(str, columns[id_at]))
        for at, column in enumerate(columns):
            if at != ts_at and not _PLAIN.issuperset(map(type, column)):
                columns[at] = [
                    value if type(value) in _PLAIN else json_value(value) for value in column
                ]
        stamps = columns[ts_at]
        exact = _EXACT_DATETIME.issuperset(map(type, stamps))
        zones = set(map(_TZINFO, stamps)) if exact else None
        if zones is not None and _UTC_OR_NAIVE.issuperset(zones):
            ts_jsons = list(map(_INSTANT_JSON, stamps))
            columns[ts_at] = list(map(bytes.decode, map(_UNQUOTED, ts_jsons)))
        else:
            columns[ts_at] = texts = list(map(_instant_text, stamps))
            ts_jsons = list(map(orjson.dumps, texts))
        instants = stamps if zones == _UTC_ONLY else list(map(as_utc, stamps))
        bodies = list(map(dict, map(zip, repeat(names), zip(*columns, strict=True))))
        encoded = list(map(encode_body, bodies))
        if max(map(len, encoded)) > self.config.max_document_bytes:
            return None
        lines = map(
            STAGED_LINE.__mod__, zip(map(orjson.dumps, ids), ts_jsons, encoded, strict=True)
        )
        return list(map(Document, ids, instants, bodies, encoded, lines))

    def _row_batch(
        self, names: list[str], ts_at: int, id_at: int, rows: Sequence[Sequence[Any]]
    ) -> Batch:
        """A page row by row: a row whose text is not UTF-8 or whose document is over
        `max_document_bytes` becomes a rejection, every other row a document."""
        batch = Batch()
        ts_name = names[ts_at]
        limit = self.config.max_document_bytes
        for row in rows:
            doc_id = str(row[id_at])
            try:
                body = {
                    name: value if type(value) in _PLAIN else json_value(value)
                    for name, value in zip(names, row, strict=True)
                }
                try:
                    # Serialized once: for the size check here and for the staged line.
                    encoded = encode_body(body)
                except orjson.JSONEncodeError:
                    # Text that is not UTF-8 (raises UnicodeError here), or a value orjson
                    # refuses even as `json_value` makes it: a JSON column holding an integer
                    # beyond 64 bits, nesting too deep (a rejection with its reason).
                    body = {name: json_value(value) for name, value in zip(names, row, strict=True)}
                    encoded = encode_body(body)
            except UnicodeError:
                batch.rejected.append(Rejection(doc_id, "not UTF-8"))
                continue
            except orjson.JSONEncodeError as error:
                batch.rejected.append(Rejection(doc_id, unencodable_reason(error)))
                continue
            if len(encoded) > limit:
                batch.rejected.append(Rejection(doc_id, "oversized document"))
                continue
            # The body holds the timestamp as `format_instant` prints it: the line's `ts` too.
            line = staged_line(doc_id, orjson.dumps(body[ts_name]), encoded)
            batch.documents.append(Document(doc_id, as_utc(row[ts_at]), body, encoded, line))
        return batch

    def close(self) -> None:
        """Give the engine back (the last source using it disposes of its connections); it is
        leased again on next use."""
        with self._lock:
            held, self._lease, self._statements = self._lease, None, None
        if held is not None:
            held.release()


def _source_engine(url: sa.URL) -> sa.Engine:
    """A source's engine; on SQLite, text is decoded leniently (`_lenient_text`)."""
    engine = create_engine(url, None, "sql source")
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _text_factory(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.text_factory = _lenient_text

    return engine


def _driver_rows(
    result: sa.CursorResult[Any], types: list[sa.types.TypeEngine[Any]], dialect: sa.Dialect
) -> list[tuple[Any, ...]]:
    """A page as the driver's tuples, through the result processors SQLAlchemy would apply to
    its columns (ARRAY of an enum, BIT, ranges, ...): the values SQLAlchemy's `Row`s hold. An
    error from the driver comes wrapped as SQLAlchemy would wrap it."""
    cursor = result.cursor
    try:
        rows: list[tuple[Any, ...]] = list(cursor.fetchall())
        description = cursor.description or ()
    except dialect.loaded_dbapi.Error as error:
        raise sa.exc.DBAPIError.instance(
            None, None, error, dialect.loaded_dbapi.Error, dialect=dialect
        ) from error
    finally:
        result.close()
    processors = [
        (at, processor)
        for at, (column_type, entry) in enumerate(zip(types, description, strict=True))
        if (processor := column_type.dialect_impl(dialect).result_processor(dialect, entry[1]))
        is not None
    ]
    if not processors:
        return rows
    processed = []
    for row in rows:
        values = list(row)
        for at, processor in processors:
            values[at] = processor(values[at])
        processed.append(tuple(values))
    return processed


def _version_text(value: Any) -> str | None:
    """A version column's max as text: instants in ISO 8601 (aware ones in UTC)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat() if value.tzinfo else value.isoformat()
    return str(value)
