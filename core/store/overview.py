"""What the web view (`windowpipe/web/`) reads from the state store: nothing here writes.

The pipelines page is one grouped query over every pipeline (`pipeline_tallies`); the grid
reads, for one pipeline and range, only the four columns a cell is drawn from
(`grid_cells`), through the (pipeline, window_start) unique index; the detail page reads one
record (`StateStore.get`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import sqlalchemy as sa

from core.records import WindowStatus
from core.store.repository import StateStore
from core.store.schema import WINDOWS, UTCDateTime
from core.store.tallies import seconds_between


@dataclass
class PipelineTally:
    """One pipeline's windows as the pipelines page shows them."""

    by_status: dict[str, int] = field(default_factory=dict)
    newest_succeeded_end: datetime | None = None
    """End of the newest succeeded window (None: none succeeded yet)."""
    drifted: int = 0
    """Windows whose recheck or reconcile ever found drift."""

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


def pipeline_tallies(store: StateStore) -> dict[str, PipelineTally]:
    """Every pipeline's windows by status, newest succeeded end and drifted windows: one
    grouped query (`GROUP BY pipeline, status`), whatever the number of pipelines."""
    drifted = sa.func.sum(sa.case((WINDOWS.c.drift.is_not(None), 1), else_=0))
    query = sa.select(
        WINDOWS.c.pipeline,
        WINDOWS.c.status,
        sa.func.count(),
        sa.func.max(WINDOWS.c.window_end),
        drifted,
    ).group_by(WINDOWS.c.pipeline, WINDOWS.c.status)
    tallies: dict[str, PipelineTally] = {}
    with store.engine.connect() as conn:
        for pipeline, status, count, newest_end, drift_count in conn.execute(query).tuples():
            tally = tallies.setdefault(pipeline, PipelineTally())
            tally.by_status[status] = int(count)
            tally.drifted += int(drift_count or 0)
            if status == WindowStatus.SUCCEEDED.value:
                tally.newest_succeeded_end = newest_end
    return tallies


class Cell(NamedTuple):
    """What the grid draws of one window (a tuple: tens of thousands are built per page)."""

    offset: int
    """Seconds from the grid's origin (its first row's start) to the window's start."""
    status: str
    drifted: bool
    rechecked: bool


def grid_cells(
    store: StateStore, pipeline: str, origin: datetime, start: datetime, end: datetime
) -> list[Cell]:
    """The windows of `pipeline` starting in `[start, end)`, oldest first, with only what a
    grid cell needs; each start as whole seconds after `origin`, computed by the database, so
    no instant is built per window."""
    offset = seconds_between(
        store.dialect, sa.literal(origin, UTCDateTime()), WINDOWS.c.window_start
    )
    query = (
        sa.select(
            offset,
            WINDOWS.c.status,
            WINDOWS.c.drift.is_not(None),
            WINDOWS.c.rechecks_done,
        )
        .where(
            WINDOWS.c.pipeline == pipeline,
            WINDOWS.c.window_start >= start,
            WINDOWS.c.window_start < end,
        )
        .order_by(WINDOWS.c.window_start)
    )
    with store.engine.connect() as conn:
        return [
            # round(): SQLite's julianday arithmetic is a float a few microseconds off.
            Cell(round(seconds), status, bool(drifted), bool(rechecks))
            for seconds, status, drifted, rechecks in conn.execute(query).tuples()
        ]


def newest_window_start(store: StateStore, pipeline: str) -> datetime | None:
    """The start of the pipeline's newest window (one step of the unique index), or None."""
    query = (
        sa.select(WINDOWS.c.window_start)
        .where(WINDOWS.c.pipeline == pipeline)
        .order_by(WINDOWS.c.window_start.desc())
        .limit(1)
    )
    with store.engine.connect() as conn:
        value: datetime | None = conn.execute(query).scalar_one_or_none()
    return value
