"""1. Orchestration overhead: tiny windows (one document each) through the four-stage chain on
real `celery worker` subprocesses, against a bare chain of four no-op tasks on the same queue
names, the same worker layout (one worker per stage queue plus control) and the same Redis
server (a DB of its own, so both sets of workers run at once and their runs alternate: a shared
machine that slows down or speeds up during the bench moves both alike).

Throughput is windows (chains) per second from the first send to the last finish, as recorded
by the finishing process (`finished_at` of the record, or the no-op audit's timestamp), so the
bench's polling interval does not count. Latency is one window alone on idle workers. CPU is
read from /proc per process group, and PostgreSQL's for the bench database's backends but the
bench's own (its polling of the records).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
import sqlalchemy as sa
from celery import Celery, chain

from bench.common import (
    NOOP_DONE_KEY,
    NOOP_LAST_KEY,
    REPO,
    STAGE_QUEUES,
    Beat,
    Row,
    Workers,
    as_bench_client,
    backend_pids,
    cpu_seconds,
    log,
    median,
    percentile,
    redis_db,
    schema_url,
    sql_pipeline,
    write_config,
)
from core.config import load_config
from core.instants import format_instant
from core.records import WindowKind, WindowStatus
from core.store import StateStore
from core.windows import Window

ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
PIPELINE = "tiny"
TARGET_RATIO = 0.5
LATENCY_TARGET_RATIO = 2.0
"""Idle latency p50 against the bare chain's (issue 14)."""
CONCURRENCY = 2
"""Pool size of each stage worker (prefork), for windowpipe and the baseline alike."""


@dataclass
class Plan:
    windows: int
    """Windows (chains) per throughput run."""
    runs: int
    latency_samples: int
    warmup: int = 8


PLANS = {"full": Plan(windows=200, runs=5, latency_samples=30), "quick": Plan(60, 2, 10)}

ENQUEUE_CAP = 32
"""`max_active_windows` and `max_backfill_windows` of the bench pipeline: caps that do not
throttle 4 stage workers of 2 processes each, so the measured rate is the orchestration's."""


