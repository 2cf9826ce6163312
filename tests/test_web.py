"""The web view without a browser: Starlette's test client against a SQLite state store in a
tmp dir and fakeredis for the control tasks' last runs (no service: the fast suite).

The re-run that goes through (it pings Redis and sends chains) and the pages in a real browser
are in tests/test_web_browser.py.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from starlette.testclient import TestClient

from core.control_runs import format_age, record_run
from core.errors import BadInputError
from core.keys import CLEANUP_RAN_KEY, generate_ran_key
from core.records import WindowStatus
from core.store import StateStore
from core.store.overview import Cell, PipelineTally
from tests.support.web_records import (
    DAY,
    MARKUP_ERROR,
    NOW,
    PIPELINE,
    comparable,
    opened,
    seed_every_status,
    status_of,
    web_config,
)
from windowpipe.cli import app as cli_app
from windowpipe.web import layout
from windowpipe.web.app import WebContext, create_web_app
from windowpipe.web.security import Access, CsrfTokens, access_from_env

USER, PASSWORD = "operator", "s3cret-pw"
AUTH = (USER, PASSWORD)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with opened(f"sqlite:///{tmp_path}/state.db") as store:
        yield store


@pytest.fixture
def fake_redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def make_client(
    tmp_path: Path,
    store: StateStore,
    client: Any,
    access: Access = Access(USER, PASSWORD, read_only=False),
    **extra: Any,
) -> TestClient:
    config = web_config(tmp_path, store.url, "redis://127.0.0.1:1/0", **extra)
    context = WebContext(
        config=config,
        store=store,
        redis_client=client,
        access=access,
        flower_url="http://127.0.0.1:5555/",
        clock=lambda: NOW,
    )
    return TestClient(create_web_app(context))


@pytest.fixture
def web(tmp_path: Path, store: StateStore, fake_redis: fakeredis.FakeRedis) -> TestClient:
    seed_every_status(store)
    return make_client(tmp_path, store, fake_redis)


class _Cells(HTMLParser):
    """The grid's cells: (href, class) of each link in table#grid, and empty cells."""

    def __init__(self) -> None:
        super().__init__()
        self.in_grid = False
        self.cells: dict[str, str] = {}
        self.empty = 0
        self._td_open = False
        self._td_has_link = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "table" and values.get("id") == "grid":
            self.in_grid = True
        elif self.in_grid and tag == "td":
            self._td_open, self._td_has_link = True, False
        elif self.in_grid and tag == "a" and self._td_open:
            self._td_has_link = True
            self.cells[str(values["href"])] = str(values["class"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_grid = False
        elif tag == "td" and self._td_open:
            self._td_open = False
            self.empty += not self._td_has_link


def grid_cells_of(html: str) -> _Cells:
    parser = _Cells()
    parser.feed(html)
    return parser


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token on the page"
    return match.group(1)


# --- access ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "read_only", "expected"),
    [
        ({}, False, "set WINDOWPIPE_WEB_USER and WINDOWPIPE_WEB_PASSWORD"),
        ({"WINDOWPIPE_WEB_USER": "a"}, False, "WINDOWPIPE_WEB_PASSWORD is empty or unset"),
        ({"WINDOWPIPE_WEB_PASSWORD": "p"}, True, "WINDOWPIPE_WEB_USER is empty or unset"),
        ({"WINDOWPIPE_WEB_USER": "a:b", "WINDOWPIPE_WEB_PASSWORD": "p"}, False, "':'"),
        ({}, True, Access(None, None, read_only=True)),
        (
            {"WINDOWPIPE_WEB_USER": "a", "WINDOWPIPE_WEB_PASSWORD": "p"},
            False,
            Access("a", "p", read_only=False),
        ),
        (
            {"WINDOWPIPE_WEB_USER": "a", "WINDOWPIPE_WEB_PASSWORD": "p"},
            True,
            Access("a", "p", read_only=True),
        ),
    ],
)
def test_access_needs_both_credentials_or_an_explicit_read_only_mode(
    env: dict[str, str], read_only: bool, expected: Any
) -> None:
    if isinstance(expected, Access):
        assert access_from_env(env, read_only=read_only) == expected
    else:
        with pytest.raises(BadInputError, match=re.escape(expected)):
            access_from_env(env, read_only=read_only)


def test_web_command_without_credentials_or_read_only_exits_2_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    monkeypatch.delenv("WINDOWPIPE_WEB_USER", raising=False)
    monkeypatch.delenv("WINDOWPIPE_WEB_PASSWORD", raising=False)
    result = CliRunner().invoke(
        cli_app, ["web", "--config", str(tmp_path / "missing.toml")], env={}
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert lines == [
        "windowpipe: error: web: set WINDOWPIPE_WEB_USER and WINDOWPIPE_WEB_PASSWORD (basic "
        "auth), or pass --read-only to serve the pages without any action"
    ]


def test_every_page_asks_for_credentials_and_refuses_wrong_ones(web: TestClient) -> None:
    for path in (
        "/",
        f"/pipelines/{PIPELINE}",
        f"/pipelines/{PIPELINE}/windows/{DAY:%Y%m%dT%H%M%SZ}",
    ):
        anonymous = web.get(path)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Basic ")
        assert web.get(path, auth=(USER, "wrong")).status_code == 401
        assert web.get(path, auth=("someone", PASSWORD)).status_code == 401
        assert web.get(path, auth=AUTH).status_code == 200
    broken = {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe").decode()}
    assert web.get("/", headers=broken).status_code == 401


def test_pages_forbid_framing_and_any_script(web: TestClient) -> None:
    for path in ("/", f"/pipelines/{PIPELINE}", "/pipelines/nope"):
        headers = web.get(path, auth=AUTH).headers
        assert headers["x-frame-options"] == "DENY"
        policy = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
        assert "script-src" not in policy  # so scripts fall back to 'none'


def test_probes_answer_without_credentials(web: TestClient) -> None:
    assert web.get("/healthz").text == "ok"
    assert web.get("/readyz").text == "ok"


def test_csrf_token_is_good_only_for_its_user_and_this_process() -> None:
    tokens = CsrfTokens()
    token = tokens.issue("operator")
    assert tokens.valid(token, "operator")
    assert not tokens.valid(token, "someone-else")
    assert not CsrfTokens().valid(token, "operator")
    assert not tokens.valid(token + "x", "operator")
    assert not tokens.valid("", "operator")
    assert not tokens.valid(None, "operator")


def test_csrf_token_survives_a_restart_with_the_same_credentials_and_not_a_new_password() -> None:
    served = CsrfTokens.for_access(Access("operator", "secret", read_only=False))
    token = served.issue("operator")
    # Another replica, or the same server after a restart: the same credentials, the same key.
    assert CsrfTokens.for_access(Access("operator", "secret", read_only=False)).valid(
        token, "operator"
    )
    assert not CsrfTokens.for_access(Access("operator", "changed", read_only=False)).valid(
        token, "operator"
    )


# --- the pipelines page -------------------------------------------------------------------------


def _row(html: str, pipeline: str) -> dict[str, str]:
    match = re.search(rf'<tr data-pipeline="{pipeline}">(.*?)</tr>', html, re.S)
    assert match, f"no row for {pipeline}"
    return dict(re.findall(r'data-key="([^"]+)">([^<]*)<', match.group(1)))


def test_pipelines_page_shows_windows_by_status_backlog_dead_drift_and_freshness(
    web: TestClient, store: StateStore
) -> None:
    page = web.get("/", auth=AUTH)
    assert page.status_code == 200
    records = store.list_records(PIPELINE)
    row = _row(page.text, PIPELINE)
    for status in WindowStatus:
        assert int(row[status.value]) == sum(r.status is status for r in records), status
    assert int(row["total"]) == len(records) == 96
    assert int(row["backlog"]) == sum(r.status.value in ("pending", "queued") for r in records)
    assert int(row["dead"]) == sum(r.status is WindowStatus.DEAD for r in records)
    assert int(row["drift"]) == sum(bool(r.drift) for r in records) > 0
    # Newest succeeded end, and how far it is behind the newest due window (NOW - lag).
    newest = max(r.window_end for r in records if r.status is WindowStatus.SUCCEEDED)
    assert newest.strftime("%Y-%m-%dT%H:%M:%SZ") in page.text
    due = NOW - timedelta(minutes=15)  # the newest window whose end + 5m lag <= NOW
    assert row["behind"] == format_age((due - newest).total_seconds())
    # A configured pipeline without records has a row of zeros.
    assert _row(page.text, "events")["total"] == "0"


def test_pipelines_page_says_when_generation_and_cleanup_last_ran(
    web: TestClient, fake_redis: fakeredis.FakeRedis
) -> None:
    assert "Cleanup never ran" in web.get("/", auth=AUTH).text
    record_run(fake_redis, generate_ran_key(PIPELINE), NOW - timedelta(seconds=40), "control@a")
    record_run(fake_redis, CLEANUP_RAN_KEY, NOW - timedelta(minutes=3), "control@b")
    text = web.get("/", auth=AUTH).text
    assert "Cleanup last ran 3m ago on control@b" in text
    assert "40s ago" in text


def test_pipelines_page_still_answers_with_redis_down(tmp_path: Path, store: StateStore) -> None:
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    web = make_client(tmp_path, store, down)
    page = web.get("/", auth=AUTH)
    assert page.status_code == 200
    assert "Control runs unknown: Redis: ConnectionError" in page.text


def test_pipelines_page_sorts_by_the_column_asked_for(
    tmp_path: Path, store: StateStore, fake_redis: fakeredis.FakeRedis
) -> None:
    seed_every_status(store)
    seed_every_status(store, "bigger")
    from core.store.schema import WINDOWS

    with store.engine.begin() as conn:
        conn.execute(WINDOWS.update().where(WINDOWS.c.pipeline == "bigger").values(status="dead"))
    web = make_client(tmp_path, store, fake_redis)
    order = lambda text: re.findall(r'<tr data-pipeline="([^"]+)">', text)  # noqa: E731
    assert order(web.get("/", auth=AUTH).text) == ["bigger", "events", "orders"]
    assert order(web.get("/?sort=dead&order=desc", auth=AUTH).text) == [
        "bigger",
        "orders",
        "events",
    ]
    assert order(web.get("/?sort=dead", auth=AUTH).text) == ["events", "orders", "bigger"]
    # "bigger" is not configured: no due window, no freshness; it sorts last either way.
    assert order(web.get("/?sort=behind&order=desc", auth=AUTH).text)[-1] == "bigger"
    assert "(not configured)" in web.get("/", auth=AUTH).text


# --- the grid -----------------------------------------------------------------------------------


def test_grid_has_one_cell_per_window_coloured_by_status_with_drift_and_recheck_marks(
    web: TestClient, store: StateStore
) -> None:
    page = web.get(f"/pipelines/{PIPELINE}?from=2026-01-01&to=2026-01-01", auth=AUTH)
    assert page.status_code == 200
    cells = grid_cells_of(page.text)
    records = store.list_records(PIPELINE)
    assert len(cells.cells) == len(records) == 96
    assert cells.empty == 0
    for record in records:
        href = f"{PIPELINE}/windows/{record.window_start:%Y%m%dT%H%M%SZ}"
        classes = cells.cells[href].split()
        assert classes[0] == layout.STATUS_CLASS[record.status.value], record.window_start
        assert (layout.DRIFT_CLASS in classes) == bool(record.drift)
        assert (layout.RECHECKED_CLASS in classes) == (record.rechecks_done > 0)


def test_grid_default_range_is_the_week_up_to_the_newest_window_with_empty_slots(
    web: TestClient,
) -> None:
    page = web.get(f"/pipelines/{PIPELINE}", auth=AUTH)
    cells = grid_cells_of(page.text)
    assert 'value="2025-12-26"' in page.text and 'value="2026-01-01"' in page.text
    assert len(cells.cells) == 96
    assert cells.empty == 6 * 96


def test_grid_refuses_a_range_beyond_its_cap_or_backwards(web: TestClient) -> None:
    huge = web.get(f"/pipelines/{PIPELINE}?from=2020-01-01&to=2026-01-01", auth=AUTH)
    assert huge.status_code == 400
    assert "a grid shows at most 50,000" in huge.text
    backwards = web.get(f"/pipelines/{PIPELINE}?from=2026-01-02&to=2026-01-01", auth=AUTH)
    assert backwards.status_code == 400
    assert web.get(f"/pipelines/{PIPELINE}?from=yesterday", auth=AUTH).status_code == 400
    far = web.get(f"/pipelines/{PIPELINE}?from=9999-12-30&to=9999-12-31", auth=AUTH)
    assert far.status_code == 400 and "outside" in far.text
    assert web.get("/pipelines/nope", auth=AUTH).status_code == 404


@pytest.mark.parametrize(
    ("window", "span", "columns"),
    [
        (timedelta(minutes=1), layout.HOUR, 60),
        (timedelta(minutes=5), layout.HOUR, 12),
        (timedelta(minutes=15), layout.DAY, 96),
        (timedelta(hours=1), layout.DAY, 24),
        (timedelta(hours=7), layout.DAY, 4),
        (timedelta(days=1), layout.WEEK, 7),
        (timedelta(days=14), layout.WEEK, 1),
    ],
)
def test_grid_rows_are_hours_for_minute_windows_days_for_hours_weeks_for_days(
    window: timedelta, span: timedelta, columns: int
) -> None:
    start, end = layout.day_range(date(2026, 1, 5), date(2026, 1, 5))
    shape = layout.grid_shape(start, end, window)
    assert (shape.span, shape.columns) == (span, columns)


def test_grid_places_each_window_by_its_row_and_offset() -> None:
    start, end = layout.day_range(date(2026, 1, 1), date(2026, 1, 2))
    window = timedelta(minutes=15)
    shape = layout.grid_shape(start, end, window)
    cells = [
        Cell(0, "succeeded", False, True),
        Cell(86400 + 23 * 3600 + 45 * 60, "dead", True, False),
        Cell(86400 + 6 * 3600 + 30 * 60, "failed", False, False),
    ]
    rows = layout.grid_rows(shape, window, cells)
    assert [row.label for row in rows] == ["2026-01-01", "2026-01-02"]
    assert rows[0].slots[0] == ("s c", "20260101T000000Z")
    assert rows[1].slots[95] == ("d x", "20260102T234500Z")
    assert rows[1].slots[26] == ("f", "20260102T063000Z")
    assert sum(slot is not None for row in rows for slot in row.slots) == 3


def test_grid_of_daily_windows_has_week_rows_starting_on_monday() -> None:
    start, end = layout.day_range(date(2026, 1, 1), date(2026, 1, 14))  # a Thursday
    window = timedelta(days=1)
    shape = layout.grid_shape(start, end, window)
    assert shape.first_row == datetime(2025, 12, 29, tzinfo=UTC)
    cells = [Cell(3 * 86400, "succeeded", False, False), Cell(9 * 86400, "dead", False, False)]
    rows = layout.grid_rows(shape, window, cells)
    assert [row.label for row in rows] == ["2025-12-29", "2026-01-05", "2026-01-12"]
    assert rows[0].slots[3] == ("s", "20260101T000000Z")
    assert rows[1].slots[2] == ("d", "20260107T000000Z")
    assert layout.column_labels(shape, window) == ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 1, 1, 0, 19, tzinfo=UTC), None),  # the first window ends 00:15, +5m lag
        (datetime(2026, 1, 1, 0, 20, tzinfo=UTC), datetime(2026, 1, 1, 0, 15, tzinfo=UTC)),
        (datetime(2026, 1, 3, 0, 0, tzinfo=UTC), datetime(2026, 1, 2, 23, 45, tzinfo=UTC)),
    ],
)
def test_newest_due_end_follows_generations_rule(
    tmp_path: Path, now: datetime, expected: datetime | None
) -> None:
    settings = web_config(tmp_path, "sqlite://", "redis://x").pipelines[PIPELINE]
    assert layout.newest_due_end(settings, now) == expected


