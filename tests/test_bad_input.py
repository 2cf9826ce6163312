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
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from core.cli import app
from tests.deployment import REPO, write_config

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
    "stage": {"type": "local", "path": "./stage"},
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
        "unknown-stage-type",
        _with("stage.type", "gcs"),
        {},
        "pipelines.orders.stage: unknown connector type 'gcs'",
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


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
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
    # Nothing written: no state store, no stage directory.
    assert not (tmp_path / "state.db").exists()
    assert not (tmp_path / "stage").exists()


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


def test_console_script_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    write_config(tmp_path / "windowpipe.toml", {}, {"orders": _with("window", "15x")})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "core.cli",
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
redis_url = "redis://127.0.0.1:6379/0"
state_url = "sqlite:///windowpipe.db"

[pipelines.orders]
window = "15m"
start = "2026-11-01T00:00:00Z"
lag = "5m"
max_windows_per_tick = 96
every = "5m"

[pipelines.orders.source]
type = "elasticsearch"
hosts = ["http://127.0.0.1:9200"]
index = "orders-*"
timestamp_field = "@timestamp"

[pipelines.orders.stage]
type = "s3"
bucket = "pipeline-stage"
prefix = "orders/"

[pipelines.orders.target]
type = "snowflake"
account = "xy12345"
user = "LOADER"
password_env = "SF_PASSWORD"
database = "RAW"
schema = "EVENTS"
table = "ORDERS"
stage = "ORDERS_STAGE"
"""
"""The example config of the design, verbatim (comments aside)."""


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
