"""`python -m bench.exporter_scrape [--pipelines N] [--windows W] [--runs R]`: what one scrape of
`windowpipe metrics` costs at N configured pipelines of W windows each, on PostgreSQL.

windowpipe: the exporter's reads now (`core.metrics.read_window_metrics`: one statement per
metric family for every pipeline), and a whole scrape (`render` of the collector: the store,
the control activity in Redis, the config families, the text). Baseline, in the same run on the
same database: the per-pipeline reads the exporter made before (9 statements per pipeline:
`read_window_metrics` of commit BASELINE_COMMIT, loaded from git, plus the store's per-pipeline
`recheck_tally` and `count_due_rechecks`). Medians of R runs after one warm-up, and the number
of SQL statements each sends.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import sqlalchemy as sa

from bench.common import Row, file_at, log, pg_database, redis_db, schema_url, write_config
from core.config import Config, load_config
from core.metrics import read_window_metrics
from core.store import StateStore
from core.store.schema import WINDOWS
from core.windows import Window
from windowpipe.exporter import ScrapeCache, WindowpipeCollector, render

BASELINE_COMMIT = "3d7043e"
"""The commit whose exporter read the store pipeline by pipeline (before issue 21)."""

ORIGIN = datetime(2026, 11, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
NOW = ORIGIN + timedelta(days=2)


def baseline_module() -> ModuleType:
    """core/metrics.py as it was at BASELINE_COMMIT, imported under another name."""
    source = file_at(BASELINE_COMMIT, "core/metrics.py")
    path = Path(tempfile.mkdtemp()) / "baseline_metrics.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_metrics", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def seed(store: StateStore, pipelines: list[str], windows: int) -> None:
    """Every pipeline: its windows succeeded with counts and durations, but the last three:
    one failed at load (attempt 2), one queued at extract, one running at load."""
    for name in pipelines:
        store.create_windows(
            name, [Window(ORIGIN + i * SIZE, ORIGIN + (i + 1) * SIZE) for i in range(windows)]
        )
    done_before = ORIGIN + (windows - 3) * SIZE
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(WINDOWS)
            .where(WINDOWS.c.window_start < done_before)
            .values(
                status="succeeded",
                attempts=1,
                source_count=100,
                staged_count=100,
                target_count=100,
                started_at=NOW - timedelta(hours=1),
                finished_at=NOW - timedelta(minutes=50),
            )
        )
        states = (
            {"status": "failed", "stage": "load", "attempts": 2, "error": "load: boom"},
            {"status": "queued", "stage": "extract", "attempts": 1},
            {"status": "running", "stage": "load", "attempts": 1},
        )
        for offset, values in enumerate(states):
            conn.execute(
                sa.update(WINDOWS)
                .where(WINDOWS.c.window_start == done_before + offset * SIZE)
                .values(**values)
            )
        conn.execute(sa.text("ANALYZE windows"))


@contextmanager
def statements(store: StateStore) -> Iterator[list[str]]:
    """The SQL statements sent through the store's engine meanwhile (no BEGIN/COMMIT)."""
    sent: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)


def timed(action: Callable[[], object], runs: int) -> list[float]:
    action()  # warm-up: connections, statement caches
    seconds = []
    for _ in range(runs):
        began = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - began)
    return seconds


def measure(config: Config, store: StateStore, runs: int) -> dict[str, tuple[float, int]]:
    """{what: (median seconds, statements per scrape)}."""
    old = baseline_module()
    pipelines = config.pipelines
    starts = {name: p.start for name, p in pipelines.items()}
    recheck = {name: p.recheck for name, p in pipelines.items()}

    def baseline() -> None:
        old.read_window_metrics(store, starts, NOW)  # a fresh prefix: as at the first scrape
        for name, pipeline in sorted(pipelines.items()):
            store.recheck_tally(name)
            store.count_due_rechecks(name, pipeline.recheck, NOW)

    def reads() -> None:
        read_window_metrics(store, starts, NOW, recheck=recheck)

    collector = WindowpipeCollector(config, store, broker=None, clock=lambda: NOW)

    def scrape() -> None:
        render(collector)

    cache = ScrapeCache(collector)
    cache.refresh()

    def served() -> None:
        cache.exposition()

    def prefix_kept() -> None:
        # The baseline at its best: the complete prefixes kept from the scrape before.
        old.read_window_metrics(store, starts, NOW, prefixes=kept)
        for name, pipeline in sorted(pipelines.items()):
            store.recheck_tally(name)
            store.count_due_rechecks(name, pipeline.recheck, NOW)

    kept = old.PrefixTallies()
    found = {}
    for what, action in (
        ("baseline", baseline),
        ("baseline_kept", prefix_kept),
        ("reads", reads),
        ("scrape", scrape),
        ("served", served),
    ):
        with statements(store) as sent:
            action()
        count = len(sent)
        found[what] = (statistics.median(timed(action, runs)), count)
        log(f"{what}: median {found[what][0]:.3f}s, {count} statements")
    return found


