"""The distributed runtime end to end: real Celery workers per stage queue on the real Redis,
SQL source -> local staging -> SQL target on PostgreSQL, window records on SQLite or PostgreSQL."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from connectors.registry import connector_for
from core.config import load_config
from core.errors import LostOwnershipError
from core.instants import format_instant
from core.locks import RecheckLock, WindowLock
from core.records import Stage, WindowKind, WindowStatus
from core.retry import CONTROL_TIME_LIMIT
from core.runner import Outcome, Runtime, run_stage
from core.store import StateStore
from tests.support import wait_until
from tests.support.deployment import (
    Deployment,
    statuses,
    write_config,
)

pytestmark = pytest.mark.integration

ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
WINDOWS = 60


def seed_events(url: str, windows: int = WINDOWS) -> dict[int, int]:
    """Create `events` with a few documents per window (every 7th window empty, some exactly
    on a boundary); returns documents per window index."""
    engine = sa.create_engine(url)
    per_window: dict[int, int] = {}
    rows = []
    next_id = 1
    for index in range(windows):
        count = 0 if index % 7 == 3 else (index % 5) + 1
        per_window[index] = count
        start = ORIGIN + index * SIZE
        for n in range(count):
            # The first document sits exactly on the window's start boundary.
            at = start + timedelta(seconds=0 if n == 0 else 37 * n)
            rows.append({"id": next_id, "created_at": at, "payload": f"doc {next_id} ✓"})
            next_id += 1
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE events (id BIGINT PRIMARY KEY, "
                "created_at TIMESTAMPTZ NOT NULL, payload TEXT)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO events (id, created_at, payload) VALUES (:id, :created_at, :payload)"
            ),
            rows,
        )
    engine.dispose()
    return per_window


def make_deployment(
    tmp_path: Path, data_url: str, state_url: str, redis_url: str, **settings: Any
) -> Deployment:
    config = write_config(
        tmp_path / "windowpipe.toml",
        {
            "redis_url": redis_url,
            "state_url": state_url,
            "lock_ttl": "10s",
            "stale_after": "20s",
            "failed_retry_base": "1s",
            **settings,
        },
        {
            "events": {
                "window": "15m",
                "start": format_instant(ORIGIN),
                "lag": "0s",
                "max_windows_per_tick": WINDOWS,
                "every": "1h",
                "max_active_windows": 12,
                "max_backfill_windows": 4,
                "source": {
                    "type": "sql",
                    "url": data_url,
                    "table": "events",
                    "timestamp_column": "created_at",
                    "id_column": "id",
                    "page_size": 3,
                },
                "staging": {"type": "local", "path": str(tmp_path / "staging")},
                "target": {"type": "sql", "url": data_url, "table": "events_loaded"},
            }
        },
    )
    return Deployment(config_path=config, workdir=tmp_path)


def target_ids(url: str) -> Counter[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        ids = [row[0] for row in conn.execute(sa.text("SELECT doc_id FROM events_loaded"))]
    engine.dispose()
    return Counter(str(i) for i in ids)


def source_ids(url: str) -> Counter[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        ids = [row[0] for row in conn.execute(sa.text("SELECT id FROM events"))]
    engine.dispose()
    return Counter(str(i) for i in ids)


@pytest.fixture
def deployment(
    tmp_path: Path, pg_schema_url: str, redis_db: str, request: pytest.FixtureRequest
) -> Iterator[tuple[Deployment, str, dict[int, int]]]:
    state = getattr(request, "param", "sqlite")
    state_url = f"sqlite:///{tmp_path}/state.db" if state == "sqlite" else pg_schema_url
    per_window = seed_events(pg_schema_url)
    dep = make_deployment(tmp_path, pg_schema_url, state_url, redis_db)
    try:
        yield dep, pg_schema_url, per_window
    finally:
        dep.stop_all()


@pytest.mark.parametrize("deployment", ["sqlite", "postgresql"], indirect=True)
def test_generated_windows_run_end_to_end_through_four_stage_queues(
    deployment: tuple[Deployment, str, dict[int, int]],
) -> None:
    dep, data_url, per_window = deployment
    dep.start_stage_workers(concurrency=2)
    dep.send("windowpipe.generate", "events")
    records = dep.wait_finished("events", WINDOWS, timeout=300)

    assert len(records) == WINDOWS
    for index, record in enumerate(records):
        expected = per_window[index]
        assert record.window_start == ORIGIN + index * SIZE
        if expected == 0:
            assert record.status == WindowStatus.SKIPPED, record
        else:
            assert record.status == WindowStatus.SUCCEEDED, record
            assert record.source_count == record.staged_count == record.target_count == expected
    assert target_ids(data_url) == source_ids(data_url)


def test_same_window_enqueued_many_times_at_once_runs_each_stage_once(
    deployment: tuple[Deployment, str, dict[int, int]],
) -> None:
    dep, data_url, per_window = deployment
    window_start = ORIGIN + SIZE  # window 1: 2 documents
    store = dep.store()
    store.create_windows("events", [_window(1)], kind=WindowKind.MANUAL)
    # Before any worker runs: beat-like dispatch plus 20 manual chains for the same window.
    dep.send("windowpipe.dispatch", "events")
    for _ in range(20):
        dep.send_chain("events", format_instant(window_start))
    dep.start_stage_workers(concurrency=3)
    records = dep.wait_finished("events", 1, timeout=120)

    assert [r.status for r in records] == [WindowStatus.SUCCEEDED]
    started = Counter(
        line.split('"stage": "')[1].split('"')[0]
        for line in dep.logs().splitlines()
        if '"stage started"' in line and format_instant(window_start) in line
    )
    assert started == {"precheck": 1, "extract": 1, "load": 1, "audit": 1}
    assert sum(target_ids(data_url).values()) == per_window[1]


def _window(index: int) -> Any:
    from core.windows import Window

    return Window(ORIGIN + index * SIZE, ORIGIN + (index + 1) * SIZE)


def test_enqueue_runs_exactly_the_range_and_force_replaces_instead_of_duplicating(
    deployment: tuple[Deployment, str, dict[int, int]],
) -> None:
    dep, data_url, per_window = deployment
    dep.start_stage_workers(concurrency=2)
    start, end = format_instant(ORIGIN + 4 * SIZE), format_instant(ORIGIN + 10 * SIZE)
    result = dep.cli(
        "enqueue", "events", "--start", start, "--end", end, "--wait", "--timeout", "120"
    )
    assert "6 window(s) in range" in result.stdout
    store = dep.store()
    records = store.list_records("events")
    assert [r.window_start for r in records] == [ORIGIN + i * SIZE for i in range(4, 10)]
    assert all(r.kind == WindowKind.MANUAL for r in records)
    loaded_before = sum(target_ids(data_url).values())
    assert loaded_before == sum(per_window[i] for i in range(4, 10))

    # The source changes for window 6; a forced re-run replaces the window's rows.
    engine = sa.create_engine(data_url)
    with engine.begin() as conn:
        removed = conn.execute(
            sa.text("DELETE FROM events WHERE created_at >= :a AND created_at < :b"),
            {"a": ORIGIN + 6 * SIZE + timedelta(seconds=1), "b": ORIGIN + 7 * SIZE},
        ).rowcount
    engine.dispose()
    assert removed > 0
    dep.cli(
        "enqueue", "events", "--start", start, "--end", end, "--force", "--wait", "--timeout", "120"
    )
    records = store.list_records("events")
    assert statuses(records) == {"succeeded": 6} or all(
        r.status in (WindowStatus.SUCCEEDED, WindowStatus.SKIPPED) for r in records
    )
    assert sum(target_ids(data_url).values()) == loaded_before - removed
    assert target_ids(data_url) == Counter(
        i for i in source_ids(data_url) if _in_windows(data_url, i, 4, 10)
    )


def _in_windows(url: str, doc_id: str, first: int, last: int) -> bool:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        at = conn.execute(
            sa.text("SELECT created_at FROM events WHERE id = :i"), {"i": int(doc_id)}
        ).scalar_one()
    engine.dispose()
    return ORIGIN + first * SIZE <= at < ORIGIN + last * SIZE


def test_holder_whose_lock_expired_cannot_overwrite_the_new_owners_result(
    tmp_path: Path, pg_schema_url: str, redis_db: str
) -> None:
    seed_events(pg_schema_url, windows=3)
    dep = make_deployment(tmp_path, pg_schema_url, f"sqlite:///{tmp_path}/state.db", redis_db)
    config = load_config(dep.config_path)
    store = StateStore(config.settings.state_url)
    store.migrate()
    client = redis.Redis.from_url(redis_db)
    start = ORIGIN + SIZE
    store.create_windows("events", [_window(1)])
    store.queue("events", start, expect=[WindowStatus.PENDING])

    # Worker A takes the window and is then paused past its lock's TTL (no renewal).
    lock_a = WindowLock(client, "events", start, ttl_seconds=0.5)
    assert lock_a.acquire()
    claimed_a = store.claim_stage("events", start, Stage.PRECHECK)
    assert claimed_a is not None
    fence_a = claimed_a.fence
    wait_until(lambda: not client.exists(lock_a.key), timeout=30, what="A's lock to expire")
    assert not client.exists(lock_a.key)

    # Worker B finds the lock gone, takes over and runs precheck for real.
    store.transition("events", start, WindowStatus.QUEUED, expect=[WindowStatus.RUNNING])
    runtime = Runtime(config, store, client, connector_for)
    result_b = run_stage(runtime, Stage.PRECHECK, "events", start)
    assert result_b.outcome == Outcome.DONE
    after_b = store.get("events", start)
    assert after_b is not None and after_b.fence > fence_a and after_b.source_count == 2

    # A wakes up and tries to commit a (wrong) result with its old fence: refused.
    with pytest.raises(LostOwnershipError):
        store.transition(
            "events",
            start,
            WindowStatus.SKIPPED,
            expect=[WindowStatus.RUNNING],
            fence=fence_a,
            source_count=0,
        )
    final = store.get("events", start)
    assert final is not None
    assert final.status == WindowStatus.QUEUED and final.stage == Stage.EXTRACT
    assert final.source_count == 2
    store.dispose()


def test_only_one_of_two_beats_schedules(tmp_path: Path, pg_schema_url: str, redis_db: str) -> None:
    seed_events(pg_schema_url, windows=2)
    dep = make_deployment(
        tmp_path, pg_schema_url, f"sqlite:///{tmp_path}/state.db", redis_db, cleanup_every="2s"
    )
    try:
        dep.start_beat("beat-a")
        dep.start_beat("beat-b")

        def sent_by_each() -> dict[str, int]:
            return {
                name: dep.log_path(name).read_text(errors="replace").count("Sending due task")
                for name in ("beat-a", "beat-b")
            }

        # Three ticks of cleanup_every (2 s) by whichever beat holds the lock, while the other
        # one tries to take it.
        wait_until(
            lambda: max(sent_by_each().values()) >= 3, timeout=120, what="a beat sending 3 tasks"
        )
        sent = sent_by_each()
    finally:
        dep.stop_all()
    assert sorted(sent.values())[0] == 0, sent
    assert sorted(sent.values())[1] >= 3, sent


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A fresh RabbitMQ vhost for the test (RabbitMQ runs on this machine)."""
    import subprocess
    import uuid

    vhost = f"wp_test_{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)


