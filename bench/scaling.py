"""4. Scaling: extract throughput with a fixed latency per source page, at extract worker
concurrency 1, 2, 4 and 8 (`celery -A bench.slow_app worker -Q extract -c N`, prefork).

Windows are prechecked in-process first (no latency), then only `windowpipe.extract` tasks are
sent; throughput is windows from the first send to the last extract's commit (`updated_at`).
Target: >= 6x at 8 vs 1. Latency-bound work should scale with concurrency until the two cores
are busy.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from celery import Celery

from bench.common import Row, Workers, log, schema_url, sql_pipeline, write_config
from bench.slow_source import PAGE_LATENCY_ENV
from connectors.registry import close_all, connector_for
from core.config import load_config
from core.instants import format_instant
from core.records import Stage, WindowKind, WindowStatus
from core.runner import Runtime, run_stage
from core.store import StateStore
from core.windows import Window

ORIGIN = datetime(2026, 6, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
PIPELINE = "scaling"
PAGE_LATENCY_MS = 20
DOCS_PER_WINDOW = 200
PAGE_SIZE = 20
"""10 pages per window: 200 ms of latency against a few ms of CPU."""
LEVELS = (1, 2, 4, 8)
TARGET_RATIO = 6.0


def _window(index: int) -> Window:
    return Window(ORIGIN + index * SIZE, ORIGIN + (index + 1) * SIZE)


def _seed(url: str, windows: int) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE events (id BIGINT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL, "
                "payload TEXT)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO events SELECT n, :origin + (n * (900.0 / :per)) * interval '1 second',"
                " 'payload ' || md5(n::text) FROM generate_series(0, :total - 1) n"
            ),
            {"origin": ORIGIN, "per": DOCS_PER_WINDOW, "total": windows * DOCS_PER_WINDOW},
        )
        conn.execute(sa.text("CREATE INDEX ix_events_ts_id ON events (created_at, id)"))
        conn.execute(sa.text("ANALYZE events"))
    engine.dispose()


def _prepare(rt: Runtime, windows: list[Window]) -> None:
    """Create, queue and precheck `windows` in this process (no latency here)."""
    rt.store.create_windows(PIPELINE, windows, kind=WindowKind.MANUAL)
    for window in windows:
        rt.store.queue(PIPELINE, window.start, expect=[WindowStatus.PENDING])
        result = run_stage(rt, Stage.PRECHECK, PIPELINE, window.start)
        assert result.continues_chain, result


def _extract(app: Celery, store: StateStore, windows: list[Window]) -> float:
    """Send extract for `windows`; windows per second until the last one is staged."""
    began = time.time()
    for window in windows:
        app.send_task(
            "windowpipe.extract", (PIPELINE, format_instant(window.start)), queue="extract"
        )
    deadline = time.monotonic() + 600
    while True:
        records = store.list_records(PIPELINE, start=windows[0].start, end=windows[-1].end)
        if all(r.stage == Stage.LOAD for r in records):
            break
        if time.monotonic() > deadline or any(r.status == WindowStatus.FAILED for r in records):
            raise RuntimeError(
                f"extract did not finish: {[r for r in records if r.stage != Stage.LOAD][:3]}"
            )
        time.sleep(0.1)
    finished = max(r.updated_at for r in records)
    return len(windows) / (finished.timestamp() - began)


def run(quick: bool, database_url: str, redis_url: str, workdir: Path) -> list[Row]:
    per_slot = 6 if quick else 12
    counts = {level: level * per_slot for level in LEVELS}
    warmups = {level: 2 * level for level in LEVELS}
    total = sum(counts.values()) + sum(warmups.values())
    data_url = schema_url(database_url, "scaling")
    state_url = schema_url(database_url, "scaling_state")
    _seed(data_url, total)
    config_path = write_config(
        workdir / "scaling.toml",
        {"redis_url": redis_url, "state_url": state_url, "log_level": "INFO"},
        {
            PIPELINE: sql_pipeline(
                data_url,
                workdir / "scaling-stage",
                "events_loaded",
                format_instant(ORIGIN),
                page_size=PAGE_SIZE,
            )
        },
    )
    config = load_config(config_path)
    import redis

    store = StateStore(config.settings.state_url)
    store.migrate()
    rt = Runtime(config, store, redis.Redis.from_url(redis_url), connector_for)
    plan: dict[int, tuple[list[Window], list[Window]]] = {}
    next_index = 0
    for level in LEVELS:
        warm = [_window(i) for i in range(next_index, next_index + warmups[level])]
        next_index += warmups[level]
        measured = [_window(i) for i in range(next_index, next_index + counts[level])]
        next_index += counts[level]
        _prepare(rt, warm + measured)
        plan[level] = (warm, measured)
    close_all()

    env = {"WINDOWPIPE_CONFIG": str(config_path), PAGE_LATENCY_ENV: str(PAGE_LATENCY_MS)}
    app = Celery(broker=redis_url)
    rates: dict[int, float] = {}
    for level in LEVELS:
        warm, measured = plan[level]
        with Workers("bench.slow_app", workdir, env) as workers:
            workers.start(["extract"], level, pool="prefork")
            _extract(app, store, warm)
            rates[level] = _extract(app, store, measured)
        log(f"scaling: -c {level}: {rates[level]:.2f} windows/s ({len(measured)} windows)")
    app.close()
    store.dispose()
    rt.redis.close()

    ratio = rates[8] / rates[1]
    note = (
        f"{PAGE_LATENCY_MS} ms per page, {DOCS_PER_WINDOW // PAGE_SIZE} pages of {PAGE_SIZE} "
        f"per window; {per_slot} windows per pool slot; one run per level"
    )
    return [
        Row(
            "4. scaling",
            f"extract windows/s at -c {level}",
            rates[level],
            rates[1],
            rates[level] / rates[1],
            f">= {TARGET_RATIO}x" if level == 8 else "report",
            (ratio >= TARGET_RATIO) if level == 8 else None,
            note=note,
        )
        for level in LEVELS
    ]
