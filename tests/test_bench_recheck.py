"""Bench 6's recheck backlog: the seeded windows are finished, due once and drift as meant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.backfill import RECHECK_HORIZONS, WINDOW, seed_recheck_backlog
from core.recheck import Fingerprint, recheck_due
from core.records import WindowStatus
from core.store import StateStore


def test_seeded_backlog_is_due_once_and_drifts_where_seeded(tmp_path: Path) -> None:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    store.migrate()
    now = datetime(2026, 11, 30, tzinfo=UTC)
    first = now - timedelta(days=8)
    horizons = list(RECHECK_HORIZONS.values())
    try:
        drifted = seed_recheck_backlog(
            store, "p", first, 60, documents=3, drift_every=10, drifted=3
        )
        assert drifted == [first, first + 10 * WINDOW, first + 20 * WINDOW]
        records = store.list_records("p")
        assert {r.status for r in records} == {WindowStatus.SUCCEEDED}
        assert all(r.finished_at is not None and r.finished_at <= now for r in records)
        assert store.count_due_rechecks("p", horizons, now) == 60

        report = recheck_due(store, "p", horizons, lambda w: Fingerprint(3), now, limit=1000)
        assert report.checked == 60
        assert [r.window_start for r in report.drifted] == drifted
        assert store.count_due_rechecks("p", horizons, now) == 0
        pending = store.list_records("p", statuses=[WindowStatus.PENDING])
        assert [r.window_start for r in pending] == drifted
    finally:
        store.dispose()
