"""The `windowpipe` command line (typer): check, plan, enqueue, status, validate, locks, migrate,
demo.

Errors are one line on stderr, `windowpipe: error: ...`; exit status 2 for bad input (a bad
config, argument, option or range, a state store without the schema), 1 for a failed run (a
system unreachable, a window dead). Every command runs through one guard, `_GuardedGroup.main`:
click's usage errors, windowpipe's errors and anything unexpected all end as that one line,
never a traceback (`WINDOWPIPE_LOG_LEVEL=DEBUG` adds the traceback of an unexpected error).

Nothing is written before the input is known to be good: the config (every URL included) is
validated first, then the arguments and the range, then the systems are reached, and only then
does a write command write. Read commands (`plan`, `status`, `validate`, `locks`, `check`)
never change the state store's schema; `migrate` does, and so does `enqueue`, which writes.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from core.config import Config, PipelineConfig, load_config
from core.errors import BadInputError, WindowpipeError
from core.instants import format_duration, format_instant, parse_instant, utc_now
from core.records import FINISHED, WindowKind, WindowRecord, WindowStatus
from core.windows import Window, align_down, windows_in_range

if TYPE_CHECKING:
    from core.store import StateStore

MAX_ENQUEUE_WINDOWS = 100_000
"""The most windows one `enqueue` may create; a longer backfill is split into several ranges."""

CONNECT_TIMEOUT_SECONDS = 5.0
"""How long a command waits for Redis or the broker to answer before calling it unreachable."""

T = TypeVar("T")

_click_errors: Any = sys.modules[typer.BadParameter.__module__]
"""The exceptions of the click typer parses with: typer >= 0.2x vendors its own copy of click
(`typer._click`), older typer uses click itself; `typer.BadParameter` lives in either one."""


class _NeverRaised(Exception):
    """Stands in for NoArgsIsHelpError with a click that does not have it (before 8.2)."""


_NoArgsIsHelp: type[Exception] = getattr(_click_errors, "NoArgsIsHelpError", _NeverRaised)
_UsageError: type[Exception] = _click_errors.UsageError
_ClickException: type[Exception] = _click_errors.ClickException
_Abort = (typer.Abort, getattr(_click_errors, "Abort", typer.Abort))


def _error_line(message: str) -> None:
    """Print `windowpipe: error: MESSAGE` as exactly one line on stderr."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"windowpipe: error: {text}", file=sys.stderr)


