"""The edges of a window's truth, on real workers: what the audit proves, what a skip does to
the target, and fences across a restored state store.

Real Celery worker processes per stage queue plus control, on the real Redis; a SQL source and
a SQL target on PostgreSQL; a local staging; the state store on SQLite (a file, so a test can
back it up and restore it as an operator would). Each test starts only the workers its
timeline needs, so that it decides what happens between two stages.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import sqlite3
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from connectors.base import Batch, Document, Manifest
from connectors.local import LocalStaging
from connectors.sql_target import SqlTarget
from core.config import LocalStagingConfig, SqlTargetConfig
from core.errors import StaleFenceError
from core.instants import format_instant
from core.records import Stage, WindowRecord, WindowStatus
from core.windows import Window
from tests import test_faults as faults
from tests.support import wait_until
from tests.support.deployment import Deployment, statuses

pytestmark = pytest.mark.integration

ORIGIN, SIZE = faults.ORIGIN, faults.SIZE


def _deploy(tmp_path: Path, pg_url: str, redis_url: str, windows: int, **extra: Any) -> Deployment:
    return faults.deploy(
        tmp_path,
        redis_url,
        {
            "events": faults.pipeline(
                faults.sql_source(pg_url),
                {"type": "local", "path": str(tmp_path / "staging")},
                faults.sql_target(pg_url),
                windows,
                **extra,
            )
        },
    )


def _records(dep: Deployment) -> list[WindowRecord]:
    store = dep.store()
    try:
        return store.list_records("events")
    finally:
        store.dispose()


def _source_ids(url: str) -> Counter[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return Counter(str(i) for i in conn.execute(sa.text("SELECT id FROM events")).scalars())
    finally:
        engine.dispose()


def _execute(url: str, statement: str, rows: list[dict[str, Any]] | None = None) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement), rows or {})
    finally:
        engine.dispose()


def _all_at(dep: Deployment, stage: Stage, windows: int) -> list[WindowRecord]:
    """Every window queued for `stage` (the stages before it done, nobody runs it yet)."""
    found = _records(dep)
    ready = [r for r in found if r.status == WindowStatus.QUEUED and r.stage == stage]
    return found if len(ready) == windows else []


def _window_end(windows: int) -> str:
    return format_instant(ORIGIN + windows * SIZE)


def test_documents_arriving_between_precheck_and_extract_are_loaded_and_pass_the_audit(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    """Timeline: control and precheck workers only; every window is counted (3 documents
    each) and waits for extract. A document arrives in every window. Then the extract, load
    and audit workers start: extract reads 4 per window, the target holds 4, the source holds
    4. The audit compares the target with what extract read, not with precheck's 3: every
    window succeeds on its first attempt and the target equals the source. (Before, every
    window failed its first audit with `source=3 staged=4 target=4` and ran again; a steady
    trickle of late documents killed windows after `max_attempts`.)"""
    windows = 6
    faults.seed_events(pg_schema_url, [3] * windows)
    dep = _deploy(tmp_path, pg_schema_url, redis_db, windows)
    stop_all.append(dep)
    dep.start_workers(["control", "precheck"])
    dep.send("windowpipe.generate", "events")
    wait_until(lambda: _all_at(dep, Stage.EXTRACT, windows), 120, "every window prechecked")

    _execute(
        pg_schema_url,
        "INSERT INTO events (id, created_at, payload) VALUES (:id, :at, 'late')",
        [
            {"id": 1000 + index, "at": ORIGIN + index * SIZE + timedelta(minutes=14)}
            for index in range(windows)
        ],
    )
    dep.start_workers(["extract", "load", "audit"])
    done = faults.wait_all_finished(dep, {"events": windows}, timeout=180)["events"]

    assert statuses(done) == {"succeeded": windows}, [r.error for r in done]
    for record in done:
        assert record.attempts == 1, record
        assert record.source_count == record.staged_count == record.target_count == 4
        assert record.checksum == record.target_checksum is not None
        assert record.drift == []
    assert faults.loaded_ids(pg_schema_url) == _source_ids(pg_schema_url)


def _swap_staged_ids(staging_root: Path, manifest_path: str) -> None:
    """Rewrite a window's staged files with every document's id changed (same count), and
    its manifest's sha256 and sizes to match: a load that brings the right number of rows
    with the wrong ids."""
    manifest = Manifest.from_json((staging_root / manifest_path).read_bytes())
    rewritten = []
    for staged in manifest.files:
        path = staging_root / staged.path
        lines = gzip.decompress(path.read_bytes()).splitlines()
        swapped = []
        for line in lines:
            item = json.loads(line)
            item["id"] = f"wrong-{item['id']}"
            swapped.append(json.dumps(item).encode())
        data = gzip.compress(b"\n".join(swapped) + b"\n")
        path.write_bytes(data)
        rewritten.append(
            dataclasses.replace(staged, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        )
    manifest.files = rewritten
    (staging_root / manifest_path).write_bytes(manifest.to_json())


def test_a_load_with_the_right_count_but_the_wrong_ids_fails_the_audit(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    """Timeline: precheck and extract workers only; every window is staged and waits for
    load. One window's staged files are rewritten with other ids (same count, sha256 and
    manifest made to match, so the load accepts them). The load and audit workers start: that
    window's target rows have the staged count but not the ids extract read; the audit
    compares the id checksum extract recorded with the target's and fails the window
    (`max_attempts = 1`: it ends dead, its error saying so). The other windows succeed. (Before,
    the count-only audit let the wrong ids through as succeeded.)"""
    windows, wrong = 4, 2
    faults.seed_events(pg_schema_url, [3] * windows)
    dep = _deploy(tmp_path, pg_schema_url, redis_db, windows, max_attempts=1)
    stop_all.append(dep)
    dep.start_workers(["control", "precheck", "extract"])
    dep.send("windowpipe.generate", "events")
    staged = wait_until(lambda: _all_at(dep, Stage.LOAD, windows), 120, "every window staged")
    [victim] = [r for r in staged if r.window_start == ORIGIN + wrong * SIZE]
    assert victim.manifest is not None
    _swap_staged_ids(tmp_path / "staging", victim.manifest)

    dep.start_workers(["load", "audit"])
    done = faults.wait_all_finished(dep, {"events": windows}, timeout=180)["events"]

    by_start = {r.window_start: r for r in done}
    failed = by_start[victim.window_start]
    assert failed.status == WindowStatus.DEAD, failed
    assert failed.error is not None and "ids disagree" in failed.error, failed.error
    assert failed.target_count == failed.staged_count == 3
    assert failed.checksum != failed.target_checksum
    others = [r for r in done if r.window_start != victim.window_start]
    assert statuses(others) == {"succeeded": windows - 1}


def _reconcile(dep: Deployment, *extra: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        dep.cli(
            "reconcile",
            "events",
            "--start",
            format_instant(ORIGIN),
            "--end",
            _window_end(4),
            "--json",
            *extra,
        ).stdout
    )
    return rows


def test_a_window_purged_at_the_source_is_emptied_in_the_target_by_reconcile_repair(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    """Timeline: 4 windows succeed (3 documents each). Every document of window 1 is deleted
    at the source. `reconcile --repair` finds window 1 drifted (source 0, target 3) and puts
    it back to pending; its re-run's precheck counts 0 and skips it through a fenced empty
    load: its rows are deleted from the target and the ledger moves to the skip's fence, in
    one transaction. A second `reconcile` finds every window matching. (Before, the skip left
    the 3 rows in the target, and every later reconcile reported the same drift.)"""
    windows, purged = 4, 1
    seeded = faults.seed_events(pg_schema_url, [3] * windows)
    dep = _deploy(tmp_path, pg_schema_url, redis_db, windows)
    stop_all.append(dep)
    dep.start_workers(faults.ALL_QUEUES)
    dep.send("windowpipe.generate", "events")
    first = faults.wait_all_finished(dep, {"events": windows}, timeout=180)["events"]
    assert statuses(first) == {"succeeded": windows}
    assert faults.loaded_ids(pg_schema_url) == seeded
    start = ORIGIN + purged * SIZE
    _execute(
        pg_schema_url,
        "DELETE FROM events WHERE created_at >= :start AND created_at < :end",
        [{"start": start, "end": start + SIZE}],
    )

    repaired = _reconcile(dep, "--repair")
    assert [(r["window_start"], r["repaired"]) for r in repaired if not r["matches"]] == [
        (format_instant(start), True)
    ]
    wait_until(
        lambda: (
            next(r for r in _records(dep) if r.window_start == start).status == WindowStatus.SKIPPED
        ),
        180,
        "the purged window re-run and skipped",
    )

    assert faults.loaded_ids(pg_schema_url) == _source_ids(pg_schema_url)
    assert all(row["matches"] for row in _reconcile(dep)), _reconcile(dep)
    skipped = next(r for r in _records(dep) if r.window_start == start)
    assert (skipped.source_count, skipped.target_count) == (0, 0)
    assert _ledger(pg_schema_url)[start] == (skipped.load_fence, 0)


def _ledger(url: str) -> dict[datetime, tuple[int, int]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT window_start, fence, row_count FROM windowpipe_ledger")
            )
            return {start: (int(fence), int(count)) for start, fence, count in rows}
    finally:
        engine.dispose()


def _sqlite_copy(source: Path, destination: Path) -> None:
    """A consistent copy of a SQLite database (WAL included), with SQLite's backup API."""
    with sqlite3.connect(source) as src, sqlite3.connect(destination) as dst:
        src.backup(dst)


