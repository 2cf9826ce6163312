"""The web view's pure parts: a pipeline's row on the pipelines page (freshness measured
against the newest window that is due), its sorting, and the window grid's rows and cells.

Everything takes `now` and the records as arguments; nothing reads the clock or a database.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from markupsafe import Markup, escape

from core.config import PipelineConfig
from core.control_runs import LastRun
from core.records import WindowStatus
from core.store.overview import Cell, PipelineTally
from core.windows import align_down

MAX_GRID_WINDOWS = 50_000
"""The most window slots one grid page draws: a year of 15-minute windows (35,040) fits; a
larger range is refused with a line saying so, before anything is read."""

STATUS_ORDER: tuple[str, ...] = tuple(status.value for status in WindowStatus)
"""Statuses in the order of the chain, for columns and the legend."""

STATUS_CLASS: dict[str, str] = {
    "pending": "p",
    "queued": "q",
    "running": "r",
    "succeeded": "s",
    "skipped": "k",
    "failed": "f",
    "dead": "d",
}
"""A cell's CSS class per status: one letter, since a grid holds tens of thousands of cells."""

DRIFT_CLASS = "x"
"""Added to a cell whose window ever drifted (a recheck or reconcile found the source moved)."""

RECHECKED_CLASS = "c"
"""Added to a cell whose window passed at least one recheck horizon."""

HOUR, DAY, WEEK = timedelta(hours=1), timedelta(days=1), timedelta(days=7)
_MONDAY = datetime(2024, 1, 1, tzinfo=UTC)
"""A Monday at midnight UTC: week rows are aligned to it."""


# --- the pipelines page ------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineRow:
    """One row of the pipelines page."""

    name: str
    configured: bool
    """False for a pipeline that has records but is no longer in the config."""
    window: timedelta | None
    by_status: Mapping[str, int]
    drifted: int
    newest_succeeded_end: datetime | None
    due_end: datetime | None
    """End of the newest window that is due now (`end + lag <= now`); None: none due yet."""
    behind: timedelta | None
    """How far the newest succeeded window end is behind `due_end`; None when none is due."""
    generation: LastRun | None
    cleanup: LastRun | None

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def backlog(self) -> int:
        """Windows waiting to run: pending and queued."""
        return self.by_status.get("pending", 0) + self.by_status.get("queued", 0)

    @property
    def dead(self) -> int:
        return self.by_status.get("dead", 0)


def newest_due_end(settings: PipelineConfig, now: datetime) -> datetime | None:
    """End of the pipeline's newest due window: due once `end + lag <= now` (generation's rule);
    None when no window is due yet."""
    horizon = now - settings.lag
    if horizon < settings.start + settings.window:
        return None
    return align_down(horizon, settings.start, settings.window)


def pipeline_rows(
    configured: Mapping[str, PipelineConfig],
    tallies: Mapping[str, PipelineTally],
    generation: Mapping[str, LastRun | None],
    cleanup: LastRun | None,
    now: datetime,
) -> list[PipelineRow]:
    """A row for every configured pipeline and every pipeline that has records, by name."""
    rows = []
    for name in sorted(set(configured) | set(tallies)):
        settings = configured.get(name)
        tally = tallies.get(name, PipelineTally())
        due = newest_due_end(settings, now) if settings is not None else None
        behind = None
        if settings is not None and due is not None:
            newest = tally.newest_succeeded_end or settings.start
            behind = max(due - newest, timedelta(0))
        rows.append(
            PipelineRow(
                name=name,
                configured=settings is not None,
                window=settings.window if settings is not None else None,
                by_status={status: tally.by_status.get(status, 0) for status in STATUS_ORDER},
                drifted=tally.drifted,
                newest_succeeded_end=tally.newest_succeeded_end,
                due_end=due,
                behind=behind,
                generation=generation.get(name),
                cleanup=cleanup,
            )
        )
    return rows


def _age(run: LastRun | None) -> datetime | None:
    return run.at if run is not None else None


def _status_count(status: str) -> Callable[[PipelineRow], int]:
    return lambda row: row.by_status.get(status, 0)


SORT_KEYS: dict[str, Callable[[PipelineRow], Any]] = {
    "name": lambda row: row.name,
    "behind": lambda row: row.behind,
    "newest": lambda row: row.newest_succeeded_end,
    "total": lambda row: row.total,
    "backlog": lambda row: row.backlog,
    "dead": lambda row: row.dead,
    "drift": lambda row: row.drifted,
    "generation": lambda row: _age(row.generation),
    **{status: _status_count(status) for status in STATUS_ORDER},
}
"""The pipelines page's sortable columns (`?sort=KEY&order=desc`)."""


def sort_rows(rows: Sequence[PipelineRow], key: str, descending: bool) -> list[PipelineRow]:
    """Rows sorted by the column `key` (unknown: by name); rows without a value come last in
    either order, ties by name."""
    pick = SORT_KEYS.get(key, SORT_KEYS["name"])
    known = sorted((row for row in rows if pick(row) is not None), key=lambda row: row.name)
    known.sort(key=pick, reverse=descending)
    missing = sorted((row for row in rows if pick(row) is None), key=lambda row: row.name)
    return known + missing