def _first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (drivers add hints and URLs below it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _usage_message(error: Any) -> str:
    message = error.format_message().strip().rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    if error.ctx is None:
        return message
    path = error.ctx.command_path
    command = path.split(" ", 1)[1] if " " in path else None
    where = f"{command}: " if command else ""
    return f"{where}{message} (see `{path} --help`)"


def _exit_status(run: Callable[[], Any]) -> int:
    """Run the command line; every error becomes one line on stderr and an exit status."""
    try:
        result = run()
    except _NoArgsIsHelp as error:
        # `windowpipe` alone asks for the help, like `windowpipe --help`.
        print(error.format_message())  # type: ignore[attr-defined]
        return 0
    except _UsageError as error:
        _error_line(_usage_message(error))
        return 2
    except _Abort:
        _error_line("aborted")
        return 1
    except _ClickException as error:
        _error_line(error.format_message())  # type: ignore[attr-defined]
        return int(error.exit_code)  # type: ignore[attr-defined]
    except BadInputError as error:
        _error_line(str(error))
        return 2
    except WindowpipeError as error:
        _error_line(str(error))
        return 1
    except Exception as error:
        # A system failed in a way no command anticipated (a connection dropped mid-command):
        # a failed run, in one line. The traceback is there for whoever asks for it.
        if os.environ.get("WINDOWPIPE_LOG_LEVEL", "").upper() == "DEBUG":
            traceback.print_exc()
        _error_line(f"{type(error).__name__}: {_first_line(error)}")
        return 1
    return result if isinstance(result, int) else 0


class _GuardedGroup(TyperGroup):
    """The `windowpipe` group: click runs in non-standalone mode, so its usage errors reach
    `_exit_status` instead of being drawn as a framed box, and so do every command's errors."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        status = _exit_status(
            lambda: super(_GuardedGroup, self).main(
                args, prog_name or "windowpipe", complete_var, standalone_mode=False, **extra
            )
        )
        if standalone_mode:
            sys.exit(status)
        return status


app = typer.Typer(
    name="windowpipe",
    help="Time-windowed pipelines from a search engine to a warehouse, on Celery workers.",
    cls=_GuardedGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Piped (not a terminal), tables get room for every column instead of rich's default 80.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)

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
    _error_line(message)
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


# --- reaching the systems --------------------------------------------------------------------


def _shown(url: str) -> str:
    """A URL fit for a message: its password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<the configured URL>"


class StoreUnreachableError(WindowpipeError):
    """The state store's database did not answer (or could not be opened): a failed run."""


def _reaching_store(store: StateStore, call: Callable[[], T]) -> T:
    """`call()` on the state store; a database that cannot be reached is StoreUnreachableError."""
    from sqlalchemy.exc import DBAPIError

    try:
        return call()
    except DBAPIError as error:
        reason = _first_line(error.orig or error)
        raise StoreUnreachableError(
            f"cannot reach the state store at {_shown(store.url)}: {reason}"
        ) from None


def _open_store(config: Config) -> StateStore:
    from core.store import StateStore

    return guarded(lambda: StateStore(config.settings.state_url))


def _schema_problem(store: StateStore) -> str | None:
    """Why the state store cannot be read by this windowpipe yet, or None; runs no DDL."""
    current, head = _reaching_store(store, store.schema_revision)
    if current == head:
        return None
    where = f"the state store at {_shown(store.url)}"
    if current is None:
        return f"{where} has no windowpipe schema; run `windowpipe migrate`"
    if not _known_revision(current):
        return (
            f"{where} is at schema revision {current}, which this windowpipe does not know "
            f"(was it migrated by a newer windowpipe?); this windowpipe needs {head}"
        )
    return (
        f"{where} is at schema revision {current}, this windowpipe needs {head}; "
        f"run `windowpipe migrate`"
    )


def _known_revision(revision: str) -> bool:
    """True when `revision` is one of the migrations this windowpipe ships."""
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    from core.store import MIGRATIONS_DIR

    try:
        return ScriptDirectory(str(MIGRATIONS_DIR)).get_revision(revision) is not None
    except CommandError:
        return False


def _read_store(config: Config) -> StateStore:
    """The state store for a command that reads it (or repairs records): never runs DDL; a
    database without the newest schema is refused in one line, exit 2, and left as it was."""
    store = _open_store(config)
    problem = _schema_problem(store)
    if problem:
        store.dispose()
        fail(problem, 2)
    return store


def _write_store(config: Config) -> StateStore:
    """The state store for a command that writes windows: migrated to the newest schema."""
    store = _open_store(config)
    _reaching_store(store, store.migrate)
    return store


def _systems_to_ping(config: Config) -> list[tuple[str, str]]:
    """(what, URL) of every message system a command that sends work must reach first."""
    settings = config.settings
    named = [
        ("redis", settings.redis_url),
        ("broker", settings.broker_url),
        ("result backend", settings.result_backend_url),
    ]
    seen: set[str] = set()
    systems = []
    for what, url in named:
        if url and url not in seen:
            seen.add(url)
            systems.append((what, url))
    return systems


def _ping(url: str) -> None:
    """Connect to a Redis or AMQP URL and check it answers; raises on failure."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_timeout=CONNECT_TIMEOUT_SECONDS,
        )
        try:
            client.ping()
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=CONNECT_TIMEOUT_SECONDS) as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)


def _unreachable(config: Config) -> list[str]:
    """One line per message system (Redis, broker, result backend) that does not answer."""
    problems = []
    for what, url in _systems_to_ping(config):
        try:
            _ping(url)
        except Exception as error:
            problems.append(f"{what} at {_shown(url)} is unreachable: {_first_line(error)}")
    return problems


def _redis_client(config: Config) -> Any:
    """A client of `redis_url` that answered a ping; an unreachable Redis is exit 1."""
    import redis

    url = config.settings.redis_url
    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        client.ping()
    except redis.RedisError as error:
        fail(f"redis at {_shown(url)} is unreachable: {_first_line(error)}", 1)
    return client


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
    problems = _unreachable(config)
    store = _open_store(config)
    try:
        problem = _schema_problem(store)
    except StoreUnreachableError as error:
        problem = str(error)
    finally:
        store.dispose()
    if problem:
        problems.append(f"state store: {problem}")
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
    from core.dispatch import planned_windows

    store = _read_store(config)
    windows = guarded(lambda: _reaching_store(store, lambda: planned_windows(store, settings, at)))
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
    timeout: Annotated[
        float, typer.Option(min=0, help="With --wait: give up after seconds.")
    ] = 3600,
    config_path: ConfigOption = None,
) -> None:
    """Manual runs and backfills: create the windows in [start, end) and enqueue their chains."""
    config = _config(config_path)
    settings = guarded(lambda: config.pipeline(pipeline))
    first, last = _instant(start, "--start"), _instant(end, "--end")
    windows = _backfill_windows(settings, first, last, utc_now())
    # Everything the run needs must answer before the first window is written.
    problems = _unreachable(config)
    if problems:
        fail(problems[0], 1)
    from workers.runtime import send_chain

    store = _write_store(config)
    created = store.create_windows(pipeline, windows, kind=WindowKind.MANUAL)
    reset = 0
    if force:
        reset = store.reset_for_rerun(pipeline, [w.start for w in windows], kind=WindowKind.MANUAL)
    queued = _dispatch_now(config, settings, store, send_chain)
    print(
        f"{pipeline}: {len(windows)} window(s) in range, {len(created)} created, "
        f"{reset} reset for re-run, {queued} queued now (the rest follow as windows finish)"
    )
    if wait:
        _wait_for(store, pipeline, windows[0].start, windows[-1].end, timeout)


def _backfill_windows(
    settings: PipelineConfig, first: datetime, last: datetime, now: datetime
) -> list[Window]:
    """The windows `enqueue` creates for `[first, last)`, after every check of the range.

    The range is refused (exit 2) before a single window is built when it is empty, reaches
    beyond the newest window that is due `now` (windows are due once `end + lag <= now`, as in
    generation), or holds more than MAX_ENQUEUE_WINDOWS windows; so an unbounded `--end` costs
    nothing. Bounds that are not window boundaries are refused by `windows_in_range`, which
    names the nearest boundaries.
    """
    origin, size, lag = settings.start, settings.window, settings.lag
    if last <= first:
        fail(f"--end {format_instant(last)} must be after --start {format_instant(first)}")
    # Compare with `now - lag` rather than `last + lag`: an end near year 9999 plus a lag would
    # overflow.
    horizon = now - lag
    if last > horizon:
        newest = align_down(horizon, origin, size) if horizon >= origin + size else None
        due = (
            f"the newest due window ends at {format_instant(newest)}"
            if newest is not None
            else f"no window of {settings.name} is due yet"
        )
        fail(
            f"--end {format_instant(last)} is beyond the newest due window: a window is due "
            f"once its end plus the lag ({format_duration(lag)}) has passed; {due}"
        )
    span = last - max(first, origin)
    count = -(-span // size) if span > timedelta(0) else 0
    if count > MAX_ENQUEUE_WINDOWS:
        fail(
            f"--start {format_instant(first)} --end {format_instant(last)} holds {count:,} "
            f"windows of {format_duration(size)}; one enqueue creates at most "
            f"{MAX_ENQUEUE_WINDOWS:,}: split the range"
        )
    try:
        return windows_in_range(origin=origin, size=size, start=first, end=last)
    except ValueError as error:
        fail(str(error))


def _dispatch_now(
    config: Config, settings: PipelineConfig, store: StateStore, send_chain: Any
) -> int:
    import redis

    from core.dispatch import dispatch

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
    store = _read_store(config)
    records: list[WindowRecord] = store.list_records(pipeline)
    if json:
        _print_json([r.to_json() for r in records])
        return
    _print_status_table(records)
    # When generation and cleanup last ran (core/liveness.py): an age that keeps growing means
    # nothing consumes the control queue.
    from core.liveness import control_activity_lines

    names = [pipeline] if pipeline else sorted(config.pipelines)
    for line in control_activity_lines(config.settings.redis_url, names, utc_now()):
        print(line)
    # How far behind each pipeline's target is (the exporter's windowpipe_freshness_seconds).
    from core.metrics import freshness_lines, read_freshness

    starts = {name: config.pipelines[name].start for name in names}
    for line in freshness_lines(read_freshness(store, starts, utc_now())):
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


@app.command()
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

    config = _config(config_path)
    settings = guarded(lambda: config.pipeline(pipeline))
    first, last = _instant(start, "--start"), _instant(end, "--end")
    if last <= first:
        fail(f"--end {format_instant(last)} must be after --start {format_instant(first)}")
    if repair:
        # A repair sends work: everything it needs must answer before a record changes.
        problems = _unreachable(config)
        if problems:
            fail(problems[0], 1)
    store = _read_store(config)
    records = guarded(
        lambda: _reaching_store(store, lambda: closed_windows(store, pipeline, first, last))
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
        _print_json([row.to_json() for row in rows])
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
        from workers.runtime import send_chain

        _dispatch_now(config, settings, store, send_chain)


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
    # --rebuild writes records but never the schema: it needs the schema like a read does.
    store = _read_store(config)
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
    from core.locks import held_locks

    # Listing needs no secrets; a cleanup may start chains, which need them.
    config = _config(config_path, require_secrets=cleanup)
    # Locks belong to the windows of one state store: refuse a store without the schema (the
    # cleanup writes records, never the schema) before touching Redis.
    store = _read_store(config)
    client = _redis_client(config)
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

        problems = _unreachable(config)
        if problems:
            fail(problems[0], 1)
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


# --- metrics ----------------------------------------------------------------------------------


@app.command()
def metrics(
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to serve /metrics on (0: any free port).")
    ] = 9810,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    once: Annotated[
        bool, typer.Option("--once", help="Print one scrape on stdout and exit.")
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """Prometheus exporter: freshness, windows by status, stage durations, rows, queue depth."""
    from core.exporter import WindowpipeCollector, render, serve

    config = _config(config_path, require_secrets=False)
    if once:
        # Like every read command: a store without the newest schema is refused, exit 2.
        print(render(WindowpipeCollector(config, _read_store(config))), end="")
        return
    # Serving, it reports such a store as down until it is migrated (core/exporter.py).
    collector = WindowpipeCollector(config, _open_store(config))
    serve(collector, address, port, announce=lambda line: print(line, flush=True))


# --- migrate ----------------------------------------------------------------------------------


@app.command()
def migrate(config_path: ConfigOption = None) -> None:
    """Create or upgrade the state store's schema (read commands never change it)."""
    config = _config(config_path, require_secrets=False)
    store = _open_store(config)
    where = f"the state store at {_shown(store.url)}"
    try:
        before, head = _reaching_store(store, store.schema_revision)
        if before == head:
            print(f"{where} is at schema revision {head}, the newest: nothing to do")
            return
        try:
            _reaching_store(store, store.migrate)
        except _alembic_errors() as error:
            fail(
                f"cannot migrate {where} from schema revision {before}: {_first_line(error)} "
                f"(was it migrated by a newer windowpipe?)",
                1,
            )
        after, _ = _reaching_store(store, store.schema_revision)
    finally:
        store.dispose()
    was = "had no windowpipe schema" if before is None else f"was at schema revision {before}"
    print(f"{where} {was}; migrated to revision {after}")


def _alembic_errors() -> tuple[type[Exception], ...]:
    """What alembic raises for a revision it cannot resolve (one unknown to this windowpipe)."""
    from alembic.util.exc import CommandError

    return (CommandError,)


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
    typer.main.get_command(app).main(prog_name="windowpipe")


if __name__ == "__main__":
    main()
