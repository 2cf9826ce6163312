"""Record validation and rebuild (the original `record_validation`), as pure functions.

Given a pipeline's window records, find what is wrong with the chain (gaps, overlaps,
misaligned windows, impossible states, invalid continuations) and plan a rebuild that repairs it
from the last valid record without touching finished (succeeded or skipped) work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

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
