"""The hot statements on psycopg directly: a stage's claim and commit, the record a refused
claim reads, the waiting windows a finishing window reads (PostgreSQL only).

Each runs once per stage of every window, and SQLAlchemy's `Connection.execute` (execution
context, parameter processing, result setup, the autocommit switch per checkout) was about two
thirds of a claim's client CPU in a profile of stage workers; psycopg's own execute a fraction.
Here a statement is compiled ONCE to the psycopg dialect's SQL string, with its constant
parameters (literals, the `status IN` lists) already rendered and processed; each call only
runs SQLAlchemy's own bind processors on the values given (so an instant, a JSON value or a
string is sent exactly as SQLAlchemy sends it), executes on the pooled connection's psycopg
connection, and runs the columns' result processors on the rows. The statement, its guards
and its result are the ones SQLAlchemy would run and return; only the machinery around the
driver call is skipped.

Errors behave as on SQLAlchemy's path: a driver error is raised as SQLAlchemy's wrapper of it
(`sqlalchemy.exc.OperationalError`, ...), and a disconnect invalidates the connection and the
pool's older connections, so the next checkout opens a fresh one. A statement interrupted
mid-flight (a soft time limit) raises the interruption itself, and its connection is closed
(SQLAlchemy's path raised the pool's failed rollback instead, the interruption in its chain).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.pool import PoolProxiedConnection


@dataclass(frozen=True)
class DirectStatement:
    """A statement compiled once for one dialect: its SQL and how its parameters and result
    columns are converted."""

    sql: str
    constants: Mapping[str, Any]
    """The parameters the statement itself holds (literals, expanded IN lists), processed."""
    binds: Mapping[str, Callable[[Any], Any] | None]
    """Each parameter a caller gives, by name, with SQLAlchemy's bind processor (or None)."""
    results: tuple[tuple[int, Callable[[Any], Any]], ...]
    """The result columns that have a result processor: (position, processor)."""

    def parameters(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The driver's parameters for `given`; every parameter the statement needs must be
        given, and nothing else (KeyError, as SQLAlchemy's missing-parameter error)."""
        if given.keys() != self.binds.keys():
            missing = sorted(self.binds.keys() - given.keys())
            extra = sorted(given.keys() - self.binds.keys())
            raise KeyError(f"parameters missing {missing} or unknown {extra}")
        params = dict(self.constants)
        for name, process in self.binds.items():
            value = given[name]
            params[name] = value if process is None else process(value)
        return params

    def row(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """A driver row as SQLAlchemy's row would hold it."""
        if not self.results:
            return tuple(values)
        converted = list(values)
        for at, process in self.results:
            converted[at] = process(converted[at])
        return tuple(converted)


def compile_direct(statement: sa.UpdateBase | sa.Select[Any], dialect: Dialect) -> DirectStatement:
    """`statement` compiled once for `dialect`: every parameter without a value is one a caller
    gives at each run; the rest are constants of the statement.

    Expanding (IN) and literal-execute parameters must be constants: their SQL depends on the
    value, so a caller's value would need a new string each time (ValueError)."""
    compiled = statement.compile(dialect=dialect)
    given: dict[str, Callable[[Any], Any] | None] = {}
    processors: dict[str, Callable[[Any], Any] | None] = {}
    for bind, name in compiled.bind_names.items():
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        processors[name] = process
        if bind.required:
            if bind.expanding or bind in compiled.literal_execute_params:
                raise ValueError(f"parameter {name!r} changes the SQL: give it as a constant")
            given[name] = process
    expanded = compiled.construct_expanded_state(dict.fromkeys(given))
    for parent, names in (expanded.parameter_expansion or {}).items():
        processors.update(dict.fromkeys(names, processors.get(parent)))
    constants = {}
    for name, value in expanded.parameters.items():
        if name not in given:
            convert = processors.get(name)
            constants[name] = value if convert is None else convert(value)
    results = tuple(
        (at, process)
        for at, column in enumerate(statement.exported_columns)
        if (process := column.type.dialect_impl(dialect).result_processor(dialect, None))
        is not None
    )
    return DirectStatement(expanded.statement, constants, given, results)


def direct_rows(
    engine: Engine, statement: DirectStatement, given: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """Run `statement` with `given` in autocommit on a pooled connection's psycopg
    connection; its rows, converted as SQLAlchemy converts them.

    One statement is its own transaction in autocommit, as on SQLAlchemy's path
    (`StoreConnections._one_statement`). The connection goes back to the pool out of
    autocommit, as SQLAlchemy resets it: a later `_writing` transaction must not autocommit.
    """
    params = statement.parameters(given)
    dialect = engine.dialect
    dbapi_error = dialect.loaded_dbapi.Error
    try:
        pooled = engine.raw_connection()
    except dbapi_error as error:
        disconnect = dialect.is_disconnect(error, None, None)
        raise _wrapped(engine, None, None, error, disconnect=disconnect) from error
    try:
        driver: Any = pooled.driver_connection
        try:
            driver.autocommit = True
            with driver.cursor() as cursor:
                cursor.execute(statement.sql, params)
                rows = cursor.fetchall()
            driver.autocommit = False
        except dbapi_error as error:
            disconnect = dialect.is_disconnect(error, driver, None)
            if disconnect:
                # As SQLAlchemy's Connection does on a disconnect: this connection is closed,
                # and the pool's others opened before now are replaced at their next checkout.
                engine.pool._invalidate(pooled, error)
            else:
                _leave_autocommit(pooled, driver, dbapi_error)
            raise _wrapped(engine, statement.sql, params, error, disconnect=disconnect) from error
        except BaseException as error:
            # Interrupted mid-statement (a soft time limit, a signal): the connection's state
            # is unknown, so it is closed rather than reused.
            pooled.invalidate(error)
            raise
    finally:
        pooled.close()
    return [statement.row(values) for values in rows]


def _leave_autocommit(
    pooled: PoolProxiedConnection, driver: Any, dbapi_error: type[Exception]
) -> None:
    """Put a connection back out of autocommit after a failed statement; a connection that
    cannot be (not idle) is closed rather than pooled."""
    try:
        driver.autocommit = False
    except dbapi_error as error:
        pooled.invalidate(error)


def _wrapped(
    engine: Engine,
    sql: str | None,
    params: Mapping[str, Any] | None,
    error: Exception,
    *,
    disconnect: bool,
) -> sa.exc.StatementError:
    """`error` as SQLAlchemy's `Connection` raises it (`DBAPIError.instance`)."""
    return sa.exc.DBAPIError.instance(
        sql,
        params,
        error,
        engine.dialect.loaded_dbapi.Error,
        hide_parameters=engine.hide_parameters,
        connection_invalidated=disconnect,
        dialect=engine.dialect,
    )
