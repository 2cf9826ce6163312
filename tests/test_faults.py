"""Each source document lands in the target exactly once, under failure.

Real Celery workers per stage queue, a SQL source and target on PostgreSQL (or SQLite), and
real faults: SIGKILL and SIGSTOP of worker processes, a Redis restart, TCP resets and latency
in front of PostgreSQL, HTTP 503/429 in front of moto's S3, bad rows, leaked secrets.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import sqlalchemy as sa
from kombu.transport.redis import Channel

from core.instants import format_instant
from core.locks import HeldLock, held_locks
from core.records import Stage, WindowRecord, WindowStatus
from tests.support import wait_until
from tests.support.deployment import (
    STAGE_QUEUES,
    Deployment,
    statuses,
    write_config,
)
from tests.support.faults import HttpFaultProxy, PrivateRedis, TcpFaultProxy
from windowpipe.exporter import queue_depths

pytestmark = pytest.mark.integration

ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
ALL_QUEUES = (*STAGE_QUEUES, "control")
FAST_RECOVERY = {
    "lock_ttl": "4s",
    "stale_after": "10s",
    "failed_retry_base": "1s",
}
"""Short lock TTL and stale window so cleanup recovers lost windows within seconds."""


# --- data ---------------------------------------------------------------------------------------


def seed_events(
    url: str, docs_per_window: Sequence[int], table: str = "events", payload: str = "doc"
) -> Counter[str]:
    """Create `table` with `docs_per_window[i]` rows in window i; returns the ids seeded."""
    rows = []
    next_id = 1
    for index, count in enumerate(docs_per_window):
        start = ORIGIN + index * SIZE
        for n in range(count):
            at = start + timedelta(seconds=0 if n == 0 else 7 * n)
            rows.append({"id": next_id, "created_at": at, "payload": f"{payload} {next_id}"})
            next_id += 1
    metadata = sa.MetaData()
    events = sa.Table(
        table,
        metadata,
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.Text),
    )
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        if rows:
            conn.execute(sa.insert(events), rows)
    engine.dispose()
    return Counter(str(row["id"]) for row in rows)


def loaded_ids(url: str, table: str = "events_loaded") -> Counter[str]:
    """The multiset of document ids in a target table (empty if it was never created)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(table):
                return Counter()
            return Counter(
                str(row[0]) for row in conn.execute(sa.text(f"SELECT doc_id FROM {table}"))
            )
    finally:
        engine.dispose()


def via_proxy(url: str, port: int) -> str:
    """The same database URL, through a proxy on 127.0.0.1:`port`."""
    proxied = sa.make_url(url).set(host="127.0.0.1", port=port)
    return proxied.render_as_string(hide_password=False)


def upstream_of(url: str) -> tuple[str, int]:
    parsed = sa.make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


def sql_source(url: str, table: str = "events", **extra: Any) -> dict[str, Any]:
    return {
        "type": "sql",
        "url": url,
        "table": table,
        "timestamp_column": "created_at",
        "id_column": "id",
        **extra,
    }


def sql_target(url: str, table: str = "events_loaded", **extra: Any) -> dict[str, Any]:
    return {"type": "sql", "url": url, "table": table, **extra}


def pipeline(
    source: dict[str, Any],
    staging: dict[str, Any],
    target: dict[str, Any],
    windows: int,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "window": "15m",
        "start": format_instant(ORIGIN),
        "lag": "0s",
        "max_windows_per_tick": windows,
        "every": "1h",
        **extra,
        "source": source,
        "staging": staging,
        "target": target,
    }


def deploy(
    tmp_path: Path,
    redis_url: str,
    pipelines: dict[str, dict[str, Any]],
    env: dict[str, str] | None = None,
    **settings: Any,
) -> Deployment:
    config = write_config(
        tmp_path / "windowpipe.toml",
        {
            "redis_url": redis_url,
            "state_url": f"sqlite:///{tmp_path}/state.db",
            **FAST_RECOVERY,
            **settings,
        },
        pipelines,
    )
    return Deployment(config_path=config, workdir=tmp_path, extra_env=dict(env or {}))