def test_a_state_store_restored_behind_its_target_ledger_still_runs_every_window_once(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    """Timeline: the windows are created (fence f each) and the state store is backed up.
    They run and succeed (ledger at f+3, the load's claim), then are re-run by `enqueue
    --force` (ledger at f+8). The workers stop and the backup is restored: every record is
    pending at fence f again, far behind the ledger. The workers start: each window's load
    (fence f+3) is refused by the ledger (f+8), the store still holds f+3, so no newer owner
    exists: the fence is raised above the ledger's and the load retried, without an attempt.
    Every window succeeds on its first attempt and the target holds each document once.
    (Before, each refusal stopped the load as a lost window, cleanup requeued it with an
    attempt, and the window ended dead.)"""
    windows = 4
    seeded = faults.seed_events(pg_schema_url, [3] * windows)
    dep = _deploy(tmp_path, pg_schema_url, redis_db, windows, max_attempts=2)
    stop_all.append(dep)
    state, backup = tmp_path / "state.db", tmp_path / "state-backup.db"
    dep.cli("enqueue", "events", "--start", format_instant(ORIGIN), "--end", _window_end(windows))
    _sqlite_copy(state, backup)
    dep.start_workers(faults.ALL_QUEUES)
    dep.send("windowpipe.dispatch", "events")
    assert statuses(faults.wait_all_finished(dep, {"events": windows})["events"]) == {
        "succeeded": windows
    }
    dep.cli(
        "enqueue",
        "events",
        "--start",
        format_instant(ORIGIN),
        "--end",
        _window_end(windows),
        "--force",
    )
    faults.wait_all_finished(dep, {"events": windows})
    ahead = _ledger(pg_schema_url)
    dep.stop_all()
    _sqlite_copy(backup, state)
    restored = {r.window_start: r.fence for r in _records(dep)}
    assert all(restored[start] + 3 < fence for start, (fence, _) in ahead.items()), (
        restored,
        ahead,
    )

    dep.start_workers(faults.ALL_QUEUES)
    dep.send("windowpipe.dispatch", "events")
    done = faults.wait_all_finished(dep, {"events": windows}, timeout=180)["events"]

    assert statuses(done) == {"succeeded": windows}, [r.error for r in done]
    for record in done:
        assert record.attempts == 1, record
        assert record.load_fence is not None
        assert record.load_fence > ahead[record.window_start][0]
    assert faults.loaded_ids(pg_schema_url) == seeded
    raised = [e for e in faults.log_events(dep) if "fence raised" in str(e.get("event"))]
    assert len(raised) >= windows


def test_validate_rebuild_clears_the_target_rows_of_an_unfinished_record_it_deletes(
    tmp_path: Path, pg_schema_url: str, redis_db: str
) -> None:
    """Timeline: an unfinished record misaligned by 7 minutes (written by an older release,
    say) was loaded into the target by a worker (its rows and ledger row at its fence), then
    left unfinished. `validate --rebuild` deletes the record, since running it would load
    documents of two aligned windows; before it does, it clears the window's rows from the
    target with a fenced empty load above every fence the record issued. Nothing is left
    that no record owns, and the frozen worker's late load (fence of the record) is refused.
    (Before, the record went and its rows stayed in the target for good.)"""
    dep = _deploy(tmp_path, pg_schema_url, redis_db, 4)
    misaligned = Window(ORIGIN + timedelta(minutes=7), ORIGIN + timedelta(minutes=22))
    store = dep.store()
    try:
        store.create_windows("events", [misaligned])
        [record] = store.list_records("events")
    finally:
        store.dispose()
    staging = LocalStaging(LocalStagingConfig(type="local", path=str(tmp_path / "staging")))
    documents = [
        Document(f"m{n}", misaligned.start + timedelta(seconds=n), {"id": f"m{n}"})
        for n in range(5)
    ]
    manifest = staging.write_window("events", misaligned, "f1", [Batch(documents=documents)])
    target = SqlTarget(SqlTargetConfig(**faults.sql_target(pg_schema_url)))
    try:
        target.load_window("events", manifest, staging, record.fence)
        assert target.count_window("events", misaligned) == 5

        rebuilt = dep.cli("validate", "events", "--rebuild")

        assert "the target rows of 1 deleted window(s) cleared" in rebuilt.stdout, rebuilt.stdout
        assert target.count_window("events", misaligned) == 0
        assert all(r.window_start != misaligned.start for r in _records(dep))
        with pytest.raises(StaleFenceError):
            target.load_window("events", manifest, staging, record.fence)
    finally:
        target.close()
