"""The large-window data set shared by the throughput and memory benchmarks, and a windowpipe
runtime over it.

`events` in schema `bulk`: one window of `LARGE` documents and one of `SMALL`, each row
`(id, created_at, user_id, kind, payload)` with ~100 bytes of text, indexed on
`(created_at, id)` as the SQL source's keyset paging needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
import sqlalchemy as sa

from bench.common import schema_url, sql_pipeline, write_config
from connectors.registry import close_all, connector_for
from core.config import load_config
from core.instants import format_instant
from core.records import FINISHED, STAGE_ORDER, WindowKind, WindowStatus
from core.runner import Runtime, run_stage
from core.store import StateStore
from core.windows import Window

ORIGIN = datetime(2026, 3, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
PIPELINE = "bulk"
TARGET_TABLE = "events_loaded"


def window(index: int) -> Window:
    return Window(ORIGIN + index * SIZE, ORIGIN + (index + 1) * SIZE)


@dataclass
class BulkData:
    """Where the data set lives and which window holds how many documents."""

    data_url: str
    config_path: Path
    windows: dict[int, int]
    """Window index -> documents in it."""

    def index_of(self, documents: int) -> int:
        return next(i for i, n in self.windows.items() if n == documents)


def seed(database_url: str, redis_url: str, workdir: Path, sizes: list[int]) -> BulkData:
    """Create the source table with one window per entry of `sizes` (window 0, 1, ...)."""
    data_url = schema_url(database_url, "bulk")
    state_url = schema_url(database_url, "bulk_state")
    engine = sa.create_engine(data_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE events (id BIGINT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL, "
                "user_id INTEGER NOT NULL, kind TEXT NOT NULL, payload TEXT)"
            )
        )
        first_id = 0
        for index, count in enumerate(sizes):
            # `count` documents spread evenly over the window (many share a microsecond).
            conn.execute(
                sa.text(
                    "INSERT INTO events SELECT :first + n, "
                    ":start + (n * (900.0 / :count)) * interval '1 second', "
                    "(n::bigint * 7919) % 100000, "
                    "(ARRAY['view','click','order','refund'])[1 + n % 4], "
                    "'payload ' || md5(n::text) || ' ' || repeat('x', 40) "
                    "FROM generate_series(0, :count - 1) n"
                ),
                {"first": first_id, "start": window(index).start, "count": count},
            )
            first_id += count
        conn.execute(sa.text("CREATE INDEX ix_events_ts_id ON events (created_at, id)"))
        conn.execute(sa.text("ANALYZE events"))
    engine.dispose()
    config_path = write_config(
        workdir / "bulk.toml",
        {"redis_url": redis_url, "state_url": state_url, "log_level": "WARNING"},
        {
            PIPELINE: sql_pipeline(
                data_url,
                workdir / "bulk-stage",
                TARGET_TABLE,
                format_instant(ORIGIN),
            )
        },
    )
    return BulkData(data_url, config_path, dict(enumerate(sizes)))


def runtime(config_path: Path) -> Runtime:
    """An in-process windowpipe runtime (what a worker process builds) for the config at
    `config_path` (the bulk config here, bench 1's in `bench.stage_cpu`)."""
    config = load_config(config_path)
    store = StateStore(config.settings.state_url)
    store.migrate()
    return Runtime(config, store, redis.Redis.from_url(config.settings.redis_url), connector_for)


def queue_window(rt: Runtime, index: int) -> Window:
    """Create (or reset for a re-run) window `index` and queue it at precheck."""
    target = window(index)
    rt.store.create_windows(PIPELINE, [target], kind=WindowKind.MANUAL)
    rt.store.reset_for_rerun(PIPELINE, [target.start])
    rt.store.queue(PIPELINE, target.start, expect=[WindowStatus.PENDING])
    return target


def run_stages(rt: Runtime, target: Window, stages: list | None = None) -> None:
    """Run `stages` (default: all four) of one window in this process, in order."""
    for stage in stages or STAGE_ORDER:
        result = run_stage(rt, stage, PIPELINE, target.start)
        if not result.continues_chain and result.status not in FINISHED:
            raise RuntimeError(f"{stage.value} did not go on: {result.summary()}")


def close(rt: Runtime) -> None:
    close_all()
    rt.store.dispose()
    rt.redis.close()
