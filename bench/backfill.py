"""6. Backfill beside live: does a 10,000-window backfill delay live windows?

Live pipelines with 1-minute windows (a few documents each; SQL source on PostgreSQL -> local
stage -> SQL target in a SQLite file per pipeline; window records on PostgreSQL) are generated
by a real `celery beat` every 10 s and run by real `celery -A workers worker` subprocesses, one
per stage queue plus control, prefork `-c 2`. Three phases on the same workers and beat:

1. live alone: each live window's delay from due (end + lag) to succeeded (`finished_at`);
2. live beside two backfills started with `windowpipe enqueue` (what users do): 10,000 windows
   of another pipeline (`archive`) and 10,000 windows of live pipeline 0's own history, on the
   same workers and queues; the same delays, and the backfills' rate from the records;
3. backfill alone: beat stopped (no live windows), the same two backfills' rate; it is taken
   in slices beside | alone, alone | beside (beat stopped, then started again), so a machine
   getting busier or quieter during the run favours neither side.

Between 1 and 2, live beside a recheck backlog: live pipeline 1 has recheck horizons (`1h`, `1d`,
`7d`) from the start, and a recheck worker (`-Q recheck`, as in compose and Kubernetes) runs
beside the others throughout; beat sends `windowpipe.recheck` for it every tick. At the start of
the phase 10,000 succeeded windows of its own history (the week before the live windows) are
written straight into the state store, each past its horizons and due, as if `recheck` had just
been added to a pipeline with that history. Ten of them, among the oldest, record one document
fewer than the source holds, so those rechecks find drift and re-run through the normal chain
beside the live windows. The same live delays are measured, and the rechecks done from the
records (`checked_at`). The recheck worker is stopped after the phase so what is left of the
backlog does not run under the backfill phases.

One live pipeline gives one window a minute, so several run at once for enough samples (their
lags, 1, 3, 5, 7, 9 s, spread their due instants over the tick). A live window's delay is the
wait for the next tick plus the time from that tick to succeeded (control queue, generation,
dispatch, stage queues, work: what a backfill can slow). The wait for the tick depends on where
beat's ticks fall against the minute, which no backfill changes; yet with 5 pipelines its
median moved by up to 2 s from one phase to the next (beat drifts ~10 ms a tick, and a tick sent
just before a window is due can run late enough to create it). So the tick each window could
have been created by is read from beat's log, and the delay is reported for a window due at a
uniformly random instant between two ticks (a wait uniform on 0-10 s plus the measured time
after the tick), the delay a user sees over time; the delays as measured are in the notes.

`python -m bench.backfill --cap N` runs this benchmark alone with another `max_backfill_windows`
and prints its rows (how the cap was chosen: docs/BENCHMARKS.md); `--recheck-only` runs live
alone and beside the recheck backlog only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import (
    REPO,
    STAGE_QUEUES,
    Beat,
    Row,
    Workers,
    log,
    percentile,
    pg_database,
    redis_db,
    run_lines,
    schema_url,
    table_lines,
    write_config,
)
from core.config import PipelineConfig
from core.instants import format_instant
from core.records import WindowKind, WindowStatus
from core.store import StateStore
from core.store.schema import WINDOWS
from core.windows import Window, align_down

BENCHMARK = "6. backfill"
WINDOW = timedelta(minutes=1)
TICK_SECONDS = 10
"""Beat's `every` for the live pipelines."""
BACKFILL_WINDOWS = 10_000
"""Windows in each of the two backfills."""
WARM_WINDOWS = 8
"""Windows per pipeline run before measuring, so every pool process has its connectors."""
DOCS_PER_MINUTE = 3
CONCURRENCY = 2
"""Pool size of each worker (one per stage queue plus control)."""
P95_GOAL = 1.1
"""Live p95 delay beside the backfills <= this times the p95 alone."""
RATE_GOAL = 0.8
"""Backfill rate beside live >= this fraction of its rate alone."""
ARCHIVE = "archive"
"""The other pipeline, backfilled only (its own generation runs hourly)."""
PG_CONNECTIONS_NOTE = (
    "each worker pool process holds a connection pool per pipeline and role, so PostgreSQL "
    "connections grow as processes x pipelines x roles; 11 pipelines with PostgreSQL source "
    "and target reached the server's max_connections (100) here"
)
"""Why the live pipelines are few and their targets are SQLite files."""
DEFAULT_CAP: int = PipelineConfig.model_fields["max_backfill_windows"].default
"""`max_backfill_windows` when the config says nothing."""
RECHECK_PIPELINE = "live1"
"""The live pipeline with recheck horizons whose history is the recheck backlog."""
RECHECK_HORIZONS = {"1h": timedelta(hours=1), "1d": timedelta(days=1), "7d": timedelta(days=7)}
RECHECK_WINDOWS = 10_000
"""Succeeded windows of its history seeded due for a recheck."""
RECHECK_SHIFT = timedelta(minutes=70)
"""The backlog starts this long before the backfill range (and ends as long before the live
windows), so even its newest window is older than the first horizon during the phase."""
RECHECK_DRIFT_EVERY = 100
RECHECK_DRIFTED = 10
"""Every `RECHECK_DRIFT_EVERY`-th of the oldest windows, `RECHECK_DRIFTED` in all, records one
document fewer than the source holds: their recheck finds drift and re-runs them."""
RECHECK_CAP: int = PipelineConfig.model_fields["max_rechecks_per_tick"].default
"""`max_rechecks_per_tick` when the config says nothing."""