def _seed(url: str, count: int) -> None:
    """One document per window, 1 minute into it, for `count` windows."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE events (id BIGINT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL, "
                "payload TEXT)"
            )
        )
        conn.execute(sa.text("CREATE INDEX ix_events_ts_id ON events (created_at, id)"))
        conn.execute(
            sa.text(
                "INSERT INTO events SELECT n, :origin + (n * interval '15 minutes') "
                "+ interval '1 minute', 'tiny document ' || n FROM generate_series(0, :last) n"
            ),
            {"origin": ORIGIN, "last": count - 1},
        )
    engine.dispose()


class _Sender:
    """Sends chains the way windowpipe does: immutable signatures, arguments are identifiers."""

    def __init__(self, broker_url: str, task_prefix: str) -> None:
        self.app = Celery(broker=broker_url, backend=broker_url)
        self.prefix = task_prefix

    def send(self, window_start: datetime) -> None:
        start = format_instant(window_start)
        chain(
            *(
                self.app.signature(
                    f"{self.prefix}.{queue}",
                    (PIPELINE, start),
                    immutable=True,
                    options={"queue": queue},
                )
                for queue in STAGE_QUEUES
            )
        ).apply_async()

    def close(self) -> None:
        self.app.close()


class _Windowpipe:
    """Chains of real windows; a window is done when its record says succeeded."""

    def __init__(self, store: StateStore, sender: _Sender) -> None:
        self.store = store
        self.sender = sender
        self.next_index = 0

    def _take(self, count: int) -> list[Window]:
        windows = [
            Window(ORIGIN + i * SIZE, ORIGIN + (i + 1) * SIZE)
            for i in range(self.next_index, self.next_index + count)
        ]
        self.next_index += count
        # Created and queued up front, so a control-queue dispatch finds nothing to start.
        self.store.create_windows(PIPELINE, windows, kind=WindowKind.MANUAL)
        for window in windows:
            self.store.queue(PIPELINE, window.start, expect=[WindowStatus.PENDING])
        return windows

    def throughput(self, count: int) -> float:
        windows = self._take(count)
        began = time.time()
        for window in windows:
            self.sender.send(window.start)
        records = self._wait(windows, timeout=600)
        finished = max(r.finished_at for r in records if r.finished_at is not None)
        return count / (finished.timestamp() - began)

    def latency(self) -> float:
        (window,) = self._take(1)
        began = time.time()
        self.sender.send(window.start)
        (record,) = self._wait([window], timeout=60, poll=0.005)
        assert record.finished_at is not None
        return record.finished_at.timestamp() - began

    def _wait(self, windows: list[Window], timeout: float, poll: float = 0.1) -> list:
        deadline = time.monotonic() + timeout
        start, end = windows[0].start, windows[-1].end
        while True:
            records = self.store.list_records(PIPELINE, start=start, end=end)
            if all(r.status == WindowStatus.SUCCEEDED for r in records):
                return records
            failed = [r for r in records if r.status in (WindowStatus.FAILED, WindowStatus.DEAD)]
            if failed or time.monotonic() > deadline:
                raise RuntimeError(f"windows did not succeed: {failed[:3] or records[:3]}")
            time.sleep(poll)


class _Enqueued:
    """The stricter set-up (the headline): a range enqueued with `windowpipe enqueue`, started
    by the control queue's dispatch as slots free up, beat running; the rate is taken from the
    records alone, first `started_at` to last `finished_at`."""

    def __init__(self, store: StateStore, windows: _Windowpipe, env: dict[str, str]) -> None:
        self.store = store
        self.windows = windows
        self.env = env

    def throughput(self, count: int) -> float:
        first = self.windows.next_index
        self.windows.next_index += count
        start, end = ORIGIN + first * SIZE, ORIGIN + (first + count) * SIZE
        output = subprocess.run(
            [
                *(sys.executable, "-m", "windowpipe", "enqueue", PIPELINE),
                *("--start", format_instant(start), "--end", format_instant(end)),
            ],
            cwd=REPO,
            env={**os.environ, **self.env, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            check=False,
        )
        if output.returncode != 0:
            raise RuntimeError(f"windowpipe enqueue failed: {output.stderr or output.stdout}")
        windows = [
            Window(ORIGIN + i * SIZE, ORIGIN + (i + 1) * SIZE) for i in range(first, first + count)
        ]
        records = self.windows._wait(windows, timeout=600)
        began = min(r.started_at for r in records if r.started_at is not None)
        finished = max(r.finished_at for r in records if r.finished_at is not None)
        return count / (finished - began).total_seconds()


class _Noop:
    """Chains of four no-op tasks; the last one counts and timestamps itself in Redis."""

    def __init__(self, redis_url: str, sender: _Sender) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.sender = sender
        self.next_index = 0

    def _done(self) -> int:
        return int(self.redis.get(NOOP_DONE_KEY) or 0)

    def throughput(self, count: int) -> float:
        goal = self._done() + count
        began = time.time()
        for i in range(self.next_index, self.next_index + count):
            self.sender.send(ORIGIN + i * SIZE)
        self.next_index += count
        self._wait(goal, timeout=600, poll=0.1)
        return count / (float(self.redis.get(NOOP_LAST_KEY) or 0) - began)

    def latency(self) -> float:
        goal = self._done() + 1
        began = time.time()
        self.sender.send(ORIGIN + self.next_index * SIZE)
        self.next_index += 1
        self._wait(goal, timeout=60, poll=0.005)
        return float(self.redis.get(NOOP_LAST_KEY) or 0) - began

    def _wait(self, goal: int, timeout: float, poll: float) -> None:
        deadline = time.monotonic() + timeout
        while self._done() < goal:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no-op chains did not finish: {self._done()} of {goal}")
            time.sleep(poll)


@dataclass
class _Cpu:
    """CPU milliseconds per window of the workers (and the bench database's PostgreSQL
    backends) over throughput runs."""

    groups: list[int]
    database: str
    bench_url: str
    """A URL of the bench database as the bench's own client: its backends are not counted."""
    workers_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)

    by_group_ms: dict[int, list[float]] = field(default_factory=dict)
    """CPU ms per window of each process group (a worker per queue, in `groups` order)."""

    def measure(self, windows: int, work: Callable[[], float]) -> float:
        each = [cpu_seconds([group]) for group in self.groups]
        # The bench's own polling of the records runs in backends of the same database.
        skip = backend_pids(self.bench_url)
        workers = cpu_seconds(self.groups)
        everything = cpu_seconds(self.groups, self.database, skip)
        rate = work()
        skip |= backend_pids(self.bench_url)
        self.workers_ms.append((cpu_seconds(self.groups) - workers) * 1000 / windows)
        self.total_ms.append(
            (cpu_seconds(self.groups, self.database, skip) - everything) * 1000 / windows
        )
        for group, before in zip(self.groups, each, strict=True):
            spent = (cpu_seconds([group]) - before) * 1000 / windows
            self.by_group_ms.setdefault(group, []).append(spent)
        return rate

    def split(self, names: Sequence[str]) -> str:
        """Median CPU ms per window of each named group, e.g. "precheck 9.1, extract 12.0"."""
        return ", ".join(
            f"{name} {median(self.by_group_ms.get(group, [0.0])):.1f}"
            for name, group in zip(names, self.groups, strict=False)
        )


