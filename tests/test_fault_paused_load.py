"""A load worker frozen inside its target transaction past its lock TTL cannot double a window.

Real Celery workers on Redis, a SQL source, a local staging and a SQL target on PostgreSQL. A load
worker (A) is frozen with SIGSTOP of its whole process group while every one of its loads is
inside its target transaction; its locks expire, cleanup requeues the windows and a second load
worker (B) takes them over with newer fences. Then A is woken. Two timings, both for every
window at once:

- A holds its ledger rows (the method in TESTING.md): a test connection holds the target table
  in EXCLUSIVE mode, so A's loads get through their ledger upsert and wait at their DELETE. B's
  loads wait on A's ledger rows until `lock_timeout`, then end A's sessions (tagged with an
  older fence of the same window, `connectors.sql_target.take_ledger_row`), take the rows and
  wait at their own DELETE. The table lock is released and B commits; A is woken, finds its
  connection gone, and its retry is refused by the ledger.
- A is frozen before its ledger write reaches the server: a TCP proxy in front of PostgreSQL,
  used by A only, holds the message carrying A's ledger upsert. B loads and commits, audit
  marks the windows succeeded, and only then is A woken: the target refuses its load
  (StaleFenceError) and A's task stops.

Before the ledger, the first timing put every window's documents in the target twice (A's and
B's transactions each deleted nothing, then inserted the window): here the audit caught it and
the whole chain ran again; in the issue's run A committed after the audit and the target kept
both copies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from connectors.sql_target import SqlTarget
from core.config import SqlTargetConfig
from core.instants import format_instant
from core.locks import held_locks
from core.records import Stage, WindowRecord, WindowStatus
from core.windows import Window
from tests.support.deployment import Deployment, statuses, write_config
from tests.support.faults import WireHold
from tests.test_faults import (
    FAST_RECOVERY,
    ORIGIN,
    SIZE,
    pipeline,
    process_tree,
    seed_events,
    sql_source,
    sql_target,
    stage_starts,
    upstream_of,
    via_proxy,
)

pytestmark = pytest.mark.integration

WINDOWS = 6
"""Windows in each test; the paused load worker runs all of them at once."""
DOCS = [3 + index % 4 for index in range(WINDOWS)]
SETTINGS = {**FAST_RECOVERY, "lock_ttl": "3s", "stale_after": "10s"}
"""Locks expire 3 s after a frozen worker's last renewal; cleanup then requeues its windows."""
MAX_ATTEMPTS = 20
"""Cleanup's requeues count attempts; room enough that no window dies of the pause."""
TIMEOUT = 60.0


@pytest.fixture
def deployments() -> Iterator[list[Deployment]]:
    """Deployments registered here have every process woken and stopped after the test."""
    started: list[Deployment] = []
    yield started
    for dep in started:
        for _, process in dep.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)
        dep.stop_all()


def deployment(
    workdir: Path, name: str, redis_url: str, source_url: str, target_url: str
) -> Deployment:
    """A config of its own (its own target URL) over the shared Redis DB and state store."""
    events = pipeline(
        sql_source(source_url),
        {"type": "local", "path": str(workdir / "staging")},
        sql_target(target_url),
        WINDOWS,
        max_attempts=MAX_ATTEMPTS,
    )
    config = write_config(
        workdir / f"{name}.toml",
        {"redis_url": redis_url, "state_url": f"sqlite:///{workdir}/state.db", **SETTINGS},
        {"events": events},
    )
    return Deployment(config_path=config, workdir=workdir)


def create_target_tables(url: str) -> None:
    """The target table and its ledger, as the first load would create them."""
    target = SqlTarget(SqlTargetConfig(type="sql", url=url, table="events_loaded"))
    try:
        target.count_window("events", Window(ORIGIN, ORIGIN + SIZE))
    finally:
        target.close()


# --- observing ----------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, tick: Callable[[], object] = bool) -> None:
    """Wait until `condition()` holds, calling `tick` about once a second meanwhile."""
    deadline = time.monotonic() + TIMEOUT
    last_tick = 0.0
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen after {TIMEOUT:g}s")
        if time.monotonic() - last_tick > 1:
            tick()
            last_tick = time.monotonic()
        time.sleep(0.1)


def waiting_backends(url: str, pattern: str) -> int:
    """PostgreSQL backends of this database waiting on a lock, running a statement like
    `pattern` (`pg_stat_activity` says who waits where)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND query ILIKE :pattern"
                    ),
                    {"pattern": pattern},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def load_fences_in_server(url: str) -> list[int]:
    """The fences of the loads PostgreSQL has a session for in this database (a load tags its
    transaction `windowpipe-load FENCE ...`, `connectors.sql_target.LoadTag`)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            names = conn.execute(
                sa.text(
                    "SELECT application_name FROM pg_stat_activity"
                    " WHERE datname = current_database()"
                    " AND application_name LIKE 'windowpipe-load %'"
                )
            ).scalars()
            return [int(name.split()[1]) for name in names]
    finally:
        engine.dispose()


