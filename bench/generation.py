"""5. Generation: planning and storing one year of 15-minute windows (35,040) with
`core.dispatch.create_due_windows` (`max_windows_per_tick = 35040`) into an empty state store,
against a plain SQLAlchemy bulk insert (`conn.execute(insert(table), rows)`) of the same rows
into a same-shaped table, on SQLite and on PostgreSQL. Target: windowpipe <= 2x the time.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from bench.common import Row, log, median, schema_url
from core.config import PipelineConfig
from core.dispatch import create_due_windows
from core.store import StateStore

ORIGIN = datetime(2025, 1, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
YEAR = 35_040
TARGET_RATIO = 2.0


def _pipeline() -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "year",
            "window": "15m",
            "start": ORIGIN,
            "lag": "0s",
            "max_windows_per_tick": YEAR,
            "every": "1h",
            "source": {
                "type": "sql",
                "url": "sqlite://",
                "table": "t",
                "timestamp_column": "ts",
                "id_column": "id",
            },
            "stage": {"type": "local", "path": "."},
            "target": {"type": "sql", "url": "sqlite://", "table": "t"},
        }
    )


def _windowpipe_seconds(url: str) -> float:
    store = StateStore(url)
    store.migrate()
    now = ORIGIN + YEAR * SIZE
    began = time.perf_counter()
    created = create_due_windows(store, _pipeline(), now)
    seconds = time.perf_counter() - began
    store.dispose()
    assert len(created) == YEAR, len(created)
    return seconds


def _baseline_seconds(url: str) -> float:
    # The same shape: the state store's own migration creates the table, reflected here.
    StateStore(url).migrate()
    engine = sa.create_engine(url)
    table = sa.Table("windows", sa.MetaData(), autoload_with=engine)
    # Plain DateTime columns: SQLite takes naive UTC, PostgreSQL's timestamptz aware.
    origin = ORIGIN.replace(tzinfo=None) if engine.dialect.name == "sqlite" else ORIGIN
    began = time.perf_counter()
    now = datetime.now(UTC).replace(tzinfo=origin.tzinfo)
    rows = [
        {
            "pipeline": "year",
            "window_start": origin + i * SIZE,
            "window_end": origin + (i + 1) * SIZE,
            "status": "pending",
            "kind": "scheduled",
            "attempts": 0,
            "fence": 0,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(YEAR)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(table), rows)
    seconds = time.perf_counter() - began
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == YEAR
    engine.dispose()
    return seconds


def _fresh_url(backend: str, database_url: str, workdir: Path) -> str:
    name = f"g_{uuid.uuid4().hex[:8]}"
    if backend == "sqlite":
        return f"sqlite:///{workdir}/{name}.db"
    return schema_url(database_url, name)


def run(quick: bool, database_url: str, workdir: Path) -> list[Row]:
    runs = 3 if quick else 5
    rows = []
    for backend in ("sqlite", "postgresql"):
        ours, theirs = [], []
        for _ in range(runs):
            theirs.append(_baseline_seconds(_fresh_url(backend, database_url, workdir)))
            ours.append(_windowpipe_seconds(_fresh_url(backend, database_url, workdir)))
        ratio = median(ours) / median(theirs)
        log(f"generation {backend}: windowpipe {median(ours):.2f}s, plain {median(theirs):.2f}s")
        rows.append(
            Row(
                "5. generation",
                f"seconds for 35,040 windows, {backend}",
                median(ours),
                median(theirs),
                ratio,
                f"<= {TARGET_RATIO}x",
                ratio <= TARGET_RATIO,
                ours,
                theirs,
                f"empty store each run; {runs} runs each, alternating",
            )
        )
    return rows