def test_windows_run_with_rabbitmq_as_the_broker(
    tmp_path: Path, pg_schema_url: str, redis_db: str, rabbitmq_url: str
) -> None:
    per_window = seed_events(pg_schema_url, windows=12)
    dep = make_deployment(
        tmp_path,
        pg_schema_url,
        f"sqlite:///{tmp_path}/state.db",
        redis_db,
        broker_url=rabbitmq_url,
    )
    try:
        dep.start_stage_workers(concurrency=2)
        start, end = format_instant(ORIGIN), format_instant(ORIGIN + 12 * SIZE)
        dep.cli("enqueue", "events", "--start", start, "--end", end, "--wait", "--timeout", "120")
        records = dep.store().list_records("events")
    finally:
        dep.stop_all()
    assert len(records) == 12
    for index, record in enumerate(records):
        expected = WindowStatus.SKIPPED if per_window[index] == 0 else WindowStatus.SUCCEEDED
        assert record.status == expected
        assert record.target_count == per_window[index]
    assert target_ids(pg_schema_url) == source_ids(pg_schema_url)
    # Nothing went through Redis as a broker: its DB holds no kombu queues.
    client = redis.Redis.from_url(redis_db)
    assert not [k for k in client.keys("*") if k in (b"precheck", b"extract", b"load", b"audit")]


