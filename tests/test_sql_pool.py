"""The SQL connectors' pooled connections: checked at checkout only when they may have died
(`connectors.sql.checkout_ping_needed`), and a dead one is still replaced silently (README:
"a pooled connection found dead at checkout is replaced once before use"); a source's
session keeps no time zone of its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from connectors import shared
from connectors.local import LocalStaging
from connectors.sql import IDLE_PING_SECONDS, SqlSource, checkout_ping_needed
from connectors.sql_target import SqlTarget
from core.config import LocalStagingConfig, SqlSourceConfig, SqlTargetConfig
from core.windows import Window

WINDOWS = [
    Window(datetime(2026, 11, 1, n, tzinfo=UTC), datetime(2026, 11, 1, n + 1, tzinfo=UTC))
    for n in range(2)
]


@pytest.mark.parametrize(
    ("idle_seconds", "has_input", "pinged"),
    [
        (None, False, False),  # just opened
        (None, True, False),
        (0.0, False, False),  # the next task a moment later: no round trip
        (IDLE_PING_SECONDS, False, False),
        (IDLE_PING_SECONDS + 0.001, False, True),  # long idle: may have been dropped silently
        (3600.0, False, True),
        (0.0, True, True),  # the server ended it (its last message waits on the socket)
        (IDLE_PING_SECONDS + 1, True, True),
    ],
)
def test_a_connection_is_pinged_at_checkout_only_when_it_may_have_died(
    idle_seconds: float | None, has_input: bool, pinged: bool
) -> None:
    assert checkout_ping_needed(idle_seconds, has_input) is pinged


@pytest.fixture
def events_url(pg_schema_url: str) -> Iterator[str]:
    """A schema holding `events` with two rows in each of `WINDOWS`."""
    engine = sa.create_engine(pg_schema_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE events (id BIGINT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL)"
        )
        conn.execute(
            sa.text("INSERT INTO events VALUES (:id, :at)"),
            [
                {"id": number * 10 + row, "at": window.start + timedelta(minutes=row + 1)}
                for number, window in enumerate(WINDOWS)
                for row in range(2)
            ],
        )
    engine.dispose()
    yield pg_schema_url
    shared.close_all()


def _backend_pids(engine: sa.Engine) -> set[int]:
    with engine.connect() as conn:
        return {int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())}


def _terminate(url: str, pids: set[int]) -> None:
    """End the backends `pids` as an administrator would, and wait until they are gone."""
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        for pid in pids:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            alive = conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                {"pids": list(pids)},
            ).scalar_one()
            if alive == 0:
                break
            time.sleep(0.05)
    admin.dispose()


class Stages:
    """A SQL source and target on `url` and a local staging, as the stages use them."""

    def __init__(self, url: str, staging: Path) -> None:
        self.source = SqlSource(SqlSourceConfig(type="sql", url=url, table="events"))
        self.target = SqlTarget(SqlTargetConfig(type="sql", url=url, table="loaded"))
        self.staging = LocalStaging(LocalStagingConfig(type="local", path=str(staging)))
        self.fence = 0

    def run_window(self, number: int) -> None:
        """Precheck, extract, load and audit of `WINDOWS[number]`; raises on any error."""
        window = WINDOWS[number]
        self.fence += 1
        assert self.source.fingerprint(window).count == 2
        batches = self.source.iter_batches(window)
        manifest = self.staging.write_window("p", window, f"r{self.fence}", batches)
        assert self.target.load_window("p", manifest, self.staging, fence=self.fence) == 2
        assert self.target.audit_window("p", window).rows == 2
        assert self.source.fingerprint(window).count == 2

    def engines(self) -> list[sa.Engine]:
        return [self.source._connect()[0], self.target._connect()[0]]

    def close(self) -> None:
        self.source.close()
        self.target.close()


def test_a_live_connection_pinged_after_idling_is_kept_and_serves_every_stage(
    events_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = Stages(events_url, tmp_path)
    stages.run_window(0)
    before = set().union(*(_backend_pids(engine) for engine in stages.engines()))

    monkeypatch.setattr("connectors.sql.IDLE_PING_SECONDS", -1.0)  # every checkout pings
    stages.run_window(1)
    stages.run_window(0)

    assert set().union(*(_backend_pids(engine) for engine in stages.engines())) == before
    stages.close()


def test_pooled_connections_terminated_between_two_windows_are_replaced_without_an_error(
    events_url: str, tmp_path: Path
) -> None:
    stages = Stages(events_url, tmp_path)
    source, target, run_window = stages.source, stages.target, stages.run_window

    run_window(0)
    engines = [source._connect()[0], target._connect()[0]]
    before = set().union(*(_backend_pids(engine) for engine in engines))

    _terminate(events_url, before)
    run_window(1)  # raises if a stage met a dead connection

    after = set().union(*(_backend_pids(engine) for engine in engines))
    assert before.isdisjoint(after)
    source.close()
    target.close()


def test_a_source_reads_the_same_instants_in_any_session_time_zone_and_leaves_it_as_it_was(
    events_url: str,
) -> None:
    # The session's default zone as a server or role setting would make it; page_size 1 reads
    # the window in its transaction (`SET LOCAL TIME ZONE 'UTC'`), 1,000 in one statement.
    kolkata = events_url + "%20-ctimezone%3DAsia/Kolkata"
    read: dict[int, list[tuple[str, datetime]]] = {}
    for page_size in (1, 1000):
        source = SqlSource(
            SqlSourceConfig(type="sql", url=kolkata, table="events", page_size=page_size)
        )
        read[page_size] = [
            (document.body["created_at"], document.timestamp)
            for batch in source.iter_batches(WINDOWS[0])
            for document in batch.documents
        ]
        with source._connect()[0].connect() as conn:
            # No session state kept (PgBouncer's transaction pooling shares server sessions).
            assert conn.exec_driver_sql("SHOW TimeZone").scalar_one() == "Asia/Kolkata"
        source.close()

    stamps = [WINDOWS[0].start + timedelta(minutes=minute) for minute in (1, 2)]
    expected = [(stamp.strftime("%Y-%m-%dT%H:%M:%SZ"), stamp) for stamp in stamps]
    assert read[1] == read[1000] == expected