@dataclass
class Plan:
    live_pipelines: int
    """Live pipelines (divides 10, so their lags cover the tick evenly)."""
    live_seconds: float
    """Length of each live phase (alone, then beside the backfills)."""
    rate_slice_seconds: float
    """The backfill rate is taken over slices of this length: beside live (the end of the
    live phase), alone twice (beat stopped), beside live again (beat started)."""
    cap: int
    """`max_backfill_windows` of every pipeline."""
    backfills: tuple[str, ...] = ("archive", "live0")
    """The pipelines backfilled: another one, and live pipeline 0 itself."""
    recheck: bool = True
    """Measure live windows beside the recheck backlog (between alone and the backfills)."""
    recheck_cap: int = RECHECK_CAP
    """`max_rechecks_per_tick` of the recheck pipeline."""
    backfill: bool = True
    """Measure the backfill phases."""


PLANS = {
    "full": Plan(live_pipelines=5, live_seconds=150, rate_slice_seconds=45, cap=DEFAULT_CAP),
    "quick": Plan(live_pipelines=5, live_seconds=40, rate_slice_seconds=15, cap=DEFAULT_CAP),
}


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    delays: list[float] = field(default_factory=list)
    """Live windows: seconds from due to succeeded, as measured."""
    tick_waits: list[float] = field(default_factory=list)
    """Live windows: seconds from due to beat sending the tick that could create them."""
    after_tick: list[float] = field(default_factory=list)
    """Live windows: seconds from that tick to succeeded (control queue, generation, dispatch,
    the four stage queues and the work)."""
    finished: dict[str, int] = field(default_factory=dict)
    """Backfill windows finished during the phase's rate slices, per pipeline."""
    seconds: float = 0.0
    """Length of the phase's rate slices together."""

    rechecked: int = 0
    """Recheck phase: windows of the backlog rechecked during it (`checked_at`)."""
    drifted: int = 0
    """Recheck phase: of those, the ones whose recheck found drift (re-run)."""
    reran: int = 0
    """Recheck phase: drifted windows whose re-run succeeded during it."""
    backlog_left: int = 0
    """Recheck phase: windows still due for a recheck at its end."""
    recheck_cpu: float = 0.0
    """Recheck phase: CPU seconds of the recheck worker (its pool included) during it."""
    seed_seconds: float = 0.0
    """Recheck phase: time to write the backlog's records."""

    @property
    def rate(self) -> float:
        """Backfill windows finished per second (every backfill together)."""
        return sum(self.finished.values()) / self.seconds if self.seconds else 0.0

    def rates(self) -> str:
        return ", ".join(f"{k} {v / self.seconds:.1f}/s" for k, v in self.finished.items())


@dataclass
class _Setup:
    store: StateStore
    config_path: Path
    env: dict[str, str]
    live: list[str]
    lags: dict[str, int]
    origin: datetime
    """Every pipeline's `start`: the warm-up windows, then the backfill range."""
    backfill_start: datetime
    frontier: datetime
    """The end of the seeded first scheduled window; the backfill range ends where it starts."""
    data_url: str
    state_url: str
    redis_url: str
    workdir: Path
    backfills: tuple[str, ...] = ()
    recheck_cap: int = RECHECK_CAP
    beat_log: Path = Path()
    """Beat's log: when each generation tick was sent."""
    peak_connections: int = 0
    """Most PostgreSQL connections to the bench database seen during the run."""

    def write_config(self, cap: int) -> None:
        pipelines = {
            name: self._pipeline(name, f"{self.lags[name]}s", f"{TICK_SECONDS}s", cap)
            for name in self.live
        }
        if RECHECK_PIPELINE in pipelines:
            pipelines[RECHECK_PIPELINE]["recheck"] = list(RECHECK_HORIZONS)
            pipelines[RECHECK_PIPELINE]["max_rechecks_per_tick"] = self.recheck_cap
        pipelines[ARCHIVE] = self._pipeline(ARCHIVE, "0s", "1h", cap)
        write_config(
            self.config_path,
            # A generation task per pipeline: the delays are read per pipeline from beat's log.
            {
                "redis_url": self.redis_url,
                "state_url": self.state_url,
                "log_level": "INFO",
                "generation_batch": 1,
            },
            pipelines,
        )

    def _pipeline(self, name: str, lag: str, every: str, cap: int) -> dict[str, Any]:
        return {
            "window": "1m",
            "start": format_instant(self.origin),
            "lag": lag,
            "every": every,
            "max_backfill_windows": cap,
            "source": {
                "type": "sql",
                "url": self.data_url,
                "table": "events",
                "timestamp_column": "created_at",
                "id_column": "id",
            },
            "staging": {"type": "local", "path": str(self.workdir / "backfill-staging" / name)},
            # SQLite target files: a PostgreSQL target would add a connection pool per pipeline
            # in every load and audit process (see PG_CONNECTIONS_NOTE).
            "target": {
                "type": "sql",
                "url": f"sqlite:///{self.workdir / f'{name}-target.db'}",
                "table": "loaded",
            },
        }


