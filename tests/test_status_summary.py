"""`windowpipe status` without a pipeline: a line per pipeline (windows by status, how far
behind, backlog, dead, when generation last ran) and the totals, read with one grouped query."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from core.control_runs import ControlActivity, LastRun
from core.metrics import read_frontiers
from core.records import WindowKind, WindowStatus
from core.store import PipelineSummary, StateStore
from core.store.schema import WINDOWS
from core.summary import counts_text, summary_lines
from core.windows import Window
from tests.support import free_port
from tests.support.console import run_windowpipe
from tests.support.deployment import write_config

ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
S, K, F, P, D, Q = (
    WindowStatus.SUCCEEDED,
    WindowStatus.SKIPPED,
    WindowStatus.FAILED,
    WindowStatus.PENDING,
    WindowStatus.DEAD,
    WindowStatus.QUEUED,
)

HISTORIES = {
    "all-done": [S, K, S],
    "gap-after-two": [S, K, F, S],  # complete through the second window, then a failure
    "first-pending": [P, S],
    "dead-then-done": [S, D, S, Q],
}


def build(store: StateStore, histories: dict[str, list[WindowStatus]]) -> None:
    for name, history in histories.items():
        windows = [Window(ORIGIN + i * HOUR, ORIGIN + (i + 1) * HOUR) for i in range(len(history))]
        store.create_windows(name, windows, kind=WindowKind.SCHEDULED)
        with store.engine.begin() as conn:
            for window, status in zip(windows, history, strict=True):
                conn.execute(
                    sa.update(WINDOWS)
                    .where(WINDOWS.c.pipeline == name, WINDOWS.c.window_start == window.start)
                    .values(status=status.value)
                )


def pipeline_config(tmp_path: Path) -> dict[str, object]:
    """A pipeline's config; status never reaches its source or target."""
    return {
        "window": "1h",
        "start": "2026-01-01T00:00:00Z",
        "source": {"type": "sql", "url": f"sqlite:///{tmp_path}/data.db", "table": "events"},
        "staging": {"type": "local", "path": str(tmp_path / "staging")},
        "target": {"type": "sql", "url": f"sqlite:///{tmp_path}/data.db", "table": "loaded"},
    }


def test_summaries_count_by_status_and_end_where_the_metrics_frontier_ends_in_one_statement(
    state_url: str,
) -> None:
    store = StateStore(state_url)
    store.migrate()
    try:
        build(store, HISTORIES)
        statements: list[str] = []

        def seen(*args: object) -> None:
            statements.append(str(args[2]))

        sa.event.listen(store.engine, "before_cursor_execute", seen)
        summaries = store.pipeline_summaries()
        sa.event.remove(store.engine, "before_cursor_execute", seen)

        assert len([s for s in statements if "windows" in s]) == 1
        assert set(summaries) == set(HISTORIES)
        for name, history in HISTORIES.items():
            summary = summaries[name]
            assert summary.counts == {s: history.count(s) for s in set(history)}, name
            with store.engine.connect() as conn:
                frontier = read_frontiers(conn, [name])[name]
            assert summary.complete_through == frontier.complete_through, name
        assert summaries["gap-after-two"].complete_through == ORIGIN + 2 * HOUR
        assert summaries["first-pending"].complete_through is None
        assert (summaries["dead-then-done"].backlog, summaries["dead-then-done"].dead) == (1, 1)
    finally:
        store.dispose()


def test_counts_text_lists_statuses_in_their_order_and_says_when_there_are_none() -> None:
    assert counts_text({F: 1, S: 40, Q: 3}) == "3 queued, 40 succeeded, 1 failed"
    assert counts_text({}) == "no windows"


def test_summary_lines_give_a_line_per_pipeline_then_the_totals_and_the_cleanup() -> None:
    now = ORIGIN + 10 * HOUR
    summaries = {
        "orders": PipelineSummary("orders", {S: 8, Q: 1}, ORIGIN + 8 * HOUR),
        "users": PipelineSummary("users", {S: 2, D: 1, F: 1}, ORIGIN + 2 * HOUR),
    }
    starts = {"orders": ORIGIN, "users": ORIGIN, "new": ORIGIN + 9 * HOUR}
    activity = ControlActivity(
        cleanup=LastRun(now - timedelta(seconds=3), "control@b"),
        generation={"orders": LastRun(now - timedelta(seconds=12), "control@a"), "users": None},
    )

    lines = summary_lines(summaries, starts, activity, now)

    assert lines == [
        "new: no window complete yet, 1h since the pipeline's start; no windows; "
        "backlog 0, dead 0; generation never ran (since Redis was last emptied)",
        "orders: complete through 2026-01-01T08:00:00Z, 2h behind now; 1 queued, 8 succeeded; "
        "backlog 1, dead 0; generation last ran 12s ago on control@a",
        "users: complete through 2026-01-01T02:00:00Z, 8h behind now; 2 succeeded, 1 failed, "
        "1 dead; backlog 1, dead 1; generation never ran (since Redis was last emptied)",
        "3 pipeline(s), 13 window(s): 1 queued, 10 succeeded, 1 failed, 1 dead; backlog 2 in "
        "2 pipeline(s), dead 1 in 1 pipeline(s); most behind: users (8h)",
        "cleanup last ran 3s ago on control@b",
    ]


def test_summary_lines_say_why_when_the_control_records_cannot_be_read() -> None:
    lines = summary_lines({}, {"orders": ORIGIN}, "control activity unknown: Redis: down", ORIGIN)
    assert lines[0].endswith("; no windows; backlog 0, dead 0")
    assert lines[-1] == "control activity unknown: Redis: down"


def test_status_without_a_pipeline_prints_a_line_per_pipeline_not_every_window(
    tmp_path: Path,
) -> None:
    state_url = f"sqlite:///{tmp_path}/state.db"
    store = StateStore(state_url)
    store.migrate()
    build(store, {f"p{index:03}": [S, S, F] for index in range(120)})
    store.dispose()
    pipeline = pipeline_config(tmp_path)
    config = write_config(
        tmp_path / "windowpipe.toml",
        # Nothing listens there: status says so in one line and still prints the summary.
        {"state_url": state_url, "redis_url": f"redis://127.0.0.1:{free_port()}/0"},
        {f"p{index:03}": pipeline for index in range(120)},
    )

    run = run_windowpipe("status", cwd=tmp_path, config=config)

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 120 + 2
    assert lines[0].startswith("p000: complete through 2026-01-01T02:00:00Z, ")
    assert lines[0].endswith("; 2 succeeded, 1 failed; backlog 1, dead 0")
    assert lines[-2].startswith("120 pipeline(s), 360 window(s): 240 succeeded, 120 failed;")
    assert lines[-1].startswith("control activity unknown: Redis: ")


def test_status_json_without_a_pipeline_still_lists_every_record(tmp_path: Path) -> None:
    state_url = f"sqlite:///{tmp_path}/state.db"
    store = StateStore(state_url)
    store.migrate()
    build(store, {"a": [S, F], "b": [S]})
    store.dispose()
    pipeline = pipeline_config(tmp_path)
    config = write_config(
        tmp_path / "windowpipe.toml", {"state_url": state_url}, {"a": pipeline, "b": pipeline}
    )

    run = run_windowpipe("status", "--json", cwd=tmp_path, config=config)

    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [(row["pipeline"], row["status"]) for row in rows] == [
        ("a", "succeeded"),
        ("a", "failed"),
        ("b", "succeeded"),
    ]
