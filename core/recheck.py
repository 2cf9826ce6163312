"""Late and changed data: compare closed windows with the source again, re-run what drifted.

A window is extracted once, `lag` after its end; documents that arrive later for its time range,
or are deleted or updated afterwards, would never reach the target. So each finished window
(succeeded or skipped) is compared with its source again when it reaches each of the
pipeline's recheck horizons (`recheck = ["1h", "1d", "7d"]`, ages after the window's end), and
on demand by `windowpipe reconcile` over any range.

The comparison is a fingerprint, cheap for every source: the number of documents in the window
and, where the source has a field that changes on every update (`version_field`, e.g.
`updated_at` or `_seq_no`), its maximum. A window whose fingerprint changed is put back to
pending (as a manual window, under the backfill cap) and runs the normal chain again: its
rows in the target are replaced, never added to, and the load is fenced like any other. The
drift is kept on the record (`drift`: when, by what, count and version before -> after).

What it cannot see: an in-place update that leaves the count alone and has no version field,
or one whose new version is not the window's maximum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core.errors import BadInputError
from core.instants import format_instant
from core.logs import get_logger
from core.records import FINISHED, WindowRecord
from core.store import StateStore
from core.windows import Window

RECONCILE_MAX_WINDOWS = 10_000
"""Most closed windows one `windowpipe reconcile` call compares (one count per window)."""


@dataclass(frozen=True)
class Fingerprint:
    """What a source says about one window now: how many documents, and the newest version."""

    count: int
    version: str | None = None


FingerprintOf = Callable[[Window], Fingerprint]
"""The source's fingerprint of a window (`Source.fingerprint`)."""


def horizons_passed(window_end: datetime, horizons: Sequence[timedelta], now: datetime) -> int:
    """How many of `horizons` (ascending ages after the window's end) have passed at `now`."""
    return sum(1 for horizon in horizons if window_end + horizon <= now)


def fingerprint_matches(record: WindowRecord, now: Fingerprint) -> bool:
    """True when the source still holds what the record says it had."""
    version_changed = now.version is not None and now.version != record.source_version
    return now.count == (record.source_count or 0) and not version_changed


def drift_of(
    record: WindowRecord, now: Fingerprint, *, at: datetime, by: str
) -> dict[str, Any] | None:
    """The drift entry when the source's fingerprint no longer matches the record, else None.

    The version is compared only when the source reports one: a pipeline without a version
    field compares counts alone.
    """
    if fingerprint_matches(record, now):
        return None
    return {
        "at": format_instant(at),
        "by": by,
        "count_before": record.source_count or 0,
        "count_after": now.count,
        "version_before": record.source_version,
        "version_after": now.version,
    }


@dataclass
class RecheckReport:
    pipeline: str
    checked: int = 0
    drifted: list[WindowRecord] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "pipeline": self.pipeline,
            "checked": self.checked,
            "drifted": [format_instant(r.window_start) for r in self.drifted],
        }


def recheck_due(
    store: StateStore,
    pipeline: str,
    horizons: Sequence[timedelta],
    fingerprint: FingerprintOf,
    now: datetime,
    *,
    limit: int,
) -> RecheckReport:
    """Compare the finished windows that reached a horizon (at most `limit`, oldest first) with
    the source; put the ones that drifted back to pending. Returns what it did."""
    log = get_logger("windowpipe.recheck", pipeline=pipeline)
    report = RecheckReport(pipeline)
    for record in store.due_rechecks(pipeline, horizons, now, limit=limit):
        passed = horizons_passed(record.window_end, horizons, now)
        horizon = horizons[min(record.rechecks_done, len(horizons) - 1)]
        drift = drift_of(record, fingerprint(record.window), at=now, by=f"recheck {horizon}")
        if store.record_check(record, rechecks_done=passed, drift=drift) is None:
            continue  # re-run or reset meanwhile: the next horizon looks again
        report.checked += 1
        if drift is not None:
            report.drifted.append(record)
            window = format_instant(record.window_start)
            log.warning("window drifted: re-running it", window=window, **drift)
    return report


@dataclass(frozen=True)
class ReconcileRow:
    """One closed window compared with its source and target now."""

    record: WindowRecord
    source_now: Fingerprint
    target_now: int
    repaired: bool = False

    @property
    def recorded(self) -> int:
        return self.record.source_count or 0

    @property
    def matches(self) -> bool:
        return (
            fingerprint_matches(self.record, self.source_now)
            and self.target_now == self.source_now.count
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.record.pipeline,
            "window_start": format_instant(self.record.window_start),
            "window_end": format_instant(self.record.window_end),
            "status": self.record.status.value,
            "recorded": self.recorded,
            "source_now": self.source_now.count,
            "target_now": self.target_now,
            "version_recorded": self.record.source_version,
            "version_now": self.source_now.version,
            "matches": self.matches,
            "repaired": self.repaired,
        }


def closed_windows(
    store: StateStore, pipeline: str, start: datetime, end: datetime
) -> list[WindowRecord]:
    """The finished windows whose start lies in `[start, end)`; refuses an unbounded amount."""
    records = store.list_records(
        pipeline, statuses=FINISHED, start=start, end=end, limit=RECONCILE_MAX_WINDOWS + 1
    )
    if len(records) > RECONCILE_MAX_WINDOWS:
        raise BadInputError(
            f"the range holds more than {RECONCILE_MAX_WINDOWS:,} closed windows; reconcile a "
            "shorter range per call"
        )
    return records


def reconcile(
    store: StateStore,
    records: Sequence[WindowRecord],
    fingerprint: FingerprintOf,
    target_count: Callable[[Window], int],
    now: datetime,
    *,
    repair: bool,
    progress: Callable[[], None] = lambda: None,
) -> list[ReconcileRow]:
    """Compare each closed window with the source and target now; with `repair`, put the ones
    that do not match back to pending (recording the drift) so the normal chain re-runs them."""
    rows = []
    for record in records:
        row = ReconcileRow(record, fingerprint(record.window), target_count(record.window))
        if repair and not row.matches:
            # The source may match while the target does not (rows lost or added there).
            drift = drift_of(record, row.source_now, at=now, by="reconcile") or {
                "at": format_instant(now),
                "by": "reconcile",
                "count_before": row.recorded,
                "count_after": row.source_now.count,
                "version_before": record.source_version,
                "version_after": row.source_now.version,
            }
            drift["target_now"] = row.target_now
            rerun = store.record_check(record, rechecks_done=record.rechecks_done, drift=drift)
            row = ReconcileRow(record, row.source_now, row.target_now, repaired=rerun is not None)
        rows.append(row)
        progress()
    return rows
