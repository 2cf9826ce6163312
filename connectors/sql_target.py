"""A table in PostgreSQL, SQLite (or any SQLAlchemy database) as the target.

One row per source document: `pipeline`, `window_start`, `window_end`, `doc_id`, `doc` (the
whole document as JSON; JSONB on PostgreSQL), and for lineage `source_file` and `file_row`.
Loading a window deletes the window's rows and inserts the staged ones in one transaction, so
a retried, duplicated or `--force`d load replaces instead of adding: the window ends with each
staged document exactly once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from connectors.base import Manifest, Stage, decode_line
from connectors.sql import _one_line, _translate, create_engine
from core.config import SqlTargetConfig
from core.errors import TerminalError, TransientError, WindowpipeError
from core.instants import utc_now
from core.windows import Window


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


def _copy_into_postgresql(
    conn: sa.Connection, table: sa.Table, batches: Iterator[list[dict[str, Any]]]
) -> int:
    """Stream rows with `COPY ... FROM STDIN` on the transaction's own connection.

    An INSERT per row (what executemany does on psycopg) spent most of a load's time in round
    trips; COPY streams them. Same transaction as the DELETE before it, so still atomic.
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
            for rows in batches:
                for row in rows:
                    copy.write_row(
                        tuple(
                            orjson.dumps(row[name]).decode() if name == "doc" else row[name]
                            for name in _COPY_COLUMNS
                        )
                    )
                loaded += len(rows)
    except psycopg.OperationalError as error:
        raise TransientError(_one_line(f"sql target: load window failed: {error}")) from None
    except psycopg.Error as error:
        raise TerminalError(_one_line(f"sql target: load window failed: {error}")) from None
    return loaded


class SqlTarget:
    """Loads windows into a SQL table, idempotently per window."""

    def __init__(self, config: SqlTargetConfig) -> None:
        self.config = config
        self._engine: sa.Engine | None = None
        self._table: sa.Table | None = None
        self._lock = threading.Lock()

    def _connect(self) -> tuple[sa.Engine, sa.Table]:
        with self._lock:
            if self._engine is None or self._table is None:
                engine = self._engine or self._create_engine()
                self._engine = engine
                table = target_table(self.config.table, sa.MetaData())
                try:
                    table.create(engine, checkfirst=True)
                except sa.exc.IntegrityError:
                    pass  # another worker created it a moment ago
                except sa.exc.ProgrammingError as error:
                    if "already exists" not in str(error):
                        raise _translate(error, "create table", "sql target") from None
                except sa.exc.SQLAlchemyError as error:
                    raise _translate(error, "create table", "sql target") from None
                self._table = table
            return self._engine, self._table

    def _create_engine(self) -> sa.Engine:
        return create_engine(
            self.config.url,
            self.config.password_env,
            "sql target",
            json_serializer=lambda value: orjson.dumps(value).decode(),
        )

    def _instant(self, engine: sa.Engine, value: datetime) -> datetime:
        # SQLite keeps no zone: store and compare naive UTC there.
        if engine.dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def load_window(self, pipeline: str, manifest: Manifest, stage: Stage) -> int:
        """Replace the window's rows with the manifest's documents in one transaction.

        Raises TerminalError, committing nothing, if the staged files hold a different number
        of documents than the manifest lists."""
        engine, table = self._connect()
        start = self._instant(engine, manifest.window_start)
        end = self._instant(engine, manifest.window_end)
        loaded_at = self._instant(engine, utc_now())
        loaded = 0
        try:
            with engine.begin() as conn:
                conn.execute(
                    sa.delete(table).where(
                        table.c.pipeline == pipeline, table.c.window_start == start
                    )
                )
                batches = self._row_batches(manifest, stage, pipeline, start, end, loaded_at)
                if engine.dialect.name == "postgresql":
                    loaded = _copy_into_postgresql(conn, table, batches)
                else:
                    for rows in batches:
                        conn.execute(sa.insert(table), rows)
                        loaded += len(rows)
                if loaded != manifest.rows:
                    # Raised inside the transaction: nothing of this load is committed.
                    raise TerminalError(
                        f"sql target: the staged files of run {manifest.run} hold {loaded} "
                        f"rows but the manifest lists {manifest.rows}"
                    )
        except sa.exc.SQLAlchemyError as error:
            raise _translate_target(error, "load window") from None
        return loaded

    def _row_batches(
        self,
        manifest: Manifest,
        stage: Stage,
        pipeline: str,
        start: datetime,
        end: datetime,
        loaded_at: datetime,
    ) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        for staged in manifest.files:
            for number, line in enumerate(stage.iter_lines(staged.path), start=1):
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

    def count_window(self, pipeline: str, window: Window) -> int:
        """Rows the table holds for the window."""
        engine, table = self._connect()
        try:
            with engine.connect() as conn:
                return int(
                    conn.execute(
                        sa.select(sa.func.count()).where(
                            table.c.pipeline == pipeline,
                            table.c.window_start == self._instant(engine, window.start),
                        )
                    ).scalar_one()
                )
        except sa.exc.SQLAlchemyError as error:
            raise _translate_target(error, "count window") from None

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
            self._engine = None
            self._table = None
