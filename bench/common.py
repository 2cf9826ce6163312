"""What every benchmark shares: a private Redis DB and PostgreSQL database, a config file,
Celery worker subprocesses, and medians.

Nothing here imports from `tests/`; the worker harness follows the same recipe as
`tests/support/deployment.py` (real `celery worker` subprocesses, ready when the log says so).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from core.config import config_toml

REPO = Path(__file__).resolve().parent.parent
"""The repository root (workers import `core`, `connectors`, `workers` and `bench` from it)."""

REDIS_BASE_URL = os.environ.get("WINDOWPIPE_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
"""The shared Redis server; the bench claims one DB number on it and flushes only that DB."""

PG_ADMIN_URL = os.environ.get(
    "WINDOWPIPE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
"""A PostgreSQL URL allowed to create and drop databases; the bench makes its own."""

DB_CLAIM_KEY = "windowpipe-test:db:{number}"
"""Same claim keys as the test suite's, so a test run and a bench run never share a DB."""

STAGE_QUEUES = ("precheck", "extract", "load", "audit")
"""The four stage queues, in chain order."""

NOOP_DONE_KEY = "bench:noop:done"
"""How many no-op chains finished (INCR by the baseline's last task)."""

NOOP_LAST_KEY = "bench:noop:last"
"""`time.time()` when the last no-op chain finished."""


def file_at(ref: str, path: str) -> str:
    """The text of the repository's file `path` as of commit `ref` (to bench old code)."""
    shown = subprocess.run(
        ["git", "show", f"{ref}:{path}"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return shown.stdout


# --- services -----------------------------------------------------------------------------------


@contextmanager
def redis_db() -> Iterator[str]:
    """A Redis URL on a DB number nobody else holds, flushed before and after."""
    admin = redis.Redis.from_url(f"{REDIS_BASE_URL}/0")
    number = next(
        (
            n
            for n in range(15, 1, -1)
            if admin.set(DB_CLAIM_KEY.format(number=n), f"bench:{os.getpid()}", nx=True, ex=3600)
        ),
        None,
    )
    if number is None:
        raise RuntimeError("no free Redis DB between 2 and 15")
    url = f"{REDIS_BASE_URL}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        admin.delete(DB_CLAIM_KEY.format(number=number))
        client.close()
        admin.close()


@contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this bench run, dropped at the end."""
    name = f"wp_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def schema_url(database_url: str, schema: str) -> str:
    """`database_url` with `schema` (created if missing) as the default search path."""
    engine = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    engine.dispose()
    return f"{database_url}?options=-csearch_path%3D{schema}"


# --- config -------------------------------------------------------------------------------------


def write_config(
    path: Path, settings: dict[str, Any], pipelines: dict[str, dict[str, Any]]
) -> Path:
    """A windowpipe.toml from plain dicts (`source`/`staging`/`target` as sub-tables)."""
    path.write_text(config_toml(settings, pipelines))
    return path


# --- workers ------------------------------------------------------------------------------------


@dataclass
class Workers:
    """`celery worker` subprocesses of one app, each started in its own process group."""

    app: str
    """`-A` argument: `workers` (windowpipe) or a bench module."""
    workdir: Path
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, queues: Sequence[str], concurrency: int = 2, pool: str = "prefork") -> None:
        """Start one worker per queue at once, then wait until every one is ready."""
        started = []
        for queue in queues:
            name = f"{queue}-c{concurrency}-{len(self.processes)}"
            log = self.workdir / f"{self.app.replace('.', '_')}-{name}.log"
            command = [
                *(sys.executable, "-m", "celery", "-A", self.app, "worker"),
                *("-Q", queue, "-c", str(concurrency), "-P", pool, "-n", f"{name}@%h"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
                *("--loglevel", "INFO"),
            ]
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env={**os.environ, **self.env, "PYTHONPATH": str(REPO)},
                stdout=log.open("ab"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.processes.append(process)
            started.append((process, log))
        for process, log in started:
            _wait_ready(process, log)

    def stop(self) -> None:
        """Stop every worker this object started (its process group only), warm then cold."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self.processes.clear()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def sql_pipeline(
    data_url: str, staging_dir: Path, target_table: str, origin: str, **source: Any
) -> dict[str, Any]:
    """The benchmarks' pipeline: 15-minute windows from `origin`, an `events` table as the
    SQL source (`source` adds keys, e.g. page_size), a local staging, a SQL target table."""
    return {
        "window": "15m",
        "start": origin,
        "lag": "0s",
        "every": "1h",
        "source": {
            "type": "sql",
            "url": data_url,
            "table": "events",
            "timestamp_column": "created_at",
            "id_column": "id",
            **source,
        },
        "staging": {"type": "local", "path": str(staging_dir)},
        "target": {"type": "sql", "url": data_url, "table": target_table},
    }


def _wait_ready(process: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited: {log.read_text(errors='replace')[-3000:]}")
        if log.exists() and "ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"worker not ready after {timeout}s: {log.read_text()[-3000:]}")


# --- numbers ------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile by linear interpolation (0.5 is the median)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    metric: str
    windowpipe: float
    baseline: float | None
    ratio: float | None
    target: str
    met: bool | None
    runs: list[float] = field(default_factory=list)
    """Every windowpipe measurement (the median of which is `windowpipe`)."""
    baseline_runs: list[float] = field(default_factory=list)
    note: str = ""


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- CPU ----------------------------------------------------------------------------------------


def cpu_seconds(
    process_groups: Sequence[int], database: str | None = None, skip: Collection[int] = ()
) -> float:
    """CPU seconds (user + system) used so far by every process in `process_groups` (worker
    subprocesses and their pool children), plus the PostgreSQL backends serving `database`
    but those in `skip` (the bench's own connections, `backend_pids`).

    On a shared, loaded machine a rate moves with whatever else runs; the CPU each window costs
    moves much less, so the bench reports both.
    """
    groups = set(process_groups)

    def mine(entry: Path, name: str, fields: list[str]) -> bool:
        if int(fields[2]) in groups:  # pgrp
            return True
        if database is not None and "postgres" in name and int(entry.name) not in skip:
            return f" {database} " in (entry / "cmdline").read_text().replace("\0", " ")
        return False

    return _proc_cpu(mine)


BENCH_APPLICATION = "windowpipe-bench"
"""The `application_name` of the bench's own PostgreSQL connections (its polling, its set-up),
whose backends a CPU reading of windowpipe's work leaves out (`backend_pids`)."""


def as_bench_client(database_url: str) -> str:
    """`database_url` (with a query string already) naming its connections the bench's."""
    return f"{database_url}&application_name={BENCH_APPLICATION}"


def backend_pids(database_url: str, application_name: str = BENCH_APPLICATION) -> set[int]:
    """The pids of the PostgreSQL backends whose connections call themselves
    `application_name`, asked on a connection of that name (so it is among them)."""
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": application_name},
            )
            return {int(pid) for (pid,) in rows}
    finally:
        engine.dispose()


def redis_server_cpu() -> float:
    """CPU seconds used so far by the Redis server(s) on this machine (shared by everyone)."""
    return _proc_cpu(lambda _entry, name, _fields: name == "redis-server")


def postgres_server_cpu() -> float:
    """CPU seconds used so far by the whole PostgreSQL server: every live `postgres` process,
    plus what the postmaster's ended children used (a backend closed when its pooled
    connection was returned is counted there once reaped, and lost to a per-backend reading).
    Every database's backends, autovacuum and the bench's own sampler included: an upper bound
    for a database on an otherwise idle server."""
    return _proc_cpu(lambda _entry, name, _fields: name == "postgres", reaped=True)


def _proc_cpu(match: Callable[[Path, str, list[str]], bool], *, reaped: bool = False) -> float:
    """CPU seconds (user + system) of every process that `match(entry, name, stat fields after
    the name)` selects, from /proc; with `reaped`, its ended children's too."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            if match(entry, name, fields):
                total += int(fields[11]) + int(fields[12])  # utime, stime
                if reaped:
                    total += int(fields[13]) + int(fields[14])  # cutime, cstime
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
    return total / tick


class ConnectionSampler:
    """The most sessions on PostgreSQL at once matching `database` and/or `role`, sampled from
    pg_stat_activity every `every` seconds on a connection of `admin_url`'s (not counted)."""

    def __init__(
        self,
        admin_url: str,
        *,
        database: str | None = None,
        role: str | None = None,
        every: float = 0.5,
    ) -> None:
        self.highest = 0
        self._query = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND (CAST(:db AS text) IS NULL OR datname = :db) "
            "AND (CAST(:role AS text) IS NULL OR usename = :role)"
        ).bindparams(db=database, role=role)
        self._every = every
        self._engine = sa.create_engine(admin_url, poolclass=sa.pool.NullPool)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self._engine.connect() as conn:
            while not self._stop.is_set():
                count = conn.execute(self._query).scalar_one()
                conn.rollback()  # a fresh snapshot of the statistics each time
                self.highest = max(self.highest, int(count))
                self._stop.wait(self._every)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._engine.dispose()


