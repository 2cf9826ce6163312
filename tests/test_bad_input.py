"""Bad input is refused with one clear line, exit status 2, and no state written.

A corpus of broken configs and CLI arguments, each with the message it must produce.
(Bad source documents are covered by the source and fault tests: they are rejected with a
reason and fail the audit.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner

from core.config import S3StagingConfig, config_from_dict
from tests.conftest import REDIS_TEST_URL
from tests.support import free_port
from tests.support.console import Run, StateWorld, assert_one_error_line, run_windowpipe
from tests.support.deployment import REPO, free_redis_db, release_redis_db, write_config
from windowpipe.cli import app
from windowpipe.enqueue import MAX_ENQUEUE_WINDOWS

GOOD_PIPELINE: dict[str, Any] = {
    "window": "15m",
    "start": "2026-11-01T00:00:00Z",
    "lag": "5m",
    "max_windows_per_tick": 96,
    "every": "5m",
    "source": {
        "type": "sql",
        "url": "sqlite:///source.db",
        "table": "events",
        "timestamp_column": "created_at",
    },
    "staging": {"type": "local", "path": "./staging"},
    "target": {"type": "sql", "url": "sqlite:///target.db", "table": "events_loaded"},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """GOOD_PIPELINE with `path` (dotted) set to value; value None deletes the key."""
    body: dict[str, Any] = {
        k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD_PIPELINE.items()
    }
    node = body
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    if value is None:
        node.pop(keys[-1])
    else:
        node[keys[-1]] = value
    return body


def _under_old_name(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with its `staging` table written under the old name, `stage`."""
    return {("stage" if key == "staging" else key): value for key, value in body.items()}