def test_rows_without_a_value_sort_last_in_either_order(tmp_path: Path) -> None:
    config = web_config(tmp_path, "sqlite://", "redis://x")
    tallies = {"gone": PipelineTally({"dead": 2})}
    rows = layout.pipeline_rows(config.pipelines, tallies, {}, None, NOW)
    for descending in (False, True):
        assert layout.sort_rows(rows, "behind", descending)[-1].name == "gone"
    assert [r.name for r in layout.sort_rows(rows, "no-such-column", False)] == [
        "events",
        "gone",
        "orders",
    ]


# --- the window page ----------------------------------------------------------------------------


def _window(web: TestClient, index: int) -> Any:
    start = DAY + index * timedelta(minutes=15)
    return web.get(f"/pipelines/{PIPELINE}/windows/{start:%Y-%m-%dT%H:%M:%SZ}", auth=AUTH)


def test_window_page_shows_status_counts_fence_staging_drift_and_the_flower_link(
    web: TestClient, store: StateStore
) -> None:
    index = 17  # succeeded, with drift and a recheck
    assert status_of(index) is WindowStatus.SUCCEEDED
    page = _window(web, index)
    assert page.status_code == 200
    record = store.get(PIPELINE, DAY + index * timedelta(minutes=15))
    assert record is not None and record.drift
    text = page.text
    assert '<span class="badge s" id="status">succeeded</span>' in text
    assert f'<td id="source_count">{record.source_count}</td>' in text
    assert f'<td id="staged_count">{record.staged_count}</td>' in text
    assert f'<td id="target_count">{record.target_count}</td>' in text
    assert f'<td id="fence">{record.fence}</td>' in text
    assert f"<code>{record.manifest}</code>" in text
    assert '<table class="drift" id="drift">' in text
    assert "<td>recheck</td>" in text
    assert 'href="http://127.0.0.1:5555/tasks"' in text
    assert "args:2026-01-01T04:15:00Z" in text


