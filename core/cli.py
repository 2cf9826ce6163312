"""The `windowpipe` command line (typer): check, plan, enqueue, status, validate, locks, demo.

Errors are one line on stderr; exit status 2 for bad input, 1 for a failed run.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table

from core.config import Config, PipelineConfig, load_config
from core.errors import BadInputError, WindowpipeError
from core.instants import format_instant, parse_instant, utc_now
from core.records import FINISHED, WindowKind, WindowRecord, WindowStatus
from core.windows import due_windows, windows_in_range

app = typer.Typer(
    name="windowpipe",
    help="Time-windowed pipelines from a search engine to a warehouse, on Celery workers.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
T = TypeVar("T")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $WINDOWPIPE_CONFIG, else ./windowpipe.toml).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON list of objects.")]


def fail(message: str, status: int = 2) -> NoReturn:
    """Print one line on stderr and exit (2: bad input, 1: a failed run)."""
    print(f"windowpipe: error: {message}", file=sys.stderr)
    raise typer.Exit(status)


def guarded(function: Callable[[], T]) -> T:
    """Run a command body, turning windowpipe errors into one line and the right status."""
    try:
        return function()
    except BadInputError as error:
        fail(str(error), 2)
    except WindowpipeError as error:
        fail(str(error), 1)


def _config(path: Path | None, *, require_secrets: bool = True) -> Config:
    config = guarded(lambda: load_config(path, require_secrets=require_secrets))
    # Workers and the Celery app find the same file through the environment.
    os.environ["WINDOWPIPE_CONFIG"] = config.path
    return config


def _instant(text: str, option: str) -> datetime:
    try:
        return parse_instant(text)
    except ValueError as error:
        fail(f"{option}: {error}")


def _print_json(rows: list[dict[str, Any]]) -> None:
    sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")


def _store(config: Config, *, create: bool = True) -> Any:
    """The state store; with create=False, None when a SQLite file does not exist yet."""
    from sqlalchemy.engine import make_url

    from core.store import StateStore

    url = config.settings.state_url
    try:
        parsed = make_url(url)
    except Exception:
        fail(f"{config.path}: windowpipe.state_url: not a valid SQLAlchemy URL")
    if not create and parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not Path(database).exists():
            return None
    store = StateStore(url)
    store.migrate()
    return store


# --- check ------------------------------------------------------------------------------------


@app.command()
def check(config_path: ConfigOption = None) -> None:
    """Validate the config and reach every configured system; one line per problem."""
    config = _config(config_path)
    problems = _reach_everything(config)
    for line in problems:
        print(line)
    if problems:
        raise typer.Exit(1)
    print(f"ok: {config.path}: {len(config.pipelines)} pipeline(s), every system reachable")


def _reach_everything(config: Config) -> list[str]:
    import redis

    problems = []
    try:
        redis.Redis.from_url(config.settings.redis_url, socket_timeout=5).ping()
    except Exception as error:
        problems.append(f"redis: {type(error).__name__}: {error}")
    try:
        store = _store(config)
        store.counts_by_status()
    except Exception as error:
        problems.append(f"state store: {type(error).__name__}: {error}")
    for name, pipeline in config.pipelines.items():
        problems += _reach_pipeline(name, pipeline)
    return problems


def _reach_pipeline(name: str, pipeline: PipelineConfig) -> list[str]:
    from connectors.registry import build
    from core.windows import Window

    probe = Window(pipeline.start, pipeline.start + pipeline.window)
    calls: dict[str, Callable[[Any], object]] = {
        "source": lambda c: c.count(probe),
        "stage": lambda c: c.list_files(name, probe),
        "target": lambda c: c.count_window(name, probe),
    }
    problems = []
    for role, call in calls.items():
        try:
            connector = build(role, pipeline)  # type: ignore[arg-type]
            try:
                call(connector)
            finally:
                connector.close()
        except Exception as error:
            problems.append(f"{name}.{role}: {error}")
    return problems


# --- plan -------------------------------------------------------------------------------------


@app.command()
def plan(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    now: Annotated[
        str | None, typer.Option(help="Plan as of this ISO 8601 instant (default: now).")
    ] = None,
    json: JsonOption = False,
    config_path: ConfigOption = None,
) -> None:
    """The windows a generation tick would create now, without creating them."""
    config = _config(config_path, require_secrets=False)
    settings = guarded(lambda: config.pipeline(pipeline))
    at = _instant(now, "--now") if now else utc_now()
    store = _store(config, create=False)
    if store is None:
        windows = due_windows(
            origin=settings.start,
            size=settings.window,
            lag=settings.lag,
            max_windows=settings.max_windows_per_tick,
            now=at,
        )
    else:
        from core.dispatch import planned_windows

        windows = guarded(lambda: planned_windows(store, settings, at))
    rows = [
        {
            "pipeline": pipeline,
            "window_start": format_instant(w.start),
            "window_end": format_instant(w.end),
        }
        for w in windows
    ]
    if json:
        _print_json(rows)
        return
    if not rows:
        print(f"{pipeline}: no window due at {format_instant(at)}")
        return
    table = Table("pipeline", "window_start", "window_end", title=f"due at {format_instant(at)}")
    for row in rows:
        table.add_row(*row.values())
    out.print(table)


# --- enqueue ----------------------------------------------------------------------------------


@app.command()
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
    timeout: Annotated[float, typer.Option(help="With --wait: give up after seconds.")] = 3600,
    config_path: ConfigOption = None,
) -> None:
    """Manual runs and backfills: create the windows in [start, end) and enqueue their chains."""
    config = _config(config_path)
    settings = guarded(lambda: config.pipeline(pipeline))
    first, last = _instant(start, "--start"), _instant(end, "--end")
    if last <= first:
        fail(f"--end {format_instant(last)} must be after --start {format_instant(first)}")
    try:
        windows = windows_in_range(
            origin=settings.start, size=settings.window, start=first, end=last
        )
    except ValueError as error:
        fail(str(error))
    now = utc_now()
    if windows[-1].end + settings.lag > now:
        fail(
            f"--end {format_instant(last)} is not complete yet: a window is due once its end "
            f"plus the lag ({settings.lag}) has passed"
        )
    store = _store(config)
    created = store.create_windows(pipeline, windows, kind=WindowKind.MANUAL)
    reset = 0
    if force:
        reset = store.reset_for_rerun(pipeline, [w.start for w in windows], kind=WindowKind.MANUAL)
    queued = _dispatch_now(config, settings, store)
    print(
        f"{pipeline}: {len(windows)} window(s) in range, {len(created)} created, "
        f"{reset} reset for re-run, {queued} queued now (the rest follow as windows finish)"
    )
    if wait:
        _wait_for(store, pipeline, windows[0].start, windows[-1].end, timeout)


def _dispatch_now(config: Config, settings: PipelineConfig, store: Any) -> int:
    import redis

    from core.dispatch import dispatch
    from workers.runtime import send_chain

    client = redis.Redis.from_url(config.settings.redis_url)
    queued, _ = dispatch(
        store,
        client,
        settings,
        send_chain,
        utc_now(),
        failed_retry_base=config.settings.failed_retry_base,
    )
    return len(queued)


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


@app.command()
def status(
    pipeline: Annotated[str | None, typer.Argument(help="Pipeline name (default: all).")] = None,
    json: JsonOption = False,
    config_path: ConfigOption = None,
) -> None:
    """Window records with status and counts."""
    config = _config(config_path, require_secrets=False)
    if pipeline is not None:
        guarded(lambda: config.pipeline(pipeline))
    store = _store(config, create=False)
    records: list[WindowRecord] = store.list_records(pipeline) if store else []
    if json:
        _print_json([r.to_json() for r in records])
        return
    _print_status_table(records)


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
            (r.error or "")[:80],
        )
    out.print(table)
    totals: dict[str, int] = {}
    for r in records:
        totals[r.status.value] = totals.get(r.status.value, 0) + 1
    out.print(", ".join(f"{k}: {v}" for k, v in sorted(totals.items())) or "no windows")


def _count(value: int | None) -> str:
    return "" if value is None else str(value)


# --- validate ---------------------------------------------------------------------------------


@app.command()
def validate(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name.")],
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Repair the chain; succeeded work is kept.")
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """Report (or repair) a pipeline's chain of window records."""
    from core.validation import plan_rebuild, validate_chain

    config = _config(config_path, require_secrets=False)
    settings = guarded(lambda: config.pipeline(pipeline))
    store = _store(config, create=False)
    records = store.list_records(pipeline) if store else []
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
    store.apply_rebuild(pipeline, plan_)
    print(
        f"{pipeline}: rebuilt: {len(plan_.delete_starts)} deleted, {len(plan_.reset_starts)} "
        f"reset to pending, {len(plan_.create)} created; succeeded windows kept"
    )