# --- beat ---------------------------------------------------------------------------------------


@dataclass
class Beat:
    """`celery -A <app> beat` as a subprocess in its own process group."""

    app: str
    workdir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """Beat's log file (it says when each task was sent)."""
        return self.workdir / f"{self.app.replace('.', '_')}-beat.log"

    def start(self, timeout: float = 90) -> None:
        """Start beat and wait until its log says it is starting to schedule."""
        log = self.log_path
        offset = log.stat().st_size if log.exists() else 0
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", self.app, "beat"),
                *("--loglevel", "INFO", "-s", str(self.workdir / "beat-schedule")),
            ],
            cwd=REPO,
            env={**os.environ, **self.env, "PYTHONPATH": str(REPO)},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"beat exited: {log.read_text(errors='replace')[-3000:]}")
            text = log.read_text(errors="replace")[offset:] if log.exists() else ""
            if "beat: Starting" in text:
                return
            time.sleep(0.2)
        raise RuntimeError(f"beat not started after {timeout}s: {log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop beat (its process group only)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> Beat:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- the report's tables ------------------------------------------------------------------------


def number(value: float | None) -> str:
    """A figure as the report prints it: thousands separated from 100 up, else 2 decimals."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def table_lines(rows: list[Row]) -> list[str]:
    """The results table (markdown) of `rows`, one line a row."""
    lines = [
        "| benchmark | metric | windowpipe | baseline | ratio | target | met |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "**no**")
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        lines.append(
            f"| {row.benchmark} | {row.metric} | {number(row.windowpipe)} | "
            f"{number(row.baseline)} | {ratio} | {row.target} | {met} |"
        )
    return lines


def run_lines(rows: list[Row]) -> list[str]:
    """One line per row with runs or a note: every run's figure, then the note."""
    lines = []
    for row in rows:
        if row.runs or row.note:
            runs = ", ".join(number(v) for v in row.runs)
            base = ", ".join(number(v) for v in row.baseline_runs)
            detail = f"windowpipe [{runs}], baseline [{base}]; " if row.runs else ""
            lines.append(f"- {row.benchmark}, {row.metric}: {detail}{row.note}")
    return lines
