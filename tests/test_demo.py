"""`windowpipe demo`: its pure parts offline, then whole runs as a subprocess.

The runs start everything the demo starts (embedded Redis, osmem, fakesnow, Celery workers,
beat, Flower) and check that it ends with every window audited equal, and that no process
of the demo is left afterwards: after a clean run, after Ctrl-C (SIGINT) at any point, after
SIGTERM, and after `--keep` is ended with Ctrl-C.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.config import config_from_dict
from core.records import WindowKind, WindowRecord, WindowStatus
from windowpipe.demo import processes, run, seeding, services, view

START = datetime(2026, 11, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
DEMO_TIMEOUT = 85
"""Seconds a whole test-sized demo run may take (it takes about 15 here)."""

AUDIT_ROW = re.compile(
    r"│ (?P<window>\S+Z) │ (?P<status>\w+) +│ +(?P<seeded>\d+) │ +(?P<source>\S+) │"
    r" +(?P<staged>\S+) │ +(?P<target>\S+) │ (?P<ok>\w+) +│"
)


# --- offline ----------------------------------------------------------------------------------


def test_synthetic_events_fill_every_hour_but_the_empty_one() -> None:
    events = list(seeding.synthetic_events(2000, START, 6))
    per_hour = Counter(seeding.window_of(e["@timestamp"], START) for e in events)
    empty = START + seeding.empty_window_index(6) * HOUR
    assert len(events) == 2000
    assert per_hour[empty] == 0
    assert set(per_hour) == {START + n * HOUR for n in range(6)} - {empty}
    assert len({e["event_id"] for e in events}) == 2000


def test_synthetic_events_are_the_same_every_run() -> None:
    first, again = (list(seeding.synthetic_events(50, START, 4)) for _ in range(2))
    assert first == again


def test_synthetic_events_share_timestamps_so_paging_must_break_ties() -> None:
    stamps = Counter(e["@timestamp"] for e in seeding.synthetic_events(5000, START, 2))
    assert max(stamps.values()) > 1


def _record(start: datetime, status: WindowStatus, *counts: int | None) -> WindowRecord:
    source, staged, target = (*counts, None, None, None)[:3]
    return WindowRecord(
        pipeline=run.PIPELINE,
        window_start=start,
        window_end=start + HOUR,
        status=status,
        kind=WindowKind.SCHEDULED,
        source_count=source,
        staged_count=staged,
        target_count=target,
    )


def test_audit_passes_windows_whose_counts_all_equal_what_was_seeded() -> None:
    seeded = Counter({START: 5})
    records = [
        _record(START, WindowStatus.SUCCEEDED, 5, 5, 5),
        _record(START + HOUR, WindowStatus.SKIPPED, 0),
    ]
    rows = view.audit(records, seeded, [START, START + HOUR])
    assert [row.ok for row in rows] == [True, True]
    assert (rows[1].staged, rows[1].target) == (0, 0)


@pytest.mark.parametrize(
    ("status", "counts"),
    [
        (WindowStatus.SUCCEEDED, (5, 5, 4)),  # a row lost on load
        (WindowStatus.SUCCEEDED, (4, 4, 4)),  # the source missed a seeded event
        (WindowStatus.SKIPPED, (0, None, None)),  # skipped although there was data
        (WindowStatus.DEAD, (5, 5, None)),
        (WindowStatus.RUNNING, (5, None, None)),
    ],
)
def test_audit_fails_a_window_that_did_not_move_exactly_what_was_seeded(
    status: WindowStatus, counts: tuple[int | None, ...]
) -> None:
    rows = view.audit([_record(START, status, *counts)], Counter({START: 5}), [START])
    assert not rows[0].ok


def test_audit_fails_an_expected_window_without_a_record() -> None:
    rows = view.audit([], Counter({START: 5}), [START])
    assert [(row.status, row.ok) for row in rows] == [("missing", False)]


def test_audit_accepts_a_later_empty_window_beat_created_across_the_hour() -> None:
    later = START + HOUR
    records = [
        _record(START, WindowStatus.SUCCEEDED, 5, 5, 5),
        _record(later, WindowStatus.SKIPPED, 0),
    ]
    rows = view.audit(records, Counter({START: 5}), [START])
    assert [row.ok for row in rows] == [True, True]


@pytest.mark.parametrize("target", ["sql", "snowflake"])
def test_the_generated_config_is_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    monkeypatch.setenv(services.SNOWFLAKE_PASSWORD_ENV, "snow")
    target_config = (
        services.sql_target(tmp_path).config
        if target == "sql"
        else {
            "type": "snowflake",
            "account": "fakesnow",
            "user": "fake",
            "password_env": services.SNOWFLAKE_PASSWORD_ENV,
            "database": "DEMO",
            "schema": "RAW",
            "table": "EVENTS",
            "stage": "EVENTS_STAGE",
            "host": "127.0.0.1",
            "port": 1234,
            "protocol": "http",
        }
    )
    text = run.demo_config(
        redis_url="redis://127.0.0.1:1/0",
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        start=START,
        hours=24,
        osmem_url="http://127.0.0.1:2",
        staging_dir=tmp_path / "staging",
        target=target_config,
    )
    config = config_from_dict(tomllib.loads(text), tmp_path / "windowpipe.toml")
    pipeline = config.pipeline(run.PIPELINE)
    assert (pipeline.window, pipeline.start, pipeline.lag) == (HOUR, START, timedelta(0))
    assert pipeline.max_windows_per_tick >= 24
    assert pipeline.target.type == target
    assert pipeline.source.type == "opensearch"


def test_a_directory_that_is_not_a_demo_work_dir_is_never_wiped(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(processes.DemoError, match="refusing to wipe"):
        run.prepare_workdir(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_a_previous_demo_work_dir_is_wiped(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    run.prepare_workdir(workdir)
    (workdir / "state.db").write_text("old")
    run.prepare_workdir(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == [run.MARKER]


def test_demo_processes_inherit_no_windowpipe_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINDOWPIPE_STATE_URL", "postgresql://elsewhere/db")
    env = run.base_env(tmp_path)
    assert "WINDOWPIPE_STATE_URL" not in env
    assert env["WINDOWPIPE_DEMO_DIR"] == str(tmp_path)


# --- whole runs -------------------------------------------------------------------------------


def _like_a_terminal() -> None:
    # A shell runs background jobs with SIGINT ignored, and children inherit that (Python then
    # installs no KeyboardInterrupt handler). These tests play a user pressing Ctrl-C in a
    # terminal, whatever started pytest.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _demo_env() -> dict[str, str]:
    # The embedded Redis, never the shared one; no config of the caller's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINDOWPIPE_")}
    env["COLUMNS"] = "120"
    return env


def _command(workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "windowpipe",
        "demo",
        "--events",
        "3000",
        "--hours",
        "4",
        "--workdir",
        str(workdir),
        *extra,
    ]


def _demo_pids(workdir: Path) -> list[int]:
    """Processes that belong to the demo in `workdir` (its marker in their environment, or the
    work dir on their command line)."""
    marker = f"WINDOWPIPE_DEMO_DIR={workdir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in environ or str(workdir).encode() in cmdline:
            found.append(int(proc.name))
    return found


def _assert_nothing_left(workdir: Path) -> None:
    deadline = time.monotonic() + 5
    while (left := _demo_pids(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    details = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in left}
    assert not left, f"processes of the demo left behind: {details}"


def _kill_leftovers(workdir: Path) -> None:
    for pid in _demo_pids(workdir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for_output(
    process: subprocess.Popen[bytes], output: Path, text: str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while text not in output.read_text():
        assert process.poll() is None, f"demo exited early:\n{output.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n{output.read_text()}"
        time.sleep(0.1)


@pytest.mark.integration
def test_the_demo_runs_the_whole_pipeline_and_leaves_nothing_running(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    try:
        result = subprocess.run(
            _command(workdir),
            cwd=tmp_path,
            env=_demo_env(),
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        rows = [match.groupdict() for match in AUDIT_ROW.finditer(result.stdout)]
        assert len(rows) >= 4, output
        statuses = Counter(row["status"] for row in rows)
        assert statuses["succeeded"] == 3, output
        assert statuses["succeeded"] + statuses["skipped"] == len(rows), output
        for row in rows:
            assert row["seeded"] == row["source"] == row["staged"] == row["target"], row
            assert row["ok"] == "yes", row
        assert sum(int(row["target"]) for row in rows) == 3000
        assert re.search(r"audit: ok: \d+ windows", result.stdout), output
        assert re.search(r"Flower: http://127\.0\.0\.1:\d+ +\(user demo, password \S+\)", output)
        assert re.search(
            r"Web view: http://127\.0\.0\.1:\d+/pipelines/events +\(user demo, password \S+\)",
            output,
        )
        _assert_nothing_left(workdir)
    finally:
        _kill_leftovers(workdir)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("when", "sig"),
    [
        ("source: osmem-server", signal.SIGINT),  # while the target is set up
        ("starting beat", signal.SIGINT),  # while windows are running
        ("starting beat", signal.SIGTERM),
    ],
)
def test_interrupting_the_demo_stops_every_process(
    tmp_path: Path, when: str, sig: signal.Signals
) -> None:
    workdir = tmp_path / "demo"
    output = tmp_path / "output.txt"
    with output.open("w") as out:
        process = subprocess.Popen(
            _command(workdir),
            cwd=tmp_path,
            env=_demo_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_like_a_terminal,
        )
    try:
        _wait_for_output(process, output, when)
        process.send_signal(sig)
        assert process.wait(timeout=60) == 130, output.read_text()
        assert "interrupted: stopping every process" in output.read_text()
        _assert_nothing_left(workdir)
    finally:
        if process.poll() is None:
            process.kill()
        _kill_leftovers(workdir)


@pytest.mark.integration
def test_keep_leaves_everything_up_until_ctrl_c_then_stops_it(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    output = tmp_path / "output.txt"
    with output.open("w") as out:
        process = subprocess.Popen(
            _command(workdir, "--keep"),
            cwd=tmp_path,
            env=_demo_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_like_a_terminal,
        )
    try:
        _wait_for_output(process, output, "Ctrl-C stops it", timeout=DEMO_TIMEOUT)
        flower = re.search(r"Flower: (http://\S+)", output.read_text())
        assert flower is not None
        assert processes.http_status(f"{flower[1]}/healthcheck") == 200
        web = re.search(
            r"Web view: (http://\S+)/pipelines/events +\(user demo, password (\S+)\)",
            output.read_text(),
        )
        assert web is not None
        assert processes.http_status(f"{web[1]}/healthz") == 200
        # The grid answers with the printed password, and refuses without it.
        assert processes.http_status(f"{web[1]}/pipelines/events") == 401
        request = urllib.request.Request(
            f"{web[1]}/pipelines/events",
            headers={
                "Authorization": "Basic " + base64.b64encode(f"demo:{web[2]}".encode()).decode()
            },
        )
        with urllib.request.urlopen(request, timeout=10) as page:
            assert page.status == 200
            assert b'id="grid"' in page.read()
        assert _demo_pids(workdir), "--keep stopped the demo's processes"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, output.read_text()
        _assert_nothing_left(workdir)
    finally:
        if process.poll() is None:
            process.kill()
        _kill_leftovers(workdir)
