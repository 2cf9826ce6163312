"""The state store's contract, run against SQLite and PostgreSQL alike (`state_url`)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from core.errors import InvalidTransitionError, LostOwnershipError
from core.instants import utc_now
from core.records import Stage, WindowKind, WindowStatus
from core.store import RebuildCounts, RecordNotFoundError, StateStore
from core.store.schema import METADATA
from core.validation import RebuildPlan
from core.windows import Window

pytestmark = pytest.mark.integration

ORIGIN = datetime(2026, 11, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
PIPELINE = "orders"

S = WindowStatus


def windows(count: int, first: int = 0) -> list[Window]:
    """`count` consecutive 15-minute windows from ORIGIN + first * SIZE."""
    return [Window(ORIGIN + i * SIZE, ORIGIN + (i + 1) * SIZE) for i in range(first, first + count)]


def start(index: int) -> datetime:
    return ORIGIN + index * SIZE


@pytest.fixture
def store(state_url: str) -> Iterator[StateStore]:
    store = StateStore(state_url)
    store.migrate()
    yield store
    store.dispose()


def claim(store: StateStore, index: int, stage: Stage = Stage.PRECHECK) -> int:
    """Claim window `index` at `stage` as a worker does; returns the new fencing token."""
    claimed = store.claim_stage(PIPELINE, start(index), stage)
    assert claimed is not None
    return claimed.fence


def drive(store: StateStore, index: int, *path: WindowStatus, **fields: Any) -> None:
    """Walk window `index` through `path` (queue() for queued, transition() otherwise)."""
    for status in path:
        if status == S.QUEUED:
            record = store.get(PIPELINE, start(index))
            assert record is not None
            assert store.queue(PIPELINE, start(index), expect=[record.status]) is not None
        else:
            store.transition(PIPELINE, start(index), status, **fields)


# --- schema -------------------------------------------------------------------------------------


def test_migrating_twice_is_a_no_op(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(3))
    store.migrate()
    with store.engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
    _, head = store.schema_revision()
    assert versions == [(head,)]
    assert len(store.list_records(PIPELINE)) == 3


def test_migrated_schema_matches_the_model(store: StateStore) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), METADATA)
    assert diff == []


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(Exception, match="sqlite or postgresql"):
        StateStore("mysql+pymysql://user@localhost/db")


# --- creating and reading -------------------------------------------------------------------


def test_creating_the_same_windows_twice_creates_them_once(store: StateStore) -> None:
    assert store.create_windows(PIPELINE, windows(4)) == windows(4)
    assert store.create_windows(PIPELINE, windows(4)) == []
    assert store.create_windows(PIPELINE, windows(6)) == windows(2, first=4)
    assert len(store.list_records(PIPELINE)) == 6


def test_created_windows_come_back_oldest_first_and_deduplicated(store: StateStore) -> None:
    shuffled = [*reversed(windows(3)), windows(1)[0]]
    assert store.create_windows(PIPELINE, shuffled, kind=WindowKind.MANUAL) == windows(3)
    assert {r.kind for r in store.list_records(PIPELINE)} == {WindowKind.MANUAL}


def test_two_different_windows_with_one_start_are_refused(store: StateStore) -> None:
    clash = [Window(ORIGIN, ORIGIN + SIZE), Window(ORIGIN, ORIGIN + 2 * SIZE)]
    with pytest.raises(ValueError, match="two different windows"):
        store.create_windows(PIPELINE, clash)
    assert store.list_records() == []


def test_instants_round_trip_as_aware_utc(store: StateStore) -> None:
    plus_two = timezone(timedelta(hours=2))
    local = Window(
        datetime(2026, 11, 1, 2, 0, 0, 123456, tzinfo=plus_two),
        datetime(2026, 11, 1, 2, 15, tzinfo=plus_two),
    )
    store.create_windows(PIPELINE, [local])
    record = store.get(PIPELINE, datetime(2026, 11, 1, 0, 0, 0, 123456, tzinfo=UTC))
    assert record is not None
    assert record.window_start == local.start
    for instant in (record.window_start, record.window_end, record.created_at, record.updated_at):
        assert instant is not None
        assert instant.tzinfo is UTC
    assert record.window_start.hour == 0
    assert record.window_start.microsecond == 123456


def test_naive_instants_are_refused(store: StateStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.get(PIPELINE, datetime(2026, 11, 1))


def test_last_window_end_is_the_latest_end_of_the_pipeline(store: StateStore) -> None:
    assert store.last_window_end(PIPELINE) is None
    store.create_windows(PIPELINE, windows(3))
    store.create_windows(PIPELINE, windows(2, first=10), kind=WindowKind.MANUAL)
    store.create_windows("other", windows(50))
    assert store.last_window_end(PIPELINE) == start(12)
    assert store.last_window_end(PIPELINE, kind=WindowKind.SCHEDULED) == start(3)


def test_list_records_filters_and_orders(store: StateStore) -> None:
    store.create_windows("zebra", windows(2))
    store.create_windows(PIPELINE, list(reversed(windows(5))))
    drive(store, 1, S.QUEUED)
    everything = store.list_records()
    assert [(r.pipeline, r.window_start) for r in everything] == sorted(
        (r.pipeline, r.window_start) for r in everything
    )
    assert [r.pipeline for r in everything] == [PIPELINE] * 5 + ["zebra"] * 2
    in_range = store.list_records(PIPELINE, start=start(1), end=start(3))
    assert [r.window_start for r in in_range] == [start(1), start(2)]
    queued = store.list_records(statuses=[S.QUEUED])
    assert [(r.pipeline, r.window_start) for r in queued] == [(PIPELINE, start(1))]
    assert len(store.list_records(PIPELINE, statuses=[S.PENDING], limit=2)) == 2
    assert store.list_records(PIPELINE, kind=WindowKind.MANUAL) == []


def test_counts_by_status_lists_every_status(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(3))
    store.create_windows("other", windows(1))
    drive(store, 0, S.QUEUED)
    assert store.counts_by_status(PIPELINE) == {
        "pending": 2, "queued": 1, "running": 0, "succeeded": 0,
        "skipped": 0, "failed": 0, "dead": 0,
    }  # fmt: skip
    assert store.counts_by_status()["pending"] == 3


# --- guarded transitions --------------------------------------------------------------------


def test_transition_from_a_wrong_state_is_refused(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(1))
    with pytest.raises(InvalidTransitionError, match="is pending: cannot go to running"):
        store.transition(PIPELINE, start(0), S.RUNNING)
    with pytest.raises(InvalidTransitionError, match="is pending"):
        store.transition(PIPELINE, start(0), S.QUEUED, expect=[S.FAILED])
    record = store.get(PIPELINE, start(0))
    assert record is not None and record.status == S.PENDING


def test_transition_with_a_stale_fence_raises_lost_ownership(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(1))
    drive(store, 0, S.QUEUED)
    old = claim(store, 0)
    new = claim(store, 0)
    with pytest.raises(LostOwnershipError, match=f"fence is {new} now"):
        store.transition(PIPELINE, start(0), S.QUEUED, expect=[S.RUNNING], fence=old)
    record = store.transition(PIPELINE, start(0), S.QUEUED, expect=[S.RUNNING], fence=new)
    assert record.status == S.QUEUED and record.fence == new


def test_transition_of_a_missing_record_raises_not_found(store: StateStore) -> None:
    with pytest.raises(RecordNotFoundError):
        store.transition(PIPELINE, start(0), S.QUEUED)
    with pytest.raises(RecordNotFoundError):
        store.transition(PIPELINE, start(0), S.RUNNING)


def test_expecting_a_status_the_state_machine_forbids_is_a_caller_bug(store: StateStore) -> None:
    with pytest.raises(ValueError, match="pending -> running"):
        store.transition(PIPELINE, start(0), S.RUNNING, expect=[S.PENDING])


def test_unknown_fields_are_refused(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(1))
    with pytest.raises(TypeError, match="cannot set window_end"):
        store.transition(PIPELINE, start(0), S.QUEUED, window_end=start(5))
    with pytest.raises(TypeError, match="cannot set status"):
        store.transition(PIPELINE, start(0), S.QUEUED, status=S.SUCCEEDED)
    record = store.get(PIPELINE, start(0))
    assert record is not None and (record.status, record.window_end) == (S.PENDING, start(1))


def test_transition_sets_fields_and_attempt_instants(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(1))
    drive(store, 0, S.QUEUED)
    running = store.transition(PIPELINE, start(0), S.RUNNING, stage=Stage.PRECHECK)
    assert running.started_at is not None and running.finished_at is None
    store.transition(PIPELINE, start(0), S.QUEUED, stage=Stage.EXTRACT, source_count=7)
    again = store.transition(PIPELINE, start(0), S.RUNNING)
    assert again.started_at == running.started_at  # the attempt started once
    assert again.stage == Stage.EXTRACT and again.source_count == 7
    done = store.transition(PIPELINE, start(0), S.SUCCEEDED, target_count=7, error=None)
    assert done.finished_at is not None and running.started_at <= done.finished_at
    assert done.updated_at == done.finished_at


def test_each_claim_takes_the_next_fence_of_its_own_window(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(2))
    drive(store, 0, S.QUEUED)
    drive(store, 1, S.QUEUED)
    first = store.get(PIPELINE, start(0))
    assert first is not None
    tokens = [claim(store, 0) for _ in range(5)]
    assert tokens == [first.fence + n for n in range(1, 6)]
    other = store.get(PIPELINE, start(1))
    assert other is not None and claim(store, 1) == other.fence + 1


def test_claiming_a_stage_takes_a_new_fence_and_marks_the_window_running(
    store: StateStore,
) -> None:
    store.create_windows(PIPELINE, windows(1))
    created = store.get(PIPELINE, start(0))
    assert created is not None
    assert store.claim_stage(PIPELINE, start(0), Stage.PRECHECK) is None  # still pending
    store.queue(PIPELINE, start(0), expect=[S.PENDING])
    assert store.claim_stage(PIPELINE, start(0), Stage.EXTRACT) is None  # not at extract yet
    claimed = store.claim_stage(PIPELINE, start(0), Stage.PRECHECK)
    assert claimed is not None
    assert (claimed.status, claimed.stage) == (S.RUNNING, Stage.PRECHECK)
    assert claimed.fence == created.fence + 1
    assert claimed.started_at is not None
    again = store.claim_stage(PIPELINE, start(0), Stage.PRECHECK)
    # A second claimant fences out the first.
    assert again is not None and again.fence == claimed.fence + 1
    with pytest.raises(LostOwnershipError):
        store.transition(PIPELINE, start(0), S.QUEUED, fence=claimed.fence, stage=Stage.EXTRACT)


# --- queueing -------------------------------------------------------------------------------


def test_queue_returns_none_for_the_second_caller(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(1))
    first = store.queue(PIPELINE, start(0), expect=[S.PENDING])
    second = store.queue(PIPELINE, start(0), expect=[S.PENDING])
    assert first is not None and second is None
    assert (first.status, first.attempts, first.stage) == (S.QUEUED, 1, Stage.PRECHECK)


def test_queue_of_a_failed_window_resumes_at_its_recorded_stage(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(1))
    drive(store, 0, S.QUEUED, S.RUNNING)
    store.transition(PIPELINE, start(0), S.QUEUED, stage=Stage.LOAD, source_count=5)
    drive(store, 0, S.RUNNING)
    failed = store.transition(PIPELINE, start(0), S.FAILED, error="load: timeout")
    assert failed.finished_at is not None
    again = store.queue(PIPELINE, start(0), expect=[S.FAILED])
    assert again is not None
    assert (again.stage, again.source_count, again.attempts) == (Stage.LOAD, 5, 2)
    assert again.error is None and again.finished_at is None and again.started_at is None


def test_forced_requeue_of_a_succeeded_window_starts_over(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(1))
    drive(store, 0, S.QUEUED, S.RUNNING)
    store.transition(
        PIPELINE, start(0), S.SUCCEEDED, stage=Stage.AUDIT, source_count=5, staged_count=5,
        target_count=5, manifest="orders/m.json",
    )  # fmt: skip
    rerun = store.queue(PIPELINE, start(0), expect=[S.SUCCEEDED], kind=WindowKind.MANUAL)
    assert rerun is not None
    assert (rerun.stage, rerun.kind, rerun.attempts) == (Stage.PRECHECK, WindowKind.MANUAL, 2)
    assert (rerun.source_count, rerun.staged_count, rerun.target_count, rerun.manifest) == (
        None, None, None, None,
    )  # fmt: skip


def test_runnable_count_active_and_mark_dead_exhausted(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(5))
    store.create_windows(PIPELINE, windows(1, first=5), kind=WindowKind.MANUAL)
    drive(store, 0, S.QUEUED, S.RUNNING, S.FAILED)  # 1 attempt
    drive(store, 1, S.QUEUED, S.RUNNING, S.FAILED, S.QUEUED, S.RUNNING, S.FAILED)  # 2
    drive(store, 2, S.QUEUED)
    drive(store, 3, S.QUEUED, S.RUNNING)
    scheduled = WindowKind.SCHEDULED
    assert store.count_active(PIPELINE, scheduled) == 2
    assert store.count_active(PIPELINE, WindowKind.MANUAL) == 0
    runnable = store.runnable(PIPELINE, scheduled, max_attempts=2, limit=10)
    assert [r.window_start for r in runnable] == [start(0), start(4)]
    assert len(store.runnable(PIPELINE, scheduled, max_attempts=3, limit=2)) == 2
    manual = store.runnable(PIPELINE, WindowKind.MANUAL, max_attempts=2, limit=9)
    assert [r.window_start for r in manual] == [start(5)]
    assert store.mark_dead_exhausted(PIPELINE, max_attempts=2) == 1
    assert store.mark_dead_exhausted(PIPELINE, max_attempts=2) == 0
    dead = store.get(PIPELINE, start(1))
    assert dead is not None and dead.status == S.DEAD and dead.finished_at is not None


def test_stale_candidates_are_active_records_not_updated_lately(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(3))
    store.create_windows("other", windows(1))
    drive(store, 0, S.QUEUED)
    drive(store, 1, S.QUEUED, S.RUNNING)
    store.queue("other", start(0), expect=[S.PENDING])
    later = utc_now() + timedelta(minutes=1)
    stale = store.stale_candidates(older_than=later)
    assert [(r.pipeline, r.window_start) for r in stale] == [
        (PIPELINE, start(0)), (PIPELINE, start(1)), ("other", start(0)),
    ]  # fmt: skip
    assert store.stale_candidates(older_than=utc_now() - timedelta(minutes=1)) == []


def test_unfinished_counts_every_pipelines_waiting_windows_in_one_read(
    store: StateStore,
) -> None:
    store.create_windows(PIPELINE, windows(4))
    store.create_windows(PIPELINE, windows(2, first=4), kind=WindowKind.MANUAL)
    store.create_windows("other", windows(2))
    drive(store, 0, S.QUEUED, S.RUNNING, S.FAILED)
    drive(store, 1, S.QUEUED)
    drive(store, 2, S.QUEUED, S.RUNNING, S.SUCCEEDED)
    store.queue("other", start(0), expect=[S.PENDING])
    failed = store.get(PIPELINE, start(0))
    assert failed is not None and failed.finished_at is not None

    found = {(g.pipeline, g.kind, g.status, g.attempts): g for g in store.unfinished()}
    assert {key: g.count for key, g in found.items()} == {
        (PIPELINE, WindowKind.SCHEDULED, S.FAILED, 1): 1,
        (PIPELINE, WindowKind.SCHEDULED, S.QUEUED, 1): 1,
        (PIPELINE, WindowKind.SCHEDULED, S.PENDING, 0): 1,
        (PIPELINE, WindowKind.MANUAL, S.PENDING, 0): 2,
        ("other", WindowKind.SCHEDULED, S.QUEUED, 1): 1,
        ("other", WindowKind.SCHEDULED, S.PENDING, 0): 1,
    }  # the succeeded window is not read
    assert found[(PIPELINE, WindowKind.SCHEDULED, S.FAILED, 1)].oldest_finished_at == (
        failed.finished_at
    )
    assert found[(PIPELINE, WindowKind.MANUAL, S.PENDING, 0)].oldest_finished_at is None


# --- administrative resets ------------------------------------------------------------------


def test_apply_rebuild_deletes_resets_creates_and_keeps_finished_work(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(4))
    drive(store, 0, S.QUEUED, S.RUNNING, S.SUCCEEDED)
    drive(store, 1, S.QUEUED, S.RUNNING, S.FAILED)
    drive(store, 2, S.QUEUED)
    owner = claim(store, 2)
    plan = RebuildPlan(
        delete_starts=[start(3)], reset_starts=[start(1), start(2)], create=windows(2, first=4)
    )
    assert store.apply_rebuild(PIPELINE, plan) == RebuildCounts(deleted=1, reset=2, created=2)
    by_start = {r.window_start: r for r in store.list_records(PIPELINE)}
    assert sorted(by_start) == [start(i) for i in (0, 1, 2, 4, 5)]
    assert by_start[start(0)].status == S.SUCCEEDED
    reset = by_start[start(1)]
    assert (reset.status, reset.stage, reset.error, reset.attempts) == (S.PENDING, None, None, 0)
    with pytest.raises(LostOwnershipError):  # an owner of a reset window cannot write into it
        store.transition(PIPELINE, start(2), S.QUEUED, fence=owner, stage=Stage.EXTRACT)


def test_apply_rebuild_refuses_to_delete_succeeded_work(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(3))
    drive(store, 0, S.QUEUED, S.RUNNING, S.SUCCEEDED)
    drive(store, 1, S.QUEUED, S.RUNNING, S.SKIPPED)
    for plan in (
        RebuildPlan(delete_starts=[start(2), start(0)], create=windows(1, first=3)),
        RebuildPlan(reset_starts=[start(1)]),
    ):
        with pytest.raises(InvalidTransitionError, match="finished work"):
            store.apply_rebuild(PIPELINE, plan)
    # Nothing of a refused plan was applied.
    assert [r.window_start for r in store.list_records(PIPELINE)] == [start(0), start(1), start(2)]
    assert store.counts_by_status(PIPELINE)["succeeded"] == 1


def test_reset_for_rerun_puts_finished_and_dead_windows_back_to_pending(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(4))
    drive(store, 0, S.QUEUED, S.RUNNING, S.SUCCEEDED)
    drive(store, 1, S.QUEUED, S.RUNNING, S.FAILED, S.DEAD)
    drive(store, 2, S.QUEUED)
    reset = store.reset_for_rerun(PIPELINE, [start(i) for i in range(4)])
    assert reset == 2
    records = store.list_records(PIPELINE)
    assert [r.status for r in records] == [S.PENDING, S.PENDING, S.QUEUED, S.PENDING]
    assert [r.kind for r in records[:2]] == [WindowKind.MANUAL] * 2
    assert records[1].attempts == 0 and records[1].finished_at is None


# --- scale and concurrency ------------------------------------------------------------------


def test_a_year_of_15m_windows_is_created_in_one_call(store: StateStore) -> None:
    year = windows(35_040)
    began = time.monotonic()
    created = store.create_windows(PIPELINE, year)
    took = time.monotonic() - began
    assert len(created) == 35_040
    assert store.counts_by_status(PIPELINE)["pending"] == 35_040
    assert store.create_windows(PIPELINE, year) == []
    assert took < 20, f"bulk create took {took:.1f}s"


def _race_worker(url: str, count: int, barrier: Any, results: Any) -> None:
    """One process of the race: migrate, create the same windows, then queue each one."""
    store = StateStore(url)
    try:
        barrier.wait()
        store.migrate()
        barrier.wait()
        created = store.create_windows(PIPELINE, windows(count))
        barrier.wait()
        queued = [
            store.queue(PIPELINE, window.start, expect=[S.PENDING]) for window in windows(count)
        ]
        results.put((len(created), sum(1 for record in queued if record is not None)))
    except BaseException as error:
        results.put(error)
        raise
    finally:
        store.dispose()


@pytest.mark.timeout(300)
def test_racing_processes_create_and_queue_each_window_exactly_once(state_url: str) -> None:
    processes, count = 4, 500
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [
        context.Process(target=_race_worker, args=(state_url, count, barrier, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors == []
    assert sum(created for created, _ in outcomes) == count
    assert sum(queued for _, queued in outcomes) == count
    store = StateStore(state_url)
    try:
        records = store.list_records(PIPELINE)
        assert len(records) == count
        assert {(r.status, r.attempts) for r in records} == {(S.QUEUED, 1)}
    finally:
        store.dispose()


def test_a_window_recreated_by_rebuild_keeps_its_fence_moving_forward(store: StateStore) -> None:
    # A target's ledger remembers the newest fence that loaded a window; a record deleted and
    # created again at the same start must not start below it, or every load would be refused.
    store.create_windows(PIPELINE, [Window(start(0), start(0) + timedelta(minutes=10))])
    with store.engine.begin() as conn:  # a record claimed far more often than time has passed
        conn.execute(sa.text("UPDATE windows SET fence = fence + 10000000000"))
    old = store.get(PIPELINE, start(0))
    assert old is not None
    plan = RebuildPlan(delete_starts=[start(0)], create=windows(1))
    assert store.apply_rebuild(PIPELINE, plan) == RebuildCounts(deleted=1, reset=0, created=1)
    record = store.get(PIPELINE, start(0))
    assert record is not None and record.window_end == start(1) and record.fence == old.fence
    store.queue(PIPELINE, start(0), expect=[S.PENDING])
    claimed = store.claim_stage(PIPELINE, start(0), Stage.PRECHECK)
    assert claimed is not None and claimed.fence == old.fence + 1


def test_a_record_created_again_in_a_new_store_starts_above_the_old_fences(
    store: StateStore,
) -> None:
    # A state store wiped and started again (the target and its ledger kept): fences start
    # from the clock, so the new record's fences are above any the old record reached.
    store.create_windows(PIPELINE, windows(1))
    old = store.get(PIPELINE, start(0))
    assert old is not None
    drive(store, 0, S.QUEUED)
    for _ in range(50):
        claim(store, 0)
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM windows"))
    time.sleep(0.001)
    store.create_windows(PIPELINE, windows(1))
    new = store.get(PIPELINE, start(0))
    assert new is not None and new.fence > old.fence + 50


# --- lost messages and waiting windows ---------------------------------------------------------


def test_touching_a_queued_window_uses_no_attempt_and_loses_to_a_claim(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(2))
    queued = store.queue(PIPELINE, start(0), expect=[S.PENDING])
    assert queued is not None and queued.attempts == 1
    touched = store.touch_queued(PIPELINE, start(0), fence=queued.fence, stage=queued.stage)
    assert touched is not None and touched.attempts == 1 and touched.status == S.QUEUED
    assert touched.updated_at is not None and queued.updated_at is not None
    assert touched.updated_at >= queued.updated_at
    # Once a worker claimed the window (a new fence), the touch matches nothing.
    assert store.claim_stage(PIPELINE, start(0), Stage.PRECHECK) is not None
    assert store.touch_queued(PIPELINE, start(0), fence=queued.fence, stage=queued.stage) is None
    # A queued window at another stage than the one read is not touched either.
    store.queue(PIPELINE, start(1), expect=[S.PENDING])
    assert store.touch_queued(PIPELINE, start(1), fence=0, stage=Stage.LOAD) is None


def test_queue_with_a_fence_refuses_a_window_claimed_since_it_was_read(store: StateStore) -> None:
    store.create_windows(PIPELINE, windows(1))
    store.queue(PIPELINE, start(0), expect=[S.PENDING])
    first = store.claim_stage(PIPELINE, start(0), Stage.PRECHECK)
    assert first is not None
    second = store.claim_stage(PIPELINE, start(0), Stage.PRECHECK)  # a live worker took over
    assert second is not None
    assert store.queue(PIPELINE, start(0), expect=[S.RUNNING], fence=first.fence) is None
    requeued = store.queue(PIPELINE, start(0), expect=[S.RUNNING], fence=second.fence)
    assert requeued is not None and requeued.attempts == 2