# (case id, pipeline body or raw text, settings, expected fragment of the one-line message)
CONFIG_CASES: list[tuple[str, Any, dict[str, Any], str]] = [
    ("window-missing", _with("window", None), {}, "pipelines.orders.window: missing required key"),
    ("start-missing", _with("start", None), {}, "pipelines.orders.start: missing required key"),
    ("source-missing", _with("source", None), {}, "pipelines.orders.source: missing required key"),
    ("unknown-pipeline-key", _with("windw", "15m"), {}, "pipelines.orders.windw: unknown key"),
    ("unknown-settings-key", GOOD_PIPELINE, {"redis": "x"}, "windowpipe.redis: unknown key"),
    (
        "unknown-source-key",
        _with("source.tabel", "x"),
        {},
        "pipelines.orders.source.tabel: unknown key",
    ),
    ("unknown-source-type", _with("source.type", "kafka"), {}, "unknown connector type 'kafka'"),
    (
        "unknown-staging-type",
        _with("staging.type", "gcs"),
        {},
        "pipelines.orders.staging: unknown connector type 'gcs'",
    ),
    (
        "unknown-staging-type-under-the-old-name",
        _under_old_name(_with("staging.type", "gcs")),
        {},
        "pipelines.orders.stage: unknown connector type 'gcs'",
    ),
    (
        "staging-under-both-names",
        {**GOOD_PIPELINE, "stage": GOOD_PIPELINE["staging"]},
        {},
        "pipelines.orders: both staging and stage (its old name) are set; keep staging",
    ),
    (
        "unknown-target-type",
        _with("target.type", "bigquery"),
        {},
        "unknown connector type 'bigquery'",
    ),
    (
        "source-type-missing",
        _with("source.type", None),
        {},
        "pipelines.orders.source: missing required key 'type'",
    ),
    ("bad-duration", _with("window", "15x"), {}, "pipelines.orders.window: expected a duration"),
    (
        "zero-window",
        _with("window", "0m"),
        {},
        "pipelines.orders.window: window must be longer than zero",
    ),
    ("negative-lag", _with("lag", "-5m"), {}, "pipelines.orders.lag: expected a duration"),
    (
        "zero-every",
        _with("every", "0s"),
        {},
        "pipelines.orders.every: every must be longer than zero",
    ),
    ("duration-number", _with("window", 15), {}, "pipelines.orders.window: expected a duration"),
    ("naive-start", _with("start", "2026-11-01T00:00:00"), {}, "has no UTC offset"),
    (
        "unparseable-start",
        _with("start", "yesterday"),
        {},
        "pipelines.orders.start: expected an ISO 8601 instant",
    ),
    (
        "zero-cap",
        _with("max_windows_per_tick", 0),
        {},
        "pipelines.orders.max_windows_per_tick: Input should be greater than or equal to 1",
    ),
    (
        "empty-table",
        _with("target.table", ""),
        {},
        "pipelines.orders.target.table: String should have at least 1 character",
    ),
    (
        "bad-lock-ttl",
        GOOD_PIPELINE,
        {"lock_ttl": "0s"},
        "windowpipe.lock_ttl: must be longer than zero",
    ),
    (
        "short-visibility",
        GOOD_PIPELINE,
        {"visibility_timeout": "10m"},
        "windowpipe.visibility_timeout: visibility_timeout must exceed",
    ),
    (
        "bad-redis-url",
        GOOD_PIPELINE,
        {"redis_url": "http://127.0.0.1"},
        "windowpipe.redis_url: expected a redis://",
    ),
    (
        "bad-broker-url",
        GOOD_PIPELINE,
        {"broker_url": "kafka://u:canary-pw@h"},
        "windowpipe.broker_url: expected a redis://, rediss:// or amqp:// URL, got 'kafka://u:***@h'",
    ),
    (
        "rediss-without-cert-reqs",
        GOOD_PIPELINE,
        {"redis_url": "rediss://:canary-pw@127.0.0.1:6380/0"},
        "windowpipe.redis_url: a rediss:// URL needs ?ssl_cert_reqs=required",
    ),
    (
        "bad-state-url",
        GOOD_PIPELINE,
        {"state_url": "not a url"},
        "windowpipe.state_url: not a SQLAlchemy URL",
    ),
    (
        "unknown-state-url-scheme",
        GOOD_PIPELINE,
        {"state_url": "mongodb://u:canary-pw@127.0.0.1/windows"},
        "windowpipe.state_url: unsupported database 'mongodb' in 'mongodb://u:***@127.0.0.1/windows'",
    ),
    (
        "state-url-driver-not-installed",
        GOOD_PIPELINE,
        {"state_url": "postgresql+psycopg2://postgres@127.0.0.1/test"},
        "windowpipe.state_url: the postgresql driver 'psycopg2' of",
    ),
    (
        "state-url-unknown-driver",
        GOOD_PIPELINE,
        {"state_url": "postgresql+nosuchdriver://postgres@127.0.0.1/test"},
        "windowpipe.state_url: unknown postgresql driver 'nosuchdriver'",
    ),
    (
        "redis-url-bad-port",
        GOOD_PIPELINE,
        {"redis_url": "redis://127.0.0.1:63x79/0"},
        "windowpipe.redis_url: bad port in 'redis://127.0.0.1:63x79/0'",
    ),
    (
        "redis-url-port-out-of-range",
        GOOD_PIPELINE,
        {"redis_url": "redis://127.0.0.1:70000/0"},
        "windowpipe.redis_url: bad port",
    ),
    (
        "redis-url-bad-database",
        GOOD_PIPELINE,
        {"redis_url": "redis://:canary-pw@127.0.0.1:6379/zero"},
        "windowpipe.redis_url: bad Redis database 'zero' in 'redis://:***@127.0.0.1:6379/zero'",
    ),
    (
        "broker-url-bad-port",
        GOOD_PIPELINE,
        {"broker_url": "amqp://guest:canary-pw@127.0.0.1:5x72//"},
        "windowpipe.broker_url: bad port in 'amqp://guest:***@127.0.0.1:5x72//'",
    ),
    (
        "result-backend-url-bad-scheme",
        GOOD_PIPELINE,
        {"result_backend_url": "mongodb://127.0.0.1/results"},
        "windowpipe.result_backend_url: expected a redis://",
    ),
    (
        "bad-page-size",
        _with("source.page_size", 0),
        {},
        "pipelines.orders.source.page_size: Input should be greater than or equal to 1",
    ),
]


def run_cli(tmp_path: Path, *args: str, env: Mapping[str, str | None] | None = None) -> Any:
    runner = CliRunner()
    environment = {"WINDOWPIPE_CONFIG": str(tmp_path / "windowpipe.toml"), **(env or {})}
    old = dict(os.environ)
    try:
        os.chdir(tmp_path)
        return runner.invoke(app, list(args), env=environment)
    finally:
        os.chdir(REPO)
        os.environ.clear()
        os.environ.update(old)


def assert_refused(result: Any, fragment: str, tmp_path: Path) -> None:
    stderr = result.stderr if hasattr(result, "stderr") else result.output
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1, lines
    assert fragment in lines[0], lines[0]
    # Nothing written: no state store, no staging directory.
    assert not (tmp_path / "state.db").exists()
    assert not (tmp_path / "staging").exists()


