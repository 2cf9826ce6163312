"""Late, deleted and updated documents on real workers: rechecks and `windowpipe reconcile`.

A SQL source on PostgreSQL with a version column (`updated_at`), a local staging and a SQL
target; real Celery workers per stage queue, control and recheck. After every window
succeeded, the source changes under four closed windows: documents added to two, one deleted
from a third, one updated in place (its version moves) in a fourth. Exactly those four must be
re-run, the target must match the source id for id (and the updated document's content), the
other windows must be untouched, and the drift must show in `status` and the metrics.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from core.instants import format_instant
from core.locks import RecheckLock
from core.records import WindowRecord, WindowStatus
from tests import test_faults as faults
from tests.support import wait_until
from tests.support.deployment import Deployment, statuses

pytestmark = pytest.mark.integration

WINDOWS = 8
DOCS_PER_WINDOW = 3
ORIGIN, SIZE = faults.ORIGIN, faults.SIZE
ADDED_TO, DELETED_FROM, UPDATED_IN = (1, 2), 4, 6
CHANGED = {*ADDED_TO, DELETED_FROM, UPDATED_IN}


def _seed(url: str) -> None:
    """`events(id, created_at, updated_at, payload)`: DOCS_PER_WINDOW rows in every window."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE events (id BIGINT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL, "
                "updated_at TIMESTAMPTZ NOT NULL, payload TEXT)"
            )
        )
        rows = [
            {
                "id": window * 100 + n,
                "at": ORIGIN + window * SIZE + timedelta(minutes=n),
                "payload": f"original {window * 100 + n}",
            }
            for window in range(WINDOWS)
            for n in range(DOCS_PER_WINDOW)
        ]
        conn.execute(
            sa.text("INSERT INTO events VALUES (:id, :at, :at, :payload)"),
            rows,
        )
    engine.dispose()