def _measure(
    runner: _Windowpipe | _Noop, plan: Plan, name: str, cpu: _Cpu
) -> tuple[list[float], list[float]]:
    runner.throughput(plan.warmup)  # every pool process imports and connects once
    rates = []
    for run in range(plan.runs):
        rates.append(cpu.measure(plan.windows, lambda: runner.throughput(plan.windows)))
        log(
            f"orchestration {name} run {run + 1}: {rates[-1]:.1f} windows/s, CPU per window "
            f"{cpu.workers_ms[-1]:.1f} ms workers, {cpu.total_ms[-1]:.1f} ms with PostgreSQL"
        )
    latencies = []
    for _ in range(plan.latency_samples):
        latencies.append(runner.latency())
        time.sleep(0.05)
    log(
        f"orchestration {name} latency p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
        f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms"
    )
    return rates, latencies


def _config(path: Path, redis_url: str, state_url: str, data_url: str, workdir: Path) -> Path:
    """The bench pipeline's config, on `redis_url` as broker and lock store."""
    return write_config(
        path,
        {"redis_url": redis_url, "state_url": state_url, "log_level": "INFO"},
        {
            PIPELINE: {
                **sql_pipeline(
                    data_url,
                    workdir / "orchestration-stage",
                    "events_loaded",
                    format_instant(ORIGIN),
                ),
                "max_active_windows": ENQUEUE_CAP,
                "max_backfill_windows": ENQUEUE_CAP,
            }
        },
    )


def _alternate(
    plan: Plan,
    phase: str,
    bare: _Noop,
    bare_cpu: _Cpu,
    ours: Callable[[], float],
    ours_cpu: _Cpu,
) -> tuple[list[float], list[float]]:
    """`plan.runs` throughput runs of the bare chain and of windowpipe's `ours`, one of each in
    turn, so a machine that slows down or speeds up during the phase moves both alike; their
    rates (bare, ours)."""
    bare_rates, rates = [], []
    for run in range(plan.runs):
        bare_rates.append(bare_cpu.measure(plan.windows, lambda: bare.throughput(plan.windows)))
        rates.append(ours_cpu.measure(plan.windows, ours))
        log(
            f"orchestration {phase} run {run + 1}: bare {bare_rates[-1]:.1f} windows/s, "
            f"{bare_cpu.total_ms[-1]:.1f} ms a window; windowpipe {rates[-1]:.1f} windows/s, "
            f"{ours_cpu.workers_ms[-1]:.1f} ms workers, {ours_cpu.total_ms[-1]:.1f} ms with "
            "PostgreSQL"
        )
    return bare_rates, rates


