"""What the Prometheus exporter reports about windows, read from the window records.

Everything here is computed from the state store alone, so the numbers are the same whatever
the number of worker hosts: no worker keeps a registry of its own. A scrape runs one statement
per metric family for every pipeline (`GROUP BY pipeline`), never one per pipeline: the
frontier is two index lookups per pipeline inside one statement, the backlog an index-only read
of the windows in flight (a partial index), and the sums one pass over the table. The sums are
recomputed at each scrape; `HighWater` keeps the ones reported as counters from going down.

What each number measures, honestly, given what a record holds (one row per window: status,
stage, attempts, counts, and one `started_at`/`finished_at` pair for its latest attempt):

- freshness: now minus the end of the newest window such that it and every window before it
  succeeded or were skipped; the point up to which the target is complete;
- windows by status, and windows queued or running at each stage (the stage's backlog);
- the most attempts any window still being retried has used (dead windows are counted apart);
- dead windows, and windows whose last attempt failed the audit (counts disagreed);
- chain seconds: a succeeded window's latest attempt from its first claim (precheck) to its
  audit commit, queue waits between stages and retries inside the attempt included. The
  records keep no time per stage, so there is no per-stage duration to report;
- rows: the sums, over succeeded windows, of what precheck counted in the source, extract
  wrote to the staging area, and the target held after the load (audited equal).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core.records import AUDIT_ERROR_PREFIX, STAGE_ORDER, WindowStatus
from core.store import StateStore
from core.store.tallies import (
    ROW_COLUMNS,
    Frontier,
    backlog_query,
    due_rechecks_query,
    read_frontiers,
    recheck_tally_query,
    tally_query,
    unfinished_query,
)

CHAIN_SECONDS_BUCKETS: tuple[float, ...] = (
    1,
    5,
    15,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    7200,
    14400,
    43200,
    86400,
)
"""Upper bounds (seconds) of the chain-duration histogram's buckets; `+Inf` is added."""

CHAIN_STAGE = "chain"
"""The `stage` label of the chain-duration histogram: the whole chain of an attempt."""


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (one per bound in `bounds`, then +Inf), count and sum."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    count: int
    total: float


@dataclass(frozen=True)
class Tally:
    """Sums over a set of windows: how many in each status, and over the succeeded ones the
    chain-duration histogram's "at or below" counts, its count and sum, and the row sums."""

    statuses: Mapping[str, int]
    at_or_below: tuple[int, ...]
    timed: int
    seconds: float
    rows: tuple[int, ...]

    @classmethod
    def zero(cls, bounds: Sequence[float]) -> Tally:
        return cls({}, (0,) * len(bounds), 0, 0.0, (0,) * len(ROW_COLUMNS))

    def __add__(self, other: Tally) -> Tally:
        statuses = dict(self.statuses)
        for status, count in other.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
        return Tally(
            statuses,
            tuple(a + b for a, b in zip(self.at_or_below, other.at_or_below, strict=True)),
            self.timed + other.timed,
            self.seconds + other.seconds,
            tuple(a + b for a, b in zip(self.rows, other.rows, strict=True)),
        )


@dataclass(frozen=True)
class Freshness:
    """How far behind a pipeline's target is."""

    complete_through: datetime | None
    """End of the newest window such that it and every window before it succeeded or were
    skipped; None when no such window exists (nothing complete yet)."""
    seconds: float
    """now - complete_through, or now - the pipeline's `start` when nothing is complete."""


@dataclass(frozen=True)
class PipelineMetrics:
    """The numbers of one pipeline at one instant."""

    pipeline: str
    freshness: Freshness
    windows: Mapping[str, int]
    """Windows by status, every status listed."""
    waiting: Mapping[str, int]
    """Windows queued at each stage (waiting for a worker of that stage's queue)."""
    running: Mapping[str, int]
    """Windows running at each stage."""
    max_attempts_unfinished: int
    """The most attempts of any window being retried: not succeeded, skipped or dead (0 when
    none)."""
    audit_failures: int
    """Windows failed or dead because their last attempt's audit found the counts differ."""
    chain_seconds: Histogram
    """Duration of succeeded windows' latest attempt, first claim to audit commit."""
    rows: Mapping[str, int]
    """Documents of succeeded windows per stage (precheck: source, extract: staged, load:
    target)."""
    rechecks_passed: int = 0
    """Recheck horizons passed by the pipeline's windows."""
    drifted: int = 0
    """Windows whose source was found to have drifted (by a recheck or reconcile)."""
    rechecks_pending: int = 0
    """Finished windows past a recheck horizon, waiting for their recheck."""

    @property
    def dead(self) -> int:
        return self.windows.get(WindowStatus.DEAD.value, 0)