def test_window_page_shows_an_error_with_markup_as_text(web: TestClient) -> None:
    index = 5
    assert status_of(index) is WindowStatus.FAILED
    text = _window(web, index).text
    assert "<script>document.title" not in text
    assert "<b>bold</b>" not in text
    assert (
        "&lt;script&gt;document.title=&#34;owned&#34;&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt; "
        "&amp; &#34;quoted&#34;" in text
    )
    assert MARKUP_ERROR.startswith("<script>")


def test_window_page_answers_404_and_400_for_missing_or_unreadable_windows(
    web: TestClient,
) -> None:
    assert (
        web.get(f"/pipelines/{PIPELINE}/windows/2030-01-01T00:00:00Z", auth=AUTH).status_code == 404
    )
    assert web.get(f"/pipelines/{PIPELINE}/windows/not-a-time", auth=AUTH).status_code == 400


# --- the re-run: refusals (the one that goes through is in tests/test_web_browser.py) ----------


def _records(store: StateStore) -> list[dict[str, Any]]:
    return [comparable(r) | {"updated_at": r.updated_at} for r in store.list_records(PIPELINE)]


def test_rerun_without_a_csrf_token_or_credentials_is_refused_and_changes_nothing(
    web: TestClient, store: StateStore
) -> None:
    before = _records(store)
    form = {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z"}
    path = f"/pipelines/{PIPELINE}/rerun"
    assert web.post(path, data=form).status_code == 401
    assert web.post(path, data={**form, "csrf_token": "x"}, auth=(USER, "wrong")).status_code == 401
    refused = web.post(path, data=form, auth=AUTH)
    assert refused.status_code == 403
    assert "CSRF" in refused.text
    forged = CsrfTokens().issue(USER)  # signed with another key
    assert web.post(path, data={**form, "csrf_token": forged}, auth=AUTH).status_code == 403
    assert _records(store) == before


@pytest.mark.parametrize(
    ("start", "end", "fragment"),
    [
        ("2026-01-01T01:00:00Z", "2026-01-01T00:00:00Z", "must be after --start"),
        ("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "beyond the newest due window"),
        ("2026-01-01T00:07:00Z", "2026-01-01T01:00:00Z", "boundar"),
        ("2026-01-01T00:00:00", "2026-01-01T01:00:00Z", "no UTC offset"),
    ],
)
def test_rerun_of_a_bad_range_is_refused_by_enqueues_own_checks_and_changes_nothing(
    web: TestClient, store: StateStore, start: str, end: str, fragment: str
) -> None:
    before = _records(store)
    token = csrf_of(web.get(f"/pipelines/{PIPELINE}", auth=AUTH).text)
    refused = web.post(
        f"/pipelines/{PIPELINE}/rerun",
        data={"start": start, "end": end, "csrf_token": token},
        auth=AUTH,
    )
    assert refused.status_code == 400
    assert fragment in refused.text
    assert "nothing was changed" in refused.text
    assert _records(store) == before


def test_rerun_beyond_the_enqueue_cap_is_refused(
    tmp_path: Path, store: StateStore, fake_redis: fakeredis.FakeRedis
) -> None:
    minutely = {"window": "1m", "start": "2020-01-01T00:00:00Z"}
    from tests.support.web_records import pipeline_body

    web = make_client(tmp_path, store, fake_redis, fine={**pipeline_body(tmp_path), **minutely})
    token = csrf_of(web.get("/pipelines/fine", auth=AUTH).text)
    refused = web.post(
        "/pipelines/fine/rerun",
        data={"start": "2020-01-01T00:00:00Z", "end": "2021-01-01T00:00:00Z", "csrf_token": token},
        auth=AUTH,
    )
    assert refused.status_code == 400
    assert "one enqueue creates at most 100,000: split the range" in refused.text
    assert store.list_records("fine") == []


def test_read_only_mode_serves_pages_without_credentials_and_has_no_action(
    tmp_path: Path, store: StateStore, fake_redis: fakeredis.FakeRedis
) -> None:
    seed_every_status(store)
    before = _records(store)
    web = make_client(tmp_path, store, fake_redis, access=Access(None, None, read_only=True))
    grid = web.get(f"/pipelines/{PIPELINE}")
    assert grid.status_code == 200
    assert "csrf_token" not in grid.text and "re-run" not in grid.text
    assert "re-run this window" not in _window(web, 3).text
    refused = web.post(
        f"/pipelines/{PIPELINE}/rerun",
        data={"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T01:00:00Z"},
    )
    assert refused.status_code in (404, 405)
    assert _records(store) == before


def test_authenticated_read_only_mode_asks_for_credentials_and_has_no_action(
    tmp_path: Path, store: StateStore, fake_redis: fakeredis.FakeRedis
) -> None:
    seed_every_status(store)
    web = make_client(tmp_path, store, fake_redis, access=Access(USER, PASSWORD, read_only=True))
    assert web.get("/").status_code == 401
    page = web.get(f"/pipelines/{PIPELINE}", auth=AUTH)
    assert page.status_code == 200 and "csrf_token" not in page.text
