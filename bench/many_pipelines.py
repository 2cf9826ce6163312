"""8. Many pipelines on one deployment.

a) Control plane alone: beat and two control workers (`-Q control -c 1` each), no stage
   worker, N pipelines of 1-minute windows generating every minute; CPU of beat and of the
   control workers (their pool children included) per minute, as a share of one core, with
   generation sent one task per pipeline (`generation_batch = 1`, what beat did before) and in
   groups (`generation_batch` 50, the default), one after the other in the same run. Target:
   beat + control <= 15 % of a core at 1,000 pipelines.

b) The whole deployment: N pipelines (default 1,000) of W-minute windows, each its own SQL
   source table (two documents a window, seeded with COPY) and SQL target table, in one
   PostgreSQL database that also holds the window records; a local staging; beat (generation
   every minute), two control workers (`-c 1`), one worker per stage queue at `-c 2`. After
   `minutes` of beat, beat stops and the windows already created drain. Reported: freshness
   (window end -> `finished_at`, p50/p95/max; generation ticks fall on the window boundaries,
   core/ticks.py, so a window is created the minute it closes: before, up to 60 s of it was the
   wait for a tick at beat's phase), the backlog (windows not finished, every 15 s),
   windows succeeded per second while beat ran, CPU per window by role (beat, control, each
   stage, the PostgreSQL server with its ended backends, the Redis server), the control
   plane's share of a core, the most connections to the database at once (sampled from
   pg_stat_activity every 0.5 s), and exactly-once (every target table holds the ids of its
   source's succeeded windows, each once). Targets: p95 <= 90 s, every window succeeded,
   exactly-once.

The Redis server is shared with whatever else runs on the machine: its CPU is an upper bound.

`python -m bench.many_pipelines [--quick] [--pipelines N] [--window W] [--minutes M]
[--control-only | --whole-only]` runs it alone and prints its rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from bench.common import (
    Beat,
    ConnectionSampler,
    Row,
    Workers,
    cpu_seconds,
    log,
    percentile,
    pg_database,
    postgres_server_cpu,
    redis_db,
    redis_server_cpu,
    table_lines,
    write_config,
)
from core.instants import format_instant
from core.records import WindowStatus
from core.store import StateStore

STAGES = ("precheck", "extract", "load", "audit")
DOCS_PER_WINDOW = 2
GENERATION_EVERY = "1m"
BATCHED = 50
"""`generation_batch` of the batched run (the setting's default)."""
CONTROL_SHARE_TARGET = 0.15
FRESHNESS_P95_TARGET = 90.0


# --- setup --------------------------------------------------------------------------------------


def _origin(window: timedelta) -> datetime:
    """The start of the window now runs in: the first window closes at the next boundary."""
    now = datetime.now(UTC)
    step = int(window.total_seconds())
    return datetime.fromtimestamp(int(now.timestamp()) // step * step, UTC)


def seed(url: str, pipelines: int, origin: datetime, window: timedelta, windows: int) -> int:
    """`src_<i>` per pipeline with DOCS_PER_WINDOW rows in each of `windows` windows from
    `origin`, written with COPY in one transaction; returns the rows written."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    spacing = window / (DOCS_PER_WINDOW + 1)
    rows = 0
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cursor:
            for index in range(pipelines):
                cursor.execute(
                    f"CREATE TABLE src_{index} (id BIGINT PRIMARY KEY, "
                    "created_at TIMESTAMPTZ NOT NULL, payload TEXT)"
                )
                with cursor.copy(f"COPY src_{index} (id, created_at, payload) FROM STDIN") as copy:
                    for number in range(windows):
                        start = origin + number * window
                        for doc in range(DOCS_PER_WINDOW):
                            doc_id = (index * windows + number) * DOCS_PER_WINDOW + doc
                            at = start + (doc + 1) * spacing
                            copy.write_row((doc_id, at, f"pipeline {index} doc {doc_id}"))
                            rows += 1
    engine.dispose()
    return rows


def pipelines_config(
    url: str, staging_dir: Path, pipelines: int, origin: datetime, window_minutes: int
) -> dict[str, dict[str, object]]:
    return {
        f"p{index:04}": {
            "window": f"{window_minutes}m",
            "start": format_instant(origin),
            "lag": "0s",
            "every": GENERATION_EVERY,
            "source": {"type": "sql", "url": url, "table": f"src_{index}"},
            "staging": {"type": "local", "path": str(staging_dir)},
            "target": {"type": "sql", "url": url, "table": f"dst_{index}"},
        }
        for index in range(pipelines)
    }


class BacklogSampler:
    """The windows not yet finished (pending, queued, running, failed), read every `every`
    seconds from the store while beat runs: whether the deployment keeps up shows as a backlog
    that returns to the same level each tick instead of growing."""

    def __init__(self, database_url: str, every: float = 15.0) -> None:
        self.samples: list[tuple[float, int]] = []
        self._store = StateStore(database_url)
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._began = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            counts = self._store.counts_by_status()
            open_ = sum(n for status, n in counts.items() if status not in FINISHED)
            self.samples.append((time.monotonic() - self._began, open_))

    def __enter__(self) -> BacklogSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._store.dispose()

    def trend(self) -> str:
        """The samples as `t:count` pairs, and the mean of the last third against the first
        third of the run (after the first minute's catch-up)."""
        settled = [count for at, count in self.samples if at >= 60]
        third = max(len(settled) // 3, 1)
        first, last = settled[:third], settled[-third:]
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        pairs = " ".join(f"{at:.0f}:{count}" for at, count in self.samples)
        return (
            f"backlog {pairs}; mean of the last third {mean(last):.0f} vs first {mean(first):.0f}"
        )


FINISHED = ("succeeded", "skipped", "dead")


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass
class Roles:
    """The process groups of each role, to read their CPU."""

    beat: Beat
    control: Workers
    stages: dict[str, Workers]
    database: str

    def cpu(self) -> dict[str, float]:
        readings = {
            "beat": cpu_seconds([self.beat.process.pid]) if self.beat.process else 0.0,
            "control": cpu_seconds([p.pid for p in self.control.processes]),
            **{
                stage: cpu_seconds([p.pid for p in workers.processes])
                for stage, workers in self.stages.items()
            },
            # The whole server (ended backends included): the database's live backends alone
            # miss every pooled connection closed on return (the pools' overflow).
            "postgresql": postgres_server_cpu(),
            "redis": redis_server_cpu(),
        }
        return readings


@contextmanager
def deployment(
    workdir: Path, env: dict[str, str], database: str, stage_workers: bool
) -> Iterator[Roles]:
    """Two control workers, a worker per stage queue at -c 2 (if `stage_workers`), and beat
    (started last: the caller's clock starts with it); every process stopped at the end."""
    control = Workers("workers", workdir, env)
    stages = {stage: Workers("workers", workdir, env) for stage in STAGES}
    beat = Beat("workers", workdir, env)
    try:
        control.start(["control", "control"], concurrency=1)
        if stage_workers:
            for stage, workers in stages.items():
                workers.start([stage], concurrency=2)
        yield Roles(beat, control, stages if stage_workers else {}, database)
    finally:
        beat.stop()
        for workers in (*stages.values(), control):
            workers.stop()


def _env(config: Path) -> dict[str, str]:
    # INFO: the bench waits for each worker's "ready." line.
    return {"WINDOWPIPE_CONFIG": str(config), "WINDOWPIPE_LOG_JSON": "true"}


# --- a) the control plane -----------------------------------------------------------------------


def control_plane(
    database_url: str, redis_url: str, workdir: Path, pipelines: int, minutes: float
) -> list[Row]:
    """Beat + control CPU per minute, a task per pipeline and then batched."""
    origin = _origin(timedelta(minutes=1)) - timedelta(minutes=1)
    shares: dict[int, float] = {}
    for batch in (1, BATCHED):
        run_dir = workdir / f"control-{batch}"
        run_dir.mkdir(parents=True, exist_ok=True)
        schema = f"control_{batch}"
        _create_schema(database_url, schema)
        state_url = f"{database_url}?options=-csearch_path%3D{schema}"
        config = _write(
            run_dir,
            redis_url,
            state_url,
            pipelines_config(database_url, run_dir / "staging", pipelines, origin, 1),
            generation_batch=batch,
        )
        _migrate(state_url)
        with deployment(run_dir, _env(config), _database(database_url), False) as roles:
            roles.beat.start()
            # The first tick creates and queues each pipeline's first windows: a warm-up.
            time.sleep(45)
            before, began = roles.cpu(), time.monotonic()
            time.sleep(minutes * 60)
            after, seconds = roles.cpu(), time.monotonic() - began
        used = sum(after[role] - before[role] for role in ("beat", "control"))
        shares[batch] = used / seconds
        log(
            f"control plane, generation_batch {batch}: beat {after['beat'] - before['beat']:.1f}"
            f" s, control {after['control'] - before['control']:.1f} s of CPU in {seconds:.0f} s"
            f" ({shares[batch]:.1%} of a core)"
        )
        _flush(redis_url)
    per_tick = {b: share * 60 / pipelines * 1000 for b, share in shares.items()}
    note = (
        f"{pipelines} pipelines of 1-minute windows, generation every minute, beat + 2 control "
        f"workers (-c 1), no stage worker, {minutes:g} min after a 45 s warm-up; baseline: a "
        f"task per pipeline (generation_batch 1), windowpipe: generation_batch {BATCHED}; "
        f"CPU per pipeline tick {per_tick[BATCHED]:.1f} ms vs {per_tick[1]:.1f} ms"
    )
    return [
        Row(
            "8a many pipelines: control plane",
            f"beat + control, share of one core ({pipelines} pipelines)",
            shares[BATCHED],
            shares[1],
            shares[BATCHED] / shares[1] if shares[1] else None,
            f"<= {CONTROL_SHARE_TARGET * pipelines / 1000:.1%} of a core "
            f"({CONTROL_SHARE_TARGET:.0%} per 1,000 pipelines)",
            shares[BATCHED] <= CONTROL_SHARE_TARGET * pipelines / 1000,
            note=note,
        )
    ]


# --- b) the whole deployment --------------------------------------------------------------------


def whole(
    database_url: str,
    redis_url: str,
    workdir: Path,
    pipelines: int,
    window_minutes: int,
    minutes: float,
) -> list[Row]:
    window = timedelta(minutes=window_minutes)
    origin = _origin(window)
    windows = int(minutes / window_minutes) + 3
    run_dir = workdir / f"whole-{pipelines}-{window_minutes}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"seeding {pipelines} source tables, {windows} windows each")
    seed(database_url, pipelines, origin, window, windows)
    config = _write(
        run_dir,
        redis_url,
        database_url,
        pipelines_config(database_url, run_dir / "staging", pipelines, origin, window_minutes),
    )
    _migrate(database_url)
    database = _database(database_url)
    admin_url = database_url.rsplit("/", 1)[0] + "/postgres"
    with (
        ConnectionSampler(admin_url, database=database) as sampler,
        deployment(run_dir, _env(config), database, True) as roles,
    ):
        before, began = roles.cpu(), time.monotonic()
        beat_began = datetime.now(UTC)
        roles.beat.start()
        with BacklogSampler(database_url) as backlog:
            time.sleep(minutes * 60)
        beat_used = roles.cpu()["beat"] - before["beat"]  # read before it ends: gone after
        roles.beat.stop()
        beat_span = (beat_began, datetime.now(UTC))
        beat_seconds = time.monotonic() - began
        log(f"beat stopped after {beat_seconds:.0f} s; draining")
        store = StateStore(database_url)
        try:
            drained = _drain(store, timeout=300)
            records = store.list_records()
        finally:
            store.dispose()
        after, seconds = roles.cpu(), time.monotonic() - began
    cpu = {role: after[role] - before[role] for role in after} | {"beat": beat_used}
    return _whole_rows(
        database_url,
        records,
        cpu,
        sampler.highest,
        pipelines,
        window_minutes,
        minutes,
        beat_span,
        seconds,
        drained,
        backlog.trend(),
    )


def _drain(store: StateStore, timeout: float) -> bool:
    """Wait until every created window is finished or dead; False if some still were not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = store.counts_by_status()
        open_ = sum(count for status, count in counts.items() if status not in FINISHED)
        if open_ == 0:
            return True
        time.sleep(2)
    return False


def _whole_rows(
    database_url: str,
    records: list[object],
    cpu: dict[str, float],
    connections: int,
    pipelines: int,
    window_minutes: int,
    minutes: float,
    beat_span: tuple[datetime, datetime],
    seconds: float,
    drained: bool,
    backlog: str,
) -> list[Row]:
    from core.records import WindowRecord

    typed = [r for r in records if isinstance(r, WindowRecord)]
    succeeded = [r for r in typed if r.status == WindowStatus.SUCCEEDED]
    statuses = Counter(r.status.value for r in typed)
    delays = [
        (r.finished_at - r.window_end).total_seconds()
        for r in succeeded
        if r.finished_at is not None
    ]
    exact, checked = exactly_once(database_url, typed)
    done = len(succeeded)
    per_window = {role: used / done * 1000 if done else 0.0 for role, used in cpu.items()}
    total_ms = sum(per_window.values())
    control_share = (cpu["beat"] + cpu["control"]) / seconds
    began, ended = beat_span
    in_beat = [r for r in succeeded if r.finished_at and began <= r.finished_at < ended]
    rate = len(in_beat) / (ended - began).total_seconds()
    label = f"8b many pipelines: {pipelines} x {window_minutes}-min windows, {minutes:g} min"
    roles = ", ".join(f"{role} {ms:.1f}" for role, ms in per_window.items())
    note = (
        f"windows {dict(statuses)}, drained: {drained}; CPU ms per succeeded window by role: "
        f"{roles} (total {total_ms:.1f}; Redis is shared with the machine); "
        f"freshness p50 {_p(delays, 0.5):.1f} s, max {max(delays, default=0):.1f} s; "
        f"exactly-once checked on {checked} pipelines; {backlog} (s since beat started:"
        " windows not finished)"
    )
    return [
        Row(
            label,
            "freshness p95, window end -> succeeded (s)",
            _p(delays, 0.95),
            None,
            None,
            f"<= {FRESHNESS_P95_TARGET:g} s",
            _p(delays, 0.95) <= FRESHNESS_P95_TARGET,
            note=note,
        ),
        Row(label, "windows succeeded per second", rate, None, None, "-", None),
        Row(label, "CPU per window, all roles (ms)", total_ms, None, None, "<= 60 ms", None),
        Row(
            label,
            "beat + control, share of one core",
            control_share,
            None,
            None,
            f"<= {CONTROL_SHARE_TARGET:.0%}",
            control_share <= CONTROL_SHARE_TARGET,
        ),
        Row(label, "most connections to the database", connections, None, None, "-", None),
        Row(
            label,
            "exactly-once (target ids = source ids), every window succeeded",
            1.0 if exact and drained and done == len(typed) else 0.0,
            None,
            None,
            "1",
            exact and drained and done == len(typed),
        ),
    ]


def _p(values: list[float], fraction: float) -> float:
    return percentile(values, fraction) if values else 0.0


def exactly_once(database_url: str, records: list[object]) -> tuple[bool, int]:
    """Whether every target table holds exactly the ids of its source's rows in the pipeline's
    succeeded windows, each once; and on how many pipelines that was checked."""
    from core.records import WindowRecord

    windows: dict[str, list[tuple[datetime, datetime]]] = {}
    for record in records:
        if isinstance(record, WindowRecord) and record.status == WindowStatus.SUCCEEDED:
            windows.setdefault(record.pipeline, []).append((record.window_start, record.window_end))
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    exact = True
    with engine.connect() as conn:
        for pipeline, spans in windows.items():
            index = int(pipeline[1:])
            source = conn.execute(sa.text(f"SELECT id, created_at FROM src_{index}")).all()
            expected = Counter(
                str(doc_id) for doc_id, at in source if any(s <= at < e for s, e in spans)
            )
            loaded = Counter(
                str(row[0]) for row in conn.execute(sa.text(f"SELECT doc_id FROM dst_{index}"))
            )
            exact = exact and loaded == expected
    engine.dispose()
    return exact, len(windows)


# --- helpers ------------------------------------------------------------------------------------


def _database(url: str) -> str:
    return str(sa.make_url(url).database)


def _create_schema(url: str, schema: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    engine.dispose()


def _migrate(state_url: str) -> None:
    store = StateStore(state_url)
    store.migrate()
    store.dispose()


def _write(
    workdir: Path,
    redis_url: str,
    state_url: str,
    pipelines: dict[str, dict[str, object]],
    **settings: object,
) -> Path:
    return write_config(
        workdir / "windowpipe.toml",
        {"redis_url": redis_url, "state_url": state_url, **settings},
        pipelines,
    )


def _flush(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()


def run(
    quick: bool,
    database_url: str,
    redis_url: str,
    workdir: Path,
    *,
    pipelines: int | None = None,
    window_minutes: int | None = None,
    minutes: float | None = None,
    control_only: bool = False,
    whole_only: bool = False,
) -> list[Row]:
    """Both parts; quick: 200 pipelines for 2 minutes for the control plane, then 100
    pipelines of 1-minute windows for 3 minutes; full: 1,000 pipelines, 3 minutes for the
    control plane, then 5-minute and 1-minute windows for 10 minutes each. `pipelines`,
    `window_minutes` and `minutes` override those."""
    count = pipelines or (100 if quick else 1000)
    rows = []
    if not whole_only:
        rows += control_plane(
            database_url,
            redis_url,
            workdir,
            pipelines or (200 if quick else 1000),
            minutes or (2 if quick else 3),
        )
        _flush(redis_url)
    if control_only:
        return rows
    sizes = [window_minutes] if window_minutes else ([1] if quick else [5, 1])
    for size in sizes:
        rows += whole(
            database_url, redis_url, workdir, count, size, minutes or (3 if quick else 10)
        )
        _flush(redis_url)
        _drop_tables(database_url, count)
    return rows


def _drop_tables(url: str, pipelines: int) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    # A transaction per 100 pipelines: 2,000 tables dropped in one exhaust PostgreSQL's lock
    # table ("out of shared memory", max_locks_per_transaction).
    for first in range(0, pipelines, 100):
        with engine.begin() as conn:
            for index in range(first, min(first + 100, pipelines)):
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS src_{index}, dst_{index}")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS windowpipe_ledger")
        conn.exec_driver_sql("DELETE FROM windows")
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.many_pipelines", description=__doc__)
    parser.add_argument("--pipelines", type=int, default=None)
    parser.add_argument("--window", type=int, default=None, help="window minutes")
    parser.add_argument("--minutes", type=float, default=None, help="minutes of beat")
    parser.add_argument("--control-only", action="store_true", help="a) alone")
    parser.add_argument("--whole-only", action="store_true", help="b) alone")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)

    with (
        tempfile.TemporaryDirectory(prefix="windowpipe-many-") as tmp,
        pg_database() as database_url,
        redis_db() as redis_url,
    ):
        rows = run(
            args.quick,
            database_url,
            redis_url,
            Path(tmp),
            pipelines=args.pipelines,
            window_minutes=args.window,
            minutes=args.minutes,
            control_only=args.control_only,
            whole_only=args.whole_only,
        )
    print("\n".join(table_lines(rows)))
    for row in rows:
        if row.note:
            print(f"- {row.benchmark}, {row.metric}: {row.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
