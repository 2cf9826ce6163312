"""Building the state store's engine: pool sizes for PostgreSQL, WAL, a busy timeout and
BEGIN IMMEDIATE for SQLite, and the connections reads and writes run on."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url

from core.errors import BadInputError
from core.records import WindowRecord
from core.store.direct import DirectStatement, compile_direct, direct_rows
from core.store.schema import _to_record

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
"""How long a SQLite writer waits for another process's write lock before giving up."""


_SQLITE_BEGIN = "windowpipe_sqlite_begin"
"""Execution option naming the SQLite BEGIN mode of a connection's next transaction."""


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


class StoreConnections:
    """One engine per instance, and the connections reads and writes of the `windows` table
    run on (`core.store.StateStore` builds on this)."""

    def __init__(self, url: str, *, direct: bool = True) -> None:
        self.url = url
        self._engine = _build_engine(url)
        self.direct = direct and self.dialect == "postgresql"
        """Whether the hot statements run on psycopg directly (`core.store.direct`); only on
        PostgreSQL. False runs them through SQLAlchemy's `Connection` as every other one."""
        self._direct_statements: dict[Hashable, DirectStatement] = {}

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

    def _hot_rows(
        self,
        key: Hashable,
        statement: sa.UpdateBase | sa.Select[Any],
        params: Mapping[str, Any],
        *,
        write: bool,
    ) -> Sequence[Sequence[Any]]:
        """The rows of `statement`, one of the few run for every stage of every window, with
        `params` (its parameters without values); `key` names the statement, which never
        changes for one key.

        On PostgreSQL through psycopg directly (`core.store.direct`), compiled once per key,
        unless an event listener watches the engine (it must see every statement); otherwise
        through SQLAlchemy, as `_one_statement` (`write`) or `_reading`. Both run it in
        autocommit on PostgreSQL and return the same values.
        """
        engine = self._engine
        if self.direct and not (engine._has_events or engine.dialect._has_events):
            direct = self._direct_statements.get(key)
            if direct is None:
                direct = compile_direct(statement, engine.dialect)
                self._direct_statements[key] = direct
            return direct_rows(engine, direct, params)
        with self._one_statement() if write else self._reading() as conn:
            return conn.execute(statement, params).all()

    def _records(self, query: sa.Select[Any]) -> list[WindowRecord]:
        with self._reading() as conn:
            return [_to_record(row) for row in conn.execute(query)]