def loads_running_in(dep: Deployment, worker: subprocess.Popen[bytes]) -> dict[datetime, int]:
    """The windows whose load runs in a process of `worker`, with that load's fence."""
    client, store = dep.redis(), dep.store()
    try:
        pids = process_tree(worker)
        found = {}
        for held in held_locks(client):
            record = store.get("events", held.window_start)
            if (
                held.pid in pids
                and record is not None
                and record.status == WindowStatus.RUNNING
                and record.stage == Stage.LOAD
            ):
                found[held.window_start] = record.fence
        return found
    finally:
        client.close()
        store.dispose()


def records(dep: Deployment) -> list[WindowRecord]:
    store = dep.store()
    try:
        return store.list_records("events")
    finally:
        store.dispose()


def taken_over(dep: Deployment, paused: dict[datetime, int]) -> bool:
    """Every paused window is claimed again (a newer fence), running at load or beyond."""
    now = {record.window_start: record for record in records(dep)}
    return all(
        start in now
        and now[start].fence > fence
        and (now[start].stage != Stage.LOAD or now[start].status == WindowStatus.RUNNING)
        for start, fence in paused.items()
    )


def ledger(url: str) -> dict[datetime, tuple[int, int]]:
    """The target's ledger: window start -> (fence, row_count)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT window_start, fence, row_count FROM windowpipe_ledger")
            )
            return {start: (int(fence), int(count)) for start, fence, count in rows}
    finally:
        engine.dispose()


def target_ids(url: str) -> Counter[str]:
    """The multiset of document ids in the target table."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return Counter(
                str(row[0]) for row in conn.execute(sa.text("SELECT doc_id FROM events_loaded"))
            )
    finally:
        engine.dispose()


def worker_events(dep: Deployment, name: str) -> list[dict[str, Any]]:
    """The JSON log events of one worker process."""
    events = []
    for line in dep.log_path(name).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def stopped_loads(dep: Deployment, name: str) -> dict[str, str]:
    """Window -> detail of each load the worker `name` stopped (refused) after it woke."""
    return {
        event["window"]: event.get("detail", "")
        for event in worker_events(dep, name)
        if event.get("event") == "stage result"
        and event.get("stage") == "load"
        and event.get("outcome") == "stopped"
    }


def assert_every_window_once(dep: Deployment, url: str, seeded: Counter[str]) -> None:
    finished = records(dep)
    assert statuses(finished) == {"succeeded": WINDOWS}, statuses(finished)
    for record in finished:
        assert record.source_count == record.staged_count == record.target_count
    loaded = target_ids(url)
    assert loaded == seeded, (loaded - seeded, seeded - loaded)


LEDGER_WRITE = b"INSERT INTO windowpipe_ledger"
"""What `WireHold` holds of a load to freeze it before its ledger write reaches the server: the
load has begun its transaction, but its first write has not arrived."""


def assert_taken_over_once(
    dep: Deployment,
    url: str,
    seeded: Counter[str],
    paused: dict[datetime, int],
    refused: dict[str, str],
) -> None:
    """Every window once in the target, loaded by the next owner: each frozen load (window ->
    its fence in `paused`) stopped as refused (`refused`: window -> detail), and the ledger holds
    the next owner's fence, between the frozen one and the audit's, and row count."""
    assert_every_window_once(dep, url, seeded)
    assert set(refused) == {format_instant(start) for start in paused}
    assert all("lost the window to a newer owner" in why for why in refused.values()), refused
    recorded = ledger(url)
    final = {record.window_start: record for record in records(dep)}
    for index, (start, fence) in enumerate(sorted(paused.items())):
        ledger_fence, rows = recorded[start]
        assert fence < ledger_fence < final[start].fence  # the taker's load, then its audit
        assert rows == DOCS[index] == final[start].target_count