@pytest.mark.parametrize(
    ("pipeline", "settings", "fragment"),
    [c[1:] for c in CONFIG_CASES],
    ids=[c[0] for c in CONFIG_CASES],
)
def test_bad_config_is_refused_in_one_line_with_status_2(
    tmp_path: Path, pipeline: Any, settings: dict[str, Any], fragment: str
) -> None:
    write_config(
        tmp_path / "windowpipe.toml",
        {"state_url": f"sqlite:///{tmp_path}/state.db", **settings},
        {"orders": pipeline},
    )
    result = run_cli(tmp_path, "plan", "orders", "--now", "2026-11-01T02:07:00Z")
    assert_refused(result, fragment, tmp_path)
    assert str(tmp_path / "windowpipe.toml") in result.stderr


RAW_FILE_CASES = [
    ("not-toml", b"[windowpipe\nredis_url = 1", "not valid TOML"),
    ("not-utf8", b'[windowpipe]\nredis_url = "\xff\xfe"\n', "config file is not UTF-8 text"),
    (
        "unknown-table",
        b'[pipelinez.orders]\nwindow = "15m"\n',
        "pipelinez: unknown top-level table",
    ),
    ("bad-pipeline-name", b'[pipelines."a b"]\nwindow = "15m"\n', "pipeline names may use"),
]


@pytest.mark.parametrize(
    ("raw", "fragment"), [c[1:] for c in RAW_FILE_CASES], ids=[c[0] for c in RAW_FILE_CASES]
)
def test_unreadable_config_file_is_refused(tmp_path: Path, raw: bytes, fragment: str) -> None:
    (tmp_path / "windowpipe.toml").write_bytes(raw)
    assert_refused(run_cli(tmp_path, "status"), fragment, tmp_path)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    assert_refused(run_cli(tmp_path, "status"), "config file not found", tmp_path)


def test_config_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "windowpipe.toml").mkdir()
    assert_refused(run_cli(tmp_path, "status"), "is a directory", tmp_path)


def test_bad_environment_override_is_refused(tmp_path: Path) -> None:
    write_config(
        tmp_path / "windowpipe.toml",
        {"state_url": f"sqlite:///{tmp_path}/state.db"},
        {"orders": GOOD_PIPELINE},
    )
    result = run_cli(tmp_path, "status", env={"WINDOWPIPE_LOCK_TTL": "soon"})
    assert_refused(result, "windowpipe.lock_ttl: expected a duration", tmp_path)


CLI_CASES = [
    ("plan-unknown-pipeline", ["plan", "nope"], "unknown pipeline 'nope' (configured: orders)"),
    (
        "plan-naive-now",
        ["plan", "orders", "--now", "2026-11-01T02:07:00"],
        "--now: instant 2026-11-01T02:07:00 has no UTC offset",
    ),
    (
        "plan-garbage-now",
        ["plan", "orders", "--now", "tomorrow"],
        "--now: expected an ISO 8601 instant",
    ),
    (
        "enqueue-end-before-start",
        ["enqueue", "orders", "--start", "2026-11-01T01:00:00Z", "--end", "2026-11-01T00:00:00Z"],
        "must be after --start",
    ),
    (
        "enqueue-misaligned",
        ["enqueue", "orders", "--start", "2026-11-01T00:07:00Z", "--end", "2026-11-01T01:00:00Z"],
        "start 2026-11-01T00:07:00Z is not on a window boundary",
    ),
    (
        "enqueue-before-origin",
        ["enqueue", "orders", "--start", "2026-10-31T23:00:00Z", "--end", "2026-11-01T01:00:00Z"],
        "is before the pipeline start",
    ),
    (
        "enqueue-future",
        ["enqueue", "orders", "--start", "2026-11-01T00:00:00Z", "--end", "2099-01-01T00:00:00Z"],
        "is beyond the newest due window",
    ),
    (
        "enqueue-bad-start",
        ["enqueue", "orders", "--start", "soon", "--end", "2026-11-01T01:00:00Z"],
        "--start: expected an ISO 8601 instant",
    ),
    (
        "enqueue-unknown-pipeline",
        ["enqueue", "nope", "--start", "2026-11-01T00:00:00Z", "--end", "2026-11-01T01:00:00Z"],
        "unknown pipeline 'nope'",
    ),
    ("status-unknown-pipeline", ["status", "nope"], "unknown pipeline 'nope'"),
    ("validate-unknown-pipeline", ["validate", "nope"], "unknown pipeline 'nope'"),
]


