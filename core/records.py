"""Window record states, the chain's stages, and the record as plain data.

The moves between states, as `core.transitions.MOVES` names them (tests check that this diagram
and the table agree: `A ──MOVE──▶ B` and `B ◀──MOVE── A` are edges, `a|b` is several states):

    pending ──ENQUEUE──▶ queued ──CLAIM──▶ running ──SUCCEED──▶ succeeded
                         queued ◀──ADVANCE── running ──SKIP──▶ skipped
                         queued ◀──REQUEUE_LOST── running ──FAIL──▶ failed ──BURY──▶ dead
                         queued ◀──ENQUEUE── failed
                         queued ──RESEND──▶ queued
                         running ──CLAIM──▶ running
                         running ──REFENCE──▶ running
    succeeded|skipped|dead ──ENQUEUE──▶ queued
    succeeded|skipped|dead ──RESET──▶ pending
    succeeded|skipped ──RECHECK_RERUN──▶ pending
    pending|queued|running|failed|dead ──REBUILD_RESET──▶ pending

ADVANCE, the most frequent move, sends a window back to queued between stages with `stage`
naming the next step (or the same step after a transient failure); SKIP is precheck finding 0
documents; a failed window is queued again (ENQUEUE) at its recorded stage until BURY finds its
attempts exhausted; RESEND is cleanup sending a waiting window's message again (no attempt),
REQUEUE_LOST cleanup requeueing a window whose worker died (an attempt); a second CLAIM of a
running window fences the first owner out. RESET is `enqueue --force`, RECHECK_RERUN a recheck
or reconcile that found drift, REBUILD_RESET `validate --rebuild`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any

from core.instants import format_instant
from core.windows import Window


class WindowStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"
    DEAD = "dead"


class Stage(StrEnum):
    """The steps of a window's chain, in order."""

    PRECHECK = "precheck"
    EXTRACT = "extract"
    LOAD = "load"
    AUDIT = "audit"


STAGE_ORDER: tuple[Stage, ...] = (Stage.PRECHECK, Stage.EXTRACT, Stage.LOAD, Stage.AUDIT)
"""The chain, in the order its steps run."""


class WindowKind(StrEnum):
    SCHEDULED = "scheduled"
    """Created by beat's generation tick."""
    MANUAL = "manual"
    """Created by `windowpipe enqueue` (manual runs and backfills); runs under its own cap."""


FINISHED = frozenset({WindowStatus.SUCCEEDED, WindowStatus.SKIPPED})
"""States whose work is done and must survive a rebuild."""

ACTIVE = frozenset({WindowStatus.QUEUED, WindowStatus.RUNNING})
"""States in which a chain is (or should be) in flight."""

AUDIT_ERROR_PREFIX = "audit: "
"""How a window the audit failed starts its `error` (core/runner.py writes it): the metrics
tell an audit failure from a stage that gave up by it (core/metrics.py), so it has this one
home."""


@dataclass
class WindowRecord:
    """One window's durable record, as plain data (the store maps its rows to this)."""

    pipeline: str
    window_start: datetime
    window_end: datetime
    status: WindowStatus = WindowStatus.PENDING
    stage: Stage | None = None
    kind: WindowKind = WindowKind.SCHEDULED
    attempts: int = 0
    source_count: int | None = None
    staged_count: int | None = None
    target_count: int | None = None
    rejected_count: int | None = None
    fence: int = 0
    manifest: str | None = None
    error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    source_version: str | None = None
    """The max of the source's version field in the window when precheck counted it (with
    `source_count`, the fingerprint a recheck compares); None without a version field."""
    rechecks_done: int = 0
    """How many of the pipeline's recheck horizons the window has passed."""
    checked_at: datetime | None = None
    """When the source was last compared with this record (recheck or reconcile)."""
    drift: list[dict[str, Any]] = field(default_factory=list)
    """Every drift found: `{"at", "by", "count_before", "count_after", "version_before",
    "version_after"}`, oldest first."""
    checksum: str | None = None
    """The checksum of the ids extract staged (`core.checksum`: 16 hex digits); the audit
    requires the target's to equal it."""
    target_checksum: str | None = None
    """The checksum of the ids the target held when the audit looked."""
    load_fence: int | None = None
    """The fence the window's last load took in the target's ledger; the audit requires the
    ledger to still hold it."""
    id: int | None = field(default=None)

    @property
    def window(self) -> Window:
        return Window(self.window_start, self.window_end)

    def to_json(self) -> dict[str, Any]:
        """Every field, with instants as ISO 8601 `Z` strings, for `status --json`."""
        out: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, datetime):
                value = format_instant(value)
            elif isinstance(value, StrEnum):
                value = value.value
            out[item.name] = value
        return out
