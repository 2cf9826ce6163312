"""Chain validation and rebuild plans: pure functions over lists of records, no services."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.records import FINISHED, Stage, WindowRecord, WindowStatus
from core.validation import (
    ChainProblem,
    ProblemKind,
    RebuildPlan,
    impossible_state,
    plan_rebuild,
    validate_chain,
)

ORIGIN = datetime(2026, 11, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
DONE_AT = ORIGIN + timedelta(days=1)


def at(minutes: float) -> datetime:
    return ORIGIN + timedelta(minutes=minutes)


def record(
    k: float, status: WindowStatus = WindowStatus.PENDING, *, length: float = 1, **fields: Any
) -> WindowRecord:
    """The record of window k (`origin + k * size`); k may be fractional for misaligned ones."""
    start = ORIGIN + k * SIZE
    return WindowRecord("orders", start, start + length * SIZE, status=status, **fields)


def succeeded(k: float, count: int = 10, *, length: float = 1, **fields: Any) -> WindowRecord:
    values: dict[str, Any] = {
        "stage": Stage.AUDIT,
        "attempts": 1,
        "source_count": count,
        "staged_count": count,
        "target_count": count,
        "finished_at": DONE_AT,
    }
    return record(k, WindowStatus.SUCCEEDED, length=length, **{**values, **fields})


def skipped(k: float) -> WindowRecord:
    return record(
        k,
        WindowStatus.SKIPPED,
        stage=Stage.PRECHECK,
        attempts=1,
        source_count=0,
        staged_count=0,
        target_count=0,
        finished_at=DONE_AT,
    )


def failed(k: float, attempts: int = 1) -> WindowRecord:
    return record(
        k, WindowStatus.FAILED, stage=Stage.EXTRACT, attempts=attempts, finished_at=DONE_AT
    )


def dead(k: float) -> WindowRecord:
    return record(k, WindowStatus.DEAD, stage=Stage.LOAD, attempts=5, finished_at=DONE_AT)


def running(k: float) -> WindowRecord:
    return record(k, WindowStatus.RUNNING, stage=Stage.EXTRACT, attempts=1, source_count=3)


def queued(k: float) -> WindowRecord:
    return record(k, WindowStatus.QUEUED, stage=Stage.PRECHECK, attempts=1)


def validate(records: Sequence[WindowRecord]) -> list[ChainProblem]:
    return validate_chain(records, origin=ORIGIN, size=SIZE)


def plan(records: Sequence[WindowRecord]) -> RebuildPlan:
    return plan_rebuild(records, origin=ORIGIN, size=SIZE)


def kinds(problems: Sequence[ChainProblem]) -> list[tuple[ProblemKind, datetime]]:
    return [(p.kind, p.window_start) for p in problems]


def apply_plan(records: Sequence[WindowRecord], rebuild: RebuildPlan) -> list[WindowRecord]:
    """What `StateStore.apply_rebuild` does, on a list: delete, reset to pending, create."""
    by_start = {r.window_start: r for r in records}
    assert len(by_start) == len(records), "starts are unique, as in the store"
    for start in [*rebuild.delete_starts, *rebuild.reset_starts]:
        assert by_start[start].status not in FINISHED, "a plan must never touch finished work"
    for start in rebuild.delete_starts:
        del by_start[start]
    for start in rebuild.reset_starts:
        old = by_start[start]
        by_start[start] = WindowRecord(
            old.pipeline, old.window_start, old.window_end, kind=old.kind, fence=old.fence + 1
        )
    for window in rebuild.create:
        assert window.start not in by_start, f"{window} would collide with a kept record"
        by_start[window.start] = WindowRecord("orders", window.start, window.end)
    return sorted(by_start.values(), key=lambda r: r.window_start)


def healthy_chain() -> list[WindowRecord]:
    return [
        succeeded(0),
        skipped(1),
        succeeded(2),
        failed(3),
        running(4),
        queued(5),
        record(6),
        dead(7),
    ]


# --- validation -------------------------------------------------------------------------------


def test_a_healthy_chain_has_no_problems() -> None:
    assert validate(healthy_chain()) == []


def test_an_empty_chain_has_no_problems() -> None:
    assert validate([]) == []


def test_records_in_any_order_give_the_same_problems() -> None:
    chain = [succeeded(0), record(1.5), record(4), dead(5), record(6, length=2), record(7)]
    shuffled = chain[:]
    random.Random(7).shuffle(shuffled)
    assert validate(shuffled) == validate(chain)
    assert validate(chain) != []


def test_a_missing_window_is_reported_as_a_gap_where_it_starts() -> None:
    problems = validate([succeeded(0), succeeded(1), record(4)])
    assert kinds(problems) == [(ProblemKind.GAP, at(30))]
    assert problems[0].message == (
        "gap: no window covers [2026-11-01T00:30:00Z, 2026-11-01T01:00:00Z)"
    )


def test_a_chain_not_starting_at_the_origin_has_a_gap_from_the_origin() -> None:
    assert kinds(validate([record(2), record(3)])) == [(ProblemKind.GAP, ORIGIN)]


def test_a_window_starting_before_the_previous_one_ends_is_an_overlap() -> None:
    problems = validate([succeeded(0, length=2), record(1)])
    assert (ProblemKind.OVERLAP, at(15)) in kinds(problems)
    overlap = next(p for p in problems if p.kind == ProblemKind.OVERLAP)
    assert "ends at 2026-11-01T00:30:00Z" in overlap.message


def test_a_window_off_the_grid_is_misaligned_and_names_the_nearest_boundaries() -> None:
    problems = validate([record(0), record(1.2), record(2.2)])
    misaligned = [p for p in problems if p.kind == ProblemKind.MISALIGNED]
    assert [p.window_start for p in misaligned] == [at(18), at(33)]
    assert misaligned[0].message == (
        "window 2026-11-01T00:18:00Z is not aligned to 2026-11-01T00:00:00Z + k * 15m "
        "(nearest boundaries 2026-11-01T00:15:00Z and 2026-11-01T00:30:00Z)"
    )


def test_a_window_before_the_origin_is_reported() -> None:
    problems = validate([record(-1), record(0)])
    assert kinds(problems) == [(ProblemKind.MISALIGNED, at(-15))]
    assert "before the pipeline start 2026-11-01T00:00:00Z" in problems[0].message


def test_a_window_of_another_length_is_the_wrong_size() -> None:
    problems = validate([record(0), record(1, length=4)])
    assert kinds(problems) == [(ProblemKind.WRONG_SIZE, at(15))]
    assert problems[0].message == "window 2026-11-01T00:15:00Z lasts 1h, not 15m"


# fmt: off
IMPOSSIBLE = [
    pytest.param(succeeded(0, target_count=None), "without source, staged and target counts",
                 id="succeeded-null-count"),
    pytest.param(succeeded(0, staged_count=9), "unequal counts (source=10 staged=9 target=10)",
                 id="succeeded-unequal-counts"),
    pytest.param(dataclasses.replace(skipped(0), source_count=4), "source count is 4",
                 id="skipped-with-documents"),
    pytest.param(dataclasses.replace(skipped(0), source_count=None), "source count is None",
                 id="skipped-without-count"),
    pytest.param(dataclasses.replace(running(0), stage=None), "running without a stage",
                 id="running-without-stage"),
    pytest.param(record(0, finished_at=DONE_AT), "pending but has a finish time",
                 id="pending-finished"),
    pytest.param(dataclasses.replace(queued(0), finished_at=DONE_AT),
                 "queued but has a finish time", id="queued-finished"),
    pytest.param(record(0, attempts=-1), "attempts is negative (-1)", id="negative-attempts"),
    pytest.param(dataclasses.replace(dead(0), attempts=0), "dead without any attempt",
                 id="dead-without-attempt"),
    pytest.param(failed(0, attempts=0), "failed without any attempt", id="failed-no-attempt"),
    pytest.param(dataclasses.replace(running(0), source_count=-3), "a count is negative",
                 id="negative-count"),
    pytest.param(record(0, rejected_count=-1), "a count is negative", id="negative-rejected"),
]  # fmt: skip


@pytest.mark.parametrize(("broken", "reason"), IMPOSSIBLE)
def test_fields_that_contradict_the_status_are_an_impossible_state(
    broken: WindowRecord, reason: str
) -> None:
    problems = validate([broken])
    assert kinds(problems) == [(ProblemKind.IMPOSSIBLE_STATE, ORIGIN)]
    assert reason in problems[0].message
    assert problems[0].message.startswith("window 2026-11-01T00:00:00Z: ")


@pytest.mark.parametrize("consistent", healthy_chain(), ids=lambda r: r.status.value)
def test_consistent_records_are_not_an_impossible_state(consistent: WindowRecord) -> None:
    assert impossible_state(consistent) is None


def test_every_contradiction_of_one_record_is_named() -> None:
    broken = record(0, attempts=-2, finished_at=DONE_AT)
    reason = impossible_state(broken)
    assert reason is not None
    assert "attempts is negative" in reason and "has a finish time" in reason


def test_a_dead_window_with_newer_windows_is_an_invalid_continuation_on_the_dead_one() -> None:
    problems = validate([succeeded(0), dead(1), succeeded(2), record(3)])
    assert kinds(problems) == [(ProblemKind.INVALID_CONTINUATION, at(15))]
    assert problems[0].message.startswith(
        "window 2026-11-01T00:15:00Z is dead but 2 newer window(s) follow it"
    )


def test_a_dead_window_that_is_the_newest_is_not_an_invalid_continuation() -> None:
    assert validate([succeeded(0), succeeded(1), dead(2)]) == []


def test_newer_windows_after_a_failed_window_are_a_valid_continuation() -> None:
    # A failed window is retried by the dispatcher; windows run in parallel meanwhile.
    assert validate([succeeded(0), failed(1, attempts=3), succeeded(2), running(3)]) == []


def test_every_message_is_one_line_with_z_instants() -> None:
    chain = [
        record(-1),
        record(0.5),
        record(2, length=3),
        dead(6),
        record(9, attempts=-1),
        record(9.5),
    ]
    problems = validate(chain)
    assert {p.kind for p in problems} == set(ProblemKind)
    for problem in problems:
        assert "\n" not in problem.message
        assert "+00:00" not in problem.message
        assert "Z" in problem.message


def test_naive_origin_and_empty_size_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        validate_chain([], origin=datetime(2026, 11, 1), size=SIZE)
    with pytest.raises(ValueError, match="longer than zero"):
        plan_rebuild([], origin=ORIGIN, size=timedelta(0))


# --- rebuild ------------------------------------------------------------------------------------


def test_a_healthy_chain_needs_no_rebuild() -> None:
    assert plan(healthy_chain()).is_empty


def test_rebuild_fills_gaps_with_aligned_pending_windows() -> None:
    rebuild = plan([record(2), succeeded(3), record(6)])
    assert [w.start for w in rebuild.create] == [at(0), at(15), at(60), at(75)]
    assert all(w.size == SIZE for w in rebuild.create)
    assert rebuild.delete_starts == [] and rebuild.reset_starts == []


def test_rebuild_deletes_misaligned_wrong_size_overlapping_and_pre_origin_unfinished_records() -> (
    None
):
    chain = [
        record(-1),  # before the origin
        record(0),
        queued(0.5),  # misaligned, overlaps window 0
        record(1, length=2),  # wrong size
        running(3),
        failed(3.4),  # misaligned and overlapping window 3
    ]
    rebuild = plan(chain)
    assert rebuild.delete_starts == [at(-15), at(7.5), at(15), at(51)]
    assert [w.start for w in rebuild.create] == [at(15), at(30)]


def test_rebuild_deletes_an_unfinished_record_overlapping_a_later_finished_one() -> None:
    # Running [00:15, 00:30) would load documents the succeeded [00:20, 00:35) already holds.
    chain = [record(0), record(1), succeeded(4 / 3)]
    rebuild = plan(chain)
    assert rebuild.delete_starts == [at(15)]
    assert rebuild.create == []


def test_rebuild_resets_unfinished_records_in_impossible_states() -> None:
    chain = [
        succeeded(0),
        record(1, finished_at=DONE_AT),
        dataclasses.replace(running(2), stage=None),
        record(3),
    ]
    rebuild = plan(chain)
    assert rebuild.reset_starts == [at(15), at(30)]
    assert rebuild.delete_starts == [] and rebuild.create == []


def test_rebuild_restarts_a_dead_window_that_newer_windows_follow() -> None:
    rebuild = plan([succeeded(0), dead(1), succeeded(2), dead(3)])
    assert rebuild.reset_starts == [at(15)]  # the newest dead window stays dead and visible


def test_rebuild_keeps_a_dead_window_dead_when_only_deleted_records_follow_it() -> None:
    chain = [dead(0), record(1, length=2)]
    assert kinds(validate(chain))[-1] == (ProblemKind.WRONG_SIZE, at(15))
    rebuild = plan(chain)
    assert rebuild.delete_starts == [at(15)]
    assert rebuild.reset_starts == []
    assert validate(apply_plan(chain, rebuild)) == []


def test_rebuild_leaves_failed_windows_to_the_dispatcher() -> None:
    assert plan([failed(0, attempts=2), succeeded(1), record(2)]).is_empty


def test_rebuild_never_deletes_or_resets_finished_records_even_when_broken() -> None:
    finished = [
        succeeded(0, staged_count=1),  # impossible state
        succeeded(1.2),  # misaligned
        skipped(3),
        succeeded(4, length=2),  # wrong size
        succeeded(5),  # overlaps the wrong-size one
    ]
    chain = [*finished, record(7)]
    rebuild = plan(chain)
    touched = {*rebuild.delete_starts, *rebuild.reset_starts}
    assert not touched & {r.window_start for r in finished}
    after = apply_plan(chain, rebuild)
    for kept in finished:
        assert kept in after


def test_space_next_to_a_misaligned_finished_record_stays_a_reported_gap() -> None:
    chain = [succeeded(0), succeeded(1.2), record(3)]
    after = apply_plan(chain, plan(chain))
    assert [r.window_start for r in after] == [at(0), at(18), at(45)]
    assert kinds(validate(after)) == [
        (ProblemKind.GAP, at(15)),
        (ProblemKind.MISALIGNED, at(18)),
        (ProblemKind.GAP, at(33)),
    ]


def test_a_rebuilt_chain_has_problems_only_on_finished_records() -> None:
    chain = [
        succeeded(0, staged_count=1),
        queued(0.5),
        record(2, finished_at=DONE_AT),
        dead(3),
        record(5, length=3),
        skipped(6),
        running(7),
        record(9, attempts=-1),
    ]
    before = validate(chain)
    assert {p.kind for p in before} == set(ProblemKind)
    after = apply_plan(chain, plan(chain))
    assert kinds(validate(after)) == [(ProblemKind.IMPOSSIBLE_STATE, ORIGIN)]
    assert plan(after).is_empty


# --- rebuild: properties ----------------------------------------------------------------------

STATUSES = st.sampled_from(list(WindowStatus))
SHAPES = st.sampled_from(["aligned", "aligned", "aligned", "shifted", "long", "short"])


@st.composite
def broken_records(draw: st.DrawFn) -> WindowRecord:
    k = draw(st.integers(-2, 30))
    shape = draw(SHAPES)
    start = ORIGIN + k * SIZE
    if shape == "shifted":
        start += draw(st.integers(1, 14)) * timedelta(minutes=1)
    length = {"long": 2 * SIZE, "short": SIZE / 3}.get(shape, SIZE)
    source = draw(st.none() | st.integers(-1, 5))
    consistent = draw(st.booleans())
    staged = source if consistent else draw(st.none() | st.integers(0, 5))
    target = source if consistent else draw(st.none() | st.integers(0, 5))
    return WindowRecord(
        "orders",
        start,
        start + length,
        status=draw(STATUSES),
        stage=draw(st.none() | st.sampled_from(list(Stage))),
        attempts=draw(st.integers(-1, 4)),
        source_count=source,
        staged_count=staged,
        target_count=target,
        finished_at=draw(st.none() | st.just(DONE_AT)),
    )


@st.composite
def broken_chains(draw: st.DrawFn) -> list[WindowRecord]:
    """Shuffled chains with holes, overlapping near-duplicates and every kind of breakage.

    Starts are unique, as the store's (pipeline, window_start) key guarantees.
    """
    drawn = draw(st.lists(broken_records(), max_size=30))
    unique = list({r.window_start: r for r in drawn}.values())
    return draw(st.permutations(unique))


def _well_formed(r: WindowRecord) -> bool:
    return (
        r.window_start >= ORIGIN
        and (r.window_start - ORIGIN) % SIZE == timedelta(0)
        and r.window_end - r.window_start == SIZE
    )


@settings(max_examples=400, deadline=None)
@given(broken_chains())
def test_a_rebuild_keeps_finished_work_and_leaves_no_problem_on_unfinished_records(
    chain: list[WindowRecord],
) -> None:
    finished = [dataclasses.replace(r) for r in chain if r.status in FINISHED]
    after = apply_plan(chain, plan(chain))
    for kept in finished:
        assert kept in after  # still there, every field unchanged
    unfinished_starts = {r.window_start for r in after if r.status not in FINISHED}
    problems = validate(after)
    for problem in problems:
        if problem.kind != ProblemKind.GAP:
            assert problem.window_start not in unfinished_starts, problem.message
    if all(_well_formed(r) for r in finished):
        finished_starts = {r.window_start for r in finished}
        assert all(p.window_start in finished_starts for p in problems), problems
        assert all(p.kind == ProblemKind.IMPOSSIBLE_STATE for p in problems), problems
    assert plan(after).is_empty  # a rebuilt chain needs no second rebuild


def test_a_tail_is_validated_from_since_on_and_ignores_the_history_before_it() -> None:
    # What a generation tick checks: the records from one window before its frontier on.
    tail = [record(10), record(11), record(13)]
    problems = validate_chain(tail, origin=ORIGIN, size=SIZE, since=ORIGIN + 10 * SIZE)
    assert [(p.kind, p.window_start) for p in problems] == [(ProblemKind.GAP, ORIGIN + 12 * SIZE)]
    # Without `since` the same records have a gap from the origin too.
    whole = validate_chain(tail, origin=ORIGIN, size=SIZE)
    assert [p.window_start for p in whole if p.kind == ProblemKind.GAP] == [
        ORIGIN,
        ORIGIN + 12 * SIZE,
    ]
    # A tail that starts later than `since` has a gap at `since`.
    late = validate_chain([record(12)], origin=ORIGIN, size=SIZE, since=ORIGIN + 10 * SIZE)
    assert [(p.kind, p.window_start) for p in late] == [(ProblemKind.GAP, ORIGIN + 10 * SIZE)]
