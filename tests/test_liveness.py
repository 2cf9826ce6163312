"""Liveness: a worker that cannot work is seen as dead and replaced, and control work has no
single consumer.

The integration tests run real Celery worker processes and a real beat on Redis, with a SQL
source and target on PostgreSQL. Workers are judged only by what an orchestrator sees: the
liveness probe (the very command docker-compose's healthcheck runs, read from
docker-compose.yml) and whether the process exited. A little supervisor kills (SIGKILL of the
process group) and restarts a worker on either signal, as autoheal or a Kubernetes
livenessProbe and a restart policy would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
import yaml

from core.control_runs import (
    CLEANUP_RAN_KEY,
    ControlActivity,
    LastRun,
    control_activity_lines,
    describe_activity,
    format_age,
    generate_ran_key,
    read_last_runs,
    record_run,
)
from core.instants import format_instant, parse_instant
from core.records import Stage, WindowRecord, WindowStatus
from tests.support import free_port, wait_until
from tests.support.deployment import REPO, Deployment, statuses
from tests.support.faults import PrivateRedis, TcpFaultProxy
from tests.test_faults import (
    ORIGIN,
    SIZE,
    deploy,
    loaded_ids,
    pipeline,
    seed_events,
    sql_source,
    sql_target,
    upstream_of,
    via_proxy,
    wait_until_busy,
)
from workers.liveness import HEARTBEAT_FILE_ENV, LivenessSettings, check_heartbeat, main

COMPOSE = REPO / "docker-compose.yml"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


# --- the probe, the settings and the status lines (no services) --------------------------------


@pytest.mark.parametrize(
    ("age", "max_age", "healthy"),
    [
        (0.0, 20, True),
        (19.9, 20, True),
        (20.1, 20, False),
        (3600, 20, False),
        (-5.0, 20, True),  # touched "in the future": clock skew, not a hang
    ],
)
def test_a_heartbeat_is_healthy_while_younger_than_max_age(
    tmp_path: Path, age: float, max_age: float, healthy: bool
) -> None:
    heartbeat = tmp_path / "hb"
    heartbeat.touch()
    touched = heartbeat.stat().st_mtime
    verdict = check_heartbeat(heartbeat, max_age, now=touched + age)
    assert verdict.healthy is healthy
    assert verdict.line.startswith("ok: " if healthy else "unhealthy: ")
    assert "\n" not in verdict.line


def test_a_missing_heartbeat_file_is_unhealthy(tmp_path: Path) -> None:
    verdict = check_heartbeat(tmp_path / "nope", 20, now=time.time())
    assert not verdict.healthy and "no heartbeat file" in verdict.line


def test_the_probe_exits_0_healthy_1_unhealthy_2_for_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    heartbeat = tmp_path / "hb"
    monkeypatch.delenv(HEARTBEAT_FILE_ENV, raising=False)
    assert main([str(heartbeat)]) == 1
    heartbeat.touch()
    assert main([str(heartbeat)]) == 0
    old = time.time() - 60
    os.utime(heartbeat, (old, old))
    assert main(["--max-age", "30", str(heartbeat)]) == 1
    assert main(["--max-age", "90", str(heartbeat)]) == 0
    monkeypatch.setenv(HEARTBEAT_FILE_ENV, str(heartbeat))
    assert main(["--max-age", "90"]) == 0  # the file the worker's variable names
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == [
        "unhealthy",
        "ok",
        "unhealthy",
        "ok",
        "ok",
    ]
    monkeypatch.delenv(HEARTBEAT_FILE_ENV)
    assert main([]) == 2
    assert main([str(tmp_path / "%n.heartbeat")]) == 2
    assert main(["--max-age", "0", str(heartbeat)]) == 2


def test_liveness_settings_come_from_the_environment_and_bad_values_name_the_variable() -> None:
    default = LivenessSettings.from_env({})
    assert default.heartbeat_interval == 2 and default.shutdown_timeout == 60
    assert default.heartbeat_path("control@host-1").name == "windowpipe-control@host-1.heartbeat"
    custom = LivenessSettings.from_env(
        {HEARTBEAT_FILE_ENV: "/run/hb/%n.%h", "WINDOWPIPE_RECONNECT_TIMEOUT": "7.5"}
    )
    assert custom.heartbeat_path("extract-2@box") == Path("/run/hb/extract-2.box")
    assert custom.reconnect_timeout == 7.5
    for name, value in (
        ("WINDOWPIPE_SHUTDOWN_TIMEOUT", "soon"),
        ("WINDOWPIPE_HEARTBEAT_INTERVAL", "0"),
        ("WINDOWPIPE_RECONNECT_TIMEOUT", "-1"),
    ):
        with pytest.raises(ValueError, match=name):
            LivenessSettings.from_env({name: value})


@pytest.mark.integration  # starts another program
def test_a_bad_liveness_variable_stops_a_worker_in_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WINDOWPIPE_CONFIG": str(REPO / "windowpipe.example.toml"),
        "SF_PASSWORD": "x",
        "S3_ACCESS_KEY_ID": "x",
        "S3_SECRET_ACCESS_KEY": "x",
        "WINDOWPIPE_SHUTDOWN_TIMEOUT": "a minute",
    }
    run = subprocess.run(
        [sys.executable, "-c", "import workers; workers.app"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "windowpipe: WINDOWPIPE_SHUTDOWN_TIMEOUT: expected seconds (a number), got 'a minute'"
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59.9, "59s"),
        (60, "1m"),
        (185, "3m 5s"),
        (3600, "1h"),
        (7800, "2h 10m"),
        (86400 * 3 + 3600 * 4, "3d 4h"),
        (-3, "0s"),
    ],
)
def test_ages_are_short(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


def test_status_lines_say_when_generation_and_cleanup_last_ran() -> None:
    activity = ControlActivity(
        cleanup=LastRun(NOW - timedelta(seconds=3), "control@b"),
        generation={
            "orders": LastRun(NOW - timedelta(seconds=12), "control@a"),
            "events": None,
        },
    )
    assert describe_activity(activity, NOW) == [
        "events: generation never ran (since Redis was last emptied); "
        "cleanup last ran 3s ago on control@b",
        "orders: generation last ran 12s ago on control@a; cleanup last ran 3s ago on control@b",
    ]


def test_status_lines_say_so_when_redis_cannot_be_read() -> None:
    lines = control_activity_lines(f"redis://127.0.0.1:{free_port()}/0", ["orders"], NOW)
    assert len(lines) == 1 and lines[0].startswith("control activity unknown: Redis: ")


@pytest.mark.integration
def test_run_records_are_read_back_per_pipeline(redis_db: str) -> None:
    client = redis.Redis.from_url(redis_db)
    record_run(client, CLEANUP_RAN_KEY, NOW, "control@b")
    record_run(client, generate_ran_key("orders"), NOW - timedelta(minutes=2), "control@a")
    client.hset(generate_ran_key("broken"), "at", "not an instant")
    activity = read_last_runs(client, ["orders", "events", "broken"])
    assert activity.cleanup == LastRun(NOW, "control@b")
    assert activity.generation == {
        "orders": LastRun(NOW - timedelta(minutes=2), "control@a"),
        "events": None,
        "broken": None,
    }


# --- helpers for real workers -------------------------------------------------------------------


@dataclass(frozen=True)
class Healthcheck:
    """docker-compose's worker healthcheck: the probe command (made to run with this
    interpreter) and the settings that decide when a worker is unhealthy."""

    command: list[str]
    max_age: float
    retries: int
    start_period: float


def compose_healthcheck() -> Healthcheck:
    """The healthcheck every worker service in docker-compose.yml runs (they all run the same)."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    checks = [body["healthcheck"] for name, body in services.items() if name.startswith("worker-")]
    assert checks and all(check == checks[0] for check in checks), checks
    check = checks[0]
    kind, program, *args = check["test"]
    assert (kind, program) == ("CMD", "python"), check["test"]
    return Healthcheck(
        command=[sys.executable, *args],
        max_age=float(args[args.index("--max-age") + 1]),
        retries=int(check["retries"]),
        start_period=float(check["start_period"].removesuffix("s")),
    )


