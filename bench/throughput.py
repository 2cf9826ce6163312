"""2. Data throughput: documents/s moving one large window from the SQL source (PostgreSQL)
through the local staging to the SQL target (PostgreSQL), all four stages run in-process by
`core.runner.run_stage`, against two copies of the same rows with no windowpipe:

- raw COPY (the headline): `COPY (SELECT ...) TO STDOUT` on one psycopg connection piped block
  by block into `COPY ... FROM STDIN` on another, one transaction, into a table of the target's
  shape; the SELECT builds the target's row (the document is `to_jsonb` of the source row). No
  Python touches a row: the practical limit of one window moved on this machine.
- keyset copy: SQLAlchemy keyset pages read in one REPEATABLE READ snapshot, each row turned
  into the same JSON document, inserted in batches into a table of the target's shape.

All write into empty tables (each truncates its table at the start of its run).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.dialects.postgresql import JSONB

from bench import bulk
from bench.common import Row, log, median
from core.records import WindowStatus

TARGET_RATIO = 0.8
"""Goal against the keyset copy."""
RAW_TARGET_RATIO = 0.35
"""Goal against the raw COPY pipe (issue 14)."""
PAGE_SIZE = 5000
"""The SQL source's and target's default page / batch size, used by the baseline too."""


def _doc_value(value: Any) -> Any:
    if isinstance(value, datetime):
        text = value.astimezone(UTC).isoformat(timespec="microseconds")
        return text.replace("+00:00", "Z")
    return value


def _baseline_table(metadata: sa.MetaData, name: str = "baseline_loaded") -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("doc_id", sa.Text, nullable=False),
        sa.Column("doc", JSONB, nullable=False),
        sa.Column("source_file", sa.Text),
        sa.Column("file_row", sa.Integer),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index(f"ix_{name}_window", "pipeline", "window_start"),
    )


def baseline_copy(data_url: str, index: int) -> int:
    """Copy window `index` from `events` to `baseline_loaded` by keyset paging; rows copied."""
    window = bulk.window(index)
    engine = sa.create_engine(data_url, json_serializer=lambda v: orjson.dumps(v).decode())
    metadata = sa.MetaData()
    source = sa.Table("events", metadata, autoload_with=engine)
    target = _baseline_table(metadata)
    target.create(engine, checkfirst=True)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE baseline_loaded"))
    ts, key = source.c.created_at, source.c.id
    page = sa.select(source).order_by(ts, key).limit(PAGE_SIZE)
    query = page.where(ts >= window.start, ts < window.end)
    copied = 0
    loaded_at = datetime.now(UTC)
    with (
        engine.connect().execution_options(isolation_level="REPEATABLE READ") as reader,
        engine.begin() as writer,
    ):
        names = [str(column.name) for column in source.columns]
        while True:
            rows = reader.execute(query).fetchall()
            if not rows:
                break
            batch = [
                {
                    "pipeline": bulk.PIPELINE,
                    "window_start": window.start,
                    "window_end": window.end,
                    "doc_id": str(row.id),
                    "doc": {
                        name: _doc_value(value) for name, value in zip(names, row, strict=True)
                    },
                    "source_file": None,
                    "file_row": copied + number,
                    "loaded_at": loaded_at,
                }
                for number, row in enumerate(rows, start=1)
            ]
            writer.execute(sa.insert(target), batch)
            copied += len(rows)
            if len(rows) < PAGE_SIZE:
                break
            last = rows[-1]
            query = page.where(
                ts >= last.created_at, ts < window.end, sa.or_(ts > last.created_at, key > last.id)
            )
        reader.rollback()
    engine.dispose()
    return copied


RAW_TABLE = "raw_loaded"

_RAW_COLUMNS = (
    "pipeline",
    "window_start",
    "window_end",
    "doc_id",
    "doc",
    "source_file",
    "file_row",
    "loaded_at",
)


def raw_copy(data_url: str, index: int) -> int:
    """Copy window `index` from `events` to `raw_loaded` with COPY TO STDOUT piped into COPY
    FROM STDIN (two psycopg connections, the writer's in one transaction); rows copied."""
    window = bulk.window(index)
    engine = sa.create_engine(data_url)
    _baseline_table(sa.MetaData(), RAW_TABLE).create(engine, checkfirst=True)
    engine.dispose()
    dsn = sa.make_url(data_url).set(drivername="postgresql").render_as_string(False)
    select = sql.SQL(
        "COPY (SELECT {pipeline}, {start}, {end}, e.id::text, to_jsonb(e), NULL, "
        "row_number() OVER (ORDER BY e.created_at, e.id), now() FROM events e "
        "WHERE e.created_at >= {start} AND e.created_at < {end} "
        "ORDER BY e.created_at, e.id) TO STDOUT"
    ).format(
        pipeline=sql.Literal(bulk.PIPELINE),
        start=sql.Literal(window.start),
        end=sql.Literal(window.end),
    )
    insert = sql.SQL("COPY {table} ({columns}) FROM STDIN").format(
        table=sql.Identifier(RAW_TABLE),
        columns=sql.SQL(", ").join(sql.Identifier(name) for name in _RAW_COLUMNS),
    )
    with (
        psycopg.connect(dsn, autocommit=True) as reader,
        psycopg.connect(dsn) as writer,
    ):
        reader.execute("SET TIME ZONE 'UTC'")
        with writer.transaction(), writer.cursor() as cursor:
            cursor.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(RAW_TABLE)))
            with reader.cursor().copy(select) as source, cursor.copy(insert) as target:
                for block in source:
                    target.write(block)
            copied = cursor.rowcount
    return int(copied)