# --- locks ------------------------------------------------------------------------------------


@app.command()
def locks(
    cleanup: Annotated[
        bool, typer.Option("--cleanup", help="Release stale locks and requeue their windows.")
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """List held window locks; with --cleanup, release stale ones and requeue lost windows."""
    import redis

    from core.locks import held_locks

    # Listing needs no secrets; a cleanup may start chains, which need them.
    config = _config(config_path, require_secrets=cleanup)
    client = redis.Redis.from_url(config.settings.redis_url)
    held = held_locks(client)
    table = Table("pipeline", "window_start", "owner", "ttl_s", "owner_alive")
    for lock in held:
        table.add_row(
            lock.pipeline,
            format_instant(lock.window_start),
            lock.owner,
            f"{lock.ttl_seconds:.1f}",
            "no" if lock.owner_is_dead_here() else "yes/unknown",
        )
    out.print(table if held else "no window locks held")
    if cleanup:
        from core.recovery import cleanup as run_cleanup
        from workers.runtime import send_chain

        store = _store(config)
        report = run_cleanup(store, client, config, send_chain, utc_now())
        summary = report.summary()
        for label, key in (
            ("released", "released"),
            ("requeued", "requeued"),
            ("failed (attempts exhausted)", "failed"),
        ):
            for line in summary[key]:
                print(f"{label}: {line}")
        total = len(report.released) + len(report.requeued) + len(report.failed)
        print(f"cleanup: {total} change(s)")


# --- demo -------------------------------------------------------------------------------------


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Synthetic events to seed.")] = 100_000,
    hours: Annotated[int, typer.Option(help="Hours of data: one 1h window each (2-336).")] = 24,
    workdir: Annotated[
        Path, typer.Option(help="Work dir (config, databases, stage, logs); wiped at start.")
    ] = Path(".demo"),
    flower_port: Annotated[
        int | None, typer.Option(help="Flower's port (default: a free one).", show_default=False)
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep everything running until Ctrl-C.")
    ] = False,
    target: Annotated[
        str,
        typer.Option(help="auto (Snowflake on fakesnow if it works, else sql), snowflake, sql."),
    ] = "auto",
    timeout: Annotated[float, typer.Option(help="Give up on the pipeline after seconds.")] = 600,
) -> None:
    """The whole system end to end on this machine, with no outside service."""
    from workers.demo import DemoOptions, run_demo

    options = DemoOptions(events, hours, workdir, flower_port, keep, target, timeout)
    raise typer.Exit(run_demo(options))


def main() -> None:
    """Console script entry point."""
    from core.logs import configure_logging

    configure_logging(os.environ.get("WINDOWPIPE_LOG_LEVEL", "WARNING"))
    app()


if __name__ == "__main__":
    main()
