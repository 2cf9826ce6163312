"""Nothing stalls a window: no lost message, and no worker that lost its lock, leaves a window
waiting for an hour-scale timer.

Real Celery workers (and beat) on the real Redis, a SQL source, a local staging and a SQL target
on PostgreSQL, the state store on SQLite.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from core.instants import format_instant
from core.keys import window_lock_key
from core.records import Stage, WindowStatus
from tests.support import wait_until
from tests.support.deployment import STAGE_QUEUES, Deployment, statuses
from tests.support.faults import TcpFaultProxy, WireHold
from tests.test_fault_paused_load import (
    DOCS,
    SETTINGS,
    WINDOWS,
    assert_taken_over_once,
    create_target_tables,
    deployments,
    load_fences_in_server,
    loads_running_in,
    records,
    stopped_loads,
    wait_for,
    worker_events,
)
from tests.test_fault_paused_load import deployment as paused_load_deployment
from tests.test_faults import (
    ORIGIN,
    SIZE,
    deploy,
    loaded_ids,
    log_events,
    pipeline,
    process_tree,
    seed_events,
    slow_extract_deployment,
    sql_source,
    sql_target,
    stage_starts,
    still_running_at,
    upstream_of,
    via_proxy,
    wait_until_busy,
)

pytestmark = pytest.mark.integration

__all__ = ["deployments"]  # the fixture, used here too

SETTINGS_LOCK_TTL = float(SETTINGS["lock_ttl"].removesuffix("s"))
"""The paused-load deployments' lock TTL, in seconds."""


def window_statuses(dep: Deployment) -> dict[str, int]:
    store = dep.store()
    try:
        return statuses(store.list_records("events"))
    finally:
        store.dispose()


def stage_results(dep: Deployment, worker: str, stage: Stage) -> list[dict[str, object]]:
    """The `stage result` log events of the worker named `worker`'s `stage` tasks."""
    results = []
    for line in dep.log_path(worker).read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if event.get("event") == "stage result" and event.get("stage") == stage.value:
            results.append(event)
    return results


# --- a dispatch message lost with Redis ---------------------------------------------------------


def test_a_backfill_whose_dispatch_died_with_redis_settles_without_waiting_for_generation(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    """Timeline (`every = "1h"`, a backfill of 24 windows, 4 at a time):
        t0  `windowpipe enqueue` creates the 24 windows and queues the first 4
        t1  the 4 succeed; each finishing window asks for a dispatch: one message waits in
            the control queue (its worker is down, as after the broker loss that ends it)
        t2  Redis is wiped: the dispatch request is gone; nothing is queued or running,
            20 windows are pending, and generation comes back in an hour
        t3  a control worker and beat start again (cleanup every 5 s)
    Before the safety net, cleanup found nothing stale and the 20 windows stayed pending until
    the next generation tick; now cleanup dispatches the backfill at its next run, and every
    window succeeds within a minute of the wipe.
    """
    windows = 24
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
                max_backfill_windows=4,
            )
        },
        cleanup_every="5s",
    )
    stop_all.append(dep)
    dep.start_workers(STAGE_QUEUES, concurrency=2)
    end = ORIGIN + windows * SIZE
    dep.cli("enqueue", "events", "--start", format_instant(ORIGIN), "--end", format_instant(end))
    wait_until(
        lambda: window_statuses(dep) == {"succeeded": 4, "pending": windows - 4},
        timeout=120,
        what="the first four windows succeeded, the rest pending",
    )
    client = redis.Redis.from_url(redis_db)
    assert client.llen("control") >= 1, "a finishing window's dispatch request is waiting"
    client.flushdb()  # the wipe: broker queues, dispatch requests, locks
    client.close()
    wiped_at = time.monotonic()

    dep.start_workers(["control"], concurrency=1)
    dep.start_beat()
    wait_until(
        lambda: window_statuses(dep) == {"succeeded": windows},
        timeout=max(wiped_at + 60 - time.monotonic(), 1),
        what="every window succeeded within a minute of the wipe",
    )
    assert loaded_ids(pg_schema_url) == seeded
    dispatched = [
        event
        for event in log_events(dep)
        if event.get("event") == "dispatched" and event.get("pipeline") == "events"
    ]
    assert dispatched, "the backfill was dispatched again"


