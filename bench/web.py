"""8. The web view (`windowpipe web`): server time and page weight of its two big pages.

a) The window grid of one pipeline holding a year of 15-minute windows (35,040 cells on one
page, every status, some drifted and rechecked), against the same records read the way
`windowpipe status PIPELINE --json` reads and prints them (`list_records` + `to_json` +
orjson), and against the grid's bare query alone. Target: under 1 s of server time.

b) The pipelines page with 1,000 configured pipelines (96 windows each, 96,000 records), against
the same records through `status --json`'s path and against the page's bare grouped query.

Each page is requested through Starlette's in-process test client (no network; gzip as a
browser asks for it), `RUNS` times after one warm-up; the medians are reported. Page weight is
the HTML as sent (gzip) and unpacked. On SQLite and on PostgreSQL.

`python -m bench.web [--quick]` prints the rows as a Markdown table; `make bench` runs it as
benchmark 9 with the others.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import redis
import sqlalchemy as sa

from bench.common import Row, log, median, pg_database, redis_db, schema_url
from core.config import Config, config_from_dict
from core.records import WindowKind
from core.store import StateStore
from core.store.schema import WINDOWS
from core.windows import windows_in_range

ORIGIN = datetime(2025, 1, 1, tzinfo=UTC)
YEAR_OF_15M = 35_040
PIPELINES = 1_000
WINDOWS_PER_PIPELINE = 96
RUNS = 7
QUICK_RUNS = 3
GRID_TARGET_SECONDS = 1.0
STATUS_BY_REMAINDER = ["succeeded"] * 10 + ["skipped", "failed", "dead", "queued", "pending"]
"""Statuses dealt round the windows (mostly succeeded, as a real history)."""


def _pipeline(window: str) -> dict[str, Any]:
    return {
        "window": window,
        "start": "2025-01-01T00:00:00Z",
        "source": {"type": "sql", "url": "sqlite://", "table": "t", "timestamp_column": "ts"},
        "staging": {"type": "local", "path": "."},
        "target": {"type": "sql", "url": "sqlite://", "table": "t"},
    }


def _config(state_url: str, redis_url: str, names: list[str]) -> Config:
    raw = {
        "windowpipe": {"state_url": state_url, "redis_url": redis_url},
        "pipelines": {name: _pipeline("15m") for name in names},
    }
    return config_from_dict(raw, "bench-web.toml", require_secrets=False)


def _seed(store: StateStore, pipeline: str, count: int) -> None:
    """`count` 15-minute windows of `pipeline` from ORIGIN, statuses dealt round, every 50th
    drifted, every other finished one rechecked."""
    windows = windows_in_range(
        origin=ORIGIN,
        size=timedelta(minutes=15),
        start=ORIGIN,
        end=ORIGIN + count * timedelta(minutes=15),
    )
    store.create_windows(pipeline, windows, kind=WindowKind.SCHEDULED)
    status = sa.case(
        *(
            (WINDOWS.c.id % len(STATUS_BY_REMAINDER) == index, value)
            for index, value in enumerate(STATUS_BY_REMAINDER)
        ),
        else_="pending",
    )
    with store.engine.begin() as conn:
        conn.execute(
            WINDOWS.update()
            .where(WINDOWS.c.pipeline == pipeline)
            .values(status=status, source_count=WINDOWS.c.id, rechecks_done=WINDOWS.c.id % 2)
        )
        conn.execute(
            WINDOWS.update()
            .where(WINDOWS.c.pipeline == pipeline, WINDOWS.c.id % 50 == 0)
            .values(drift=[{"at": "2025-06-01T00:00:00Z", "by": "recheck"}])
        )


def _timed(call: Callable[[], Any], runs: int) -> tuple[list[float], list[float], Any]:
    """(wall seconds, CPU seconds of this process, the last result) of `runs` calls after a
    warm-up. The CPU time (the app's thread and the test client) shows what a page costs when
    others load the machine."""
    call()
    seconds: list[float] = []
    cpu: list[float] = []
    result = None
    for _ in range(runs):
        began, began_cpu = time.perf_counter(), time.process_time()
        result = call()
        seconds.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return seconds, cpu, result


def _status_json(store: StateStore, pipeline: str | None) -> bytes:
    """What `windowpipe status [PIPELINE] --json` reads and prints."""
    return orjson.dumps([r.to_json() for r in store.list_records(pipeline)])


def _client(config: Config, store: StateStore, redis_url: str) -> Any:
    from starlette.testclient import TestClient

    from windowpipe.web.app import WebContext, create_web_app
    from windowpipe.web.security import Access

    context = WebContext(
        config=config,
        store=store,
        redis_client=redis.Redis.from_url(redis_url),
        access=Access("bench", "bench", read_only=False),
    )
    client = TestClient(create_web_app(context))
    client.auth = ("bench", "bench")
    client.headers["accept-encoding"] = "gzip"
    return client


def _get(client: Any, path: str) -> Any:
    response = client.get(path)
    assert response.status_code == 200, response.text[:300]
    return response


def _rows(backend: str, url: str, redis_url: str, runs: int) -> list[Row]:
    from core.store.overview import grid_cells, pipeline_tallies

    rows: list[Row] = []
    names = [f"p{index:04d}" for index in range(PIPELINES)]
    store = StateStore(url)
    try:
        store.migrate()
        log(f"web {backend}: seeding {YEAR_OF_15M:,} windows of one pipeline")
        _seed(store, "year", YEAR_OF_15M)
        log(f"web {backend}: seeding {PIPELINES:,} pipelines x {WINDOWS_PER_PIPELINE}")
        for name in names:
            _seed(store, name, WINDOWS_PER_PIPELINE)

        # a) the grid
        client = _client(_config(url, redis_url, ["year"]), store, redis_url)
        grid_path = "/pipelines/year?from=2025-01-01&to=2025-12-31"
        page_s, page_cpu, response = _timed(lambda: _get(client, grid_path), runs)
        cells = response.text.count('<td><a class="')
        assert cells == YEAR_OF_15M, cells
        status_s, status_cpu, printed = _timed(lambda: _status_json(store, "year"), runs)
        start, end = ORIGIN, ORIGIN + timedelta(days=365)
        query_s, _, _ = _timed(lambda: grid_cells(store, "year", start, start, end), runs)
        weight = (
            f"page {response.num_bytes_downloaded / 1024:,.0f} KiB gzip, "
            f"{len(response.content) / 1024:,.0f} KiB HTML; `status year --json` "
            f"{len(printed) / 1024:,.0f} KiB"
        )
        grid = median(page_s)
        rows.append(
            Row(
                "9. web",
                f"grid of 35,040 windows, server s vs `status --json`'s read + print, {backend}",
                grid,
                median(status_s),
                grid / median(status_s),
                f"< {GRID_TARGET_SECONDS:g} s",
                grid < GRID_TARGET_SECONDS,
                page_s,
                status_s,
                f"{weight}; CPU (median, this process) page {median(page_cpu):.3f} s, "
                f"`status --json` {median(status_cpu):.3f} s; the bare query (4 columns) "
                f"{median(query_s):.3f} s",
            )
        )

        # b) the pipelines page
        client = _client(_config(url, redis_url, names), store, redis_url)
        page_s, page_cpu, response = _timed(lambda: _get(client, "/?sort=behind&order=desc"), runs)
        # ...and `year`, which has records but is not in this config.
        assert response.text.count("<tr data-pipeline=") == PIPELINES + 1
        status_s, status_cpu, printed = _timed(lambda: _status_json(store, None), runs)
        query_s, _, _ = _timed(lambda: pipeline_tallies(store), runs)
        overview = median(page_s)
        rows.append(
            Row(
                "9. web",
                f"pipelines page, 1,000 pipelines, server s vs `status --json`'s read + print, "
                f"{backend}",
                overview,
                median(status_s),
                overview / median(status_s),
                "report",
                None,
                page_s,
                status_s,
                f"page {response.num_bytes_downloaded / 1024:,.0f} KiB gzip, "
                f"{len(response.content) / 1024:,.0f} KiB HTML; `status --json` of the "
                f"{PIPELINES * WINDOWS_PER_PIPELINE + YEAR_OF_15M:,} records "
                f"{len(printed) / 1024:,.0f} KiB; CPU (median, this process) page "
                f"{median(page_cpu):.3f} s, `status --json` {median(status_cpu):.3f} s; the "
                f"bare grouped query "
                f"{median(query_s):.3f} s",
            )
        )
    finally:
        store.dispose()
    return rows


def run(quick: bool, database_url: str, redis_url: str) -> list[Row]:
    """Both pages on SQLite (a tmp file) and on PostgreSQL (a schema of its own in
    `database_url`); `quick`: fewer requests."""
    runs = QUICK_RUNS if quick else RUNS
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += _rows("sqlite", f"sqlite:///{Path(tmp) / 'state.db'}", redis_url, runs)
    rows += _rows("postgresql", schema_url(database_url, "bench_web"), redis_url, runs)
    return rows


def _table(rows: list[Row]) -> str:
    lines = [
        "| benchmark | metric | windowpipe | baseline | ratio | target | met |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(
            f"| {row.benchmark} | {row.metric} | {row.windowpipe:.3f} | {row.baseline:.3f} | "
            f"{row.ratio:.2f}x | {row.target} | {met} |"
        )
    for row in rows:
        runs = ", ".join(f"{v:.3f}" for v in row.runs)
        base = ", ".join(f"{v:.3f}" for v in row.baseline_runs)
        lines.append(f"\n- {row.metric}: web [{runs}], baseline [{base}]; {row.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """This benchmark alone: `python -m bench.web [--quick]` prints its rows (`make bench`, i.e.
    `python -m bench.run`, runs it with the others and writes docs/BENCHMARKS.md)."""
    parser = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} requests per page")
    args = parser.parse_args(argv)
    with pg_database() as database_url, redis_db() as redis_url:
        print(_table(run(args.quick, database_url, redis_url)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