def test_a_backfill_never_starves_the_scheduled_windows(
    tmp_path: Path, pg_schema_url: str, redis_db: str
) -> None:
    seed_events(pg_schema_url, windows=WINDOWS)
    dep = make_deployment(tmp_path, pg_schema_url, f"sqlite:///{tmp_path}/state.db", redis_db)
    try:
        # A 40-window backfill is enqueued first, then beat's tick creates the live windows
        # after it (max_windows_per_tick of them: windows 40 to 100, the last 40 empty).
        dep.cli(
            "enqueue",
            "events",
            "--start",
            format_instant(ORIGIN),
            "--end",
            format_instant(ORIGIN + 40 * SIZE),
        )
        dep.start_stage_workers(concurrency=2)
        dep.send("windowpipe.generate", "events")
        store = dep.store()
        deadline = time.monotonic() + 180
        while True:
            scheduled = store.list_records("events", kind=WindowKind.SCHEDULED)
            if len(scheduled) == WINDOWS and all(
                r.status in (WindowStatus.SUCCEEDED, WindowStatus.SKIPPED) for r in scheduled
            ):
                break
            assert time.monotonic() < deadline, statuses(scheduled)
            time.sleep(0.2)
        manual = store.list_records("events", kind=WindowKind.MANUAL)
        manual_done = [
            r for r in manual if r.status in (WindowStatus.SUCCEEDED, WindowStatus.SKIPPED)
        ]
        # The live windows did not wait for the backfill to drain...
        assert len(manual_done) < 40
        # ...and the backfill still completes, max_backfill_windows at a time.
        records = dep.wait_finished("events", 40 + WINDOWS, timeout=240)
    finally:
        dep.stop_all()
    assert len(records) == 40 + WINDOWS
    assert statuses(records).keys() <= {"succeeded", "skipped"}
    assert target_ids(pg_schema_url) == source_ids(pg_schema_url)


