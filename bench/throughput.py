"""2. Data throughput: documents/s moving one large window from the SQL source (PostgreSQL)
through the local stage to the SQL target (PostgreSQL), all four stages run in-process by
`core.runner.run_stage`, against a hand-written copy with the same client libraries and no
windowpipe: SQLAlchemy keyset pages read in one REPEATABLE READ snapshot, each row turned into
the same JSON document, inserted in batches into a table of the target's shape.

Both write into empty tables (the target is truncated before each run, outside the timing).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from bench import bulk
from bench.common import Row, log, median
from core.records import WindowStatus

TARGET_RATIO = 0.8
PAGE_SIZE = 5000
"""The SQL source's and target's default page / batch size, used by the baseline too."""


def _doc_value(value: Any) -> Any:
    if isinstance(value, datetime):
        text = value.astimezone(UTC).isoformat(timespec="microseconds")
        return text.replace("+00:00", "Z")
    return value


def _baseline_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "baseline_loaded",
        metadata,
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("doc_id", sa.Text, nullable=False),
        sa.Column("doc", JSONB, nullable=False),
        sa.Column("source_file", sa.Text),
        sa.Column("file_row", sa.Integer),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_baseline_loaded_window", "pipeline", "window_start"),
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
    # The target table exists before the first timed run, as it does in production.
    windowpipe_copy(data, data.index_of(min(data.windows.values())))
    ours: list[float] = []
    theirs: list[float] = []
    for run_number in range(runs):
        # Alternate, so drift in the machine's load hits both sides alike.
        began = time.perf_counter()
        copied = baseline_copy(data.data_url, index)
        theirs.append(copied / (time.perf_counter() - began))
        began = time.perf_counter()
        loaded = windowpipe_copy(data, index)
        ours.append(loaded / (time.perf_counter() - began))
        assert copied == loaded == documents, (copied, loaded, documents)
        log(
            f"throughput run {run_number + 1}: windowpipe {ours[-1]:,.0f} docs/s, "
            f"baseline {theirs[-1]:,.0f} docs/s"
        )
    ratio = median(ours) / median(theirs)
    return [
        Row(
            "2. data throughput",
            f"docs/s, one window of {documents:,}",
            median(ours),
            median(theirs),
            ratio,
            f">= {TARGET_RATIO}x",
            ratio >= TARGET_RATIO,
            ours,
            theirs,
            f"PG -> local stage -> PG, 4 stages in-process; {runs} runs each, alternating",
        )
    ]