def windowpipe_copy(data: bulk.BulkData, index: int) -> int:
    """Run window `index`'s four stages in this process; rows in the target."""
    engine = sa.create_engine(data.data_url)
    if sa.inspect(engine).has_table(bulk.TARGET_TABLE):
        with engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {bulk.TARGET_TABLE}"))
    engine.dispose()
    rt = bulk.runtime(data.config_path)
    try:
        target = bulk.queue_window(rt, index)
        bulk.run_stages(rt, target)
        record = rt.store.get(bulk.PIPELINE, target.start)
    finally:
        bulk.close(rt)
    assert record is not None and record.status == WindowStatus.SUCCEEDED, record
    return int(record.target_count or 0)


def run(quick: bool, data: bulk.BulkData, documents: int) -> list[Row]:
    runs = 2 if quick else 3
    index = data.index_of(documents)
    # The target tables exist before the first timed run, as they do in production.
    windowpipe_copy(data, data.index_of(min(data.windows.values())))
    raw_copy(data.data_url, data.index_of(min(data.windows.values())))
    ours: list[float] = []
    raw: list[float] = []
    keyset: list[float] = []
    for run_number in range(runs):
        # Alternate, so drift in the machine's load hits every side alike.
        began = time.perf_counter()
        piped = raw_copy(data.data_url, index)
        raw.append(piped / (time.perf_counter() - began))
        began = time.perf_counter()
        copied = baseline_copy(data.data_url, index)
        keyset.append(copied / (time.perf_counter() - began))
        began = time.perf_counter()
        loaded = windowpipe_copy(data, index)
        ours.append(loaded / (time.perf_counter() - began))
        assert piped == copied == loaded == documents, (piped, copied, loaded, documents)
        log(
            f"throughput run {run_number + 1}: windowpipe {ours[-1]:,.0f} docs/s, "
            f"raw COPY {raw[-1]:,.0f} docs/s, keyset copy {keyset[-1]:,.0f} docs/s"
        )
    setup = f"PG -> local staging -> PG, 4 stages in-process; {runs} runs each, alternating"
    rows = []
    for label, goal, theirs, how in (
        (
            "vs raw COPY pipe",
            RAW_TARGET_RATIO,
            raw,
            "baseline: COPY (SELECT ...) TO STDOUT piped into COPY ... FROM STDIN, one "
            "transaction, no Python per row",
        ),
        (
            "vs keyset copy",
            TARGET_RATIO,
            keyset,
            "baseline: SQLAlchemy keyset pages + INSERT batches of 5,000",
        ),
    ):
        ratio = median(ours) / median(theirs)
        rows.append(
            Row(
                "2. data throughput",
                f"docs/s, one window of {documents:,}, {label}",
                median(ours),
                median(theirs),
                ratio,
                f">= {goal}x",
                ratio >= goal,
                ours,
                theirs,
                f"{setup}; {how}",
            )
        )
    return rows