def run(
    quick: bool,
    database_url: str,
    redis_url: str,
    workdir: Path,
    *,
    pipelines: int | None = None,
    windows: int = 21,
    runs: int | None = None,
) -> list[Row]:
    """Benchmark 10: one scrape at many configured pipelines vs the per-pipeline reads."""
    count = pipelines if pipelines is not None else (200 if quick else 1000)
    runs = runs if runs is not None else (3 if quick else 5)
    names = [f"p{i:04}" for i in range(count)]
    path = write_config(
        workdir / "exporter-scrape.toml",
        {"redis_url": redis_url, "state_url": schema_url(database_url, "exporter_scrape")},
        {
            name: {
                "window": "15m",
                "start": "2026-11-01T00:00:00Z",
                "lag": "5m",
                "every": "5m",
                "recheck": ["1h", "1d"],
                "source": {"type": "sql", "url": "sqlite://", "table": "events"},
                "staging": {"type": "local", "path": str(workdir / "staging")},
                "target": {"type": "sql", "url": "sqlite://", "table": "events_loaded"},
            }
            for name in names
        },
    )
    config = load_config(path, require_secrets=False)
    store = StateStore(config.settings.state_url)
    try:
        store.migrate()
        seed(store, names, windows)
        log(f"exporter scrape: {count} pipelines x {windows} windows on PostgreSQL")
        found = measure(config, store, runs)
    finally:
        store.dispose()
    base, base_statements = found["baseline"]
    kept, kept_statements = found["baseline_kept"]
    scrape, scrape_statements = found["scrape"]
    reads, reads_statements = found["reads"]
    answer, _ = found["served"]
    big = count >= 1000
    setup = (
        f"medians of {runs} runs after a warm-up; baseline: the per-pipeline reads of the "
        f"exporter at {BASELINE_COMMIT} (its core/metrics.py from git, plus the store's "
        "per-pipeline recheck_tally and count_due_rechecks); with its prefix sums kept between "
        f"scrapes {kept:.3f} s ({kept_statements:,} statements)"
    )
    return [
        Row(
            benchmark="10. exporter scrape",
            metric=f"seconds to answer a scrape, {count:,} pipelines x {windows} windows, "
            "postgresql (served from memory, read every --refresh s)",
            windowpipe=answer,
            baseline=base,
            ratio=answer / base,
            target="< 1 s" if big else "report",
            met=answer < 1.0 if big else None,
            note=setup + "; windowpipe: `ScrapeCache.exposition()` of the last reading",
        ),
        Row(
            benchmark="10. exporter scrape",
            metric=f"seconds per reading, {count:,} pipelines x {windows} windows, postgresql "
            f"({scrape_statements} SQL statements vs {base_statements:,})",
            windowpipe=scrape,
            baseline=base,
            ratio=scrape / base,
            target="< 1 s" if big else "report",
            met=scrape < 1.0 if big else None,
            note=setup + f"; windowpipe: a whole reading and rendering (`render` of the "
            f"collector, as at each scrape with --refresh 0); the store reads alone {reads:.3f} s "
            f"({reads_statements} statements)",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exporter_scrape")
    parser.add_argument("--pipelines", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=21)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with pg_database() as database, redis_db() as redis_url, tempfile.TemporaryDirectory() as tmp:
        rows = run(
            False,
            database,
            redis_url,
            Path(tmp),
            pipelines=args.pipelines,
            windows=args.windows,
            runs=args.runs,
        )
    for row in rows:
        print(f"| {row.benchmark} | {row.metric} | {row.windowpipe:.4f} | {row.baseline:.3f} |")
        print(row.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