# --- the grid ----------------------------------------------------------------------------------


def row_span(window: timedelta) -> timedelta:
    """How much time one grid row covers: an hour for windows under 15 minutes (a day would hold
    more than 96 cells), a day for windows under a day, else a week."""
    if window < timedelta(minutes=15):
        return HOUR
    if window < DAY:
        return DAY
    return WEEK


def day_range(first: date, last: date) -> tuple[datetime, datetime]:
    """`[first 00:00, last + 1 day 00:00)` in UTC: the grid's date-range picker is inclusive."""
    start = datetime.combine(first, time(0), tzinfo=UTC)
    return start, datetime.combine(last, time(0), tzinfo=UTC) + DAY


@dataclass(frozen=True)
class GridShape:
    """Where a grid's rows start and how many cells each holds."""

    first_row: datetime
    end: datetime
    span: timedelta
    columns: int

    @property
    def rows(self) -> int:
        return -(-(self.end - self.first_row) // self.span)

    @property
    def slots(self) -> int:
        return self.rows * self.columns


def grid_shape(start: datetime, end: datetime, window: timedelta) -> GridShape:
    """The grid of windows of size `window` starting in `[start, end)`."""
    span = row_span(window)
    first_row = align_down(start, _MONDAY, span)
    return GridShape(first_row, end, span, max(-(-span // window), 1))


@dataclass(frozen=True)
class GridRow:
    """One row: its label and a slot per column, each None (no window) or (class, start)."""

    label: str
    slots: list[tuple[str, str] | None]


def cell_class(cell: Cell) -> str:
    """The CSS classes of a cell: its status letter, then the drift and recheck marks."""
    classes = STATUS_CLASS.get(cell.status, "p")
    if cell.drifted:
        classes += " " + DRIFT_CLASS
    if cell.rechecked:
        classes += " " + RECHECKED_CLASS
    return classes


def compact_instant(value: datetime) -> str:
    """`20260101T001500Z`: an instant as ISO 8601's basic format, short enough for 35,040
    links on a page (`parse_instant` reads it back)."""
    return value.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def grid_rows(shape: GridShape, window: timedelta, cells: Sequence[Cell]) -> list[GridRow]:
    """The rows of `shape` with each cell in its row and column: row = which span its start
    falls in, column = how many windows after the row's start it begins (`cells` carry their
    start as seconds after `shape.first_row`).

    Whole seconds and string pieces rather than datetime arithmetic and `strftime` per cell: a
    year of 15-minute windows is 35,040 cells, and this runs for every one.
    """
    label_format = "%Y-%m-%d %H:%M" if shape.span == HOUR else "%Y-%m-%d"
    starts = [shape.first_row + index * shape.span for index in range(shape.rows)]
    rows = [GridRow(at.strftime(label_format), [None] * shape.columns) for at in starts]
    # Day and hour rows lie within one day: a cell's instant is its row's date and the time of
    # day the row starts at plus the cell's offset.
    same_day = shape.span in (HOUR, DAY)
    dates = [at.strftime("%Y%m%dT") for at in starts]
    span, size = int(shape.span.total_seconds()), int(window.total_seconds())
    last_column = shape.columns - 1
    for cell in cells:
        row, within = divmod(cell.offset, span)
        if not 0 <= row < len(rows):
            continue
        if same_day:
            clock = (row * span) % 86400 + within
            hours, rest = divmod(clock, 3600)
            minutes, seconds = divmod(rest, 60)
            compact = f"{dates[row]}{hours:02d}{minutes:02d}{seconds:02d}Z"
        else:
            compact = compact_instant(shape.first_row + timedelta(seconds=cell.offset))
        rows[row].slots[min(within // size, last_column)] = (cell_class(cell), compact)
    return rows


def cells_html(row: GridRow, href_prefix: str) -> Markup:
    """A row's cells as HTML: a link per window to its page, an empty cell where there is
    none. Built here rather than by the template's loop (tens of thousands of cells); the
    classes come from STATUS_CLASS and the instants are digits, and `href_prefix` is escaped.
    """
    prefix = escape(href_prefix)
    return Markup(
        "".join(
            f'<td><a class="{slot[0]}" href="{prefix}{slot[1]}"></a></td>' if slot else "<td></td>"
            for slot in row.slots
        )
    )


def column_labels(shape: GridShape, window: timedelta) -> list[str]:
    """The header over each column: the time of day every hour (day rows), the minute every 5
    minutes (hour rows), the weekday (week rows); blank between."""
    labels = []
    for column in range(shape.columns):
        at = shape.first_row + column * window
        if shape.span == WEEK:
            labels.append(at.strftime("%a") if window == DAY else "")
        elif shape.span == DAY:
            labels.append(at.strftime("%H") if at.minute == 0 else "")
        else:
            labels.append(at.strftime(":%M") if at.minute % 5 == 0 else "")
    return labels
