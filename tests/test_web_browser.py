"""The web view in a real browser: `windowpipe web` as a subprocess over a state store (SQLite
and PostgreSQL) with windows in every status, driven by Debian's Chromium through Playwright
(`executable_path`: Playwright's own browser download cannot be fetched here; `.ci/run`
installs `chromium` when missing).

Screenshots of every page are saved under `.artifacts/web/<test>/` (gitignored); each test
prints the directory.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from core.instants import format_instant, utc_now
from core.records import WindowRecord, WindowStatus
from core.store import StateStore
from tests.support import free_port, wait_until
from tests.support.deployment import REPO, write_config
from tests.support.web_records import (
    DAY,
    MARKUP_ERROR,
    PIPELINE,
    WINDOW,
    comparable,
    opened,
    pipeline_body,
    seed_every_status,
    status_of,
)

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("WINDOWPIPE_TEST_CHROMIUM", "/usr/bin/chromium")
"""Debian's Chromium (package `chromium`)."""

CHROMIUM_FLAGS = [
    "--no-sandbox",  # the tests run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium keeps calling home, and this machine refuses those connections.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

USER, PASSWORD = "operator", "browser-test-pw"
TWIN = "twin"
"""A second pipeline seeded exactly like `orders`: the CLI re-runs it, the browser `orders`."""

ARTIFACTS = REPO / ".artifacts" / "web"

WRITTEN = "<an instant written during the test>"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        yield launched
        launched.close()


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    folder = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"screenshots: {folder}")
    return folder


class Served:
    """`windowpipe web` running over a config file."""

    def __init__(self, config_path: Path, workdir: Path) -> None:
        self.config_path = config_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "WINDOWPIPE_CONFIG": str(config_path),
            "WINDOWPIPE_WEB_USER": USER,
            "WINDOWPIPE_WEB_PASSWORD": PASSWORD,
        }
        self.log = workdir / "web.log"
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "windowpipe", "web"),
                *("--port", str(self.port), "--flower-url", "http://127.0.0.1:5555"),
            ],
            cwd=workdir,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._ready, 60, f"windowpipe web to answer (log: {self.log})")

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in self.env.items() if not k.startswith("WINDOWPIPE_WEB_")}
        return subprocess.run(
            [sys.executable, "-m", "windowpipe", *args],
            cwd=self.config_path.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)


