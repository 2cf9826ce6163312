"""Rechecks and reconcile in the state store: fingerprints, horizons, drift, re-runs.

Pure functions are table-tested; the store methods run on SQLite and PostgreSQL (`state_url`).
The whole path on real workers lives in tests/test_recheck_workers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from core.errors import BadInputError
from core.recheck import (
    Fingerprint,
    closed_windows,
    drift_of,
    horizons_passed,
    recheck_due,
    reconcile,
)
from core.records import Stage, WindowKind, WindowRecord, WindowStatus
from core.store import StateStore
from core.windows import Window

ORIGIN = datetime(2026, 11, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
HOUR, DAY = timedelta(hours=1), timedelta(days=1)
PIPELINE = "orders"


def start(index: int) -> datetime:
    return ORIGIN + index * SIZE


@pytest.mark.parametrize(
    ("age", "passed"),
    [
        (timedelta(0), 0),
        (HOUR - timedelta(seconds=1), 0),
        (HOUR, 1),
        (DAY - timedelta(seconds=1), 1),
        (DAY, 2),
        (30 * DAY, 2),
    ],
)
def test_horizons_passed_counts_the_ages_reached(age: timedelta, passed: int) -> None:
    assert horizons_passed(ORIGIN, [HOUR, DAY], ORIGIN + age) == passed


def _record(count: int | None, version: str | None) -> WindowRecord:
    return WindowRecord(
        PIPELINE,
        ORIGIN,
        ORIGIN + SIZE,
        WindowStatus.SUCCEEDED,
        source_count=count,
        source_version=version,
    )


@pytest.mark.parametrize(
    ("recorded", "now", "drifts"),
    [
        ((5, None), Fingerprint(5), False),
        ((5, None), Fingerprint(6), True),  # a late document
        ((5, None), Fingerprint(4), True),  # a deleted one
        ((5, "2026-11-01T00:03:00Z"), Fingerprint(5, "2026-11-01T00:03:00Z"), False),
        ((5, "2026-11-01T00:03:00Z"), Fingerprint(5, "2026-11-02T09:00:00Z"), True),  # updated
        ((5, "v1"), Fingerprint(5, None), False),  # the source reports no version now
        ((0, None), Fingerprint(0), False),  # a skipped window still empty
        ((0, None), Fingerprint(2), True),  # a skipped window that got documents
        ((None, None), Fingerprint(0), False),
    ],
)
def test_drift_compares_count_and_version(
    recorded: tuple[int | None, str | None], now: Fingerprint, drifts: bool
) -> None:
    entry = drift_of(_record(*recorded), now, at=ORIGIN + DAY, by="recheck 1:00:00")
    assert (entry is not None) == drifts
    if entry is not None:
        assert entry["count_before"] == (recorded[0] or 0)
        assert entry["count_after"] == now.count
        assert entry["at"] == "2026-11-02T00:00:00Z"


@pytest.fixture
def store(state_url: str) -> Iterator[StateStore]:
    store = StateStore(state_url)
    store.migrate()
    yield store
    store.dispose()


def _finish(
    store: StateStore, index: int, count: int, version: str | None = None, *, skip: bool = False
) -> WindowRecord:
    """Run window `index` through a chain by hand: queued, claimed, finished with `count`."""
    store.queue(PIPELINE, start(index), expect=[WindowStatus.PENDING])
    claimed = store.claim_stage(PIPELINE, start(index), Stage.PRECHECK)
    assert claimed is not None
    status = WindowStatus.SKIPPED if skip else WindowStatus.SUCCEEDED
    return store.transition(
        PIPELINE,
        start(index),
        status,
        fence=claimed.fence,
        source_count=count,
        staged_count=count,
        target_count=count,
        source_version=version,
    )


def test_due_rechecks_follow_the_horizons_and_only_finished_windows(store: StateStore) -> None:
    store.create_windows(PIPELINE, [Window(start(i), start(i + 1)) for i in range(6)])
    for index in range(4):
        _finish(store, index, 3)
    _finish(store, 4, 0, skip=True)  # window 5 stays pending: never rechecked
    horizons = [HOUR, DAY]
    # Window 0 ends at +15m; one hour after that, windows 0..3 (ends up to +1h) are due.
    now = start(1) + HOUR + 3 * SIZE
    due = store.due_rechecks(PIPELINE, horizons, now, limit=100)
    assert [r.window_start for r in due] == [start(i) for i in range(4)]
    assert store.count_due_rechecks(PIPELINE, horizons, now) == 4
    assert [r.window_start for r in store.due_rechecks(PIPELINE, horizons, now, limit=2)] == [
        start(0),
        start(1),
    ]
    assert store.due_rechecks(PIPELINE, [], now, limit=10) == []

    def same(window: Window) -> Fingerprint:
        return Fingerprint(0 if window.start == start(4) else 3)

    report = recheck_due(store, PIPELINE, horizons, same, now, limit=100)
    assert report.checked == 4 and report.drifted == []
    assert store.due_rechecks(PIPELINE, horizons, now, limit=100) == []
    # A day later every finished window, the skipped one too, is due at the second horizon.
    later = start(5) + DAY
    assert len(store.due_rechecks(PIPELINE, horizons, later, limit=100)) == 5
    recheck_due(store, PIPELINE, horizons, same, later, limit=100)
    assert all(
        r.rechecks_done == 2
        for r in store.list_records(PIPELINE, statuses=[WindowStatus.SUCCEEDED])
    )
    assert store.count_due_rechecks(PIPELINE, horizons, later + 365 * DAY) == 0


def test_a_drifted_window_goes_back_to_pending_as_manual_with_its_drift_kept(
    store: StateStore,
) -> None:
    store.create_windows(PIPELINE, [Window(start(i), start(i + 1)) for i in range(3)])
    before = [_finish(store, i, 5, "v1") for i in range(3)]
    now = start(3) + HOUR

    def source(window: Window) -> Fingerprint:
        return {start(0): Fingerprint(6, "v1"), start(1): Fingerprint(5, "v2")}.get(
            window.start, Fingerprint(5, "v1")
        )

    report = recheck_due(store, PIPELINE, [HOUR], source, now, limit=100)
    assert report.checked == 3
    assert [r.window_start for r in report.drifted] == [start(0), start(1)]
    by_start = {r.window_start: r for r in store.list_records(PIPELINE)}
    for index in (0, 1):
        rerun = by_start[start(index)]
        assert rerun.status == WindowStatus.PENDING and rerun.kind == WindowKind.MANUAL
        assert rerun.fence > before[index].fence and rerun.rechecks_done == 1
        assert rerun.source_count is None and rerun.checked_at is not None
        assert len(rerun.drift) == 1 and rerun.drift[0]["by"] == "recheck 1:00:00"
    assert by_start[start(0)].drift[0]["count_after"] == 6
    assert by_start[start(1)].drift[0]["version_after"] == "v2"
    untouched = by_start[start(2)]
    assert untouched.status == WindowStatus.SUCCEEDED and untouched.drift == []
    # The drift history survives the re-run's own records and a second drift appends to it.
    _finish_again = store.queue(PIPELINE, start(0), expect=[WindowStatus.PENDING])
    assert _finish_again is not None and _finish_again.drift == by_start[start(0)].drift


def test_a_check_loses_to_a_window_changed_since_it_was_read(store: StateStore) -> None:
    store.create_windows(PIPELINE, [Window(start(0), start(1))])
    finished = _finish(store, 0, 2)
    store.reset_for_rerun(PIPELINE, [start(0)])  # --force meanwhile: fence + 1, pending
    drift = drift_of(finished, Fingerprint(3), at=start(9), by="recheck")
    assert store.record_check(finished, rechecks_done=1, drift=drift) is None
    assert store.get(PIPELINE, start(0)).drift == []  # type: ignore[union-attr]


def test_reconcile_reports_and_repairs_source_and_target_mismatches(store: StateStore) -> None:
    store.create_windows(PIPELINE, [Window(start(i), start(i + 1)) for i in range(4)])
    for index in range(4):
        _finish(store, index, 4)
    source = {start(1): Fingerprint(5)}
    target = {start(2): 3}
    records = closed_windows(store, PIPELINE, start(0), start(4))

    def fingerprint(window: Window) -> Fingerprint:
        return source.get(window.start, Fingerprint(4))

    def count(window: Window) -> int:
        return target.get(window.start, 4)

    report = reconcile(store, records, fingerprint, count, start(9), repair=False)
    assert [(r.record.window_start, r.matches) for r in report] == [
        (start(0), True),
        (start(1), False),
        (start(2), False),
        (start(3), True),
    ]
    assert report[2].to_json()["target_now"] == 3
    assert all(r.status == WindowStatus.SUCCEEDED for r in store.list_records(PIPELINE))

    repaired = reconcile(store, records, fingerprint, count, start(9), repair=True)
    assert [r.repaired for r in repaired] == [False, True, True, False]
    statuses = {r.window_start: r.status for r in store.list_records(PIPELINE)}
    assert statuses == {
        start(0): WindowStatus.SUCCEEDED,
        start(1): WindowStatus.PENDING,
        start(2): WindowStatus.PENDING,
        start(3): WindowStatus.SUCCEEDED,
    }
    target_drift = store.get(PIPELINE, start(2))
    assert target_drift is not None and target_drift.drift[0]["target_now"] == 3


def test_reconcile_refuses_an_unbounded_range(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.recheck

    monkeypatch.setattr(core.recheck, "RECONCILE_MAX_WINDOWS", 2)
    store.create_windows(PIPELINE, [Window(start(i), start(i + 1)) for i in range(3)])
    for index in range(3):
        _finish(store, index, 1)
    with pytest.raises(BadInputError, match="more than 2 closed windows"):
        closed_windows(store, PIPELINE, start(0), start(3))
    assert len(closed_windows(store, PIPELINE, start(0), start(2))) == 2
