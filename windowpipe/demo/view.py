"""What the demo shows: the live progress view while the windows run, and the audit table of
every window at the end (seeded = source = staged = target).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from core.instants import format_instant
from core.records import WindowRecord, WindowStatus

console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True, soft_wrap=True)


@dataclass(frozen=True)
class AuditRow:
    """One window's outcome, and whether the counts agree with what was seeded."""

    window_start: datetime
    status: str
    seeded: int
    source: int | None
    staged: int | None
    target: int | None
    ok: bool


def audit(
    records: Sequence[WindowRecord], seeded: Counter[datetime], starts: Sequence[datetime]
) -> list[AuditRow]:
    """Every expected window (and any later, empty one beat created) with its verdict.

    Succeeded: seeded = source = staged = target. Skipped: nothing seeded, source 0.
    A window with no record, or in any other state, fails.
    """
    by_start = {r.window_start: r for r in records}
    rows = []
    for start in sorted(set(starts) | set(by_start)):
        record = by_start.get(start)
        expected = seeded.get(start, 0)
        if record is None:
            rows.append(AuditRow(start, "missing", expected, None, None, None, False))
            continue
        counts = (record.source_count, record.staged_count, record.target_count)
        if record.status == WindowStatus.SUCCEEDED:
            ok = counts == (expected, expected, expected)
        elif record.status == WindowStatus.SKIPPED:
            ok = expected == 0 and record.source_count in (0, None)
            counts = (record.source_count or 0, record.staged_count or 0, record.target_count or 0)
        else:
            ok = False
        rows.append(AuditRow(start, record.status.value, expected, *counts, ok))
    return rows


def audit_table(rows: Sequence[AuditRow]) -> Table:
    table = Table(title="audit: every window", title_justify="left")
    table.add_column("window")
    table.add_column("status")
    for name in ("seeded", "source", "staged", "target"):
        table.add_column(name, justify="right")
    table.add_column("ok")
    for row in rows:
        style = "" if row.ok else "bold red"
        table.add_row(
            format_instant(row.window_start),
            row.status,
            *(_count(value) for value in (row.seeded, row.source, row.staged, row.target)),
            "yes" if row.ok else "NO",
            style=style,
        )
    return table


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def progress_view(
    records: Sequence[WindowRecord], windows: int, events: int, elapsed: float, title: str
) -> RenderableType:
    """Windows by status, rows moved, rate and elapsed time."""
    states = Counter(r.status.value for r in records)
    finished = states["succeeded"] + states["skipped"] + states["dead"]
    moved = sum(r.target_count or 0 for r in records if r.status == WindowStatus.SUCCEEDED)
    rate = moved / elapsed if elapsed > 0 else 0.0
    bars = Table.grid(padding=(0, 1))
    bars.add_column(style="bold", width=8)
    bars.add_column(width=40)
    bars.add_column()
    bars.add_row(
        "windows",
        ProgressBar(total=max(windows, 1), completed=finished, width=40),
        f"{finished}/{windows} finished",
    )
    bars.add_row(
        "rows",
        ProgressBar(total=max(events, 1), completed=moved, width=40),
        f"{moved:,}/{events:,} moved · {rate:,.0f} rows/s · {elapsed:.1f}s",
    )
    by_status = " · ".join(f"{status.value} {states[status.value]}" for status in WindowStatus)
    return Group(Text(title, style="bold"), bars, Text(f"windows by status: {by_status}"))
