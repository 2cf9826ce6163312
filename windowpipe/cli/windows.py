"""The commands about one pipeline's windows: plan, enqueue, status, reconcile, validate.

Nothing is written before the input is known to be good: the config (every URL included) is
validated first, then the arguments and the range, then the systems are reached, and only then
does a write command write.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.config import Config, PipelineConfig
from core.instants import format_instant, utc_now
from core.records import FINISHED, WindowRecord, WindowStatus
from core.store import StateStore
from windowpipe.cli.options import (
    ConfigOption,
    JsonOption,
    fail,
    guarded,
    instant,
    out,
    print_json,
    read_config,
)
from windowpipe.cli.systems import (
    chain_sender,
    reaching_store,
    read_store,
    unreachable,
    write_store,
)
from windowpipe.enqueue import dispatch_now, enqueue_range

# --- plan -------------------------------------------------------------------------------------


def plan(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    now: Annotated[
        str | None, typer.Option(help="Plan as of this ISO 8601 instant (default: now).")
    ] = None,
    json: JsonOption = False,
    config_path: ConfigOption = None,
) -> None:
    """The windows a generation tick would create now, without creating them."""
    config = read_config(config_path, require_secrets=False)
    settings = guarded(lambda: config.pipeline(pipeline))
    at = instant(now, "--now") if now else utc_now()
    from core.dispatch import planned_windows

    store = read_store(config)
    windows = guarded(lambda: reaching_store(store, lambda: planned_windows(store, settings, at)))
    rows = [
        {
            "pipeline": pipeline,
            "window_start": format_instant(w.start),
            "window_end": format_instant(w.end),
        }
        for w in windows
    ]
    if json:
        print_json(rows)
        return
    if not rows:
        print(f"{pipeline}: no window due at {format_instant(at)}")
        return
    table = Table("pipeline", "window_start", "window_end", title=f"due at {format_instant(at)}")
    for row in rows:
        table.add_row(*row.values())
    out.print(table)


# --- enqueue ----------------------------------------------------------------------------------


def enqueue(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    start: Annotated[str, typer.Option(help="First window start (ISO 8601, on a boundary).")],
    end: Annotated[str, typer.Option(help="End of the last window (exclusive).")],
    force: Annotated[
        bool, typer.Option("--force", help="Re-run windows that already succeeded or died.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until every window of the range finished.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0, help="With --wait: give up after seconds.")
    ] = 3600,
    config_path: ConfigOption = None,
) -> None:
    """Manual runs and backfills: create the windows in [start, end) and enqueue their chains."""
    config = read_config(config_path)
    settings = guarded(lambda: config.pipeline(pipeline))
    first, last = instant(start, "--start"), instant(end, "--end")
    # The same code path as the web view's re-run (windowpipe/enqueue.py).
    done = guarded(
        lambda: enqueue_range(
            config,
            settings,
            first,
            last,
            force=force,
            now=utc_now(),
            open_store=lambda: write_store(config),
            chain_sender=lambda: chain_sender(config),
        )
    )
    print(done.summary(pipeline))
    if wait:
        _wait_for(
            read_store(config), pipeline, done.windows[0].start, done.windows[-1].end, timeout
        )


def _wait_for(store: Any, pipeline: str, start: datetime, end: datetime, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        records = store.list_records(pipeline, start=start, end=end)
        done = [r for r in records if r.status in FINISHED or r.status == WindowStatus.DEAD]
        if len(done) == len(records):
            bad = [r for r in records if r.status == WindowStatus.DEAD]
            print(f"{pipeline}: {len(records) - len(bad)} finished, {len(bad)} dead")
            if bad:
                raise typer.Exit(1)
            return
        if time.monotonic() > deadline:
            fail(f"{pipeline}: {len(records) - len(done)} window(s) still running", 1)
        time.sleep(0.5)


# --- status -----------------------------------------------------------------------------------


def status(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name (default: all).")] = None,
    json: JsonOption = False,
    config_path: ConfigOption = None,
) -> None:
    """Window records with status and counts."""
    config = read_config(config_path, require_secrets=False)
    if pipeline is not None:
        guarded(lambda: config.pipeline(pipeline))
    store = read_store(config)
    if pipeline is None and not json:
        _print_pipeline_summaries(config, store)
        return
    records: list[WindowRecord] = store.list_records(pipeline)
    if json:
        print_json([r.to_json() for r in records])
        return
    _print_status_table(records)
    # When generation and cleanup last ran (core/control_runs.py): an age that keeps growing means
    # nothing consumes the control queue.
    from core.control_runs import control_activity_lines

    assert pipeline is not None
    for line in control_activity_lines(config.settings.redis_url, [pipeline], utc_now()):
        print(line)
    # How far behind the pipeline's target is (the exporter's windowpipe_freshness_seconds).
    from core.metrics import freshness_lines, read_freshness

    starts = {pipeline: config.pipelines[pipeline].start}
    for line in freshness_lines(read_freshness(store, starts, utc_now())):
        print(line)


def _print_pipeline_summaries(config: Config, store: StateStore) -> None:
    """One line per configured pipeline, then the totals: readable at a thousand pipelines, and
    read with one grouped query and one Redis round trip whatever their number."""
    from core.control_runs import read_control_activity
    from core.summary import summary_lines

    now = utc_now()
    names = sorted(config.pipelines)
    summaries = store.pipeline_summaries()
    activity = read_control_activity(config.settings.redis_url, names)
    starts = {name: config.pipelines[name].start for name in names}
    for line in summary_lines(summaries, starts, activity, now):
        print(line)


def _print_status_table(records: list[WindowRecord]) -> None:
    table = Table(
        "pipeline",
        "window_start",
        "status",
        "stage",
        "attempts",
        "source",
        "staged",
        "target",
        "checked",
        "drift",
        "error",
    )
    for r in records:
        table.add_row(
            r.pipeline,
            format_instant(r.window_start),
            r.status.value,
            str(r.stage or ""),
            str(r.attempts),
            _count(r.source_count),
            _count(r.staged_count),
            _count(r.target_count),
            # When a recheck or reconcile last compared the window with its source.
            format_instant(r.checked_at) if r.checked_at else "",
            _drift_text(r),
            (r.error or "")[:80],
        )
    out.print(table)
    totals: dict[str, int] = {}
    for r in records:
        totals[r.status.value] = totals.get(r.status.value, 0) + 1
    out.print(", ".join(f"{k}: {v}" for k, v in sorted(totals.items())) or "no windows")


def _drift_text(record: WindowRecord) -> str:
    """The drift found on a window: how often, and the last one's source count before -> after."""
    if not record.drift:
        return ""
    last = record.drift[-1]
    return f"{len(record.drift)}x, {last.get('count_before')}->{last.get('count_after')}"