def _lags(count: int) -> list[int]:
    """Lags in seconds that spread `count` pipelines' due instants evenly over one tick."""
    return [1 + i * (TICK_SECONDS // count) for i in range(count)]


def _seed_events(url: str, first: datetime, last: datetime) -> None:
    """`DOCS_PER_MINUTE` documents a minute in [first, last), at even offsets in the minute."""
    engine = sa.create_engine(url)
    step = 60 // DOCS_PER_MINUTE
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
                "INSERT INTO events SELECT n, :first + n * (:step * interval '1 second') "
                "+ interval '1 second', 'event ' || n FROM generate_series(0, :last) n"
            ),
            {
                "first": first,
                "step": step,
                "last": int((last - first).total_seconds()) // step - 1,
            },
        )
    engine.dispose()


def seed_recheck_backlog(
    store: StateStore,
    pipeline: str,
    first: datetime,
    count: int,
    *,
    documents: int,
    drift_every: int = RECHECK_DRIFT_EVERY,
    drifted: int = RECHECK_DRIFTED,
) -> list[datetime]:
    """`count` succeeded 1-minute windows from `first`, written straight into the store as if
    they had run (all finished a minute after the last one's end, never rechecked), each
    recording `documents` source documents, except every `drift_every`-th of the oldest
    (`drifted` in all), which record one fewer: a recheck finds those drifted. One insert per
    1,000 windows and one update. Returns the starts of the drifted ones."""
    windows = [Window(first + i * WINDOW, first + (i + 1) * WINDOW) for i in range(count)]
    created = store.create_windows(pipeline, windows, kind=WindowKind.SCHEDULED)
    if len(created) != count:
        raise RuntimeError(f"{pipeline}: {count - len(created)} backlog windows existed already")
    short = [windows[i].start for i in range(0, min(count, drift_every * drifted), drift_every)]
    recorded = sa.case((WINDOWS.c.window_start.in_(short), documents - 1), else_=documents)
    finished = windows[-1].end + WINDOW
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(WINDOWS)
            .where(
                WINDOWS.c.pipeline == pipeline,
                WINDOWS.c.window_start >= windows[0].start,
                WINDOWS.c.window_start <= windows[-1].start,
            )
            .values(
                status=WindowStatus.SUCCEEDED.value,
                stage="audit",
                attempts=1,
                fence=4,
                source_count=recorded,
                staged_count=recorded,
                target_count=recorded,
                started_at=finished - timedelta(seconds=1),
                finished_at=finished,
                updated_at=finished,
                rechecks_done=0,
            )
        )
    return short


def _prepare(plan: Plan, database_url: str, redis_url: str, workdir: Path, now: datetime) -> _Setup:
    data_url = schema_url(database_url, "backfill")
    state_url = schema_url(database_url, "backfill_state")
    frontier = now.replace(second=0, microsecond=0) - WINDOW
    backfill_start = frontier - WINDOW - BACKFILL_WINDOWS * WINDOW
    # The recheck backlog ends a horizon (1h) and a bit before the live windows: all of it due.
    origin = backfill_start - RECHECK_SHIFT - WARM_WINDOWS * WINDOW
    # Documents up to well past the end of the run: live windows find them once due.
    _seed_events(data_url, origin, frontier + timedelta(hours=1))
    live = [f"live{i}" for i in range(plan.live_pipelines)]
    setup = _Setup(
        store=StateStore(state_url),
        config_path=workdir / "backfill.toml",
        env={},
        live=live,
        lags=dict(zip(live, _lags(plan.live_pipelines), strict=True)),
        origin=origin,
        backfill_start=backfill_start,
        frontier=frontier,
        data_url=data_url,
        state_url=state_url,
        redis_url=redis_url,
        workdir=workdir,
    )
    setup.env = {
        "WINDOWPIPE_CONFIG": str(setup.config_path),
        "WINDOWPIPE_HEARTBEAT_FILE": str(workdir / "%n.heartbeat"),
    }
    setup.backfills = plan.backfills
    setup.recheck_cap = plan.recheck_cap
    setup.write_config(plan.cap)
    setup.store.migrate()
    # The live pipelines start now: one scheduled window just before now makes generation
    # go on from there, while the 10,000 windows before it are left for the backfill.
    for name in [*live, ARCHIVE]:
        setup.store.create_windows(
            name, [Window(frontier - WINDOW, frontier)], kind=WindowKind.SCHEDULED
        )
    return setup