@pytest.mark.parametrize(
    ("args", "fragment"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_bad_cli_arguments_are_refused_in_one_line_with_status_2(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    write_config(
        tmp_path / "windowpipe.toml",
        {"state_url": f"sqlite:///{tmp_path}/state.db"},
        {"orders": GOOD_PIPELINE},
    )
    assert_refused(run_cli(tmp_path, *args), fragment, tmp_path)


@pytest.mark.integration  # starts another program
def test_console_script_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    write_config(tmp_path / "windowpipe.toml", {}, {"orders": _with("window", "15x")})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "windowpipe",
            "plan",
            "orders",
            "--config",
            str(tmp_path / "windowpipe.toml"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"windowpipe: error: {tmp_path / 'windowpipe.toml'}: pipelines.orders.window: "
        "expected a duration like '15m', '1h' or '1d', got '15x'"
    ]


DESIGN_EXAMPLE = """
[windowpipe]
redis_url = "redis://127.0.0.1:6379/0"      # locks (and the broker, unless broker_url is set)
state_url = "sqlite:///windowpipe.db"        # window records (any SQLAlchemy URL)
# broker_url = "amqp://guest:guest@127.0.0.1:5672//"   # optional: RabbitMQ as the Celery broker

[pipelines.orders]
window = "15m"
start = "2026-11-01T00:00:00Z"
lag = "5m"
max_windows_per_tick = 96
every = "5m"                                 # how often beat runs generation
recheck = ["1h", "1d"]                       # optional: re-count closed windows at these ages; re-run on drift

[pipelines.orders.source]
type = "elasticsearch"                       # also: opensearch, sql
hosts = ["http://127.0.0.1:9200"]
index = "orders-*"
timestamp_field = "@timestamp"

[pipelines.orders.staging]                   # `stage` is accepted as the old name
type = "s3"                                  # also: local (a directory)
bucket = "pipeline-stage"
prefix = "orders/"

[pipelines.orders.target]
type = "snowflake"                           # also: sql (any SQLAlchemy URL)
account = "xy12345"
user = "LOADER"
password_env = "SF_PASSWORD"
database = "RAW"
schema = "EVENTS"
table = "ORDERS"
stage = "ORDERS_STAGE"                       # Snowflake stage over the same bucket/prefix
"""  # noqa: E501 (the design's text as it is)
"""The design's example config, verbatim, comments and all."""


def assert_design_example_windows(plan_json: str) -> None:
    """`plan orders --now 2026-11-01T02:07:00Z --json` by the design's rules: eight 15m windows
    from 00:00, the last ending at 02:00 (02:00-02:15 would cross now - lag = 02:02)."""
    rows = json.loads(plan_json)
    assert [r["window_start"] for r in rows] == [
        f"2026-11-01T{h:02d}:{m:02d}:00Z" for h in (0, 1) for m in (0, 15, 30, 45)
    ]
    assert rows[-1]["window_end"] == "2026-11-01T02:00:00Z"
    assert {r["pipeline"] for r in rows} == {"orders"}


def test_migrate_plan_and_status_need_no_secrets_on_the_design_example(tmp_path: Path) -> None:
    (tmp_path / "windowpipe.toml").write_text(DESIGN_EXAMPLE)
    unset = {"SF_PASSWORD": None}
    migrated = run_cli(tmp_path, "migrate", env=unset)
    assert migrated.exit_code == 0, migrated.output
    result = run_cli(
        tmp_path, "plan", "orders", "--now", "2026-11-01T02:07:00Z", "--json", env=unset
    )
    assert result.exit_code == 0, result.output
    assert_design_example_windows(result.stdout)
    status = run_cli(tmp_path, "status", "--json", env=unset)
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout) == []


def test_the_design_example_loads_with_its_staging_table_under_the_new_or_the_old_name() -> None:
    new = config_from_dict(tomllib.loads(DESIGN_EXAMPLE), require_secrets=False)
    assert "[pipelines.orders.staging]" in DESIGN_EXAMPLE
    old_text = DESIGN_EXAMPLE.replace("[pipelines.orders.staging]", "[pipelines.orders.stage]")
    old = config_from_dict(tomllib.loads(old_text), require_secrets=False)
    assert new.pipelines["orders"].staging == S3StagingConfig(
        type="s3", bucket="pipeline-stage", prefix="orders/"
    )
    assert old.pipelines == new.pipelines


@pytest.mark.parametrize(
    "command",
    [
        ["check"],
        ["enqueue", "orders", "--start", "2026-11-01T00:00:00Z", "--end", "2026-11-01T01:00:00Z"],
    ],
    ids=["check", "enqueue"],
)
def test_an_undefined_secret_is_refused_by_commands_that_reach_systems(
    tmp_path: Path, command: list[str]
) -> None:
    write_config(
        tmp_path / "windowpipe.toml",
        {"state_url": f"sqlite:///{tmp_path}/state.db"},
        {"orders": _with("target.password_env", "WP_TEST_UNSET_SECRET")},
    )
    result = run_cli(tmp_path, *command, env={"WP_TEST_UNSET_SECRET": None})
    assert_refused(
        result,
        "pipelines.orders.target.password_env: environment variable WP_TEST_UNSET_SECRET "
        "is not set",
        tmp_path,
    )


def test_plan_prints_the_design_example_windows_and_creates_none(tmp_path: Path) -> None:
    from core.store import StateStore

    write_config(
        tmp_path / "windowpipe.toml",
        {"state_url": f"sqlite:///{tmp_path}/state.db"},
        {"orders": GOOD_PIPELINE},
    )
    assert run_cli(tmp_path, "migrate").exit_code == 0
    result = run_cli(tmp_path, "plan", "orders", "--now", "2026-11-01T02:07:00Z", "--json")
    assert result.exit_code == 0, result.output
    assert_design_example_windows(result.stdout)
    with StateStore(f"sqlite:///{tmp_path}/state.db") as store:
        assert store.list_records("orders") == []  # plan never writes


def test_changing_the_window_grid_after_windows_exist_is_refused_by_plan(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from core.store import StateStore
    from core.windows import Window

    store = StateStore(f"sqlite:///{tmp_path}/state.db")
    store.migrate()
    first = datetime(2026, 11, 1, tzinfo=UTC)
    store.create_windows("orders", [Window(first, first + timedelta(minutes=15))])
    store.dispose()
    write_config(
        tmp_path / "windowpipe.toml",
        {"state_url": f"sqlite:///{tmp_path}/state.db"},
        {"orders": _with("window", "1h")},
    )
    result = run_cli(tmp_path, "plan", "orders", "--now", "2026-11-02T00:00:00Z")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "windowpipe: error: pipeline orders: last window end 2026-11-01T00:15:00Z is not aligned "
        "to 2026-11-01T00:00:00Z + k * 1h; did `start` or `window` change after windows were "
        "created? See `windowpipe validate orders`"
    ]


# --- every command x every kind of broken input, run as a user runs it ------------------------
#
# The real console script in a subprocess, against a real state store (a SQLite file that must
# never come to exist, or a migrated PostgreSQL schema holding windows) and a dedicated Redis
# database holding a canary key. Each refusal must be exit 2, exactly one line on stderr, no
# traceback, and leave the state store, Redis and the working directory exactly as they were.

COMMANDS: dict[str, list[str]] = {
    "check": ["check"],
    "plan": ["plan", "orders", "--now", "2026-11-01T02:07:00Z"],
    "enqueue": [
        *("enqueue", "orders"),
        *("--start", "2026-11-01T00:00:00Z", "--end", "2026-11-01T01:00:00Z"),
    ],
    "status": ["status", "orders"],
    "validate": ["validate", "orders"],
    "validate-rebuild": ["validate", "orders", "--rebuild"],
    "locks": ["locks"],
    "locks-cleanup": ["locks", "--cleanup"],
    "migrate": ["migrate"],
    "metrics": ["metrics", "--once"],
    # Never run with a good config here: it would serve until stopped.
    "web": ["web", "--read-only"],
    "reconcile": [
        *("reconcile", "orders"),
        *("--start", "2026-11-01T00:00:00Z", "--end", "2026-11-01T01:00:00Z"),
    ],
    "reconcile-repair": [
        *("reconcile", "orders", "--repair"),
        *("--start", "2026-11-01T00:00:00Z", "--end", "2026-11-01T01:00:00Z"),
    ],
}
"""A good invocation of every command that reads the config (and of its writing variants)."""

NOT_READING_THE_CONFIG = {"demo"}
"""Commands that take no config: only their usage errors are walked."""

MINUTELY: dict[str, Any] = {**GOOD_PIPELINE, "window": "1m", "start": "2026-01-01T00:00:00Z"}
"""A pipeline whose due windows number far more than one enqueue may create."""


def _settings(world: StateWorld, **overrides: str) -> dict[str, Any]:
    return {"state_url": world.state_url, "redis_url": world.redis_url, **overrides}


# (case, how the config is broken: settings overrides, a raw file, or "missing"; the fragment)
BROKEN_CONFIGS: list[tuple[str, dict[str, str] | bytes | None, str]] = [
    ("missing-file", None, "config file not found"),
    ("bad-toml", b'[windowpipe]\nredis_url = "redis://127.0.0.1:6379/0\n', "not valid TOML"),
    ("unknown-key", {"redis": "redis://127.0.0.1:6379/0"}, "windowpipe.redis: unknown key"),
    (
        "state-url-unknown-scheme",
        {"state_url": "mongodb://u:canary-pw@127.0.0.1:27017/windows"},
        "windowpipe.state_url: unsupported database 'mongodb'",
    ),
    (
        "state-url-driver-not-installed",
        {"state_url": "postgresql+psycopg2://postgres@127.0.0.1/test"},
        "windowpipe.state_url: the postgresql driver 'psycopg2'",
    ),
    (
        "redis-url-bad-port",
        {"redis_url": "redis://127.0.0.1:63x79/0"},
        "windowpipe.redis_url: bad port in 'redis://127.0.0.1:63x79/0'",
    ),
    (
        "broker-url-unknown-scheme",
        {"broker_url": "kafka://u:canary-pw@127.0.0.1:9092"},
        "windowpipe.broker_url: expected a redis://, rediss:// or amqp:// URL",
    ),
    (
        "broker-url-bad-port",
        {"broker_url": "amqp://guest:canary-pw@127.0.0.1:56720000//"},
        "windowpipe.broker_url: bad port",
    ),
    (
        "result-backend-url-bad-database",
        {"result_backend_url": "redis://127.0.0.1:6379/results"},
        "windowpipe.result_backend_url: bad Redis database 'results'",
    ),
]

BAD_ARGUMENTS: list[tuple[str, list[str], str]] = [
    ("metrics-port-out-of-range", ["metrics", "--port", "70000"], "invalid value for '--port'"),
    ("metrics-unknown-option", ["metrics", "--bogus"], "metrics: no such option: --bogus"),
    ("web-port-out-of-range", ["web", "--read-only", "--port", "70000"], "invalid value for"),
    ("web-unknown-option", ["web", "--bogus"], "web: no such option: --bogus"),
    (
        "web-without-credentials-or-read-only",
        ["web"],
        "set WINDOWPIPE_WEB_USER and WINDOWPIPE_WEB_PASSWORD (basic auth), or pass --read-only",
    ),
    ("plan-unknown-pipeline", ["plan", "nope"], "unknown pipeline 'nope' (configured: "),
    (
        "reconcile-end-before-start",
        ["reconcile", "orders", "--start", "2026-11-01T01:00:00Z", "--end", "2026-11-01T00:00:00Z"],
        "must be after --start",
    ),
    ("reconcile-unknown-pipeline", ["reconcile", "nope", *COMMANDS["reconcile"][2:]], "'nope'"),
    ("reconcile-missing-option", ["reconcile", "orders"], "missing option '--start'"),
    ("plan-bad-instant", ["plan", "orders", "--now", "tomorrow"], "--now: expected an ISO 8601"),
    ("plan-naive-instant", ["plan", "orders", "--now", "2026-11-01T02:07:00"], "no UTC offset"),
    ("plan-missing-argument", ["plan"], "plan: missing argument"),
    ("plan-unknown-option", ["plan", "orders", "--bogus"], "plan: no such option: --bogus"),
    ("plan-option-without-value", ["plan", "orders", "--now"], "'--now' requires an argument"),
    ("enqueue-unknown-pipeline", ["enqueue", "nope", *COMMANDS["enqueue"][2:]], "'nope'"),
    (
        "enqueue-bad-instant",
        ["enqueue", "orders", "--start", "2026-13-01T00:00:00Z", "--end", "2026-11-01T01:00:00Z"],
        "--start: expected an ISO 8601 instant",
    ),
    (
        "enqueue-end-before-start",
        ["enqueue", "orders", "--start", "2026-11-01T01:00:00Z", "--end", "2026-11-01T00:00:00Z"],
        "--end 2026-11-01T00:00:00Z must be after --start 2026-11-01T01:00:00Z",
    ),
    (
        "enqueue-empty-range",
        ["enqueue", "orders", "--start", "2026-11-01T01:00:00Z", "--end", "2026-11-01T01:00:00Z"],
        "must be after --start",
    ),
    (
        "enqueue-unbounded-end",
        ["enqueue", "orders", "--start", "2026-11-01T00:00:00Z", "--end", "9999-12-31T00:00:00Z"],
        "--end 9999-12-31T00:00:00Z is beyond the newest due window",
    ),
    (
        "enqueue-end-not-due-yet",
        ["enqueue", "orders", "--start", "2026-11-01T00:00:00Z", "--end", "2099-01-01T00:00:00Z"],
        "is beyond the newest due window",
    ),
    (
        "enqueue-too-many-windows",
        ["enqueue", "minutely", "--start", "2026-01-01T00:00:00Z", "--end", "2026-11-01T00:00:00Z"],
        f"one enqueue creates at most {MAX_ENQUEUE_WINDOWS:,}: split the range",
    ),
    (
        "enqueue-misaligned",
        ["enqueue", "orders", "--start", "2026-11-01T00:07:00Z", "--end", "2026-11-01T01:00:00Z"],
        "is not on a window boundary",
    ),
    (
        "enqueue-before-pipeline-start",
        ["enqueue", "orders", "--start", "2020-01-01T00:00:00Z", "--end", "2026-11-01T01:00:00Z"],
        "is before the pipeline start",
    ),
    (
        "enqueue-missing-option",
        ["enqueue", "orders", "--start", "2026-11-01T00:00:00Z"],
        "enqueue: missing option '--end'",
    ),
    ("enqueue-unknown-option", [*COMMANDS["enqueue"], "--bogus"], "no such option: --bogus"),
    (
        "enqueue-bad-value",
        [*COMMANDS["enqueue"], "--wait", "--timeout", "soon"],
        "invalid value for '--timeout'",
    ),
    ("status-unknown-pipeline", ["status", "nope"], "unknown pipeline 'nope'"),
    ("status-unknown-option", ["status", "--bogus"], "status: no such option: --bogus"),
    ("validate-unknown-pipeline", ["validate", "nope"], "unknown pipeline 'nope'"),
    ("validate-rebuild-unknown-pipeline", ["validate", "nope", "--rebuild"], "'nope'"),
    ("validate-missing-argument", ["validate"], "validate: missing argument"),
    ("validate-unknown-option", ["validate", "orders", "--bogus"], "no such option: --bogus"),
    ("locks-unknown-option", ["locks", "--bogus"], "locks: no such option: --bogus"),
    ("locks-extra-argument", ["locks", "orders"], "locks: got unexpected extra argument"),
    ("check-unknown-option", ["check", "--bogus"], "check: no such option: --bogus"),
    ("migrate-unknown-option", ["migrate", "--bogus"], "migrate: no such option: --bogus"),
    ("migrate-extra-argument", ["migrate", "orders"], "migrate: got unexpected extra argument"),
    ("demo-unknown-option", ["demo", "--bogus"], "demo: no such option: --bogus"),
    ("demo-bad-value", ["demo", "--events", "many"], "demo: invalid value for '--events'"),
    ("unknown-command", ["nosuch"], "no such command 'nosuch'"),
]


@pytest.fixture(scope="module", params=["sqlite-never-created", "postgresql-migrated"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StateWorld]:
    """A state store and a Redis DB shared by the module's tests, which must never change them."""
    number = free_redis_db(REDIS_TEST_URL)
    redis_url = f"{REDIS_TEST_URL}/{number}"
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.set("windowpipe-test:canary", "untouched")
    try:
        if request.param == "sqlite-never-created":
            directory = tmp_path_factory.mktemp("state")
            file = directory / "state.db"
            yield StateWorld(f"sqlite:///{file}", redis_url, sqlite_file=file)
        else:
            database_url = request.getfixturevalue("pg_database_url")
            yield from _migrated_pg_world(database_url, redis_url)
    finally:
        client.flushdb()
        client.close()
        release_redis_db(REDIS_TEST_URL, number)


def _migrated_pg_world(database_url: str, redis_url: str) -> Iterator[StateWorld]:
    from datetime import UTC, datetime, timedelta

    from core.store import StateStore
    from core.windows import Window

    schema = f"bad_input_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{database_url}?options=-csearch_path%3D{schema}"
    try:
        with StateStore(url) as store:
            store.migrate()
            first = datetime(2026, 11, 1, tzinfo=UTC)
            size = timedelta(minutes=15)
            store.create_windows(
                "orders", [Window(first + i * size, first + (i + 1) * size) for i in range(3)]
            )
        world = StateWorld(url, redis_url, pg_schema=schema)
        yield world
        world.close()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def _write_broken_config(
    path: Path, world: StateWorld, broken: dict[str, str] | bytes | None
) -> None:
    if broken is None:
        return
    if isinstance(broken, bytes):
        path.write_bytes(broken)
        return
    write_config(path, _settings(world, **broken), {"orders": GOOD_PIPELINE})


def _assert_refused_and_unchanged(
    run: Run, fragment: str, world: StateWorld, before: dict[str, Any], workdir: Path
) -> None:
    assert_one_error_line(run, 2, fragment)
    assert "canary-pw" not in run.stderr
    assert world.snapshot() == before, f"state changed by\n{run.describe()}"
    assert sorted(p.name for p in workdir.iterdir()) == ["windowpipe.toml"], run.describe()


@pytest.mark.integration
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("broken", "fragment"),
    [c[1:] for c in BROKEN_CONFIGS],
    ids=[c[0] for c in BROKEN_CONFIGS],
)
def test_every_command_refuses_a_broken_config_in_one_line_and_changes_nothing(
    tmp_path: Path,
    world: StateWorld,
    command: str,
    broken: dict[str, str] | bytes | None,
    fragment: str,
) -> None:
    config = tmp_path / "windowpipe.toml"
    _write_broken_config(config, world, broken)
    before = world.snapshot()
    run = run_windowpipe(*COMMANDS[command], cwd=tmp_path, config=config)
    if broken is None:  # the missing file: nothing at all may appear in the directory
        assert_one_error_line(run, 2, fragment)
        assert world.snapshot() == before, run.describe()
        assert list(tmp_path.iterdir()) == [], run.describe()
        return
    _assert_refused_and_unchanged(run, fragment, world, before, tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "fragment"), [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS]
)
def test_every_command_refuses_bad_arguments_in_one_line_and_changes_nothing(
    tmp_path: Path, world: StateWorld, args: list[str], fragment: str
) -> None:
    config = tmp_path / "windowpipe.toml"
    write_config(config, _settings(world), {"orders": GOOD_PIPELINE, "minutely": MINUTELY})
    before = world.snapshot()
    run = run_windowpipe(*args, cwd=tmp_path, config=config)
    _assert_refused_and_unchanged(run, fragment, world, before, tmp_path)
    # Refused before anything is built: an unbounded range costs no more than a typo.
    assert run.seconds < 20, run.describe()


def test_the_walk_covers_every_command() -> None:
    """A new command must be added to COMMANDS (and its bad arguments to BAD_ARGUMENTS)."""
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    registered = set(group.commands)
    walked = {args[0] for args in COMMANDS.values()} | NOT_READING_THE_CONFIG
    assert registered == walked
    with_bad_arguments = {args[0] for _, args, _ in BAD_ARGUMENTS}
    assert registered <= with_bad_arguments


# --- systems that do not answer: a failed run (exit 1), still one line, still nothing written --


@pytest.mark.integration
@pytest.mark.parametrize(
    ("down", "fragment"),
    [
        ("redis_url", "redis at redis://127.0.0.1:{port}/0 is unreachable"),
        ("broker_url", "broker at amqp://guest:***@127.0.0.1:{port}// is unreachable"),
    ],
    ids=["redis-down", "broker-down"],
)
def test_enqueue_with_redis_or_the_broker_down_writes_nothing(
    tmp_path: Path, world: StateWorld, down: str, fragment: str
) -> None:
    port = free_port()
    url = (
        f"redis://127.0.0.1:{port}/0"
        if down == "redis_url"
        else f"amqp://guest:canary-pw@127.0.0.1:{port}//"
    )
    config = tmp_path / "windowpipe.toml"
    write_config(config, _settings(world, **{down: url}), {"orders": GOOD_PIPELINE})
    before = world.snapshot()
    run = run_windowpipe(*COMMANDS["enqueue"], cwd=tmp_path, config=config)
    assert_one_error_line(run, 1, fragment.format(port=port))
    assert "canary-pw" not in run.stderr
    assert world.snapshot() == before, run.describe()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["windowpipe.toml"]


@pytest.mark.integration
@pytest.mark.parametrize("command", ["plan", "enqueue", "status", "validate", "locks", "migrate"])
def test_a_state_store_that_does_not_answer_is_one_line_exit_1(
    tmp_path: Path, world: StateWorld, command: str
) -> None:
    port = free_port()
    down = f"postgresql+psycopg://postgres:canary-pw@127.0.0.1:{port}/test"
    config = tmp_path / "windowpipe.toml"
    write_config(config, _settings(world, state_url=down), {"orders": GOOD_PIPELINE})
    before = world.redis_contents()
    run = run_windowpipe(*COMMANDS[command], cwd=tmp_path, config=config)
    assert_one_error_line(
        run,
        1,
        f"cannot reach the state store at postgresql+psycopg://postgres:***@127.0.0.1:{port}",
    )
    assert "canary-pw" not in run.stderr
    assert world.redis_contents() == before, run.describe()


@pytest.mark.integration
@pytest.mark.parametrize("command", ["locks", "locks-cleanup"])
def test_locks_with_redis_down_is_one_line_and_changes_nothing(
    tmp_path: Path, world: StateWorld, command: str
) -> None:
    port = free_port()
    config = tmp_path / "windowpipe.toml"
    write_config(
        config, _settings(world, redis_url=f"redis://127.0.0.1:{port}/0"), {"orders": GOOD_PIPELINE}
    )
    before = world.snapshot()
    run = run_windowpipe(*COMMANDS[command], cwd=tmp_path, config=config)
    if world.pg_schema is None:
        # The state store is checked first: without the schema there are no windows to lock.
        assert_one_error_line(run, 2, "has no windowpipe schema; run `windowpipe migrate`")
    else:
        assert_one_error_line(run, 1, f"redis at redis://127.0.0.1:{port}/0 is unreachable")
    assert world.snapshot() == before, run.describe()
