"""Record validation and rebuild (`windowpipe validate [--rebuild]`; README: "CLI"), as pure
functions.

Given a pipeline's window records (in any order), `validate_chain` finds what is wrong with the
chain and `plan_rebuild` plans a repair. Nothing here reads the clock, Redis or a database.

What validation reports (`ProblemKind`):

- GAP: an interval between `origin` and the newest record that no record covers.
- OVERLAP: a record starting before an earlier record ends (reported on the later record).
- MISALIGNED: a record whose start is not `origin + k * size`, or lies before `origin`.
- WRONG_SIZE: a record whose `end - start` is not `size`.
- IMPOSSIBLE_STATE: fields that contradict the status (see `impossible_state`).
- INVALID_CONTINUATION: a `dead` record with newer records after it, reported on the dead
  record. Windows run in parallel, so newer windows existing after a `failed` one is normal:
  the dispatcher retries it. A dead window is terminal, and a chain that moves on past it
  silently loses that window's data, so an operator must see it.

How a rebuild repairs the chain (records sorted by start; the valid prefix is left untouched
because every rule below keeps well-formed, consistent records as they are):

1. Succeeded and skipped records are never deleted or reset, even when misaligned, wrongly
   sized or overlapping: their problems stay reported for an operator.
2. An unfinished record is deleted when it is misaligned, wrongly sized, before `origin`, or
   overlaps a finished record or an earlier kept unfinished record (running it would load the
   same documents twice).
3. A kept unfinished record in an impossible state is reset to pending; so is a kept dead
   record with newer records after it (the repair of an invalid continuation: the window gets
   a fresh set of attempts). A dead record that is the newest one stays dead and visible.
   Failed records stay as they are: the dispatcher retries them with backoff.
4. Every aligned window of `size` between `origin` and the end of the newest kept record that
   overlaps no kept record is created as pending. Space next to a misaligned finished record
   that no aligned window fits into stays a reported gap.

After applying the plan, validation reports problems only on (or next to misaligned) finished
records.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from core.instants import format_duration, format_instant
from core.records import ACTIVE, FINISHED, WindowRecord, WindowStatus
from core.windows import Window, align_down


class ProblemKind(StrEnum):
    GAP = "gap"
    OVERLAP = "overlap"
    MISALIGNED = "misaligned"
    WRONG_SIZE = "wrong_size"
    IMPOSSIBLE_STATE = "impossible_state"
    INVALID_CONTINUATION = "invalid_continuation"


@dataclass(frozen=True)
class ChainProblem:
    """One thing wrong with a pipeline's chain of records."""

    kind: ProblemKind
    window_start: datetime
    """The record the problem is reported on (for a gap: where the gap starts)."""
    message: str


@dataclass
class RebuildPlan:
    """What `validate --rebuild` changes, applied by the store in one transaction."""

    delete_starts: list[datetime] = field(default_factory=list)
    """Records to delete (never a succeeded or skipped one)."""
    reset_starts: list[datetime] = field(default_factory=list)
    """Records to put back to `pending` (counts, stage and error cleared)."""
    create: list[Window] = field(default_factory=list)
    """Missing windows to create as `pending` (gaps)."""

    @property
    def is_empty(self) -> bool:
        return not (self.delete_starts or self.reset_starts or self.create)


# --- single records ---------------------------------------------------------------------------


def impossible_state(record: WindowRecord) -> str | None:
    """Why a record's fields contradict its status (every reason, `; `-joined), or None."""
    reasons = list(_impossible_reasons(record))
    return "; ".join(reasons) if reasons else None


def _impossible_reasons(record: WindowRecord) -> Iterator[str]:
    status = record.status
    counts = (record.source_count, record.staged_count, record.target_count)
    if record.attempts < 0:
        yield f"attempts is negative ({record.attempts})"
    if any(c is not None and c < 0 for c in (*counts, record.rejected_count)):
        yield "a count is negative"
    if status == WindowStatus.SUCCEEDED:
        if None in counts:
            yield "succeeded without source, staged and target counts"
        elif not record.source_count == record.staged_count == record.target_count:
            yield (
                f"succeeded with unequal counts (source={record.source_count} "
                f"staged={record.staged_count} target={record.target_count})"
            )
    if status == WindowStatus.SKIPPED and record.source_count != 0:
        yield f"skipped although the source count is {record.source_count}, not 0"
    if status == WindowStatus.RUNNING and record.stage is None:
        yield "running without a stage"
    if status in (WindowStatus.FAILED, WindowStatus.DEAD) and record.attempts == 0:
        yield f"{status.value} without any attempt"
    if status in ACTIVE | {WindowStatus.PENDING} and record.finished_at is not None:
        yield f"{status.value} but has a finish time ({format_instant(record.finished_at)})"


