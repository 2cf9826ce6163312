"""Window records in every status for the web view's tests (tests/test_web*.py).

`seed_every_status` creates a day of 15-minute windows of `orders` through the store, then
sets each one's status and fields as a worker would have left them (one UPDATE per window:
this is the fixture, not the behaviour under test), so the pages have something of
everything: each status, counts, errors (one holding markup), drift and rechecks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from core.config import Config, config_from_dict
from core.records import WindowKind, WindowRecord, WindowStatus
from core.store import StateStore
from core.store.schema import WINDOWS
from core.windows import windows_in_range

PIPELINE = "orders"
DAY = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = timedelta(minutes=15)
NOW = datetime(2026, 1, 3, tzinfo=UTC)
"""The instant the tests' app clock reads: every window of DAY is due."""

MARKUP_ERROR = '<script>document.title="owned"</script><b>bold</b> & "quoted"'
"""An error text with markup, as a source could return it: it must show as text."""

STATUSES = tuple(WindowStatus)


def pipeline_body(tmp: Path, window: str = "15m") -> dict[str, Any]:
    return {
        "window": window,
        "start": "2026-01-01T00:00:00Z",
        "lag": "5m",
        "max_attempts": 3,
        "source": {
            "type": "sql",
            "url": f"sqlite:///{tmp}/source.db",
            "table": "events",
            "timestamp_column": "created_at",
        },
        "staging": {"type": "local", "path": str(tmp / "staging")},
        "target": {"type": "sql", "url": f"sqlite:///{tmp}/target.db", "table": "loaded"},
    }


def web_config(tmp: Path, state_url: str, redis_url: str, **pipelines: dict[str, Any]) -> Config:
    """A config with `orders` (15m windows) and `events` (1h, no records), plus `pipelines`."""
    raw = {
        "windowpipe": {"state_url": state_url, "redis_url": redis_url},
        "pipelines": {
            PIPELINE: pipeline_body(tmp),
            "events": pipeline_body(tmp, "1h"),
            **pipelines,
        },
    }
    return config_from_dict(raw, tmp / "windowpipe.toml", require_secrets=False)


def status_of(index: int) -> WindowStatus:
    """The status the seed gives the window `index` of the day."""
    return STATUSES[index % len(STATUSES)]


def seed_every_status(store: StateStore, pipeline: str = PIPELINE) -> list[WindowRecord]:
    """A day of 15-minute windows, window i in `status_of(i)`; returns the records."""
    windows = windows_in_range(origin=DAY, size=WINDOW, start=DAY, end=DAY + timedelta(days=1))
    store.create_windows(pipeline, windows, kind=WindowKind.SCHEDULED)
    with store.engine.begin() as conn:
        for index, window in enumerate(windows):
            conn.execute(
                sa.update(WINDOWS)
                .where(WINDOWS.c.pipeline == pipeline, WINDOWS.c.window_start == window.start)
                .values(**_fields(index, window.start))
            )
    return store.list_records(pipeline)


def _fields(index: int, start: datetime) -> dict[str, Any]:
    status = status_of(index)
    values: dict[str, Any] = {"status": status.value, "fence": 100 + index}
    if status is WindowStatus.PENDING:
        return values
    values["attempts"] = 1 + index % 3
    values["started_at"] = start + timedelta(hours=1)
    if status in (WindowStatus.QUEUED, WindowStatus.RUNNING):
        values["stage"] = "extract"
        values["source_count"] = 1000 + index
        return values
    if status in (WindowStatus.FAILED, WindowStatus.DEAD):
        values["stage"] = "load"
        values["source_count"] = 1000 + index
        values["staged_count"] = 1000 + index
        values["error"] = (
            MARKUP_ERROR if status is WindowStatus.FAILED else f"load: timeout {index}"
        )
        values["finished_at"] = start + timedelta(hours=1, seconds=30)
        return values
    count = 0 if status is WindowStatus.SKIPPED else 1000 + index
    values.update(
        source_count=count,
        staged_count=None if count == 0 else count,
        target_count=None if count == 0 else count,
        manifest=None if count == 0 else f"stage/orders/{start:%Y%m%dT%H%M}/manifest.json",
        finished_at=start + timedelta(hours=1, seconds=42),
        rechecks_done=1 if index % 2 else 0,
    )
    if status is WindowStatus.SUCCEEDED and index % 14 == 3:
        values["drift"] = [
            {
                "at": "2026-01-02T01:00:00Z",
                "by": "recheck",
                "count_before": count - 5,
                "count_after": count,
                "version_before": None,
                "version_after": None,
            }
        ]
    return values


def comparable(record: WindowRecord) -> dict[str, Any]:
    """A record's fields less those that are instants of when a write happened."""
    fields = record.to_json()
    for key in ("id", "created_at", "updated_at"):
        fields.pop(key)
    return fields


@contextmanager
def opened(url: str) -> Iterator[StateStore]:
    """A migrated state store at `url`, disposed after."""
    store = StateStore(url)
    try:
        store.migrate()
        yield store
    finally:
        store.dispose()