# --- a renewer after losing its lock ------------------------------------------------------------


def test_a_worker_that_lost_its_lock_never_takes_it_back_and_its_stage_stops(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    """Timeline (lock TTL 3 s, one window of 120 documents extracted 2 a page over a slow
    link, so extraction takes seconds):
        t0  extract worker A takes the window (fence f), starts extracting; A is frozen
        t1  A's lock expires; cleanup requeues the window; worker B extracts (fence f+1),
            load and audit finish it, and B's stages release the lock: the key is gone
        t2  A wakes. Its renewer is due at once. Before: it found the key gone and took it
            back with SET NX, holding the window's lock while A extracted on for nothing
            (any later message of the window found it locked and stopped). Now: the
            renewal only extends a lock A still holds, so the lock is lost, never taken;
            A's extraction stops at its next batch, and its fenced hand-back is refused
            (fence f+1 owns the window).
    """
    seeded = seed_events(pg_schema_url, [120])
    with TcpFaultProxy(upstream_of(pg_schema_url), latency=0.04) as source_proxy:
        dep = slow_extract_deployment(tmp_path, redis_db, pg_schema_url, source_proxy.port)
        stop_all.append(dep)
        dep.start_workers(("precheck", "load", "audit", "control"), concurrency=1)
        paused = dep.start_workers(["extract"], concurrency=1)["extract"]
        paused_pids = process_tree(paused)
        dep.send("windowpipe.generate", "events")

        _, record = wait_until_busy(dep, paused, Stage.EXTRACT)
        os.killpg(paused.pid, signal.SIGSTOP)
        assert still_running_at(dep, record), "extraction ended before the pause"
        dep.start_workers(["extract"], concurrency=1)
        records = dep.wait_finished("events", 1, timeout=120, kick_cleanup=True)
        assert [r.status for r in records] == [WindowStatus.SUCCEEDED]
        client = redis.Redis.from_url(redis_db)
        key = window_lock_key("events", ORIGIN)
        wait_until(lambda: not client.exists(key), timeout=30, what="the finished window unlocked")

        os.killpg(paused.pid, signal.SIGCONT)
        paused_name = dep.name_of(paused)
        owners_seen: set[str] = set()

        def paused_stage_ended() -> bool:
            owner = client.get(key)
            if owner is not None:
                owners_seen.add(owner.decode())
            return bool(stage_results(dep, paused_name, Stage.EXTRACT))

        wait_until(
            paused_stage_ended, timeout=60, what="the woken worker's extract ended", every=0.01
        )
        client.close()

    retaken = {owner for owner in owners_seen if int(owner.split(":")[1]) in paused_pids}
    assert not retaken, f"the woken worker took its lost lock back: {retaken}"
    [ended] = stage_results(dep, paused_name, Stage.EXTRACT)
    assert ended["outcome"] == "stopped" and "lost the window" in str(ended["detail"]), ended
    final = dep.store().get("events", ORIGIN)
    assert final is not None and final.status == WindowStatus.SUCCEEDED
    assert final.source_count == final.staged_count == final.target_count == 120
    assert stage_starts(dep, ORIGIN) == {"precheck": 1, "extract": 2, "load": 1, "audit": 1}
    assert loaded_ids(pg_schema_url) == seeded


# --- a load frozen inside its target transaction ------------------------------------------------


FROZEN_AT = {
    "mid-copy": (b"COPY ", True),
    "between-statements": (b"DELETE FROM", False),
}
"""Where the first owner's loads freeze: what `WireHold` holds of their transaction. Mid-COPY:
the COPY statement reached the server, its rows did not (the server waits inside COPY, where
`idle_in_transaction_session_timeout` does not apply). Between statements: the ledger row is
taken, the DELETE never arrives (idle in transaction)."""


@pytest.mark.parametrize("frozen_at", sorted(FROZEN_AT))
def test_a_load_frozen_inside_its_transaction_does_not_hold_the_window_from_the_next_owner(
    frozen_at: str,
    tmp_path: Path,
    pg_schema_url: str,
    redis_db: str,
    deployments: list[Deployment],
) -> None:
    """Timeline (lock TTL 3 s; six windows, each loaded by the frozen worker A):
    t0  A's loads move their ledger rows to their fences and freeze (the wire stops at
        the COPY's rows, or before the DELETE); then A's whole process group is stopped
    t1  A's locks expire; cleanup requeues; worker B claims each window (newer fence) and
        its load waits on A's ledger row
    t2  before: B waited until A woke (or, between statements only, for PostgreSQL's
        300 s idle timeout); not taken over within 120 s. Now: after `lock_timeout` B
        terminates the backend whose tag names an older fence of the same window, takes
        the row, loads and commits; every window succeeds within lock TTL + 30 s
    t3  A wakes: its connection is gone, its retry is refused by the ledger, its record
        commit by the store. Each document is in the target once.
    """
    marker, after = FROZEN_AT[frozen_at]
    seeded = seed_events(pg_schema_url, DOCS)
    create_target_tables(pg_schema_url)
    with WireHold(upstream_of(pg_schema_url), marker, after=after) as hold:
        dep = paused_load_deployment(tmp_path, "windowpipe", redis_db, pg_schema_url, pg_schema_url)
        held_dep = paused_load_deployment(
            tmp_path, "held", redis_db, pg_schema_url, via_proxy(pg_schema_url, hold.port)
        )
        deployments.extend([dep, held_dep])
        dep.start_workers(("precheck", "extract", "audit", "control"), concurrency=2)
        frozen = held_dep.start_workers(["load"], concurrency=WINDOWS)["load"]
        frozen_name = held_dep.name_of(frozen)
        dep.send("windowpipe.generate", "events")
        wait_for(lambda: hold.held == WINDOWS, f"every load of the first worker frozen {frozen_at}")
        paused = loads_running_in(held_dep, frozen)
        assert len(paused) == WINDOWS, paused
        assert set(load_fences_in_server(pg_schema_url)) == set(paused.values())
        os.killpg(frozen.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()

        taker = dep.start_workers(["load"], concurrency=WINDOWS)["load"]
        bound = SETTINGS_LOCK_TTL + 30
        wait_ticking(
            lambda: statuses(records(dep)) == {"succeeded": WINDOWS},
            f"every window loaded by the next owner and succeeded within {bound:g}s",
            timeout=stopped_at + bound - time.monotonic(),
            tick=lambda: dep.send("windowpipe.cleanup"),
        )
        # The frozen loads' sessions were ended by the server, not left waiting.
        assert not set(load_fences_in_server(pg_schema_url)) & set(paused.values())
        hold.release()
    os.killpg(frozen.pid, signal.SIGCONT)
    wait_for(
        lambda: len(stopped_loads(held_dep, frozen_name)) == WINDOWS,
        "the woken worker's loads all stopped",
    )

    assert_taken_over_once(dep, pg_schema_url, seeded, paused, stopped_loads(held_dep, frozen_name))
    for start in paused:
        assert stage_starts(dep, start) == {"precheck": 1, "extract": 1, "load": 2, "audit": 1}
    ended = [
        event
        for event in worker_events(dep, dep.name_of(taker))
        if event.get("event") == "waited on the window's ledger row; ended older loads holding it"
    ]
    assert ended, "the taker ended the frozen loads"


def wait_ticking(
    condition: Callable[[], bool], what: str, timeout: float, tick: Callable[[], object]
) -> None:
    """Wait up to `timeout` seconds until `condition()` holds, calling `tick` about once a
    second meanwhile (as beat sends cleanup)."""
    deadline = time.monotonic() + max(timeout, 1)
    last_tick = 0.0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen after {timeout:g}s")
        if time.monotonic() - last_tick > 1:
            tick()
            last_tick = time.monotonic()
        time.sleep(0.1)