def _shape_problems(
    record: WindowRecord, origin: datetime, size: timedelta
) -> Iterator[ChainProblem]:
    start, end = record.window_start, record.window_end
    if start < origin:
        yield ChainProblem(
            ProblemKind.MISALIGNED,
            start,
            f"window {format_instant(start)} starts before the pipeline start "
            f"{format_instant(origin)}",
        )
    elif not _aligned(start, origin, size):
        before = align_down(start, origin, size)
        yield ChainProblem(
            ProblemKind.MISALIGNED,
            start,
            f"window {format_instant(start)} is not aligned to {format_instant(origin)} + k * "
            f"{_size_text(size)} (nearest boundaries {format_instant(before)} and "
            f"{format_instant(before + size)})",
        )
    if end - start != size:
        yield ChainProblem(
            ProblemKind.WRONG_SIZE,
            start,
            f"window {format_instant(start)} lasts {_size_text(end - start)}, "
            f"not {_size_text(size)}",
        )


def _aligned(start: datetime, origin: datetime, size: timedelta) -> bool:
    return (start - origin) % size == timedelta(0)


def _well_formed(record: WindowRecord, origin: datetime, size: timedelta) -> bool:
    """Aligned, `size` long and not before `origin`."""
    start = record.window_start
    return start >= origin and _aligned(start, origin, size) and record.window_end - start == size


def _size_text(size: timedelta) -> str:
    if size <= timedelta(0) or size % timedelta(seconds=1):
        return str(size)
    return format_duration(size)


# --- the chain --------------------------------------------------------------------------------


def validate_chain(
    records: Sequence[WindowRecord],
    *,
    origin: datetime,
    size: timedelta,
    since: datetime | None = None,
) -> list[ChainProblem]:
    """Everything wrong with one pipeline's chain of records, oldest first.

    See the module docstring for what each `ProblemKind` means. With `since`, `records` are the
    tail of the chain (every record starting at or after `since`) and only that part is
    checked: gaps are looked for from `since` on, alignment still against `origin`. That is
    what a generation tick does, so its cost does not grow with the pipeline's history.
    """
    origin = _chain_origin(origin, size)
    ordered = _ordered(records)
    starts = [r.window_start for r in ordered]
    problems: list[ChainProblem] = []
    # The latest end of the records seen so far (for a tail: where checking begins).
    covered_until: datetime | None = since
    for record in ordered:
        problems.extend(_continuity_problems(record, covered_until, origin))
        problems.extend(_shape_problems(record, origin, size))
        reason = impossible_state(record)
        if reason:
            problems.append(
                ChainProblem(
                    ProblemKind.IMPOSSIBLE_STATE,
                    record.window_start,
                    f"window {format_instant(record.window_start)}: {reason}",
                )
            )
        newer = len(starts) - bisect.bisect_right(starts, record.window_start)
        if record.status == WindowStatus.DEAD and newer:
            problems.append(_invalid_continuation(record, newer))
        end = record.window_end
        covered_until = end if covered_until is None else max(covered_until, end)
    return problems


def _continuity_problems(
    record: WindowRecord, covered_until: datetime | None, origin: datetime
) -> Iterator[ChainProblem]:
    start = record.window_start
    if covered_until is not None and start < covered_until:
        yield ChainProblem(
            ProblemKind.OVERLAP,
            start,
            f"window {format_instant(start)} overlaps an earlier window, which ends at "
            f"{format_instant(covered_until)}",
        )
        return
    gap_start = origin if covered_until is None else max(covered_until, origin)
    if start > gap_start:
        yield ChainProblem(
            ProblemKind.GAP,
            gap_start,
            f"gap: no window covers [{format_instant(gap_start)}, {format_instant(start)})",
        )