# --- window locks on the real Redis ----------------------------------------------------------


def test_renewal_keeps_locks_alive_past_their_ttl_and_stops_at_release(redis_db: str) -> None:
    client = redis.Redis.from_url(redis_db)
    locks = [WindowLock(client, "events", _window(i).start, ttl_seconds=0.3) for i in range(3)]
    assert all(lock.acquire() for lock in locks)
    with locks[0].renewing(), locks[1].renewing(), locks[2].renewing():
        time.sleep(1.2)  # four TTLs: only renewal keeps the keys
        assert all(client.get(lock.key) == lock.token.encode() for lock in locks)
        assert not any(lock.lost for lock in locks)
        locks[1].release()
        time.sleep(0.6)
        # Released means gone, and no renewal racing the release took it back.
        assert not client.exists(locks[1].key)
        assert client.exists(locks[0].key) and client.exists(locks[2].key)
    for lock in (locks[0], locks[2]):
        lock.release()
        assert not client.exists(lock.key)


def test_a_lock_due_sooner_than_the_renewer_would_wake_is_renewed_in_time(redis_db: str) -> None:
    # The renewer sleeps until the next renewal is due and is woken only for a lock due before
    # that: here it sleeps for the long lock (10 s) when the short one (0.3 s) arrives.
    client = redis.Redis.from_url(redis_db)
    long = WindowLock(client, "events", _window(0).start, ttl_seconds=30)
    short = WindowLock(client, "events", _window(1).start, ttl_seconds=0.3)
    assert long.acquire() and short.acquire()
    with long.renewing():
        time.sleep(0.1)  # the renewer is asleep until the long lock is due
        with short.renewing():
            time.sleep(1.2)  # four of the short lock's TTLs
            assert client.get(short.key) == short.token.encode() and not short.lost
    for lock in (long, short):
        lock.release()


def test_renewal_marks_a_lock_taken_by_another_owner_as_lost(redis_db: str) -> None:
    client = redis.Redis.from_url(redis_db)
    mine = WindowLock(client, "events", ORIGIN, ttl_seconds=0.3)
    assert mine.acquire()
    with mine.renewing():
        client.set(mine.key, "someone-else", px=5000)  # as if ours expired and B took it
        time.sleep(0.5)
        assert mine.lost
        mine.release()  # releasing a lock we lost leaves the new owner's key alone
        assert client.get(mine.key) == b"someone-else"


def test_renewal_never_takes_back_a_key_that_is_gone(redis_db: str) -> None:
    # The key vanishes under its owner: a new owner finished and released it, or Redis was
    # wiped. Taking it back would lock out the window's next messages.
    client = redis.Redis.from_url(redis_db)
    mine = WindowLock(client, "events", ORIGIN, ttl_seconds=0.3)
    assert mine.acquire()
    with mine.renewing():
        client.delete(mine.key)
        wait_until(lambda: mine.lost, timeout=10, what="the renewer saw the lock gone")
        assert not client.exists(mine.key)
    mine.release()
    assert not client.exists(mine.key)


def test_one_recheck_run_per_pipeline_at_a_time(redis_db: str) -> None:
    client = redis.Redis.from_url(redis_db)
    running = RecheckLock(client, "events")
    assert running.acquire()
    # The key lives at most as long as a recheck run can (its hard time limit).
    assert 0 < client.ttl(running.key) <= CONTROL_TIME_LIMIT
    assert not RecheckLock(client, "events").acquire()  # the next tick's run skips
    assert RecheckLock(client, "orders").acquire()  # another pipeline's run is not held up
    running.release()
    again = RecheckLock(client, "events")
    assert again.acquire()
    running.release()  # a stale release leaves the new holder's lock alone
    assert client.exists(again.key)
    again.release()
    assert not client.exists(again.key)