def _change_the_source(url: str) -> None:
    """Two late documents, one deleted, one updated in place (same count, newer version)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for window in ADDED_TO:
            at = ORIGIN + window * SIZE + timedelta(minutes=10)
            conn.execute(
                sa.text("INSERT INTO events VALUES (:id, :at, :at, 'late')"),
                {"id": window * 100 + 50, "at": at},
            )
        conn.execute(sa.text("DELETE FROM events WHERE id = :id"), {"id": DELETED_FROM * 100})
        conn.execute(
            sa.text("UPDATE events SET payload = 'updated', updated_at = now() WHERE id = :id"),
            {"id": UPDATED_IN * 100 + 1},
        )
    engine.dispose()


def _source_ids(url: str) -> Counter[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        ids = Counter(str(row[0]) for row in conn.execute(sa.text("SELECT id FROM events")))
    engine.dispose()
    return ids


def _target_payload(url: str, doc_id: int) -> Any:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        value = conn.execute(
            sa.text("SELECT doc ->> 'payload' FROM events_loaded WHERE doc_id = :id"),
            {"id": str(doc_id)},
        ).scalar_one()
    engine.dispose()
    return value


def _deploy(tmp_path: Path, url: str, redis_url: str, **extra: Any) -> Deployment:
    _seed(url)
    dep = faults.deploy(
        tmp_path,
        redis_url,
        {
            "events": faults.pipeline(
                faults.sql_source(url, version_column="updated_at"),
                {"type": "local", "path": str(tmp_path / "staging")},
                faults.sql_target(url),
                WINDOWS,
                **extra,
            )
        },
    )
    dep.start_workers([*faults.ALL_QUEUES, "recheck"], concurrency=1)
    dep.send("windowpipe.generate", "events")
    first = faults.wait_all_finished(dep, {"events": WINDOWS}, timeout=120)["events"]
    assert statuses(first) == {"succeeded": WINDOWS}
    assert faults.loaded_ids(url) == _source_ids(url)
    return dep


def _index(record: WindowRecord) -> int:
    return int((record.window_start - ORIGIN) / SIZE)


def _wait_rerun(dep: Deployment, before: dict[int, WindowRecord]) -> list[WindowRecord]:
    """Wait until every window is succeeded again and the changed ones ran anew."""
    deadline = time.monotonic() + 120
    store = dep.store()
    try:
        while True:
            records = store.list_records("events")
            rerun = {_index(r) for r in records if r.fence != before[_index(r)].fence}
            if rerun >= CHANGED and all(r.status == WindowStatus.SUCCEEDED for r in records):
                return records
            assert time.monotonic() < deadline, [(r.status, _index(r)) for r in records]
            dep.send("windowpipe.dispatch", "events")
            time.sleep(1)
    finally:
        store.dispose()


def _recheck_runs(dep: Deployment) -> int:
    """How many recheck tasks the workers finished."""
    return sum(
        1
        for e in faults.log_events(dep)
        if str(e.get("event", "")).startswith("Task windowpipe.recheck[")
        and " succeeded in " in str(e["event"])
    )


def _assert_exactly_the_changed_windows_reran(
    dep: Deployment, url: str, before: dict[int, WindowRecord], after: list[WindowRecord]
) -> None:
    for record in after:
        index = _index(record)
        if index in CHANGED:
            assert record.fence > before[index].fence, index
            assert len(record.drift) == 1, (index, record.drift)
        else:
            # Untouched: not re-run, no drift.
            assert record.fence == before[index].fence, index
            assert record.drift == [], index
            assert faults.stage_starts(dep, record.window_start)["load"] == 1
    by_index = {_index(r): r for r in after}
    for index in ADDED_TO:
        drift = by_index[index].drift[0]
        assert (drift["count_before"], drift["count_after"]) == (3, 4)
    assert (by_index[DELETED_FROM].drift[0]["count_after"]) == 2
    updated = by_index[UPDATED_IN].drift[0]
    assert updated["count_before"] == updated["count_after"] == 3
    assert updated["version_after"] != updated["version_before"]
    # The target matches the source again, id for id, with the updated document's content.
    assert faults.loaded_ids(url) == _source_ids(url)
    assert _target_payload(url, UPDATED_IN * 100 + 1) == "updated"


def test_a_recheck_re_runs_exactly_the_windows_whose_source_changed(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    dep = _deploy(tmp_path, pg_schema_url, redis_db, recheck=["1h", "400d"])
    stop_all.append(dep)
    store = dep.store()
    before = {_index(r): r for r in store.list_records("events")}
    store.dispose()
    assert all(r.source_version is not None and r.rechecks_done == 0 for r in before.values())
    _change_the_source(pg_schema_url)

    # A recheck run sent while another run of the pipeline holds its lock is skipped.
    held = RecheckLock(redis.Redis.from_url(redis_db), "events")
    assert held.acquire()
    app = Celery(broker=redis_db)
    app.send_task("windowpipe.recheck", ("events",), queue="recheck")
    wait_until(lambda: _recheck_runs(dep) >= 1, timeout=60, what="the held-up recheck to run")
    untouched = dep.store()
    assert [(r.rechecks_done, r.fence) for r in untouched.list_records("events")] == [
        (0, before[_index(r)].fence) for r in untouched.list_records("events")
    ]
    untouched.dispose()
    held.release()

    # What beat does for a pipeline with horizons: the windows ended long ago, so the first
    # horizon (1h) has passed for all of them; the second (400 days) for none.
    app.send_task("windowpipe.recheck", ("events",), queue="recheck")
    app.close()
    after = _wait_rerun(dep, before)

    _assert_exactly_the_changed_windows_reran(dep, pg_schema_url, before, after)
    assert all(r.rechecks_done == 1 and r.checked_at is not None for r in after)
    assert {r.drift[0]["by"] for r in after if r.drift} == {"recheck 1:00:00"}
    # Nothing is due any more: another recheck changes nothing.
    app = Celery(broker=redis_db)
    app.send_task("windowpipe.recheck", ("events",), queue="recheck")
    app.close()
    wait_until(lambda: _recheck_runs(dep) >= 3, timeout=60, what="the third recheck to run")
    again = dep.store()
    assert [r.fence for r in again.list_records("events")] == [r.fence for r in after]
    again.dispose()

    # Visible in status (the table's drift column, and the records in --json) and the metrics.
    table = dep.cli("status", "events").stdout
    assert table.count("1x, 3->4") == 2 and "1x, 3->2" in table and "1x, 3->3" in table
    rows = json.loads(dep.cli("status", "events", "--json").stdout)
    assert sum(1 for row in rows if row["drift"]) == len(CHANGED)
    exported = dep.cli("metrics", "--once").stdout
    assert 'windowpipe_drift_windows_total{pipeline="events"} 4.0' in exported
    assert f'windowpipe_rechecks_total{{pipeline="events"}} {float(WINDOWS)}' in exported
    assert 'windowpipe_rechecks_pending{pipeline="events"} 0.0' in exported
    # And when the control work last ran (the liveness alert reads it).
    assert 'windowpipe_control_last_run_timestamp_seconds{pipeline="events",task="generate"}' in (
        exported
    ) or 'windowpipe_control_last_run_timestamp_seconds{task="generate",pipeline="events"}' in (
        exported
    )


def test_reconcile_finds_the_same_windows_changes_nothing_then_repairs_them(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    dep = _deploy(tmp_path, pg_schema_url, redis_db)
    stop_all.append(dep)
    store = dep.store()
    before = {_index(r): r for r in store.list_records("events")}
    _change_the_source(pg_schema_url)
    span = (
        "--start",
        format_instant(ORIGIN),
        "--end",
        format_instant(ORIGIN + WINDOWS * SIZE),
    )

    report = json.loads(dep.cli("reconcile", "events", *span, "--json").stdout)
    assert len(report) == WINDOWS
    mismatched = {i for i, row in enumerate(report) if not row["matches"]}
    assert mismatched == CHANGED
    assert all(not row["repaired"] for row in report)
    # A report changes nothing.
    unchanged = {_index(r): r for r in store.list_records("events")}
    assert unchanged == before
    store.dispose()

    repaired = dep.cli("reconcile", "events", *span, "--repair")
    assert f"{len(CHANGED)} do not match" in repaired.stdout
    assert f"{len(CHANGED)} put back to run" in repaired.stdout
    after = _wait_rerun(dep, before)
    _assert_exactly_the_changed_windows_reran(dep, pg_schema_url, before, after)
    assert {r.drift[0]["by"] for r in after if r.drift} == {"reconcile"}
    # Reconciled again: everything matches.
    final = json.loads(dep.cli("reconcile", "events", *span, "--json").stdout)
    assert all(row["matches"] for row in final)