def _count(value: int | None) -> str:
    return "" if value is None else str(value)


# --- reconcile --------------------------------------------------------------------------------


def reconcile(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    start: Annotated[str, typer.Option(help="Compare windows starting at or after this.")],
    end: Annotated[str, typer.Option(help="... and before this (exclusive).")],
    repair: Annotated[
        bool, typer.Option("--repair", help="Re-run the windows that do not match.")
    ] = False,
    json: JsonOption = False,
    config_path: ConfigOption = None,
) -> None:
    """Compare closed windows with the source now (late or deleted documents); --repair
    re-runs the ones that drifted."""
    from core.recheck import closed_windows
    from core.recheck import reconcile as compare_windows

    config = read_config(config_path)
    settings = guarded(lambda: config.pipeline(pipeline))
    first, last = instant(start, "--start"), instant(end, "--end")
    if last <= first:
        fail(f"--end {format_instant(last)} must be after --start {format_instant(first)}")
    if repair:
        # A repair sends work: everything it needs must answer before a record changes.
        problems = unreachable(config)
        if problems:
            fail(problems[0], 1)
    store = read_store(config)
    records = guarded(
        lambda: reaching_store(store, lambda: closed_windows(store, pipeline, first, last))
    )
    from connectors.registry import connector_for

    source = guarded(lambda: connector_for("source", settings))
    target = guarded(lambda: connector_for("target", settings))
    with Progress(
        TextColumn("reconcile {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task(pipeline, total=len(records))
        rows = guarded(
            lambda: compare_windows(
                store,
                records,
                source.fingerprint,
                lambda window: target.count_window(pipeline, window),
                utc_now(),
                repair=repair,
                progress=lambda: progress.advance(task),
            )
        )
    mismatched = [row for row in rows if not row.matches]
    repaired = [row for row in rows if row.repaired]
    if json:
        print_json([row.to_json() for row in rows])
    else:
        table = Table("window_start", "status", "recorded", "source now", "target now", "match")
        for row in rows:
            table.add_row(
                format_instant(row.record.window_start),
                row.record.status.value,
                str(row.recorded),
                str(row.source_now.count),
                str(row.target_now),
                "yes" if row.matches else ("no: re-run" if row.repaired else "no"),
            )
        out.print(table)
        print(
            f"{pipeline}: {len(rows)} closed window(s) compared, {len(mismatched)} do not "
            f"match the source or target now, {len(repaired)} put back to run"
        )
    if repaired:
        dispatch_now(config, settings, store, chain_sender(config))


# --- validate ---------------------------------------------------------------------------------


def validate(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Repair the chain; succeeded work is kept.")
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """Report (or repair) a pipeline's chain of window records."""
    from core.validation import plan_rebuild, validate_chain

    config = read_config(config_path, require_secrets=False)
    settings = guarded(lambda: config.pipeline(pipeline))
    # --rebuild writes records but never the schema: it needs the schema like a read does.
    store = read_store(config)
    records = store.list_records(pipeline)
    problems = validate_chain(records, origin=settings.start, size=settings.window)
    for problem in problems:
        print(f"{problem.kind.value}: {problem.message}")
    if not rebuild:
        if problems:
            raise typer.Exit(1)
        print(f"{pipeline}: {len(records)} window(s), chain valid")
        return
    plan_ = plan_rebuild(records, origin=settings.start, size=settings.window)
    if plan_.is_empty:
        print(f"{pipeline}: nothing to rebuild")
        return
    # Rows of windows whose records go would belong to nobody: clear them first (a failure
    # stops the rebuild before any record changes).
    cleared = _clear_dropped_windows(settings, records, plan_.delete_starts)
    # What the store changed, not what was planned: a record that moved meanwhile (finished,
    # say) is left alone and not counted.
    done = store.apply_rebuild(pipeline, plan_)
    print(
        f"{pipeline}: rebuilt: {done.deleted} deleted, {done.reset} reset to pending, "
        f"{done.created} created; succeeded windows kept"
        + (f"; the target rows of {cleared} deleted window(s) cleared" if cleared else "")
    )


def _clear_dropped_windows(
    settings: PipelineConfig, records: list[WindowRecord], starts: list[datetime]
) -> int:
    """Before `validate --rebuild` deletes unfinished records, delete the target's rows of
    those windows with a fenced empty load (`clear_window`); how many windows had rows.

    A deleted record's window is never run again (it is misaligned, wrongly sized or
    overlapping), so rows it left in the target would belong to nothing. The clear's fence is
    above any its record issued (the clock's, as a new record's first fence, or the record's
    own + 1 if that is higher) and, if the ledger refuses it, above the ledger's. Timeline: a
    worker still holds such a window with fence 41 and freezes in its load. The clear commits
    first with the clock's fence: the frozen load wakes and is refused by the ledger. Or the
    load commits first: the clear's fence is higher, so it deletes those rows. Its record
    commit then finds no record and stops.
    """
    if not starts:
        return 0
    from connectors.registry import connector_for
    from core.errors import StaleFenceError
    from core.store import first_fence

    target = guarded(lambda: connector_for("target", settings))
    dropped = {record.window_start: record for record in records}

    def clear(record: WindowRecord) -> bool:
        window = record.window
        if target.count_window(settings.name, window) == 0:
            return False
        fence = max(record.fence + 1, first_fence(utc_now()))
        try:
            target.clear_window(settings.name, window, fence)
        except StaleFenceError as refused:
            if refused.recorded is None:
                raise
            target.clear_window(settings.name, window, refused.recorded + 1)
        return True

    return guarded(lambda: sum(clear(dropped[start]) for start in starts))