def slow_extract_deployment(
    tmp_path: Path, redis_url: str, url: str, proxy_port: int
) -> Deployment:
    """One window (source, local staging and target on the database `url`) whose extraction
    takes seconds: its source is read 2 documents a page through a proxy on `proxy_port`
    (`TcpFaultProxy` with latency). Lock TTL 3 s."""
    return deploy(
        tmp_path,
        redis_url,
        {
            "events": pipeline(
                sql_source(via_proxy(url, proxy_port), page_size=2),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(url),
                1,
            )
        },
        lock_ttl="3s",
    )


# --- observing the workers ---------------------------------------------------------------------


def log_events(dep: Deployment) -> list[dict[str, Any]]:
    """Every JSON log line of every process of the deployment (a killed one may have left a
    torn last line: skipped)."""
    events = []
    for line in dep.logs().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def stage_starts(dep: Deployment, window: datetime, pipeline: str = "events") -> Counter[str]:
    """How many times each stage of one window started (took the lock and ran)."""
    when = format_instant(window)
    return Counter(
        e["stage"]
        for e in log_events(dep)
        if e.get("event") == "stage started"
        and e.get("window") == when
        and e.get("pipeline") == pipeline
    )


def retries_logged(dep: Deployment, pipeline: str) -> Counter[str]:
    """Transient failures of a pipeline's stages that were retried, by stage: a connector call
    tried again within the task, or the stage sent again with a backoff."""
    return Counter(
        e["stage"]
        for e in log_events(dep)
        if e.get("pipeline") == pipeline
        and (
            e.get("event") == "transient error, retrying"
            or (e.get("event") == "stage result" and e.get("outcome") == "retry")
        )
    )


