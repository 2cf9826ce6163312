"""How a load names its session and decides which other load it may end (pure, offline):
PostgreSQL's `application_name` tag and Snowflake's `QUERY_TAG`, the lock holder named by
Snowflake's lock-wait error."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from connectors import sql_target
from connectors.base import Batch, Document, Manifest
from connectors.local import LocalStaging
from connectors.snowflake import sql
from connectors.sql_target import LoadTag, SqlTarget, window_key
from core.config import LocalStagingConfig, SqlTargetConfig
from core.errors import TransientError
from core.windows import Window

START = datetime(2026, 1, 1, 0, 15, tzinfo=UTC)


def test_a_load_tag_fits_postgresql_and_names_fence_window_and_label() -> None:
    tag = LoadTag("events_loaded", "p" * 200, START, 1_796_459_438_843_118)
    assert len(tag.text.encode()) <= 63  # what PostgreSQL keeps of application_name
    word, fence, key, label = tag.text.split(" ", 3)
    assert (word, int(fence), key) == ("windowpipe-load", tag.fence, tag.key)
    assert label.startswith("ppp")
    short = LoadTag("events_loaded", "orders", START, 7)
    assert short.text == f"windowpipe-load 7 {short.key} orders@2026-01-01T00:15:00Z"


@pytest.mark.integration
def test_a_load_tag_is_set_as_it_is_with_its_bounds_and_savepoint_in_one_query(
    pg_schema_url: str,
) -> None:
    # The settings go as literals in a simple query: quotes, `%` and backslashes stay as they
    # are (pipeline names cannot hold them; the tag's quoting does not rely on that).
    tag = LoadTag("events_loaded", "it's 5% \\ odd", START, 7)
    engine = sa.create_engine(pg_schema_url)
    with engine.begin() as conn:
        tag.apply(conn, savepoint="windowpipe_ledger")
        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT windowpipe_ledger")  # the savepoint is set
        settings = conn.exec_driver_sql(
            "SELECT current_setting('application_name'), current_setting('lock_timeout'),"
            " current_setting('idle_in_transaction_session_timeout')"
        ).one()
    with engine.connect() as conn:
        after = conn.exec_driver_sql("SELECT current_setting('application_name')").scalar_one()
    engine.dispose()

    assert tuple(settings) == (tag.text, "5s", "5min")
    assert "it's 5% \\ odd" in tag.text
    assert after != tag.text  # local to the transaction


def test_the_window_key_differs_by_table_pipeline_and_window_and_is_stable() -> None:
    key = window_key("events_loaded", "orders", START)
    assert len(key) == 16 and key == window_key("events_loaded", "orders", START)
    assert key != window_key("other_table", "orders", START)
    assert key != window_key("events_loaded", "orders2", START)
    assert key != window_key("events_loaded", "orders", START.replace(minute=30))


def test_a_snowflake_load_tag_is_a_safe_literal() -> None:
    assert sql.set_load_tag_sql("00ff", 12) == (
        "ALTER SESSION SET QUERY_TAG = 'windowpipe-load 12 00ff'"
    )
    with pytest.raises(ValueError):
        sql.set_load_tag_sql("x' OR '1", 12)


def test_the_lock_holder_is_read_from_snowflakes_lock_wait_message() -> None:
    message = (
        "Statement '01b2c3d4-0000-1111-0000-000123456789' has locked table 'WINDOWPIPE_LEDGER'"
        " in transaction 1733390000123456789 and this lock has not yet been released."
        " Your statement '01b2c3d4-0000-1111-0000-000987654321' was aborted because the"
        " lock wait timed out."
    )
    assert sql.lock_holder(message) == sql.LockHolder(
        "01b2c3d4-0000-1111-0000-000123456789", 1733390000123456789
    )
    assert sql.lock_holder("Statement reached its statement or warehouse timeout") is None


@pytest.mark.parametrize(
    ("query_tag", "ended"),
    [
        pytest.param("windowpipe-load 3 00ff", True, id="older fence, same window"),
        pytest.param("windowpipe-load 5 00ff", False, id="same fence"),
        pytest.param("windowpipe-load 9 00ff", False, id="newer fence"),
        pytest.param("windowpipe-load 3 aaaa", False, id="another window"),
        pytest.param("windowpipe-load", False, id="a session's probe tag, no load"),
        pytest.param("nightly-report 3 00ff", False, id="someone else's tag"),
        pytest.param(None, False, id="no tag"),
    ],
)
def test_a_load_ends_only_an_older_fence_of_the_same_window(
    query_tag: str | None, ended: bool
) -> None:
    assert sql.is_older_load(query_tag, "00ff", 5) is ended


# --- on PostgreSQL: which backends a blocked load ends ---------------------------------------


class HeldLedgerRow:
    """A session tagged like a load (`application_name`) holding a window's ledger row, as a
    frozen load would."""

    def __init__(self, url: str, application_name: str, window: Window) -> None:
        self.engine = sa.create_engine(url, connect_args={"application_name": application_name})
        self.conn = self.engine.connect()
        self.pid = int(self.conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        self.conn.execute(
            sa.text(
                "SELECT fence FROM windowpipe_ledger"
                " WHERE pipeline = 'events' AND window_start = :start FOR UPDATE"
            ),
            {"start": window.start},
        )

    def alive(self) -> bool:
        probe = sa.create_engine(str(self.engine.url))
        try:
            with probe.connect() as conn:
                found = conn.execute(
                    sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": self.pid},
                ).scalar_one()
                return bool(found)
        finally:
            probe.dispose()

    def close(self) -> None:
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            self.conn.close()
        self.engine.dispose()


def loaded_once(target: SqlTarget, staging: LocalStaging, window: Window, fence: int) -> Manifest:
    docs = [
        Document(id=f"{window.start:%H%M}-{n}", timestamp=window.start, body={"n": n})
        for n in range(3)
    ]
    manifest = staging.write_window("events", window, f"f{fence:08d}", [Batch(documents=docs)])
    target.load_window("events", manifest, staging, fence=fence)
    return manifest


@pytest.mark.integration
@pytest.mark.parametrize(
    ("holder", "ended"),
    [
        pytest.param("older fence, same window", True),
        pytest.param("newer fence, same window", False),
        pytest.param("older fence, another window", False),
        pytest.param("untagged session", False),
    ],
)
def test_a_blocked_load_ends_only_an_older_fence_of_its_own_window(
    holder: str,
    ended: bool,
    pg_schema_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sql_target, "LEDGER_WAIT_SECONDS", 1)
    monkeypatch.setattr(sql_target, "LEDGER_WAITS", 2)
    window = Window(START, START + timedelta(minutes=15))
    other = Window(window.end, window.end + timedelta(minutes=15))
    staging = LocalStaging(LocalStagingConfig(type="local", path=str(tmp_path / "staging")))
    target = SqlTarget(SqlTargetConfig(type="sql", url=pg_schema_url, table="events_loaded"))
    try:
        loaded_once(target, staging, window, fence=10)
        tag_window = other if "another window" in holder else window
        tag_fence = 11 if "older" in holder else 99
        tag = LoadTag("events_loaded", "events", tag_window.start, tag_fence).text
        held = HeldLedgerRow(pg_schema_url, "" if "untagged" in holder else tag, window)
        try:
            if ended:
                loaded_once(target, staging, window, fence=20)
                assert target.count_window("events", window) == 3
            else:
                with pytest.raises(TransientError, match="stayed locked"):
                    loaded_once(target, staging, window, fence=20)
            assert held.alive() is not ended
        finally:
            held.close()
    finally:
        target.close()