class TableLock:
    """A test connection holding the target table in EXCLUSIVE mode (reads go on; a load's
    DELETE waits, inside its transaction)."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)
        self.conn = self.engine.connect()

    def __enter__(self) -> TableLock:
        self.conn.execute(sa.text("LOCK TABLE events_loaded IN EXCLUSIVE MODE"))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.conn.rollback()
        self.conn.close()
        self.engine.dispose()


# --- the tests ----------------------------------------------------------------------------------


def test_a_load_frozen_holding_its_ledger_rows_is_replaced_once_by_the_next_owner(
    tmp_path: Path, pg_schema_url: str, redis_db: str, deployments: list[Deployment]
) -> None:
    seeded = seed_events(pg_schema_url, DOCS)
    create_target_tables(pg_schema_url)
    dep = deployment(tmp_path, "windowpipe", redis_db, pg_schema_url, pg_schema_url)
    deployments.append(dep)
    dep.start_workers(("precheck", "extract", "audit", "control"), concurrency=2)
    frozen = dep.start_workers(["load"], concurrency=WINDOWS)["load"]
    frozen_name = dep.name_of(frozen)

    def cleanup() -> None:
        dep.send("windowpipe.cleanup")

    def kick() -> None:
        dep.send("windowpipe.cleanup")
        dep.send("windowpipe.dispatch", "events")

    with TableLock(pg_schema_url):
        dep.send("windowpipe.generate", "events")
        # Every window's load has moved its ledger row and waits at its DELETE.
        wait_for(
            lambda: waiting_backends(pg_schema_url, "DELETE FROM%events_loaded%") == WINDOWS,
            "every load of the first worker blocked inside its transaction",
        )
        paused = loads_running_in(dep, frozen)
        assert len(paused) == WINDOWS, paused
        os.killpg(frozen.pid, signal.SIGSTOP)

        taker = dep.start_workers(["load"], concurrency=WINDOWS)["load"]
        # Locks expire, cleanup requeues, the second worker claims each window (newer fence),
        # waits on the frozen worker's ledger row, ends that session and takes the row.
        wait_for(lambda: taken_over(dep, paused), "every window claimed again", tick=cleanup)
        wait_for(
            lambda: (
                not set(load_fences_in_server(pg_schema_url)) & set(paused.values())
                and waiting_backends(pg_schema_url, "DELETE FROM%events_loaded%") == WINDOWS
            ),
            "every frozen load's session ended, the second worker's loads at their DELETE",
        )
    os.killpg(frozen.pid, signal.SIGCONT)

    wait_for(
        lambda: statuses(records(dep)) == {"succeeded": WINDOWS},
        "every window succeeded",
        tick=kick,
    )
    wait_for(
        lambda: len(stopped_loads(dep, frozen_name)) == WINDOWS,
        "the woken worker's loads all stopped",
    )

    # The woken loads found their sessions ended and were refused; the ledger holds the
    # taker's fence and row count for every window.
    refused = stopped_loads(dep, frozen_name)
    assert_taken_over_once(dep, pg_schema_url, seeded, paused, refused)
    taker_loads = [
        e
        for e in worker_events(dep, dep.name_of(taker))
        if e.get("event") == "stage result" and e.get("stage") == "load"
    ]
    assert {e["window"] for e in taker_loads if e.get("outcome") == "done"} == set(refused)
    # The pause cost one extra load per window and nothing else: the audit never found a
    # window doubled (without the ledger it did, and the whole chain ran again).
    for start in paused:
        assert stage_starts(dep, start) == {"precheck": 1, "extract": 1, "load": 2, "audit": 1}


def test_a_load_frozen_before_its_ledger_write_is_refused_by_the_target_when_it_wakes(
    tmp_path: Path, pg_schema_url: str, redis_db: str, deployments: list[Deployment]
) -> None:
    seeded = seed_events(pg_schema_url, DOCS)
    create_target_tables(pg_schema_url)
    with WireHold(upstream_of(pg_schema_url), LEDGER_WRITE) as hold:
        dep = deployment(tmp_path, "windowpipe", redis_db, pg_schema_url, pg_schema_url)
        # The frozen worker's config differs only in its target URL: through the proxy.
        held_dep = deployment(
            tmp_path,
            "held",
            redis_db,
            pg_schema_url,
            via_proxy(pg_schema_url, hold.port),
        )
        deployments.extend([dep, held_dep])
        dep.start_workers(("precheck", "extract", "audit", "control"), concurrency=2)
        frozen = held_dep.start_workers(["load"], concurrency=WINDOWS)["load"]
        frozen_name = held_dep.name_of(frozen)

        def kick() -> None:
            dep.send("windowpipe.cleanup")
            dep.send("windowpipe.dispatch", "events")

        dep.send("windowpipe.generate", "events")
        wait_for(lambda: hold.held == WINDOWS, "every load's ledger write held on the wire")
        paused = loads_running_in(held_dep, frozen)
        assert len(paused) == WINDOWS, paused
        os.killpg(frozen.pid, signal.SIGSTOP)

        dep.start_workers(["load"], concurrency=2)
        # The windows finish while their first owner is still frozen.
        wait_for(
            lambda: statuses(records(dep)) == {"succeeded": WINDOWS},
            "every window succeeded while the first load worker is frozen",
            tick=kick,
        )
        assert target_ids(pg_schema_url) == seeded
        before_wake = ledger(pg_schema_url)

        # The held upserts reach the server now, after the newer loads committed.
        hold.release()
        os.killpg(frozen.pid, signal.SIGCONT)
        wait_for(
            lambda: len(stopped_loads(held_dep, frozen_name)) == WINDOWS,
            "the woken worker's loads all refused",
        )

    assert_every_window_once(dep, pg_schema_url, seeded)
    assert ledger(pg_schema_url) == before_wake  # the refused loads changed nothing
    refused = stopped_loads(held_dep, frozen_name)
    assert set(refused) == {format_instant(start) for start in paused}
    for start, fence in paused.items():
        why = refused[format_instant(start)]
        newer = before_wake[start][0]
        assert why.startswith("lost the window to a newer owner: sql target: refused a stale"), why
        assert f"its fence {fence} is older than fence {newer}" in why, why
        assert fence < newer
        assert stage_starts(dep, start) == {"precheck": 1, "extract": 1, "load": 2, "audit": 1}