_CLI = (
    ("-m", "windowpipe")
    if (REPO / "windowpipe" / "__main__.py").exists()
    else ("-m", "core.cli")  # before the CLI moved to windowpipe/
)
"""How to run the `windowpipe` command with this interpreter."""


def _enqueue(
    setup: _Setup, ranges: Sequence[tuple[str, datetime, datetime]], wait: bool = False
) -> None:
    """`windowpipe enqueue` of each (pipeline, start, end), all at once; with `wait`, until
    every window finished."""
    processes = []
    for pipeline, start, end in ranges:
        command = [
            *(sys.executable, *_CLI, "enqueue", pipeline),
            *("--start", format_instant(start), "--end", format_instant(end)),
            *(("--wait", "--timeout", "300") if wait else ()),
        ]
        processes.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env={**os.environ, **setup.env, "PYTHONPATH": str(REPO)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for process in processes:
        output, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"windowpipe enqueue failed: {output.decode(errors='replace')}")
        log(f"backfill: {output.decode(errors='replace').strip()}")


def _live_records(setup: _Setup, before: datetime) -> dict[str, list[Any]]:
    """Scheduled records of each live pipeline whose window is due before `before`."""
    return {
        name: [
            r
            for r in setup.store.list_records(
                name, kind=WindowKind.SCHEDULED, start=setup.frontier - WINDOW
            )
            if r.window_end + timedelta(seconds=setup.lags[name]) < before
        ]
        for name in setup.live
    }


def _await_live(setup: _Setup, before: datetime, timeout: float = 180) -> None:
    """Wait until every live window due before `before` exists and has finished."""
    deadline = time.monotonic() + timeout
    while True:
        pending = []
        for name, records in _live_records(setup, before).items():
            lag = timedelta(seconds=setup.lags[name])
            last_end = align_down(before - lag - timedelta(microseconds=1), setup.origin, WINDOW)
            if not records or records[-1].window_end < last_end:
                pending.append(f"{name}: window ending {format_instant(last_end)} not created")
            pending += [
                f"{name} {format_instant(r.window_start)} {r.status.value}"
                for r in records
                if r.finished_at is None
            ]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"live windows did not finish: {pending[:5]}")
        time.sleep(0.5)


def _await_scheduled_idle(setup: _Setup, timeout: float = 120) -> None:
    """Wait until no scheduled window of any pipeline is pending, queued or running."""
    deadline = time.monotonic() + timeout
    waiting = ("pending", "queued", "running")
    while True:
        busy = [
            r
            for name in [*setup.live, ARCHIVE]
            for r in setup.store.list_records(
                name, kind=WindowKind.SCHEDULED, start=setup.frontier - WINDOW
            )
            if r.status.value in waiting
        ]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"scheduled windows still active: {busy[:5]}")
        time.sleep(0.5)