@pytest.fixture(params=["sqlite", "postgresql"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path, redis_db: str
) -> Iterator[tuple[Served, StateStore]]:
    if request.param == "sqlite":
        url = str(request.getfixturevalue("sqlite_url"))
    else:
        url = str(request.getfixturevalue("pg_schema_url"))
    body = pipeline_body(tmp_path)
    config = write_config(
        tmp_path / "windowpipe.toml",
        {"state_url": url, "redis_url": redis_db},
        {PIPELINE: body, TWIN: body, "events": pipeline_body(tmp_path, "1h")},
    )
    with opened(url) as store:
        seed_every_status(store, PIPELINE)
        seed_every_status(store, TWIN)
        server = Served(config, tmp_path)
        try:
            yield server, store
        finally:
            server.stop()


def signed_in(browser: Browser, served: Served) -> Page:
    context = browser.new_context(
        base_url=served.url,
        http_credentials={"username": USER, "password": PASSWORD},
        viewport={"width": 1400, "height": 900},
    )
    return context.new_page()


def window_path(start: Any) -> str:
    return f"/pipelines/{PIPELINE}/windows/{format_instant(start)}"


def by_start(
    records: list[WindowRecord], written_since: datetime | None = None
) -> dict[str, dict[str, Any]]:
    """Each record's fields by window start, less the pipeline; an instant at or after
    `written_since` (the time a move wrote, such as BURY's `finished_at`) reads as WRITTEN."""
    rows = {}
    for record in records:
        fields = comparable(record)
        fields.pop("pipeline")
        for key in ("started_at", "finished_at", "checked_at"):
            value = getattr(record, key)
            if written_since is not None and value is not None and value >= written_since:
                fields[key] = WRITTEN
        rows[fields.pop("window_start")] = fields
    return rows


def test_grid_cells_match_the_records_and_the_detail_shows_counts_and_error_as_text(
    browser: Browser, served: tuple[Served, StateStore], artifacts: Path
) -> None:
    server, store = served
    page = signed_in(browser, server)

    page.goto("/")
    assert page.locator(f'tr[data-pipeline="{PIPELINE}"] td[data-key="total"]').inner_text() == "96"
    page.screenshot(path=artifacts / "pipelines.png", full_page=True)

    page.goto(f"/pipelines/{PIPELINE}?from=2026-01-01&to=2026-01-01")
    drawn = page.eval_on_selector_all(
        "#grid a", "cells => cells.map(a => [a.getAttribute('href'), a.className])"
    )
    records = store.list_records(PIPELINE)
    assert len(drawn) == len(records) == 96
    expected = {
        f"{PIPELINE}/windows/{r.window_start:%Y%m%dT%H%M%SZ}": (
            {"pending": "p", "queued": "q", "running": "r", "succeeded": "s"}.get(r.status.value)
            or {"skipped": "k", "failed": "f", "dead": "d"}[r.status.value],
            bool(r.drift),
            r.rechecks_done > 0,
        )
        for r in records
    }
    for href, classes in drawn:
        letter, *marks = classes.split()
        assert (letter, "x" in marks, "c" in marks) == expected[href], href
    # Each status is drawn in its own colour.
    colours = {
        status: page.eval_on_selector(
            f"#grid a.{letter}", "a => getComputedStyle(a).backgroundColor"
        )
        for status, letter in (("succeeded", "s"), ("failed", "f"), ("dead", "d"))
    }
    assert len(set(colours.values())) == 3, colours
    page.screenshot(path=artifacts / "grid.png", full_page=True)

    # A click on a cell opens its window: the failed one, whose error holds markup.
    failed = DAY + 5 * WINDOW
    assert status_of(5) is WindowStatus.FAILED
    page.click(f"#grid a[href='{PIPELINE}/windows/{failed:%Y%m%dT%H%M%SZ}']")
    page.wait_for_url(f"**/windows/{failed:%Y%m%dT%H%M%SZ}")
    record = store.get(PIPELINE, failed)
    assert record is not None
    assert page.inner_text("#status") == "failed"
    assert page.inner_text("#source_count") == str(record.source_count)
    assert page.inner_text("#staged_count") == str(record.staged_count)
    assert page.inner_text("#error") == MARKUP_ERROR
    assert page.locator("#error script, #error b").count() == 0
    assert page.title() != "owned"
    page.screenshot(path=artifacts / "window-failed.png", full_page=True)

    succeeded = DAY + 3 * WINDOW
    page.goto(window_path(succeeded))
    done = store.get(PIPELINE, succeeded)
    assert done is not None
    for field in ("source_count", "staged_count", "target_count"):
        assert page.inner_text(f"#{field}") == str(getattr(done, field))
    assert page.inner_text("#fence") == str(done.fence)
    page.screenshot(path=artifacts / "window-succeeded.png", full_page=True)


def test_rerun_from_the_page_changes_the_windows_exactly_as_enqueue_force(
    browser: Browser, served: tuple[Served, StateStore], artifacts: Path
) -> None:
    server, store = served
    began = utc_now()
    page = signed_in(browser, server)
    # A range (succeeded and skipped windows) from the grid's form...
    first, last = DAY + 3 * WINDOW, DAY + 5 * WINDOW
    assert [status_of(3), status_of(4)] == [WindowStatus.SUCCEEDED, WindowStatus.SKIPPED]
    page.goto(f"/pipelines/{PIPELINE}?from=2026-01-01&to=2026-01-01")
    page.fill("#rerun-range input[name=start]", format_instant(first))
    page.fill("#rerun-range input[name=end]", format_instant(last))
    page.click("#rerun-range button[type=submit]")
    assert "2 window(s) in range, 0 created, 2 reset for re-run" in page.inner_text("#message")
    page.screenshot(path=artifacts / "rerun-range.png", full_page=True)
    # ...and one dead window from its page.
    dead = DAY + 6 * WINDOW
    assert status_of(6) is WindowStatus.DEAD
    page.goto(window_path(dead))
    page.click("#rerun-window button[type=submit]")
    assert "1 window(s) in range, 0 created, 1 reset for re-run" in page.inner_text("#message")

    # The CLI does the same to the twin pipeline.
    for start, end in ((first, last), (dead, dead + WINDOW)):
        result = server.cli(
            "enqueue",
            TWIN,
            "--start",
            format_instant(start),
            "--end",
            format_instant(end),
            "--force",
        )
        assert result.returncode == 0, result.stderr

    from_page = by_start(store.list_records(PIPELINE), began)
    from_cli = by_start(store.list_records(TWIN), began)
    differences = {
        start: {
            k: (v, from_cli[start].get(k)) for k, v in fields.items() if from_cli[start].get(k) != v
        }
        for start, fields in from_page.items()
    }
    assert {start: diff for start, diff in differences.items() if diff} == {}
    assert from_page.keys() == from_cli.keys()
    for start in (first, first + WINDOW, dead):
        fields = from_page[format_instant(start)]
        assert fields["kind"] == "manual"
        assert fields["status"] in ("pending", "queued")
        # RESET: results cleared, the fence moved on past the seeded 100 + index.
        index = (start - DAY) // WINDOW
        assert fields["source_count"] is None and fields["error"] is None
        assert fields["fence"] > 100 + index


def test_posts_without_csrf_token_or_credentials_are_refused_and_change_nothing(
    browser: Browser, served: tuple[Served, StateStore], artifacts: Path
) -> None:
    server, store = served
    before = by_start(store.list_records(PIPELINE))
    before_updates = [r.updated_at for r in store.list_records(PIPELINE)]
    form = {"start": format_instant(DAY + 3 * WINDOW), "end": format_instant(DAY + 4 * WINDOW)}
    rerun = f"/pipelines/{PIPELINE}/rerun"

    page = signed_in(browser, server)
    no_token = page.request.post(rerun, form=form)
    assert no_token.status == 403
    assert "CSRF" in no_token.text()
    page.goto(window_path(DAY + 3 * WINDOW))
    token = page.get_attribute("#rerun-window input[name=csrf_token]", "value")
    assert token
    # A page of another origin posting the form: the browser sends the credentials, but the
    # forged form cannot know the token.
    forged = page.request.post(rerun, form={**form, "csrf_token": token[:-2] + "xx"})
    assert forged.status == 403

    # The same forged form submitted by the browser from a page of another origin.
    page.set_content(
        f'<form method="post" action="{server.url}{rerun}">'
        f'<input name="start" value="{form["start"]}"><input name="end" value="{form["end"]}">'
        '<button type="submit">win a prize</button></form>'
    )
    with page.expect_navigation():
        page.click("button")
    assert "missing or expired CSRF token" in page.inner_text("#message")
    page.screenshot(path=artifacts / "forged-post-refused.png")

    anonymous = browser.new_context(base_url=server.url)
    assert anonymous.request.post(rerun, form={**form, "csrf_token": token}).status == 401
    assert anonymous.request.get("/").status == 401
    anonymous.close()

    assert by_start(store.list_records(PIPELINE)) == before
    assert [r.updated_at for r in store.list_records(PIPELINE)] == before_updates


def test_detail_page_links_to_the_windows_tasks_in_flower(
    browser: Browser, served: tuple[Served, StateStore]
) -> None:
    server, _ = served
    page = signed_in(browser, server)
    page.goto(window_path(DAY + timedelta(hours=1)))
    assert page.get_attribute("#flower", "href") == "http://127.0.0.1:5555/tasks"
    assert "args:2026-01-01T01:00:00Z" in page.inner_text("main")
