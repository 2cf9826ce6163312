"""5. Generation.

a) Planning and storing one year of 15-minute windows (35,040) with
`core.dispatch.create_due_windows` (`max_windows_per_tick = 35040`) into an empty state store,
against a plain SQLAlchemy bulk insert (`conn.execute(insert(table), rows)`) of the same rows
into a same-shaped table, on SQLite and on PostgreSQL. Target: windowpipe <= 2x the time.

b) One generation tick (`core.dispatch.generation_tick`: create the due window, validate,
dispatch) on PostgreSQL with 500,000 succeeded windows of history, against the same tick with
1,000. Target: <= 2x (a tick must not grow with history; a one-minute pipeline makes 525,600
windows a year).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
import sqlalchemy as sa

from bench.common import Row, log, median, schema_url
from core.config import PipelineConfig
from core.dispatch import create_due_windows, generation_tick
from core.records import Stage
from core.store import StateStore
from core.windows import Window

ORIGIN = datetime(2025, 1, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
YEAR = 35_040
TARGET_RATIO = 2.0


def _pipeline(name: str = "year", max_windows_per_tick: int = YEAR) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": name,
            "window": "15m",
            "start": ORIGIN,
            "lag": "0s",
            "max_windows_per_tick": max_windows_per_tick,
            "every": "1h",
            "source": {
                "type": "sql",
                "url": "sqlite://",
                "table": "t",
                "timestamp_column": "ts",
                "id_column": "id",
            },
            "staging": {"type": "local", "path": "."},
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


HISTORY_SMALL = 1_000
HISTORY_LARGE = 500_000
TICK_TARGET_RATIO = 2.0


def _tick_seconds(url: str, history: int, ticks: int) -> list[float]:
    """Seconds of each of `ticks` generation ticks over `history` succeeded windows."""
    store = StateStore(url)
    store.migrate()
    pipeline = _pipeline("ticking", max_windows_per_tick=1)
    windows = [Window(ORIGIN + i * SIZE, ORIGIN + (i + 1) * SIZE) for i in range(history)]
    store.create_windows(pipeline.name, windows)
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE windows SET status = 'succeeded', stage = :stage, attempts = 1, "
                "source_count = 1, staged_count = 1, target_count = 1, rejected_count = 0, "
                "fence = 4, started_at = created_at, finished_at = created_at"
            ),
            {"stage": Stage.AUDIT.value},
        )
        conn.execute(sa.text("ANALYZE windows"))
    client = redis.Redis.from_url("redis://127.0.0.1:6379/15")
    sent: list[datetime] = []

    def send(_pipeline: str, start: datetime, _stage: Stage) -> None:
        sent.append(start)

    seconds = []
    for tick in range(ticks):
        now = ORIGIN + (history + 1 + tick) * SIZE
        began = time.perf_counter()
        report = generation_tick(store, client, pipeline, send, now)
        seconds.append(time.perf_counter() - began)
        assert len(report.created) == 1 and not report.problems, report.summary()
    store.dispose()
    assert len(sent) == ticks
    return seconds


def _tick_row(database_url: str, quick: bool) -> Row:
    ticks = 5 if quick else 11
    small = _tick_seconds(
        schema_url(database_url, f"t_{uuid.uuid4().hex[:8]}"), HISTORY_SMALL, ticks
    )
    large = _tick_seconds(
        schema_url(database_url, f"t_{uuid.uuid4().hex[:8]}"), HISTORY_LARGE, ticks
    )
    ratio = median(large) / median(small)
    log(
        f"tick: {median(large) * 1000:.1f} ms with {HISTORY_LARGE:,} windows, "
        f"{median(small) * 1000:.1f} ms with {HISTORY_SMALL:,}"
    )
    return Row(
        "5. generation",
        f"ms per tick, {HISTORY_LARGE:,} vs {HISTORY_SMALL:,} windows of history, postgresql",
        median(large) * 1000,
        median(small) * 1000,
        ratio,
        f"<= {TICK_TARGET_RATIO}x",
        ratio <= TICK_TARGET_RATIO,
        [s * 1000 for s in large],
        [s * 1000 for s in small],
        f"{ticks} ticks each; each creates, validates and dispatches one window",
    )


def run(quick: bool, database_url: str, workdir: Path) -> list[Row]:
    runs = 3 if quick else 5
    rows = [_tick_row(database_url, quick)]
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