@dataclass(frozen=True)
class WindowMetrics:
    """Every pipeline's numbers, read at `now`."""

    now: datetime
    pipelines: Mapping[str, PipelineMetrics] = field(default_factory=dict)


# --- pure computations ---------------------------------------------------------------------------


def freshness_seconds(complete_through: datetime | None, start: datetime, now: datetime) -> float:
    """How far behind `now` the target is complete: now minus `complete_through`, or minus the
    pipeline's `start` when no window is complete yet; never negative (a `start` in the future
    is not behind)."""
    since = complete_through if complete_through is not None else start
    return max((now - since).total_seconds(), 0.0)


def cumulative_buckets(counts_at_or_below: Sequence[int]) -> tuple[int, ...]:
    """The per-bound "at or below" counts as Prometheus cumulative buckets (monotone).

    SQL counts each bound independently, so they are cumulative already; this only guards
    the contract (a bucket never holds fewer than the one before it).
    """
    out: list[int] = []
    for count in counts_at_or_below:
        out.append(max(int(count), out[-1] if out else 0))
    return tuple(out)


# --- reading the store -------------------------------------------------------------------------


def read_freshness(
    store: StateStore, starts: Mapping[str, datetime], now: datetime
) -> dict[str, Freshness]:
    """The freshness of each pipeline in `starts` (name -> the pipeline's `start`): one
    statement, two index lookups per pipeline, whatever the history."""
    with store.engine.connect() as conn:
        frontiers = read_frontiers(conn, starts)
    return {name: _freshness(frontiers[name], start, now) for name, start in starts.items()}


def _freshness(frontier: Frontier, start: datetime, now: datetime) -> Freshness:
    through = frontier.complete_through
    return Freshness(through, freshness_seconds(through, start, now))


def read_window_metrics(
    store: StateStore,
    starts: Mapping[str, datetime],
    now: datetime,
    *,
    bounds: Sequence[float] = CHAIN_SECONDS_BUCKETS,
    recheck: Mapping[str, Sequence[timedelta]] | None = None,
) -> WindowMetrics:
    """The numbers of each pipeline in `starts` (name -> the pipeline's `start`, from which
    freshness is measured until a window is complete), read on one connection with one
    statement per metric family for every pipeline (each number is right on its own; they are
    not one snapshot): the frontiers, the tally by (pipeline, status), the backlog, the
    unfinished windows, the recheck tally, and the due rechecks once per distinct `recheck`
    horizons (name -> the pipeline's `recheck`; pipelines without horizons have none due).
    """
    bounds = tuple(bounds)
    tallies: dict[str, Tally] = {name: Tally.zero(bounds) for name in starts}
    waiting: dict[str, dict[str, int]] = {name: {} for name in starts}
    running: dict[str, dict[str, int]] = {name: {} for name in starts}
    unfinished: dict[str, tuple[int, int]] = {}
    rechecks: dict[str, tuple[int, int]] = {}
    due: dict[str, int] = {}
    with store.engine.connect() as conn:
        frontiers = read_frontiers(conn, starts)
        for row in conn.execute(tally_query(conn.dialect.name, bounds)):
            name = row[0]
            if name in tallies:
                tallies[name] = tallies[name] + _status_tally(row[1:], bounds)
        for name, stage, status, count in conn.execute(backlog_query()).tuples():
            if name in starts:
                into = waiting if status == WindowStatus.QUEUED.value else running
                into[name][stage] = int(count)
        for name, most, audit in conn.execute(unfinished_query(AUDIT_ERROR_PREFIX)).tuples():
            unfinished[name] = (int(most or 0), int(audit or 0))
        for name, passed, drifted in conn.execute(recheck_tally_query()).tuples():
            rechecks[name] = (int(passed or 0), int(drifted or 0))
        for horizons, names in _by_horizons(recheck or {}, starts).items():
            for name, count in conn.execute(due_rechecks_query(names, horizons, now)).tuples():
                due[name] = int(count)
    pipelines = {}
    for name, start in sorted(starts.items()):
        tally = tallies[name]
        most, audit = unfinished.get(name, (0, 0))
        passed, drifted = rechecks.get(name, (0, 0))
        pipelines[name] = PipelineMetrics(
            pipeline=name,
            freshness=_freshness(frontiers[name], start, now),
            windows=_every_status(tally.statuses),
            waiting=_every_stage(waiting[name]),
            running=_every_stage(running[name]),
            max_attempts_unfinished=most,
            audit_failures=audit,
            chain_seconds=Histogram(
                bounds, cumulative_buckets(tally.at_or_below), tally.timed, tally.seconds
            ),
            rows={
                stage.value: count
                for (stage, _), count in zip(ROW_COLUMNS, tally.rows, strict=True)
            },
            rechecks_passed=passed,
            drifted=drifted,
            rechecks_pending=due.get(name, 0),
        )
    return WindowMetrics(now=now, pipelines=pipelines)