def run(quick: bool, database_url: str, redis_url: str, workdir: Path) -> list[Row]:
    plan = PLANS["quick" if quick else "full"]
    database = database_url.rsplit("/", 1)[1]
    data_url = schema_url(database_url, "orchestration")
    state_url = schema_url(database_url, "orchestration_state")
    total = plan.warmup + 2 * plan.runs * plan.windows + plan.latency_samples
    _seed(data_url, total)
    config_path = _config(workdir / "orchestration.toml", redis_url, state_url, data_url, workdir)
    env = {"WINDOWPIPE_CONFIG": str(config_path)}
    load_config(config_path)  # the workers read it: it must be valid
    bench_url = as_bench_client(state_url)
    store = StateStore(bench_url)
    store.migrate()
    # Generation (beat) goes on from just before now, leaving the bench's windows to it.
    frontier = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    store.create_windows(PIPELINE, [Window(frontier - SIZE, frontier)], kind=WindowKind.SCHEDULED)
    layout = [*STAGE_QUEUES, "control"]

    log("orchestration: windowpipe's app (time limits, logging, liveness) with no-op bodies")
    sender = _Sender(redis_url, "bench.noop")
    with Workers("bench.noop_windowpipe_app", workdir, env) as workers:
        workers.start(layout, CONCURRENCY)
        app_cpu = _Cpu([p.pid for p in workers.processes], database, bench_url)
        app_rates, app_latencies = _measure(
            _Noop(redis_url, sender), plan, "no-op in windowpipe's app", app_cpu
        )
    sender.close()

    # The bare chain's workers run beside windowpipe's on a Redis DB of their own (the same
    # queue names, other messages), so their runs can alternate with windowpipe's.
    log("orchestration: the bare chain and windowpipe's four stages, runs alternating")
    with redis_db() as bare_redis_url:
        bare_path = _config(
            workdir / "orchestration-bare.toml", bare_redis_url, state_url, data_url, workdir
        )
        bare_env = {"WINDOWPIPE_CONFIG": str(bare_path)}
        bare_sender = _Sender(bare_redis_url, "bench.noop")
        sender = _Sender(redis_url, "windowpipe")
        with (
            Workers("bench.noop_app", workdir, bare_env) as bare_workers,
            Workers("workers", workdir, env) as workers,
        ):
            bare_workers.start(layout, CONCURRENCY)
            workers.start(layout, CONCURRENCY)
            bare = _Noop(bare_redis_url, bare_sender)
            chains = _Windowpipe(store, sender)
            bare_groups = [p.pid for p in bare_workers.processes]
            base_cpu = _Cpu(bare_groups, database, bench_url)
            cpu = _Cpu([p.pid for p in workers.processes], database, bench_url)
            bare.throughput(plan.warmup)  # every pool process imports and connects once
            chains.throughput(plan.warmup)
            base_rates, rates = _alternate(
                plan, "chains", bare, base_cpu, lambda: chains.throughput(plan.windows), cpu
            )
            base_latencies, latencies = [], []
            for _ in range(plan.latency_samples):
                base_latencies.append(bare.latency())
                latencies.append(chains.latency())
                time.sleep(0.05)
            log(
                f"orchestration idle latency p50 bare {percentile(base_latencies, 0.5) * 1000:.0f}"
                f" ms, windowpipe {percentile(latencies, 0.5) * 1000:.0f} ms"
            )
            log("orchestration: `windowpipe enqueue` with beat running, alternating")
            enqueued = _Enqueued(store, chains, env)
            with Beat("workers", workdir, env) as beat:
                beat.start()
                assert beat.process is not None
                enqueued_cpu = _Cpu([*cpu.groups, beat.process.pid], database, bench_url)
                enqueue_base_cpu = _Cpu(bare_groups, database, bench_url)
                enqueue_base_rates, enqueued_rates = _alternate(
                    plan,
                    "enqueue",
                    bare,
                    enqueue_base_cpu,
                    lambda: enqueued.throughput(plan.windows),
                    enqueued_cpu,
                )
        bare_sender.close()
        sender.close()
    store.dispose()

    ratio = median(rates) / median(base_rates)
    note = (
        f"{plan.windows} windows per run, {plan.runs} runs; one worker per stage queue + "
        f"control, prefork -c {CONCURRENCY}"
    )
    enqueued_ratio = median(enqueued_rates) / median(enqueue_base_rates)
    rows = [
        Row(
            "1. orchestration",
            "windows/s, `windowpipe enqueue` + beat (headline)",
            median(enqueued_rates),
            median(enqueue_base_rates),
            enqueued_ratio,
            f">= {TARGET_RATIO}x",
            enqueued_ratio >= TARGET_RATIO,
            enqueued_rates,
            enqueue_base_rates,
            f"{plan.windows} windows per `windowpipe enqueue`, {plan.runs} runs, caps "
            f"max_active_windows = max_backfill_windows = {ENQUEUE_CAP}, beat running, records, "
            "source and target on PostgreSQL; rate from the records (first started_at to last "
            "finished_at); baseline: the bare chain, its runs alternating with these",
        ),
        Row(
            "1. orchestration",
            "windows/s (full chain)",
            median(rates),
            median(base_rates),
            ratio,
            f">= {TARGET_RATIO}x",
            ratio >= TARGET_RATIO,
            rates,
            base_rates,
            note,
        ),
    ]
    app_ratio = median(app_rates) / median(base_rates)
    rows.append(
        Row(
            "1. orchestration",
            "windows/s, no-op bodies in windowpipe's app (where the gap is)",
            median(app_rates),
            median(base_rates),
            app_ratio,
            "report",
            None,
            app_rates,
            base_rates,
            "the bare chain's four no-op tasks run by windowpipe's own app "
            "(`bench.noop_windowpipe_app`: `create_app` with its time limits, structured "
            "logging, liveness bootsteps and every windowpipe task registered); near 1.0x means "
            "windowpipe's Celery plumbing costs what bare Celery does and the gap is the stage "
            f"work; CPU ms per window {median(app_cpu.total_ms):.1f} vs "
            f"{median(base_cpu.total_ms):.1f}, idle p50 "
            f"{percentile(app_latencies, 0.5) * 1000:.0f} vs "
            f"{percentile(base_latencies, 0.5) * 1000:.0f} ms",
        )
    )
    cpu_names = [*layout, "beat"]
    cpu_note = (
        "CPU (user + system, from /proc) of the worker processes and their pool children, "
        "plus the PostgreSQL backends of the bench database (but the bench's own), over the "
        "throughput runs, per window; Redis not counted; the bare chain's runs alternate with "
        "windowpipe's"
    )
    for label, ours, base in (
        ("`windowpipe enqueue` + beat", enqueued_cpu, enqueue_base_cpu),
        ("chains", cpu, base_cpu),
    ):
        ratio_cpu = median(ours.total_ms) / median(base.total_ms)
        rows.append(
            Row(
                "1. orchestration",
                f"CPU ms per window, {label}",
                median(ours.total_ms),
                median(base.total_ms),
                ratio_cpu,
                "report",
                None,
                ours.total_ms,
                base.total_ms,
                f"{cpu_note}; workers alone {median(ours.workers_ms):.1f} vs "
                f"{median(base.workers_ms):.1f} ms; by worker ({ours.split(cpu_names)}) vs "
                f"({base.split(cpu_names)})",
            )
        )
    for name, fraction in (("p50", 0.5), ("p95", 0.95)):
        ours_ms = percentile(latencies, fraction) * 1000
        theirs_ms = percentile(base_latencies, fraction) * 1000
        rows.append(
            Row(
                "1. orchestration",
                f"idle latency {name} (ms)",
                ours_ms,
                theirs_ms,
                ours_ms / theirs_ms,
                f"<= {LATENCY_TARGET_RATIO}x" if name == "p50" else "report",
                ours_ms / theirs_ms <= LATENCY_TARGET_RATIO if name == "p50" else None,
                note=f"{plan.latency_samples} single windows on idle workers",
            )
        )
    return rows