def process_tree(process: subprocess.Popen[bytes]) -> set[int]:
    """The pids of a worker's main process and its pool children."""
    try:
        main = psutil.Process(process.pid)
        return {process.pid, *(child.pid for child in main.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def wait_until_busy(
    dep: Deployment,
    worker: subprocess.Popen[bytes],
    stage: Stage,
    timeout: float = 60,
    pipeline: str = "events",
) -> tuple[HeldLock, WindowRecord]:
    """A window lock held by a process of `worker` while the window runs at `stage`."""
    client = dep.redis()
    store = dep.store()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            pids = process_tree(worker)
            for held in held_locks(client):
                if held.pid not in pids or held.pipeline != pipeline:
                    continue
                record = store.get(pipeline, held.window_start)
                if (
                    record is not None
                    and record.status == WindowStatus.RUNNING
                    and record.stage == stage
                ):
                    return held, record
            time.sleep(0.01)
        raise AssertionError(f"no {stage.value} task of {dep.name_of(worker)} seen running")
    finally:
        client.close()
        store.dispose()


def still_running_at(dep: Deployment, record: WindowRecord) -> bool:
    """True when the record has not moved since `record` was read (same fence, same stage)."""
    store = dep.store()
    try:
        now = store.get(record.pipeline, record.window_start)
    finally:
        store.dispose()
    return (
        now is not None
        and now.status == WindowStatus.RUNNING
        and now.stage == record.stage
        and now.fence == record.fence
    )


def wait_all_finished(
    dep: Deployment,
    expected: dict[str, int],
    timeout: float = 120,
    every_tick: Callable[[], object] | None = None,
) -> dict[str, list[WindowRecord]]:
    """Wait until every pipeline has its windows finished (succeeded, skipped or dead), sending
    cleanup and dispatch for all of them every 2 s, as beat would (and calling `every_tick`)."""
    store = dep.store()
    deadline = time.monotonic() + timeout
    last_kick = 0.0
    try:
        while True:
            found = {name: store.list_records(name) for name in expected}
            if all(
                len(found[name]) >= count
                and all(
                    r.status in (WindowStatus.SUCCEEDED, WindowStatus.SKIPPED, WindowStatus.DEAD)
                    for r in found[name]
                )
                for name, count in expected.items()
            ):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not finished after {timeout}s: "
                    f"{ {name: statuses(records) for name, records in found.items()} }"
                )
            if time.monotonic() - last_kick > 2:
                if every_tick is not None:
                    every_tick()
                dep.send("windowpipe.cleanup")
                for name in expected:
                    dep.send("windowpipe.dispatch", name)
                last_kick = time.monotonic()
            time.sleep(0.3)
    finally:
        store.dispose()


def status_json(dep: Deployment, *pipeline: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(dep.cli("status", *pipeline, "--json").stdout)
    return rows


# --- 1. worker death ---------------------------------------------------------------------------


def test_workers_killed_mid_task_on_every_stage_lose_and_double_no_document(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    windows = 100
    seeded = seed_events(pg_schema_url, [2 + index % 4 for index in range(windows)])
    upstream = upstream_of(pg_schema_url)
    # Every round trip to PostgreSQL is 15 ms slower, so each stage takes long enough to be
    # killed in the middle of its work.
    with (
        TcpFaultProxy(upstream, latency=0.015) as source_proxy,
        TcpFaultProxy(upstream, latency=0.015) as target_proxy,
    ):
        dep = deploy(
            tmp_path,
            redis_db,
            {
                "events": pipeline(
                    sql_source(via_proxy(pg_schema_url, source_proxy.port), page_size=1),
                    {"type": "local", "path": str(tmp_path / "staging")},
                    sql_target(via_proxy(pg_schema_url, target_proxy.port), batch_size=1),
                    windows,
                    max_attempts=20,
                    max_active_windows=16,
                )
            },
        )
        stop_all.append(dep)
        workers = dep.start_workers(ALL_QUEUES, concurrency=2)
        dep.send("windowpipe.generate", "events")

        # One kill per stage queue, each while a window runs at that stage on that worker:
        # a pool child (the main process forks a new one), or the whole worker (restarted).
        kills: list[tuple[Stage, WindowRecord, str]] = []
        for stage, whole_worker in (
            (Stage.PRECHECK, False),
            (Stage.EXTRACT, True),
            (Stage.LOAD, False),
            (Stage.AUDIT, True),
        ):
            for _ in range(5):
                worker = workers[stage.value]
                held, record = wait_until_busy(dep, worker, stage)
                if whole_worker:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(timeout=10)
                else:
                    assert held.pid is not None and held.pid != worker.pid
                    os.kill(held.pid, signal.SIGKILL)
                landed = still_running_at(dep, record)
                if whole_worker:
                    workers.update(dep.start_workers([stage.value], concurrency=2))
                if landed:
                    kind = "worker" if whole_worker else "pool child"
                    kills.append((stage, record, kind))
                    break
            else:
                raise AssertionError(f"no kill landed in the middle of a {stage.value} task")

        records = dep.wait_finished("events", windows, timeout=180, kick_cleanup=True)

    assert statuses(records) == {"succeeded": windows}
    for record in records:
        assert record.source_count == record.staged_count == record.target_count
    loaded = loaded_ids(pg_schema_url)
    assert loaded == seeded, (loaded - seeded, seeded - loaded)
    assert sum(seeded.values()) == sum(2 + index % 4 for index in range(windows))
    # The killed stages really ran again for their windows.
    for stage, record, kind in kills:
        starts = stage_starts(dep, record.window_start)
        assert starts[stage.value] >= 2, (stage, kind, starts)


# --- 2. Redis restart --------------------------------------------------------------------------


def test_redis_restart_mid_run_loses_no_window_and_doubles_no_document(
    tmp_path: Path, pg_schema_url: str, stop_all: list[Deployment]
) -> None:
    windows = 40
    seeded = seed_events(pg_schema_url, [1 + index % 3 for index in range(windows)])
    private = PrivateRedis(tmp_path)
    private.start()
    try:
        with TcpFaultProxy(upstream_of(pg_schema_url), latency=0.02) as source_proxy:
            dep = deploy(
                tmp_path,
                private.url,
                {
                    "events": pipeline(
                        sql_source(via_proxy(pg_schema_url, source_proxy.port), page_size=1),
                        {"type": "local", "path": str(tmp_path / "staging")},
                        sql_target(pg_schema_url),
                        windows,
                        max_attempts=20,
                        max_active_windows=8,
                    )
                },
            )
            stop_all.append(dep)
            workers = dep.start_workers(ALL_QUEUES, concurrency=2)
            dep.send("windowpipe.generate", "events")
            store = dep.store()
            deadline = time.monotonic() + 90
            while True:
                done = statuses(store.list_records("events")).get("succeeded", 0)
                if done >= 5:
                    break
                assert time.monotonic() < deadline, "the run did not get going"
                time.sleep(0.1)
            # Broker queues, unacked messages, results and window locks: all gone.
            client = redis.Redis.from_url(private.url)
            client.set("before-the-restart", 1)
            private.stop()
            time.sleep(2)
            private.start()
            assert not client.exists("before-the-restart")
            in_flight = [
                r for r in store.list_records("events") if r.status != WindowStatus.SUCCEEDED
            ]
            assert in_flight, "the restart came too late: nothing was in flight"
            store.dispose()
            # A worker whose connection broke while it held unacknowledged messages exits
            # (kombu 5.7 fails restoring them: "Unrecoverable error: AttributeError ...
            # 'hostname'"); the deployment's supervisor (compose: restart unless-stopped)
            # starts it again, and so does this test.
            restarted: list[str] = []

            def supervise() -> None:
                for queue, process in list(workers.items()):
                    if process.poll() is not None:
                        restarted.append(queue)
                        workers.update(dep.start_workers([queue], concurrency=2))

            found = wait_all_finished(dep, {"events": windows}, timeout=150, every_tick=supervise)
            records = found["events"]
            dep.stop_all()
    finally:
        private.stop()

    assert statuses(records) == {"succeeded": windows}
    loaded = loaded_ids(pg_schema_url)
    assert loaded == seeded, (loaded - seeded, seeded - loaded)


# --- 3. expired lock: a paused worker comes back ------------------------------------------------


def test_worker_paused_past_its_lock_ttl_cannot_commit_after_another_took_the_window(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    seeded = seed_events(pg_schema_url, [80])
    # 80 documents, 2 a page, 40 ms a round trip: extraction takes a few seconds.
    with TcpFaultProxy(upstream_of(pg_schema_url), latency=0.04) as source_proxy:
        dep = slow_extract_deployment(tmp_path, redis_db, pg_schema_url, source_proxy.port)
        stop_all.append(dep)
        dep.start_workers(("precheck", "load", "audit", "control"), concurrency=1)
        paused = dep.start_workers(["extract"], concurrency=1)["extract"]
        dep.send("windowpipe.generate", "events")

        _, record = wait_until_busy(dep, paused, Stage.EXTRACT)
        os.killpg(paused.pid, signal.SIGSTOP)
        assert still_running_at(dep, record), "extraction ended before the pause"
        # Another extract worker; cleanup requeues the window once the paused lock expired.
        dep.start_workers(["extract"], concurrency=1)
        records = dep.wait_finished("events", 1, timeout=90, kick_cleanup=True)
        assert [r.status for r in records] == [WindowStatus.SUCCEEDED]
        assert records[0].fence > record.fence

        os.killpg(paused.pid, signal.SIGCONT)
        paused_log = dep.log_path(dep.name_of(paused))
        deadline = time.monotonic() + 60
        while "lost the window" not in paused_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the resumed worker never tried to commit"
            time.sleep(0.2)

    outcomes = [
        e
        for e in log_events(dep)
        if e.get("event") == "stage result" and e.get("stage") == "extract"
    ]
    refused = [e for e in outcomes if "lost the window" in e.get("detail", "")]
    assert len(refused) == 1 and refused[0]["outcome"] == "stopped", outcomes
    final = dep.store().get("events", ORIGIN)
    assert final is not None and final.status == WindowStatus.SUCCEEDED
    assert final.source_count == final.staged_count == final.target_count == 80
    assert stage_starts(dep, ORIGIN) == {"precheck": 1, "extract": 2, "load": 1, "audit": 1}
    assert loaded_ids(pg_schema_url) == seeded


# --- 4. duplicate jobs -------------------------------------------------------------------------


def test_window_enqueued_twenty_times_at_once_from_every_entry_point_runs_each_stage_once(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    seeded = seed_events(pg_schema_url, [5])
    # A lag that makes window 0 the only due one, so every generation tick finds that window.
    since = datetime.now(UTC) - (ORIGIN + SIZE)
    only_first_due = f"{int(since.total_seconds() // 60)}m"
    dep = deploy(
        tmp_path,
        redis_db,
        {
            "events": pipeline(
                sql_source(pg_schema_url, page_size=2),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(pg_schema_url),
                1,
                lag=only_first_due,
            )
        },
    )
    stop_all.append(dep)
    dep.start_workers(ALL_QUEUES, concurrency=3)
    start, end = format_instant(ORIGIN), format_instant(ORIGIN + SIZE)
    enqueue = [sys.executable, "-m", "windowpipe", "enqueue", "events", "--start", start]
    clis = [
        subprocess.Popen(
            [*enqueue, "--end", end],
            cwd=tmp_path,
            env=dep.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    senders = [
        lambda: dep.send("windowpipe.generate", "events"),
        lambda: dep.send("windowpipe.dispatch", "events"),
        lambda: dep.send_chain("events", start),
    ]
    with ThreadPoolExecutor(max_workers=12) as pool:
        for future in [pool.submit(senders[n % 3]) for n in range(60)]:
            future.result()
    for cli in clis:
        _, stderr = cli.communicate(timeout=60)
        assert cli.returncode == 0, stderr
    records = dep.wait_finished("events", 1, timeout=90)
    # Every duplicate message drains: none waits in a queue, none is reserved by a worker.
    broker = dep.redis()
    wait_until(
        lambda: (
            sum(queue_depths(broker, ALL_QUEUES).values()) == 0
            and broker.hlen(Channel.unacked_key) == 0
        ),
        timeout=60,
        what="every duplicate message to drain",
    )

    assert [r.status for r in records] == [WindowStatus.SUCCEEDED]
    assert stage_starts(dep, ORIGIN) == {"precheck": 1, "extract": 1, "load": 1, "audit": 1}
    assert loaded_ids(pg_schema_url) == seeded
    assert [r.status for r in dep.store().list_records("events")] == [WindowStatus.SUCCEEDED]


# --- 5. transient and terminal faults -----------------------------------------------------------


@pytest.fixture
def moto_s3() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def test_transient_faults_are_retried_until_the_window_succeeds_and_terminal_ones_fail_it(
    tmp_path: Path,
    pg_schema_url: str,
    redis_db: str,
    moto_s3: str,
    stop_all: list[Deployment],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3

    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket="stage")
    seeded = seed_events(pg_schema_url, [3, 4])
    upstream = upstream_of(pg_schema_url)
    with (
        TcpFaultProxy(upstream, reset_first=4) as source_resets,
        TcpFaultProxy(upstream, reset_first=4) as target_resets,
        HttpFaultProxy(moto_s3, fail_first=12, statuses=(503, 429)) as throttling_s3,
    ):

        def s3(endpoint: str, bucket: str = "stage") -> dict[str, Any]:
            return {"type": "s3", "bucket": bucket, "endpoint_url": endpoint, "region": "us-east-1"}

        local = {"type": "local", "path": str(tmp_path / "staging")}
        dep = deploy(
            tmp_path,
            redis_db,
            {
                # PostgreSQL drops the first connections of the source and of the target.
                "resets": pipeline(
                    sql_source(via_proxy(pg_schema_url, source_resets.port)),
                    local,
                    sql_target(via_proxy(pg_schema_url, target_resets.port), table="resets"),
                    2,
                ),
                # S3 answers 503 SlowDown / 429 to the first requests.
                "throttled": pipeline(
                    sql_source(pg_schema_url),
                    s3(throttling_s3.url),
                    sql_target(pg_schema_url, table="throttled"),
                    2,
                ),
                "missing_table": pipeline(
                    sql_source(pg_schema_url, table="no_such_events"),
                    local,
                    sql_target(pg_schema_url, table="missing_table"),
                    1,
                    max_attempts=2,
                ),
                "missing_bucket": pipeline(
                    sql_source(pg_schema_url),
                    s3(moto_s3, bucket="no-such-bucket"),
                    sql_target(pg_schema_url, table="missing_bucket"),
                    1,
                    max_attempts=2,
                ),
            },
            env=AWS_ENV,
        )
        stop_all.append(dep)
        dep.start_workers(ALL_QUEUES, concurrency=2)
        for name in ("resets", "throttled", "missing_table", "missing_bucket"):
            dep.send("windowpipe.generate", name)
        found = wait_all_finished(
            dep, {"resets": 2, "throttled": 2, "missing_table": 1, "missing_bucket": 1}
        )
        assert source_resets.resets == 4 and target_resets.resets == 4
        assert throttling_s3.failed == 12

    for name in ("resets", "throttled"):
        assert statuses(found[name]) == {"succeeded": 2}, found[name]
        assert loaded_ids(pg_schema_url, name) == seeded
        for record in found[name]:
            assert record.source_count == record.staged_count == record.target_count
    # Retried: both reset connections (source at precheck, target at load) and the throttled
    # stage writes went through task-level retries, and the log says so.
    resets = retries_logged(dep, "resets")
    assert resets["precheck"] >= 1 and resets["load"] >= 1, resets
    assert retries_logged(dep, "throttled")["extract"] >= 1
    # Terminal: failed at once (no retry within the attempt), dead after max_attempts.
    for name, stage, words in (
        ("missing_table", "precheck", "table 'no_such_events' does not exist"),
        ("missing_bucket", "extract", "NoSuchBucket"),
    ):
        assert not retries_logged(dep, name), name
        [row] = status_json(dep, name)
        assert row["status"] == "dead" and row["attempts"] == 2, row
        error = row["error"]
        assert error.startswith(f"{stage}: ") and words in error, error
        assert "\n" not in error and len(error) < 400, error
        assert stage_starts(dep, ORIGIN, name)[stage] == 2


# --- 6. bad source documents -------------------------------------------------------------------


def test_rejected_source_documents_are_counted_with_reasons_and_fail_the_audit(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    source_url = f"sqlite:///{tmp_path}/source.db"
    seeded = seed_events(source_url, [3, 5, 2])
    # Window 1 holds a row whose text is not UTF-8 and a row above max_document_bytes.
    first_of_window_1 = 4
    bad_text, too_big = first_of_window_1 + 1, first_of_window_1 + 2
    with sqlite3.connect(tmp_path / "source.db") as conn:
        conn.execute(
            "UPDATE events SET payload = CAST(X'6f6bff28c3' AS TEXT) WHERE id = ?", [bad_text]
        )
        conn.execute("UPDATE events SET payload = ? WHERE id = ?", ["x" * 5000, too_big])
    dep = deploy(
        tmp_path,
        redis_db,
        {
            "events": pipeline(
                sql_source(source_url, page_size=2, max_document_bytes=2000),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(pg_schema_url),
                3,
                max_attempts=2,
            )
        },
    )
    stop_all.append(dep)
    dep.start_workers(ALL_QUEUES, concurrency=2)
    dep.send("windowpipe.generate", "events")
    records = dep.wait_finished("events", 3, timeout=90, kick_cleanup=True)

    assert [r.status for r in records] == [
        WindowStatus.SUCCEEDED,
        WindowStatus.DEAD,
        WindowStatus.SUCCEEDED,
    ]
    rows = {row["window_start"]: row for row in status_json(dep, "events")}
    bad = rows[format_instant(ORIGIN + SIZE)]
    assert bad["rejected_count"] == 2 and bad["attempts"] == 2
    assert (bad["source_count"], bad["staged_count"], bad["target_count"]) == (5, 3, 3)
    error = bad["error"]
    assert error.startswith("audit: ") and "\n" not in error
    assert "not UTF-8: 1" in error and "oversized document: 1" in error, error
    assert f"first ids: {bad_text}, {too_big}" in error, error
    # Nothing vanished silently: every seeded document is loaded or named as rejected.
    loaded = loaded_ids(pg_schema_url)
    assert loaded + Counter([str(bad_text), str(too_big)]) == seeded
    assert stage_starts(dep, ORIGIN + SIZE)["audit"] == 2


# --- 7. secrets --------------------------------------------------------------------------------


def redis_dump(url: str) -> bytes:
    """Every key and value in a Redis DB, as bytes (results, broker queues, locks ...)."""
    client = redis.Redis.from_url(url)
    parts: list[Any] = []
    for key in client.scan_iter(count=1000):
        parts.append(key)
        kind = client.type(key)
        if kind == b"string":
            parts.append(client.get(key))
        elif kind == b"list":
            parts.extend(client.lrange(key, 0, -1))
        elif kind == b"hash":
            parts.extend(item for pair in client.hgetall(key).items() for item in pair)
        elif kind == b"set":
            parts.extend(client.smembers(key))
        elif kind == b"zset":
            parts.extend(client.zrange(key, 0, -1))
    client.close()
    return b"\n".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)


def test_secrets_never_leave_their_environment_variable_and_a_password_redis_works(
    tmp_path: Path,
    pg_schema_url: str,
    stop_all: list[Deployment],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db_password = f"canary-s3cr3t-{uuid.uuid4().hex}"
    redis_password = f"canary-redis-{uuid.uuid4().hex}"
    seeded = seed_events(pg_schema_url, [2, 3, 1])
    private = PrivateRedis(tmp_path, password=redis_password)
    private.start()
    # PostgreSQL here trusts local connections, so the password is sent and ignored: a real
    # secret on the wire that must not show anywhere else.
    broken_db = sa.make_url(pg_schema_url).set(database="no_such_database")
    secret = {"password_env": "WP_DB_PASSWORD"}
    dep = deploy(
        tmp_path,
        private.url,
        {
            "events": pipeline(
                sql_source(pg_schema_url, **secret),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(pg_schema_url, **secret),
                3,
            ),
            "broken": pipeline(
                sql_source(pg_schema_url, **secret),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(broken_db.render_as_string(hide_password=False), **secret),
                1,
                max_attempts=1,
            ),
        },
        env={"WP_DB_PASSWORD": db_password},
    )
    stop_all.append(dep)
    monkeypatch.setenv("WP_DB_PASSWORD", db_password)  # the test process loads the config too
    try:
        dep.start_workers(ALL_QUEUES, concurrency=1)
        dep.send("windowpipe.generate", "events")
        dep.send("windowpipe.generate", "broken")
        found = wait_all_finished(dep, {"events": 3, "broken": 1})
        assert statuses(found["events"]) == {"succeeded": 3}
        assert statuses(found["broken"]) == {"dead": 1}
        assert loaded_ids(pg_schema_url) == seeded

        status = dep.cli("status", "--json").stdout
        broken_error = json.loads(dep.cli("status", "broken", "--json").stdout)[0]["error"]
        assert "no_such_database" in broken_error, broken_error
        locks = dep.cli("locks").stdout
        check = dep.cli("check", check=False)
        stored = redis_dump(private.url)
        # What Redis holds is there to inspect (queue bindings, the control jobs' last runs);
        # tasks store no results (the window record is the truth).
        assert b"_kombu.binding" in stored and b"control-" in stored
        assert b"celery-task-meta-" not in stored
        dep.stop_all()
    finally:
        private.stop()

    logs = dep.logs()
    assert "stage started" in logs and "ready." in logs
    for canary in (db_password, redis_password):
        assert canary not in logs
        assert canary.encode() not in stored
        assert canary not in status
        assert canary not in locks
        assert canary not in check.stdout + check.stderr


def test_a_tls_redis_with_a_password_carries_the_broker_and_locks(
    tmp_path: Path, pg_schema_url: str, stop_all: list[Deployment]
) -> None:
    seeded = seed_events(pg_schema_url, [2, 1, 3])
    private = PrivateRedis(tmp_path, password=f"pw-{uuid.uuid4().hex}", tls=True)
    private.start()  # TLS only: the server has no plain-text port
    assert private.url.startswith("rediss://")
    dep = deploy(
        tmp_path,
        private.url,
        {
            "events": pipeline(
                sql_source(pg_schema_url),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(pg_schema_url),
                3,
            )
        },
    )
    stop_all.append(dep)
    try:
        dep.start_workers(ALL_QUEUES, concurrency=1)
        dep.send("windowpipe.generate", "events")
        found = wait_all_finished(dep, {"events": 3})
        assert statuses(found["events"]) == {"succeeded": 3}
        assert loaded_ids(pg_schema_url) == seeded
        assert "no window locks held" in dep.cli("locks").stdout
        # The control jobs' last-run records went over TLS too (tasks store no results).
        assert b"control-" in redis_dump(private.url)
        dep.stop_all()
    finally:
        private.stop()


# --- attempts count only work that ran and failed ------------------------------------------------

STALE_AFTER_SECONDS = 2.0


def _events_named(dep: Deployment, message: str) -> list[dict[str, object]]:
    return [e for e in log_events(dep) if e.get("event") == message]


def test_a_backlog_three_times_longer_than_stale_after_uses_no_attempt(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    windows = 8
    seeded = seed_events(pg_schema_url, [1 + index % 3 for index in range(windows)])
    dep = deploy(
        tmp_path,
        redis_db,
        {
            "events": pipeline(
                sql_source(pg_schema_url),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(pg_schema_url),
                windows,
                max_attempts=2,
            )
        },
        lock_ttl="2s",
        stale_after=f"{STALE_AFTER_SECONDS:g}s",
    )
    stop_all.append(dep)
    # Every queue has workers except precheck: the windows wait there, like behind a backlog.
    dep.start_workers([q for q in STAGE_QUEUES if q != "precheck"] + ["control"], concurrency=1)
    dep.send("windowpipe.generate", "events")
    store = dep.store()
    try:
        deadline = time.monotonic() + 60
        while len(store.list_records("events")) < windows or any(
            r.status != WindowStatus.QUEUED for r in store.list_records("events")
        ):
            assert time.monotonic() < deadline, statuses(store.list_records("events"))
            time.sleep(0.2)
        # Wait three times `stale_after` (and a lock TTL), with cleanup running every second.
        waited_until = time.monotonic() + 3 * STALE_AFTER_SECONDS + 2.5
        while time.monotonic() < waited_until:
            dep.send("windowpipe.cleanup")
            time.sleep(1.0)
        waiting = store.list_records("events")
        assert statuses(waiting) == {"queued": windows}
        assert all(r.attempts == 1 for r in waiting), [r.attempts for r in waiting]
    finally:
        store.dispose()
    resent = _events_named(dep, "sent a waiting window's message again")
    assert len(resent) >= windows, "cleanup never re-sent the waiting windows' messages"

    dep.start_workers(["precheck"], concurrency=2)
    records = wait_all_finished(dep, {"events": windows}, timeout=120)["events"]

    assert statuses(records) == {"succeeded": windows}
    assert [r.attempts for r in records] == [1] * windows
    assert loaded_ids(pg_schema_url) == seeded
    # The duplicate messages were harmless: each window's precheck ran once.
    for record in records:
        assert stage_starts(dep, record.window_start)["precheck"] == 1


def test_a_load_whose_staged_files_are_gone_or_corrupt_goes_back_to_extract(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    windows = 5
    seeded = seed_events(pg_schema_url, [3] * windows)
    staging_root = tmp_path / "staging"
    dep = deploy(
        tmp_path,
        redis_db,
        {
            "events": pipeline(
                sql_source(pg_schema_url),
                {"type": "local", "path": str(staging_root)},
                sql_target(pg_schema_url),
                windows,
                max_attempts=3,
            )
        },
    )
    stop_all.append(dep)
    # No load worker yet: every window stops at load, its files staged.
    dep.start_workers(["precheck", "extract", "control"], concurrency=1)
    dep.send("windowpipe.generate", "events")
    store = dep.store()
    try:
        deadline = time.monotonic() + 60
        while True:
            records = store.list_records("events")
            if len(records) == windows and all(
                r.stage == Stage.LOAD and r.status == WindowStatus.QUEUED for r in records
            ):
                break
            assert time.monotonic() < deadline, [(r.status, r.stage) for r in records]
            time.sleep(0.2)
    finally:
        store.dispose()

    by_start = {r.window_start: r for r in records}
    broken = {
        ORIGIN: "missing file",
        ORIGIN + SIZE: "changed bytes",
        ORIGIN + 2 * SIZE: "unreadable manifest",
    }
    for start, how in broken.items():
        manifest_path = staging_root / str(by_start[start].manifest)
        parts = sorted(manifest_path.parent.glob("*part*"))
        assert parts, f"no staged part next to {manifest_path}"
        if how == "missing file":
            parts[0].unlink()
        elif how == "changed bytes":
            # Still valid gzip with the same lines (an empty member appended): only the
            # manifest's sha256 can tell these are not the bytes extract wrote.
            parts[0].write_bytes(parts[0].read_bytes() + gzip.compress(b""))
        else:
            manifest_path.write_text("{ not json")

    dep.start_workers(["load", "audit"], concurrency=1)
    final = wait_all_finished(dep, {"events": windows}, timeout=120)["events"]

    assert statuses(final) == {"succeeded": windows}
    assert loaded_ids(pg_schema_url) == seeded
    for record in final:
        starts = stage_starts(dep, record.window_start)
        if record.window_start in broken:
            # Attempt 1 failed at load; attempt 2 extracted again, loaded, audited.
            assert record.attempts == 2, (broken[record.window_start], record)
            assert starts["extract"] == 2 and starts["load"] == 2, (
                broken[record.window_start],
                starts,
            )
        else:
            assert record.attempts == 1 and starts["extract"] == 1, starts