def _invalid_continuation(record: WindowRecord, newer: int) -> ChainProblem:
    start = record.window_start
    return ChainProblem(
        ProblemKind.INVALID_CONTINUATION,
        start,
        f"window {format_instant(start)} is dead but {newer} newer window(s) follow it; "
        "re-run it with `windowpipe enqueue --force` or `windowpipe validate --rebuild`",
    )


def plan_rebuild(
    records: Sequence[WindowRecord], *, origin: datetime, size: timedelta
) -> RebuildPlan:
    """Plan the repair of a chain without losing finished work (rules: module docstring)."""
    origin = _chain_origin(origin, size)
    ordered = _ordered(records)
    finished = [r for r in ordered if r.status in FINISHED]
    blocked = _FinishedCover(finished)
    plan = RebuildPlan()
    kept = list(finished)
    kept_until = origin  # the end of the latest kept unfinished record
    for record in ordered:
        if record.status in FINISHED:
            continue
        start, end = record.window_start, record.window_end
        fits = start >= kept_until and not blocked.overlaps(start, end)
        if not (fits and _well_formed(record, origin, size)):
            plan.delete_starts.append(start)
            continue
        if impossible_state(record):
            plan.reset_starts.append(start)
        kept.append(record)
        kept_until = end
    plan.create = _missing_windows(kept, origin=origin, size=size)
    plan.reset_starts.extend(_dead_to_restart(kept, plan))
    plan.reset_starts.sort()
    return plan


def _dead_to_restart(kept: Sequence[WindowRecord], plan: RebuildPlan) -> list[datetime]:
    """Kept dead records that newer records (kept or created) will follow, not yet reset."""
    latest = max([*(r.window_start for r in kept), *(w.start for w in plan.create)], default=None)
    already = set(plan.reset_starts)
    return [
        r.window_start
        for r in kept
        if r.status == WindowStatus.DEAD
        and latest is not None
        and r.window_start < latest
        and r.window_start not in already
    ]


class _FinishedCover:
    """Answers "does `[start, end)` overlap a finished record?" in O(log n)."""

    def __init__(self, finished: Sequence[WindowRecord]) -> None:
        spans = sorted((r.window_start, r.window_end) for r in finished)
        self._starts = [s for s, _ in spans]
        # _reach[i]: the latest end among the first i + 1 spans (spans may overlap each other).
        self._reach: list[datetime] = []
        for _, end in spans:
            self._reach.append(end if not self._reach else max(self._reach[-1], end))

    def overlaps(self, start: datetime, end: datetime) -> bool:
        before_end = bisect.bisect_left(self._starts, end)  # spans starting before `end`
        return before_end > 0 and self._reach[before_end - 1] > start


def _missing_windows(
    kept: Sequence[WindowRecord], *, origin: datetime, size: timedelta
) -> list[Window]:
    """Aligned windows in `[origin, end of the newest kept record)` that overlap no kept one."""
    if not kept:
        return []
    missing: list[Window] = []
    cursor = origin
    for start, end in sorted((r.window_start, r.window_end) for r in kept):
        missing.extend(_aligned_windows_between(cursor, start, origin, size))
        cursor = max(cursor, end)
    return missing


def _aligned_windows_between(
    start: datetime, end: datetime, origin: datetime, size: timedelta
) -> Iterator[Window]:
    """The aligned windows of `size` that fit entirely inside `[start, end)`."""
    cursor = align_down(start, origin, size)
    if cursor < start:
        cursor += size
    while cursor + size <= end:
        yield Window(cursor, cursor + size)
        cursor += size


def _ordered(records: Sequence[WindowRecord]) -> list[WindowRecord]:
    return sorted(records, key=lambda r: (r.window_start, r.window_end))


def _chain_origin(origin: datetime, size: timedelta) -> datetime:
    """`origin` in UTC, after checking the chain's parameters."""
    if origin.tzinfo is None or origin.utcoffset() is None:
        raise ValueError(f"pipeline start {origin.isoformat()} is naive; windowpipe needs UTC")
    if size <= timedelta(0):
        raise ValueError(f"window size must be longer than zero, got {size}")
    return origin.astimezone(UTC)