def run_probe(check: Healthcheck, heartbeat: Path) -> subprocess.CompletedProcess[str]:
    """Run the healthcheck's command the way the container does: the heartbeat file comes from
    `WINDOWPIPE_HEARTBEAT_FILE`, the variable the worker reads too."""
    return subprocess.run(
        check.command,
        cwd=REPO,
        env={**os.environ, HEARTBEAT_FILE_ENV: str(heartbeat)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def heartbeat_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Each worker node's heartbeat file in `tmp_path/heartbeats`, named after the node."""
    return {HEARTBEAT_FILE_ENV: str(tmp_path / "heartbeats" / "%n.heartbeat"), **extra}


def heartbeat_of(tmp_path: Path, worker_name: str) -> Path:
    return tmp_path / "heartbeats" / f"{worker_name}.heartbeat"


def last_run(dep: Deployment, key: str) -> LastRun | None:
    client = dep.redis()
    try:
        activity = read_last_runs(client, [])
        if key == CLEANUP_RAN_KEY:
            return activity.cleanup
        pipeline_name = key.rsplit(":", 1)[1]
        return read_last_runs(client, [pipeline_name]).generation[pipeline_name]
    finally:
        client.close()


def log_lines(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def logged(path: Path, after: datetime, before: datetime) -> list[dict[str, Any]]:
    """The JSON log events of one worker between two instants."""
    return [e for e in log_lines(path) if after <= parse_instant(e["timestamp"]) <= before]


@dataclass
class Slot:
    """One supervised process: a worker of a queue (or beat), restarted under a new name."""

    name: str
    queue: str | None
    concurrency: int
    process: subprocess.Popen[bytes]
    node: str
    started: float
    healthy_once: bool = False
    failures: int = 0
    generation: int = 0


@dataclass(frozen=True)
class Restart:
    slot: str
    node: str
    reason: str
    at: datetime


@dataclass
class Supervisor:
    """Restarts processes the way an orchestrator does, from two signals only: the process
    exited, or (workers) the liveness probe failed `retries` times in a row once the start
    period is over (Docker's rules: a pass ends the start period). A restart is SIGKILL of the
    process group, then a new process of the same kind. Runs in a thread, probing every
    `period` seconds."""

    dep: Deployment
    check: Healthcheck
    workdir: Path
    period: float = 1.0
    slots: dict[str, Slot] = field(default_factory=dict)
    restarts: list[Restart] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def add_worker(self, name: str, queue: str, concurrency: int = 2) -> None:
        node = f"{name}-0"
        process = self.dep.spawn_worker(queue, concurrency, name=node)
        self.slots[name] = Slot(name, queue, concurrency, process, node, time.monotonic())

    def add_beat(self, name: str = "beat") -> None:
        node = f"{name}-0"
        process = self.dep.start_beat(node)
        self.slots[name] = Slot(name, None, 0, process, node, time.monotonic())

    def wait_all_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for slot in self.slots.values():
            if slot.queue is None:
                continue
            while run_probe(self.check, heartbeat_of(self.workdir, slot.node)).returncode != 0:
                assert slot.process.poll() is None, self.dep.log_path(slot.node).read_text()
                assert time.monotonic() < deadline, f"{slot.node} never became healthy"
                time.sleep(0.5)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def restarted(self) -> list[Restart]:
        with self._guard:
            return list(self.restarts)

    def node(self, slot: str) -> str:
        with self._guard:
            return self.slots[slot].node

    def _run(self) -> None:
        while not self._stop.is_set():
            for slot in list(self.slots.values()):
                if self._stop.is_set():
                    return
                self._check(slot)
            self._stop.wait(self.period)

    def _check(self, slot: Slot) -> None:
        code = slot.process.poll()
        if code is not None:
            self._restart(slot, f"exited with status {code}")
            return
        if slot.queue is None:
            return
        probe = run_probe(self.check, heartbeat_of(self.workdir, slot.node))
        if probe.returncode == 0:
            slot.healthy_once, slot.failures = True, 0
            return
        in_start_period = time.monotonic() - slot.started < self.check.start_period
        if in_start_period and not slot.healthy_once:
            return
        slot.failures += 1
        if slot.failures >= self.check.retries:
            self._restart(slot, f"probe: {probe.stdout.strip()}")

    def _restart(self, slot: Slot, reason: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(slot.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            slot.process.wait(timeout=30)
        with self._guard:
            self.restarts.append(Restart(slot.name, slot.node, reason, datetime.now(UTC)))
            slot.generation += 1
            slot.node = f"{slot.name}-{slot.generation}"
        if slot.queue is None:
            slot.process = self.dep.start_beat(slot.node)
        else:
            slot.process = self.dep.spawn_worker(slot.queue, slot.concurrency, name=slot.node)
        slot.started, slot.healthy_once, slot.failures = time.monotonic(), False, 0


def wait_settled(
    dep: Deployment, pipeline_name: str, expected: int, timeout: float
) -> list[WindowRecord]:
    """Wait until the pipeline's `expected` windows are all finished; beat and the control
    workers do the rest (nothing is kicked by the test)."""
    store = dep.store()
    deadline = time.monotonic() + timeout
    try:
        while True:
            records = store.list_records(pipeline_name)
            finished = (WindowStatus.SUCCEEDED, WindowStatus.SKIPPED, WindowStatus.DEAD)
            if len(records) >= expected and all(r.status in finished for r in records):
                return records
            assert time.monotonic() < deadline, f"not settled: {statuses(records)}"
            time.sleep(0.5)
    finally:
        store.dispose()


def lag_for(windows: int) -> str:
    """A lag under which exactly the first `windows` windows are due now (and for the next
    quarter of an hour), so beat's generation ticks create no more than those."""
    since = datetime.now(UTC) - (ORIGIN + windows * SIZE)
    return f"{int(since.total_seconds() // 60)}m"


def succeeded_count(dep: Deployment, pipeline_name: str) -> int:
    store = dep.store()
    try:
        return statuses(store.list_records(pipeline_name)).get("succeeded", 0)
    finally:
        store.dispose()


# --- 1. the probe compose runs, against a real worker -------------------------------------------


@pytest.mark.integration
def test_the_compose_healthcheck_passes_for_a_consuming_worker_and_fails_once_it_is_frozen(
    tmp_path: Path, redis_db: str, stop_all: list[Deployment]
) -> None:
    check = compose_healthcheck()
    dep = deploy(
        tmp_path,
        redis_db,
        {
            "events": pipeline(
                sql_source(f"sqlite:///{tmp_path}/source.db"),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(f"sqlite:///{tmp_path}/target.db"),
                1,
            )
        },
        env=heartbeat_env(tmp_path),
    )
    stop_all.append(dep)
    heartbeat = heartbeat_of(tmp_path, "control-a")
    assert run_probe(check, heartbeat).returncode == 1  # no worker yet: no heartbeat
    worker = dep.start_worker("control", 1, name="control-a")

    healthy = run_probe(check, heartbeat)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.startswith("ok: ") and healthy.stdout.count("\n") == 1
    # It really consumes: a cleanup sent now runs on it.
    dep.send("windowpipe.cleanup")
    deadline = time.monotonic() + 30
    while (ran := last_run(dep, CLEANUP_RAN_KEY)) is None:
        assert time.monotonic() < deadline, "the cleanup never ran"
        time.sleep(0.2)
    assert ran.worker.startswith("control-a@")

    os.killpg(worker.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    # A frozen worker cannot touch its file, so from max_age after the freeze on, every run of
    # the probe fails: that is the bound on detection, whatever the machine's load.
    time.sleep(check.max_age + 0.5)
    assert time.monotonic() - frozen_at > check.max_age
    hung = run_probe(check, heartbeat)
    assert hung.returncode == 1, hung.stdout
    assert hung.stdout.startswith("unhealthy: ") and "not consuming" in hung.stdout

    os.killpg(worker.pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while run_probe(check, heartbeat).returncode != 0:
        assert time.monotonic() < deadline, "the resumed worker never touched its file again"
        time.sleep(0.5)


# --- 2. a frozen control worker and a frozen stage worker --------------------------------------


@pytest.mark.integration
def test_frozen_control_and_stage_workers_are_restarted_from_the_probe_alone_while_the_other_control_worker_keeps_the_pipeline_moving(  # noqa: E501
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    windows = 40
    seeded = seed_events(pg_schema_url, [2 + index % 3 for index in range(windows)])
    check = compose_healthcheck()
    # 20 ms a round trip to the source, one row a page: extraction takes long enough to be
    # caught holding a window.
    with TcpFaultProxy(upstream_of(pg_schema_url), latency=0.02) as source_proxy:
        dep = deploy(
            tmp_path,
            redis_db,
            {
                "events": pipeline(
                    sql_source(via_proxy(pg_schema_url, source_proxy.port), page_size=1),
                    {"type": "local", "path": str(tmp_path / "staging")},
                    sql_target(pg_schema_url),
                    windows,
                    lag=lag_for(windows),
                    every="2s",
                    max_active_windows=4,
                    max_attempts=20,
                )
            },
            env=heartbeat_env(tmp_path),
            cleanup_every="2s",
        )
        stop_all.append(dep)
        supervisor = Supervisor(dep, check, tmp_path)
        for name, queue, concurrency in (
            ("control-a", "control", 1),
            ("control-b", "control", 1),
            ("precheck", "precheck", 1),
            ("extract-a", "extract", 1),
            ("extract-b", "extract", 1),
            ("load", "load", 1),
            ("audit", "audit", 1),
        ):
            supervisor.add_worker(name, queue, concurrency)
        supervisor.wait_all_healthy()
        supervisor.add_beat()
        supervisor.start()
        try:
            deadline = time.monotonic() + 120
            while succeeded_count(dep, "events") < 3:
                assert time.monotonic() < deadline, "the run did not get going"
                time.sleep(0.2)
            extract_a = supervisor.slots["extract-a"].process
            _, held = wait_until_busy(dep, extract_a, Stage.EXTRACT, timeout=120)
            control_a = supervisor.slots["control-a"].process
            frozen_nodes = {slot: supervisor.node(slot) for slot in ("control-a", "extract-a")}
            for process in (control_a, extract_a):
                os.killpg(process.pid, signal.SIGSTOP)
            frozen_at = datetime.now(UTC)

            deadline = time.monotonic() + 180
            while {r.slot for r in supervisor.restarted()} < {"control-a", "extract-a"}:
                assert time.monotonic() < deadline, f"not restarted: {supervisor.restarted()}"
                time.sleep(0.5)
            records = wait_settled(dep, "events", windows, timeout=240)
        finally:
            supervisor.stop()

        status_text = dep.cli("status", "events").stdout
        status_rows = json.loads(dep.cli("status", "events", "--json").stdout)

    # Detected by the probe alone, and only the frozen ones: no healthy worker was mistaken
    # for a hung one, and nothing exited.
    restarts = supervisor.restarted()
    for restart in restarts:
        latency = (restart.at - frozen_at).total_seconds()
        print(f"{restart.slot}: restarted {latency:.1f}s after it froze ({restart.reason})")
    assert sorted(r.slot for r in restarts) == ["control-a", "extract-a"], restarts
    for restart in restarts:
        assert restart.node == frozen_nodes[restart.slot]
        assert restart.reason.startswith("probe: unhealthy: "), restart
        assert "not consuming" in restart.reason

    # While control-a was frozen, control-b ran generation (beat sends it in batches) and
    # cleanup, dispatched windows, and requeued the window extract-a froze on once its lock
    # expired.
    control_a_back = next(r.at for r in restarts if r.slot == "control-a")
    meanwhile = logged(dep.log_path(supervisor.node("control-b")), frozen_at, control_a_back)
    for task in ("windowpipe.cleanup", "windowpipe.generate_batch"):
        assert any(
            e["event"].startswith(f"Task {task}[") and " succeeded in " in e["event"]
            for e in meanwhile
        ), task
    assert any(e["event"] == "dispatched" and e.get("queued", 0) > 0 for e in meanwhile)
    assert any(
        e["event"] == "requeued lost window"
        and e.get("window") == format_instant(held.window_start)
        for e in meanwhile
    )
    finished_meanwhile = [
        r for r in records if r.finished_at and frozen_at <= r.finished_at <= control_a_back
    ]
    assert finished_meanwhile, "no window finished while control-a was frozen"
    # The window extract-a was frozen on was taken over (a newer fence) and finished.
    taken_over = next(r for r in records if r.window_start == held.window_start)
    assert taken_over.status == WindowStatus.SUCCEEDED and taken_over.fence > held.fence

    assert statuses(records) == {"succeeded": windows}
    loaded = loaded_ids(pg_schema_url)
    assert loaded == seeded, (loaded - seeded, seeded - loaded)

    # `status` says when the control work last ran, and where; `--json` is the records only.
    [line] = [row for row in status_text.splitlines() if row.startswith("events: generation")]
    assert "generation last ran " in line and "cleanup last ran " in line, line
    assert " on control-" in line, line
    assert len(status_rows) == windows and {row["status"] for row in status_rows} == {"succeeded"}


# --- 3. watchdogs: a worker that lost its broker, a shutdown that cannot finish -----------------


@contextlib.contextmanager
def source_table_locked(url: str, table: str = "events") -> Iterator[sa.Connection]:
    """Hold an exclusive lock on the source table: a precheck counting it blocks until the
    lock is released (this connection is closed)."""
    engine = sa.create_engine(url)
    conn = engine.connect()
    try:
        conn.execute(sa.text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        yield conn
    finally:
        conn.rollback()
        conn.close()
        engine.dispose()


def wait_until_blocked_on_lock(url: str, timeout: float = 60) -> None:
    """Until some backend of the database waits on a lock (the precheck, blocked)."""
    engine = sa.create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        with engine.connect() as conn:
            while True:
                waiting = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    )
                ).scalar_one()
                if waiting:
                    return
                assert time.monotonic() < deadline, "the precheck never blocked on the table"
                time.sleep(0.1)
                conn.rollback()
    finally:
        engine.dispose()


def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit status, or None if the process still runs after `timeout` seconds."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def group_gone(pid: int, timeout: float = 10) -> bool:
    """True once no process of the process group `pid` is left (pool children included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


WATCHDOG_BOUND = 5.0
"""The shutdown and reconnect bounds these tests give their workers
(`WINDOWPIPE_SHUTDOWN_TIMEOUT`, `WINDOWPIPE_RECONNECT_TIMEOUT`), instead of the default 60 s."""

NO_WATCHDOG_WAIT = 90.0
"""How long a test waits for an exit before it calls the worker hung: far beyond the bound,
and far below what the hang would last without a watchdog (the reconnect loop: ~45 min; a
blocked precheck: its 300 s soft time limit)."""


@pytest.mark.integration
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-task"])
def test_a_worker_whose_broker_disappears_exits_within_the_bound_instead_of_hanging(
    tmp_path: Path, pg_schema_url: str, stop_all: list[Deployment], busy: bool
) -> None:
    seed_events(pg_schema_url, [3])
    private = PrivateRedis(tmp_path)
    private.start()
    bound = str(WATCHDOG_BOUND)
    dep = deploy(
        tmp_path,
        private.url,
        {
            "events": pipeline(
                sql_source(pg_schema_url),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(pg_schema_url),
                1,
            )
        },
        env=heartbeat_env(
            tmp_path, WINDOWPIPE_RECONNECT_TIMEOUT=bound, WINDOWPIPE_SHUTDOWN_TIMEOUT=bound
        ),
    )
    stop_all.append(dep)
    try:
        with source_table_locked(pg_schema_url):
            worker = dep.start_worker("precheck", 1, name="precheck-a")
            if busy:
                dep.start_worker("control", 1, name="control-a")
                dep.send("windowpipe.generate", "events")
                wait_until_blocked_on_lock(pg_schema_url)  # the precheck is inside its count
            private.stop()  # the broker, the results and the locks: gone for good
            status = wait_exit(worker, WATCHDOG_BOUND + NO_WATCHDOG_WAIT)
            # Exited while its task could not have finished: the source table is still locked.
            assert status == 1, f"still running {NO_WATCHDOG_WAIT}s past the bound"
        assert group_gone(worker.pid), "a pool child outlived its worker"
    finally:
        private.stop()
    log = dep.log_path("precheck-a").read_text(errors="replace")
    assert "exiting (status 1)" in log, log[-3000:]
    assert (
        "worker lost its broker and is not consuming again" in log
        or "worker shutdown did not finish" in log
    )


@pytest.mark.integration
def test_the_heartbeat_stops_while_the_broker_is_gone_and_resumes_when_it_is_back(
    tmp_path: Path, stop_all: list[Deployment]
) -> None:
    private = PrivateRedis(tmp_path)
    private.start()
    dep = deploy(
        tmp_path,
        private.url,
        {
            "events": pipeline(
                sql_source(f"sqlite:///{tmp_path}/source.db"),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(f"sqlite:///{tmp_path}/target.db"),
                1,
            )
        },
        # No reconnect watchdog within this test: the heartbeat alone must say it.
        env=heartbeat_env(tmp_path, WINDOWPIPE_RECONNECT_TIMEOUT="600"),
    )
    stop_all.append(dep)
    probe = [sys.executable, "-m", "workers.liveness", "--max-age", "5"]
    heartbeat = heartbeat_of(tmp_path, "control-a")
    try:
        worker = dep.start_worker("control", 1, name="control-a")
        assert subprocess.run([*probe, str(heartbeat)], cwd=REPO).returncode == 0
        private.stop()
        # The heartbeat goes stale 5 s (--max-age) after the last message the worker consumed.
        wait_until(
            lambda: subprocess.run([*probe, str(heartbeat)], cwd=REPO).returncode == 1,
            timeout=8,
            what="the probe to fail once the broker is gone",
            every=1,
        )
        # The process lives on, reconnecting; it consumes nothing, and the probe says so.
        assert worker.poll() is None
        stale = subprocess.run([*probe, str(heartbeat)], cwd=REPO, capture_output=True, text=True)
        assert stale.returncode == 1, stale.stdout
        private.start()  # same port, empty
        deadline = time.monotonic() + 90
        while subprocess.run([*probe, str(heartbeat)], cwd=REPO).returncode != 0:
            assert worker.poll() is None, "the worker exited instead of reconnecting"
            assert time.monotonic() < deadline, "no heartbeat after the broker came back"
            time.sleep(1)
    finally:
        private.stop()


@pytest.mark.integration
def test_a_warm_shutdown_that_cannot_finish_is_ended_by_the_watchdog(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    seed_events(pg_schema_url, [3])
    dep = deploy(
        tmp_path,
        redis_db,
        {
            "events": pipeline(
                sql_source(pg_schema_url),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(pg_schema_url),
                1,
            )
        },
        env=heartbeat_env(tmp_path, WINDOWPIPE_SHUTDOWN_TIMEOUT=str(WATCHDOG_BOUND)),
    )
    stop_all.append(dep)
    with source_table_locked(pg_schema_url):
        worker = dep.start_worker("precheck", 1, name="precheck-a")
        dep.start_worker("control", 1, name="control-a")
        dep.send("windowpipe.generate", "events")
        wait_until_blocked_on_lock(pg_schema_url)
        # SIGTERM to the main process only: a warm shutdown, which waits for the running task,
        # and that task waits for a table lock nobody releases.
        os.kill(worker.pid, signal.SIGTERM)
        status = wait_exit(worker, WATCHDOG_BOUND + NO_WATCHDOG_WAIT)
        assert status == 1, f"still shutting down {NO_WATCHDOG_WAIT}s past the bound"
    assert group_gone(worker.pid), "a pool child outlived its worker"
    log = dep.log_path("precheck-a").read_text(errors="replace")
    assert f"worker shutdown did not finish after {WATCHDOG_BOUND:g}s" in log, log[-3000:]


# --- 4. soak: Redis wiped again and again under supervised workers ------------------------------

SOAK_WINDOWS = int(os.environ.get("WINDOWPIPE_SOAK_WINDOWS", "300"))
"""Windows in the soak (`WINDOWPIPE_SOAK_WINDOWS`); the default keeps it near two minutes."""

SOAK_WIPES = int(os.environ.get("WINDOWPIPE_SOAK_WIPES", "8"))
"""Redis wipes in the soak (`WINDOWPIPE_SOAK_WIPES`): alternately a restart of the server and
a FLUSHALL under live connections, spread evenly over the run."""

SOAK_RECOVERY = 120.0
"""How long the soak waits for windows to settle again after a wipe before it calls the
pipeline stalled (recovery takes `stale_after` plus a worker restart: some 15 s)."""


@pytest.mark.integration
def test_soak_many_redis_wipes_over_hundreds_of_windows_every_window_settles_each_id_once(
    tmp_path: Path, pg_schema_url: str, stop_all: list[Deployment]
) -> None:
    seeded = seed_events(pg_schema_url, [1 + index % 4 for index in range(SOAK_WINDOWS)])
    check = compose_healthcheck()
    private = PrivateRedis(tmp_path)
    private.start()
    dep = deploy(
        tmp_path,
        private.url,
        {
            "events": pipeline(
                sql_source(pg_schema_url),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(pg_schema_url),
                SOAK_WINDOWS,
                lag=lag_for(SOAK_WINDOWS),
                every="2s",
                max_active_windows=8,
                max_attempts=100,
            )
        },
        env=heartbeat_env(tmp_path),
        cleanup_every="2s",
    )
    stop_all.append(dep)
    supervisor = Supervisor(dep, check, tmp_path)
    wipes: list[tuple[str, int]] = []
    try:
        for name, queue in (
            ("control-a", "control"),
            ("control-b", "control"),
            ("precheck", "precheck"),
            ("extract", "extract"),
            ("load", "load"),
            ("audit", "audit"),
        ):
            supervisor.add_worker(name, queue, 2)
        supervisor.wait_all_healthy()
        supervisor.add_beat()
        supervisor.start()
        client = redis.Redis.from_url(private.url)
        # A wipe each time another slice of the windows has settled, so the wipes are spread
        # over the whole run and each one lands on windows in flight: the broker's queues and
        # unacked messages, results, window locks, beat's schedule and lock, all gone. Between
        # two wipes the pipeline must get going again by itself.
        step = max(SOAK_WINDOWS // (SOAK_WIPES + 1), 1)
        settled = 0
        while len(wipes) < SOAK_WIPES:
            deadline = time.monotonic() + SOAK_RECOVERY
            while (now_settled := succeeded_count(dep, "events")) < settled + step:
                assert time.monotonic() < deadline, f"stalled at {now_settled} after {wipes}"
                time.sleep(0.2)
            settled = now_settled
            if settled >= SOAK_WINDOWS:
                break
            if len(wipes) % 2 == 0:
                private.stop()
                time.sleep(1)
                private.start()
                wipes.append(("restart", settled))
            else:
                with contextlib.suppress(redis.RedisError):
                    client.flushall()
                wipes.append(("flushall", settled))
        records = wait_settled(dep, "events", SOAK_WINDOWS, timeout=240)
    finally:
        supervisor.stop()
        dep.stop_all()
        private.stop()

    # Every wipe landed in the middle of the run.
    assert len(wipes) == SOAK_WIPES, wipes
    assert all(0 < settled < SOAK_WINDOWS for _, settled in wipes), wipes
    assert statuses(records) == {"succeeded": SOAK_WINDOWS}
    loaded = loaded_ids(pg_schema_url)
    assert loaded == seeded, (loaded - seeded, seeded - loaded)
    restarts = Counter(f"{r.slot}: {r.reason.split(':')[0]}" for r in supervisor.restarted())
    print(f"soak: {len(wipes)} wipes {wipes}; restarts {dict(restarts)}")