SENT_TICK = re.compile(r"Sending due task generate:(?P<pipeline>[\w.-]+)")
PLAIN_TIMESTAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def _beat_sends(log_path: Path) -> dict[str, list[datetime]]:
    """When beat sent each pipeline's generation task, from its log (JSON or plain lines)."""
    sends: dict[str, list[datetime]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        match = SENT_TICK.search(line)
        if match is None:
            continue
        if line.startswith("{"):
            stamp = datetime.fromisoformat(json.loads(line)["timestamp"].replace("Z", "+00:00"))
        else:
            plain = PLAIN_TIMESTAMP.match(line)
            if plain is None:
                continue
            stamp = datetime.strptime(plain.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
        sends.setdefault(match.group("pipeline"), []).append(stamp)
    return sends


def _tick_of(sends: Sequence[datetime], due: datetime, created: datetime) -> datetime:
    """The earliest tick that could have created a window: the first sent after it was due
    (later if that tick waited too long on the control queue and expired), or an earlier one
    that ran after it was due and did create it."""
    first_after_due = next((t for t in sends if t >= due), None)
    last_before_created = max((t for t in sends if t <= created), default=None)
    ticks = [t for t in (first_after_due, last_before_created) if t is not None]
    if not ticks:
        raise RuntimeError(f"no tick sent before a window created at {format_instant(created)}")
    return min(ticks)


def _live_samples(setup: _Setup, phase: Phase, since: datetime, before: datetime) -> None:
    """Delays of the live windows due in [since, before) (all finished: `_await_live`)."""
    sends = _beat_sends(setup.beat_log)
    for name, records in _live_records(setup, before).items():
        lag = timedelta(seconds=setup.lags[name])
        for record in records:
            due = record.window_end + lag
            if due < since:
                continue
            if record.status.value not in ("succeeded", "skipped"):
                raise RuntimeError(f"live window {name} {record.window_start}: {record.status}")
            assert record.finished_at is not None and record.created_at is not None
            tick = _tick_of(sends.get(name, []), due, record.created_at)
            phase.delays.append((record.finished_at - due).total_seconds())
            phase.tick_waits.append((tick - due).total_seconds())
            phase.after_tick.append((record.finished_at - tick).total_seconds())


def uniform_tick_quantile(after_tick: Sequence[float], fraction: float, tick: float) -> float:
    """The `fraction` quantile of the delay from due to succeeded of a window due at a random
    instant between two ticks: U + A, U uniform on [0, tick) and A one of `after_tick`.

    What a live window sees over time whatever the phase of beat: the measured delays
    themselves depend on where beat's ticks happen to fall against the minute. A window created
    by a tick sent before it was due counts the time from that tick, so a slow control queue
    makes this estimate longer, never shorter.
    """
    low, high = min(after_tick), max(after_tick) + tick
    for _ in range(60):
        middle = (low + high) / 2
        below = sum(min(max((middle - a) / tick, 0.0), 1.0) for a in after_tick)
        if below / len(after_tick) < fraction:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _count_backfill(setup: _Setup, phase: Phase, since: datetime, before: datetime) -> None:
    """Add the backfill windows finished in [since, before) to `phase`'s rate."""
    query = sa.text(
        "SELECT pipeline, count(*) FROM windows WHERE kind = 'manual' AND window_start >= :first "
        "AND finished_at >= :since AND finished_at < :before GROUP BY pipeline"
    )
    with setup.store.engine.connect() as conn:
        rows = conn.execute(
            query, {"first": setup.backfill_start, "since": since, "before": before}
        ).all()
    counts: dict[str, int] = {str(pipeline): int(count) for pipeline, count in rows}
    phase.seconds += (before - since).total_seconds()
    for name in setup.backfills:
        phase.finished[name] = phase.finished.get(name, 0) + counts.get(name, 0)


def _now() -> datetime:
    return datetime.now(UTC)


def _sleep_until(setup: _Setup, instant: datetime) -> None:
    """Sleep until `instant`, counting this database's PostgreSQL connections every 5 s."""
    while (left := (instant - _now()).total_seconds()) > 0:
        with setup.store.engine.connect() as conn:
            count = conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
            ).scalar_one()
        setup.peak_connections = max(setup.peak_connections, int(count))
        time.sleep(min(5.0, max(0.0, left)))


def _phase_log(phase: Phase) -> None:
    parts = [f"backfill {phase.name}"]
    if phase.delays:
        parts.append(
            f"{len(phase.delays)} live windows, due->succeeded p50 "
            f"{uniform_tick_quantile(phase.after_tick, 0.5, TICK_SECONDS):.2f}s p95 "
            f"{uniform_tick_quantile(phase.after_tick, 0.95, TICK_SECONDS):.2f}s for a uniform "
            f"tick phase (measured p50 {percentile(phase.delays, 0.5):.2f}s p95 "
            f"{percentile(phase.delays, 0.95):.2f}s), after the tick p50 "
            f"{percentile(phase.after_tick, 0.5):.2f}s p95 "
            f"{percentile(phase.after_tick, 0.95):.2f}s, tick wait p50 "
            f"{percentile(phase.tick_waits, 0.5):.2f}s"
        )
    if phase.finished:
        parts.append(f"backfill {phase.rate:.1f} windows/s over {phase.seconds:.0f}s")
    log("; ".join(parts))


@dataclass
class Measured:
    """What the phases measured (None: the phase did not run)."""

    alone: Phase
    beside: Phase | None = None
    """Live beside the backfills (and their rate, in slices)."""
    solo: Phase | None = None
    """The backfills alone."""
    recheck: Phase | None = None
    """Live beside the recheck backlog."""


def _group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes in process group `pgid`."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp; utime and stime follow at 11, 12
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def _tally_rechecks(setup: _Setup, phase: Phase, since: datetime, before: datetime) -> None:
    """The backlog's windows rechecked in [since, before), drifted, and re-run since."""
    backlog = (
        (WINDOWS.c.pipeline == RECHECK_PIPELINE)
        & (WINDOWS.c.window_start >= setup.backfill_start - RECHECK_SHIFT)
        & (WINDOWS.c.window_end <= setup.frontier - WINDOW - RECHECK_SHIFT)
    )
    checked = (WINDOWS.c.checked_at >= since) & (WINDOWS.c.checked_at < before)
    drifted = checked & WINDOWS.c.drift.is_not(None)
    reran = drifted & (WINDOWS.c.status == WindowStatus.SUCCEEDED.value)
    reran = reran & (WINDOWS.c.finished_at < before)
    query = sa.select(
        *(sa.func.count().filter(condition) for condition in (checked, drifted, reran))
    ).where(backlog)
    with setup.store.engine.connect() as conn:
        row = conn.execute(query).one()
    phase.rechecked, phase.drifted, phase.reran = (int(value) for value in row)
    phase.seconds = (before - since).total_seconds()
    phase.backlog_left = setup.store.count_due_rechecks(
        RECHECK_PIPELINE, list(RECHECK_HORIZONS.values()), before
    )


def _await_reruns(setup: _Setup, timeout: float = 180) -> None:
    """Wait until no manual window of the recheck pipeline is pending, queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        busy = setup.store.list_records(
            RECHECK_PIPELINE,
            kind=WindowKind.MANUAL,
            statuses=[WindowStatus.PENDING, WindowStatus.QUEUED, WindowStatus.RUNNING],
        )
        if not busy:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"re-runs of drifted windows did not finish: {busy[:5]}")
        time.sleep(0.5)


def _recheck_phase(setup: _Setup, plan: Plan, rechecker: Workers, phase: Phase) -> None:
    """Live windows beside the recheck backlog, seeded at the phase's start."""
    pgid = rechecker.processes[0].pid
    cpu_before = _group_cpu(pgid)
    began = _now()
    seeding = time.monotonic()
    drifted = seed_recheck_backlog(
        setup.store,
        RECHECK_PIPELINE,
        setup.backfill_start - RECHECK_SHIFT,
        RECHECK_WINDOWS,
        documents=DOCS_PER_MINUTE,
    )
    phase.seed_seconds = time.monotonic() - seeding
    log(
        f"recheck: seeded {RECHECK_WINDOWS:,} succeeded windows of {RECHECK_PIPELINE} due for "
        f"a recheck ({len(drifted)} drifted) in {phase.seed_seconds:.1f}s"
    )
    end = began + timedelta(seconds=plan.live_seconds)
    _sleep_until(setup, end)
    phase.recheck_cpu = _group_cpu(pgid) - cpu_before
    _tally_rechecks(setup, phase, began, end)
    _await_live(setup, end)
    _live_samples(setup, phase, began, end)
    _phase_log(phase)
    log(
        f"recheck: {phase.rechecked:,} windows rechecked in {phase.seconds:.0f}s "
        f"({phase.rechecked / phase.seconds:.1f}/s), {phase.drifted} drifted, {phase.reran} "
        f"re-run, {phase.backlog_left:,} still due; recheck worker CPU {phase.recheck_cpu:.1f}s"
    )


def measure(plan: Plan, database_url: str, redis_url: str, workdir: Path) -> Measured:
    """Run the phases: live alone, beside the recheck backlog, beside the backfills, and the
    backfills alone."""
    setup = _prepare(plan, database_url, redis_url, workdir, _now())
    workers = Workers("workers", workdir, setup.env)
    rechecker = Workers("workers", workdir, setup.env)
    beat = Beat("workers", workdir, setup.env)
    measured = Measured(Phase("live alone"))
    alone = measured.alone
    try:
        setup.beat_log = beat.log_path
        workers.start([*STAGE_QUEUES, "control"], CONCURRENCY)
        if plan.recheck:
            rechecker.start(["recheck"], CONCURRENCY)
        log(f"backfill: warm-up, {WARM_WINDOWS} windows of each pipeline")
        warm = setup.origin + WARM_WINDOWS * WINDOW
        _enqueue(setup, [(name, setup.origin, warm) for name in [*setup.live, ARCHIVE]], True)
        beat.start()
        # The first tick after beat starts catches up; measure from the one after.
        began = _now() + timedelta(seconds=2 * TICK_SECONDS)
        _sleep_until(setup, began)
        end = began + timedelta(seconds=plan.live_seconds)
        _sleep_until(setup, end)
        _await_live(setup, end)
        _live_samples(setup, alone, began, end)
        _phase_log(alone)

        if plan.recheck:
            measured.recheck = Phase("live beside the recheck backlog")
            _recheck_phase(setup, plan, rechecker, measured.recheck)
            # What is left of the backlog must not run under the backfill phases.
            rechecker.stop()
            _await_reruns(setup)
        if not plan.backfill:
            return measured

        beside = measured.beside = Phase("live beside the backfills")
        solo = measured.solo = Phase("backfill alone")
        # Live windows due from the moment the enqueue starts count as beside the backfill.
        began = _now()
        log(f"backfill: enqueue {BACKFILL_WINDOWS:,} windows of {', '.join(plan.backfills)}")
        backfill_end = setup.frontier - WINDOW
        _enqueue(setup, [(n, setup.backfill_start, backfill_end) for n in plan.backfills])
        end = began + timedelta(seconds=plan.live_seconds)
        _sleep_until(setup, end)
        _await_live(setup, end)
        _live_samples(setup, beside, began, end)

        # The backfill rate beside live and alone, in slices: beside | alone, alone | beside,
        # symmetric in time, so a machine getting busier or quieter favours neither side.
        rate_slice = timedelta(seconds=plan.rate_slice_seconds)
        _count_backfill(setup, beside, end - rate_slice, end)
        beat.stop()
        _await_scheduled_idle(setup)  # live windows already queued finish first
        began = _now()
        _sleep_until(setup, began + 2 * rate_slice)
        _count_backfill(setup, solo, began, _now())
        beat.start()
        began = _now()
        _sleep_until(setup, began + rate_slice)
        _count_backfill(setup, beside, began, _now())
        _phase_log(beside)
        _phase_log(solo)
        return measured
    finally:
        log(f"backfill: at most {setup.peak_connections} PostgreSQL connections seen")
        beat.stop()
        rechecker.stop()
        workers.stop()
        setup.store.dispose()


def rows_from(plan: Plan, result: Measured) -> list[Row]:
    alone = result.alone
    rows = [] if result.recheck is None else _recheck_rows(plan, alone, result.recheck)
    if result.beside is None or result.solo is None:
        return rows
    beside, solo = result.beside, result.solo
    cap = f"backfill cap {plan.cap}"
    samples = f"{len(beside.delays)} live windows beside, {len(alone.delays)} alone"
    lags = ", ".join(str(lag) for lag in _lags(plan.live_pipelines))
    setup_note = (
        f"{plan.live_pipelines} live pipelines (1m windows, lags {lags}s, tick every "
        f"{TICK_SECONDS}s, {DOCS_PER_MINUTE} docs/min) beside "
        f"{('one', 'two')[len(plan.backfills) - 1]} {BACKFILL_WINDOWS:,}-window "
        f"`windowpipe enqueue` backfills ({' and '.join(plan.backfills)}), each capped at "
        f"{plan.cap} in flight; one worker per stage queue + control, prefork -c "
        f"{CONCURRENCY}; {plan.live_seconds:.0f}s per live phase"
        + ("; the recheck worker (idle during live alone) stopped first" if plan.recheck else "")
    )
    for name, fraction, goal in (("p50", 0.5, None), ("p95", 0.95, P95_GOAL)):
        ours = uniform_tick_quantile(beside.after_tick, fraction, TICK_SECONDS)
        theirs = uniform_tick_quantile(alone.after_tick, fraction, TICK_SECONDS)
        measured = (
            f"measured {percentile(beside.delays, fraction):.2f}s beside vs "
            f"{percentile(alone.delays, fraction):.2f}s alone, median tick wait "
            f"{percentile(beside.tick_waits, 0.5):.2f}s vs {percentile(alone.tick_waits, 0.5):.2f}s"
        )
        rows.append(
            Row(
                BENCHMARK,
                f"live delay due->succeeded {name} (s), {cap}",
                ours,
                theirs,
                ours / theirs,
                f"<= {goal}x" if goal else "report",
                ours / theirs <= goal if goal else None,
                note=(
                    f"{samples}; the delay after the tick plus a wait for the tick uniform on "
                    f"0-{TICK_SECONDS}s ({measured})" + (f"; {setup_note}" if goal else "")
                ),
            )
        )
    for name, fraction in (("p50", 0.5), ("p95", 0.95)):
        ours = percentile(beside.after_tick, fraction)
        theirs = percentile(alone.after_tick, fraction)
        rows.append(
            Row(
                BENCHMARK,
                f"live delay tick->succeeded {name} (s), {cap}",
                ours,
                theirs,
                ours / theirs,
                "report",
                None,
                note=(
                    f"{samples}; from beat sending the tick that could create the window: "
                    "control queue, generation, dispatch, stage queues and work"
                ),
            )
        )
    ratio = beside.rate / solo.rate if solo.rate else 0.0
    rows.append(
        Row(
            BENCHMARK,
            f"backfill windows/s beside live, {cap}",
            beside.rate,
            solo.rate,
            ratio,
            f">= {RATE_GOAL}x",
            ratio >= RATE_GOAL,
            note=(
                f"backfills together, from finished_at: {beside.seconds:.0f}s beside "
                f"({beside.rates()}), {solo.seconds:.0f}s alone with beat stopped "
                f"({solo.rates()}), in slices beside | alone, alone | beside"
            ),
        )
    )
    return rows


def _recheck_rows(plan: Plan, alone: Phase, phase: Phase) -> list[Row]:
    cap = f", max_rechecks_per_tick {plan.recheck_cap}" if plan.recheck_cap != RECHECK_CAP else ""
    label = f"beside a {RECHECK_WINDOWS:,}-window recheck backlog{cap}"
    samples = f"{len(phase.delays)} live windows beside, {len(alone.delays)} alone"
    ceiling = plan.recheck_cap / TICK_SECONDS
    setup_note = (
        f"the backlog: {RECHECK_WINDOWS:,} succeeded windows of {RECHECK_PIPELINE}'s own history "
        f"(recheck = {list(RECHECK_HORIZONS)}), written into the state store at the phase's start "
        f"({phase.seed_seconds:.1f}s), each due; {RECHECK_DRIFTED} of the oldest record one "
        "document fewer than the source holds, so their recheck finds drift and re-runs them "
        "through the normal chain; a recheck worker (-Q recheck, prefork -c "
        f"{CONCURRENCY}) beside the stage and control workers, beat sending windowpipe.recheck "
        f"every {TICK_SECONDS}s, max_rechecks_per_tick {plan.recheck_cap}"
        + (" (the default); " if plan.recheck_cap == RECHECK_CAP else "; ")
        + f"{plan.live_seconds:.0f}s per live phase, the same {plan.live_pipelines} live "
        "pipelines as the backfill rows"
    )
    rows = []
    for name, fraction, goal in (("p50", 0.5, None), ("p95", 0.95, P95_GOAL)):
        ours = uniform_tick_quantile(phase.after_tick, fraction, TICK_SECONDS)
        theirs = uniform_tick_quantile(alone.after_tick, fraction, TICK_SECONDS)
        measured = (
            f"measured {percentile(phase.delays, fraction):.2f}s beside vs "
            f"{percentile(alone.delays, fraction):.2f}s alone; after the tick "
            f"{percentile(phase.after_tick, fraction):.2f}s vs "
            f"{percentile(alone.after_tick, fraction):.2f}s"
        )
        rows.append(
            Row(
                BENCHMARK,
                f"live delay due->succeeded {name} (s), {label}",
                ours,
                theirs,
                ours / theirs,
                f"<= {goal}x" if goal else "report",
                ours / theirs <= goal if goal else None,
                note=(
                    f"{samples}; the delay after the tick plus a wait for the tick uniform on "
                    f"0-{TICK_SECONDS}s ({measured})" + (f"; {setup_note}" if goal else "")
                ),
            )
        )
    rate = phase.rechecked / phase.seconds if phase.seconds else 0.0
    rows.append(
        Row(
            BENCHMARK,
            f"recheck backlog windows rechecked/s beside live{cap}",
            rate,
            ceiling,
            rate / ceiling,
            "report",
            None,
            note=(
                f"baseline: the ceiling max_rechecks_per_tick / every = {plan.recheck_cap} / "
                f"{TICK_SECONDS}s; from checked_at: {phase.rechecked:,} of {RECHECK_WINDOWS:,} "
                f"rechecked in the {phase.seconds:.0f}s phase, {phase.drifted} found drifted "
                f"and {phase.reran} of those re-run to succeeded within it, "
                f"{phase.backlog_left:,} still due at its end; the recheck worker used "
                f"{phase.recheck_cpu:.1f}s of CPU ({phase.recheck_cpu / phase.seconds:.0%} of "
                "one core)"
            ),
        )
    )
    return rows


def run(
    quick: bool,
    database_url: str,
    redis_url: str,
    workdir: Path,
    cap: int | None = None,
    backfills: Sequence[str] = (),
    recheck: bool = True,
    backfill: bool = True,
    recheck_cap: int | None = None,
) -> list[Row]:
    plan = PLANS["quick" if quick else "full"]
    if cap is not None:
        plan = dataclasses.replace(plan, cap=cap)
    if backfills:
        plan = dataclasses.replace(plan, backfills=tuple(backfills))
    plan = dataclasses.replace(plan, recheck=recheck, backfill=backfill)
    if recheck_cap is not None:
        plan = dataclasses.replace(plan, recheck_cap=recheck_cap)
    return rows_from(plan, measure(plan, database_url, redis_url, workdir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backfill", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cap", type=int, help="max_backfill_windows (default: the config's)")
    parser.add_argument(
        "--backfill", nargs="+", choices=("archive", "live0"), help="backfill only these"
    )
    phases = parser.add_mutually_exclusive_group()
    phases.add_argument(
        "--recheck-only", action="store_true", help="live alone and beside the recheck backlog"
    )
    phases.add_argument("--no-recheck", action="store_true", help="skip the recheck backlog phase")
    parser.add_argument(
        "--recheck-cap", type=int, help="max_rechecks_per_tick (default: the config's)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    from core.logs import configure_logging

    configure_logging("WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="windowpipe-bench-"))
    try:
        with pg_database() as database_url, redis_db() as redis_url:
            rows = run(
                *(args.quick, database_url, redis_url, workdir, args.cap, args.backfill or ()),
                recheck=not args.no_recheck,
                backfill=not args.recheck_only,
                recheck_cap=args.recheck_cap,
            )
    finally:
        if args.keep:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join([*table_lines(rows), "", *run_lines(rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
