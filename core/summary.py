"""`windowpipe status` without a pipeline: one line per pipeline and the totals, built from the
store's grouped summary (`StateStore.pipeline_summaries`) and the control records, so it reads
the same at one pipeline or a thousand. Pure: table-tested in tests/test_status_summary.py."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from core.control_runs import ControlActivity, cleanup_age, format_age, generation_age
from core.metrics import Freshness, freshness_lines, freshness_seconds
from core.records import WindowStatus
from core.store import PipelineSummary


def counts_text(counts: Mapping[WindowStatus, int]) -> str:
    """`40 succeeded, 2 running, 3 queued` in the statuses' order; `no windows` when empty."""
    parts = [f"{counts[status]} {status.value}" for status in WindowStatus if counts.get(status)]
    return ", ".join(parts) or "no windows"


def summary_lines(
    summaries: Mapping[str, PipelineSummary],
    starts: Mapping[str, datetime],
    activity: ControlActivity | str,
    now: datetime,
) -> list[str]:
    """A line per pipeline of `starts` (name -> its `start`), by name:

    `orders: complete through 2026-11-01T10:15:00Z, 14m 30s behind now; 40 succeeded,
    2 queued; backlog 2, dead 0; generation last ran 12s ago on control@a`

    then one line of totals (pipelines, windows by status, backlog, dead, the pipeline most
    behind) and the cleanup's last run (or why the control records could not be read).
    """
    lines = []
    totals: dict[WindowStatus, int] = {}
    behind: list[tuple[float, str]] = []
    backlog = backlogged = dead_pipelines = 0
    for name, start in sorted(starts.items()):
        summary = summaries.get(name) or PipelineSummary(name)
        seconds = freshness_seconds(summary.complete_through, start, now)
        behind.append((seconds, name))
        [fresh] = freshness_lines({name: Freshness(summary.complete_through, seconds)})
        line = (
            f"{fresh}; {counts_text(summary.counts)}; "
            f"backlog {summary.backlog}, dead {summary.dead}"
        )
        if not isinstance(activity, str):
            line += f"; {generation_age(activity, name, now)}"
        lines.append(line)
        for status, count in summary.counts.items():
            totals[status] = totals.get(status, 0) + count
        backlog += summary.backlog
        backlogged += summary.backlog > 0
        dead_pipelines += summary.dead > 0
    total = f"{len(starts)} pipeline(s), {sum(totals.values())} window(s): {counts_text(totals)}"
    total += f"; backlog {backlog} in {backlogged} pipeline(s)"
    total += f", dead {totals.get(WindowStatus.DEAD, 0)} in {dead_pipelines} pipeline(s)"
    if behind:
        seconds, name = max(behind)
        total += f"; most behind: {name} ({format_age(seconds)})"
    lines.append(total)
    lines.append(activity if isinstance(activity, str) else cleanup_age(activity, now))
    return lines