def _status_tally(row: Sequence[Any], bounds: Sequence[float]) -> Tally:
    """One (status, count, sums...) row of `tally_query` as a Tally; only the succeeded
    windows' durations and rows count."""
    status, count = row[0], int(row[1])
    if status != WindowStatus.SUCCEEDED.value:
        zero = Tally.zero(bounds)
        return Tally({status: count}, zero.at_or_below, zero.timed, zero.seconds, zero.rows)
    n = len(bounds)
    return Tally(
        {status: count},
        tuple(int(v or 0) for v in row[2 : 2 + n]),
        int(row[2 + n] or 0),
        float(row[3 + n] or 0.0),
        tuple(int(v or 0) for v in row[4 + n :]),
    )


def _by_horizons(
    recheck: Mapping[str, Sequence[timedelta]], names: Iterable[str]
) -> dict[tuple[timedelta, ...], list[str]]:
    groups: dict[tuple[timedelta, ...], list[str]] = {}
    for name in names:
        horizons = tuple(recheck.get(name, ()))
        if horizons:
            groups.setdefault(horizons, []).append(name)
    return groups


class HighWater:
    """Makes numbers that are recomputed from the records behave as Prometheus counters: each
    series reports the highest value it has had in this process, so it never goes down.

    The sums over succeeded windows (rows, chain durations) and the recheck tallies shrink
    when an operator re-runs a window (`enqueue --force`, `reconcile --repair`): its counts
    are cleared until it succeeds again. Reported as they are, `rate()` would read a counter
    reset and count the whole total again. Held at their high-water mark, they stay flat
    while the window re-runs and move on once it has succeeded with more than before. A
    restart of the exporter starts from the records again (a reset, as any counter's)."""

    def __init__(self) -> None:
        self._highest: dict[tuple[str, ...], float] = {}

    def hold(self, key: tuple[str, ...], value: float) -> float:
        """max(value, the highest value reported for `key` before)."""
        highest = max(value, self._highest.get(key, value))
        self._highest[key] = highest
        return highest

    def histogram(self, key: tuple[str, ...], histogram: Histogram) -> Histogram:
        """Each bucket, the count and the sum held at their high-water marks. Each stays a
        valid histogram: at every read a bucket held no more than the next one and than the
        count, so their highest values keep that order too."""
        cumulative = tuple(
            int(self.hold((*key, "le", str(bound)), count))
            for bound, count in zip(histogram.bounds, histogram.cumulative, strict=True)
        )
        return Histogram(
            histogram.bounds,
            cumulative,
            int(self.hold((*key, "count"), histogram.count)),
            self.hold((*key, "sum"), histogram.total),
        )


def _every_status(found: Mapping[str, int]) -> dict[str, int]:
    return {status.value: int(found.get(status.value, 0)) for status in WindowStatus}


def _every_stage(found: Mapping[str, int]) -> dict[str, int]:
    return {stage.value: int(found.get(stage.value, 0)) for stage in STAGE_ORDER}


def freshness_lines(freshness: Mapping[str, Freshness]) -> list[str]:
    """One line per pipeline for `windowpipe status`: `orders: complete through
    2026-11-01T10:15:00Z, 14m 30s behind now`."""
    from core.control_runs import format_age
    from core.instants import format_instant

    lines = []
    for name, item in sorted(freshness.items()):
        behind = format_age(item.seconds)
        if item.complete_through is None:
            lines.append(f"{name}: no window complete yet, {behind} since the pipeline's start")
        else:
            through = format_instant(item.complete_through)
            lines.append(f"{name}: complete through {through}, {behind} behind now")
    return lines
