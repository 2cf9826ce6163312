"""Record validation and rebuild (the original `record_validation`), as pure functions.

Given a pipeline's window records, find what is wrong with the chain (gaps, overlaps,
misaligned windows, impossible states, invalid continuations) and plan a rebuild that repairs it
from the last valid record without touching finished (succeeded or skipped) work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from core.instants import format_instant
from core.records import ACTIVE, FINISHED, WindowRecord, WindowStatus
from core.windows import Window


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


def _aligned(start: datetime, origin: datetime, size: timedelta) -> bool:
    return (start - origin) % size == timedelta(0)


def impossible_state(record: WindowRecord) -> str | None:
    """Why a record's fields contradict its status, or None when they are consistent."""
    counts = (record.source_count, record.staged_count, record.target_count)
    if record.attempts < 0:
        return f"attempts is negative ({record.attempts})"
    if any(c is not None and c < 0 for c in (*counts, record.rejected_count)):
        return "a count is negative"
    if record.status == WindowStatus.SUCCEEDED:
        if None in counts:
            return "succeeded without source, staged and target counts"
        if not record.source_count == record.staged_count == record.target_count:
            return (
                f"succeeded with unequal counts (source={record.source_count} "
                f"staged={record.staged_count} target={record.target_count})"
            )
    if record.status == WindowStatus.SKIPPED and record.source_count not in (0, None):
        return f"skipped although the source counted {record.source_count} documents"
    if record.status == WindowStatus.RUNNING and record.stage is None:
        return "running without a stage"
    if record.status in (WindowStatus.FAILED, WindowStatus.DEAD) and record.attempts == 0:
        return f"{record.status.value} without any attempt"
    if record.status in ACTIVE | {WindowStatus.PENDING} and record.finished_at is not None:
        return f"{record.status.value} but has a finish time"
    return None


def validate_chain(
    records: Sequence[WindowRecord], *, origin: datetime, size: timedelta
) -> list[ChainProblem]:
    """Everything wrong with one pipeline's chain of records, oldest first.

    - GAP: windows missing between `origin` and the last record (a window was skipped).
    - OVERLAP: a record starting before the previous one ends.
    - MISALIGNED / WRONG_SIZE: a record not on `origin + k * size`, or not `size` long.
    - IMPOSSIBLE_STATE: fields that contradict the status (see `impossible_state`).
    - INVALID_CONTINUATION: a dead window with newer windows after it: the chain moved on
      past data that never arrived; an operator must re-run it (`enqueue --force`).
    """
    ordered = sorted(records, key=lambda r: (r.window_start, r.window_end))
    problems: list[ChainProblem] = []
    cursor = origin
    for index, record in enumerate(ordered):
        start, end = record.window_start, record.window_end
        if not _aligned(start, origin, size):
            problems.append(
                ChainProblem(
                    ProblemKind.MISALIGNED,
                    start,
                    f"window {format_instant(start)} is not aligned to "
                    f"{format_instant(origin)} + k * {size}",
                )
            )
        if end - start != size:
            problems.append(
                ChainProblem(
                    ProblemKind.WRONG_SIZE,
                    start,
                    f"window {format_instant(start)} lasts {end - start}, not {size}",
                )
            )
        if start > cursor:
            problems.append(
                ChainProblem(
                    ProblemKind.GAP,
                    cursor,
                    f"gap: no window covers [{format_instant(cursor)}, {format_instant(start)})",
                )
            )
        elif start < cursor and index > 0:
            problems.append(
                ChainProblem(
                    ProblemKind.OVERLAP,
                    start,
                    f"window {format_instant(start)} overlaps the previous window, which ends "
                    f"at {format_instant(cursor)}",
                )
            )
        reason = impossible_state(record)
        if reason:
            problems.append(
                ChainProblem(
                    ProblemKind.IMPOSSIBLE_STATE,
                    start,
                    f"window {format_instant(start)}: {reason}",
                )
            )
        if record.status == WindowStatus.DEAD and index < len(ordered) - 1:
            later = len(ordered) - index - 1
            problems.append(
                ChainProblem(
                    ProblemKind.INVALID_CONTINUATION,
                    start,
                    f"window {format_instant(start)} is dead but {later} newer window(s) follow "
                    f"it; re-run it with `windowpipe enqueue --force`",
                )
            )
        cursor = max(cursor, end)
    return problems


def plan_rebuild(
    records: Sequence[WindowRecord], *, origin: datetime, size: timedelta
) -> RebuildPlan:
    """Repair the chain without losing finished work.

    Walking the records oldest first, a record is kept when it is well formed (aligned, `size`
    long, not overlapping a kept record). Unfinished records that are not well formed are
    deleted; unfinished records in impossible states are reset to pending. Succeeded and
    skipped records are always kept as they are (their problems stay reported). Finally every
    aligned window missing between `origin` and the last kept record is created as pending, so
    the chain has no gaps. Dead records are kept: they are the operator's to re-run.
    """
    plan = RebuildPlan()
    kept: list[WindowRecord] = []
    kept_end = origin
    for record in sorted(records, key=lambda r: (r.window_start, r.window_end)):
        finished = record.status in FINISHED
        well_formed = (
            _aligned(record.window_start, origin, size)
            and record.window_end - record.window_start == size
            and record.window_start >= kept_end
            and record.window_start >= origin
        )
        if finished:
            kept.append(record)
            kept_end = max(kept_end, record.window_end)
            continue
        if not well_formed:
            plan.delete_starts.append(record.window_start)
            continue
        if impossible_state(record):
            plan.reset_starts.append(record.window_start)
        kept.append(record)
        kept_end = max(kept_end, record.window_end)
    plan.create = _missing_windows(kept, origin=origin, size=size)
    return plan


def _missing_windows(
    kept: Sequence[WindowRecord], *, origin: datetime, size: timedelta
) -> list[Window]:
    if not kept:
        return []
    end = max(r.window_end for r in kept)
    covered = sorted((r.window_start, r.window_end) for r in kept)
    missing: list[Window] = []
    cursor = origin
    index = 0
    while cursor + size <= end:
        candidate = Window(cursor, cursor + size)
        while index < len(covered) and covered[index][1] <= candidate.start:
            index += 1
        overlaps = False
        for start, stop in covered[index:]:
            if start >= candidate.end:
                break
            if stop > candidate.start:
                overlaps = True
                break
        if not overlaps:
            missing.append(candidate)
        cursor += size
    return missing
