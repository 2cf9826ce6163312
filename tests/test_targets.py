"""One contract suite for every target: `SnowflakeTarget` on fakesnow's server (the real
snowflake-connector over HTTP, an external `file://` Snowflake stage over a `LocalStaging`
directory) and `SqlTarget` on PostgreSQL and SQLite; then the Snowflake SQL builders offline.

Fencing: every target keeps a ledger row per window (the newest fence that loaded it) and
refuses a load whose fence is older. Loads that overlap in time are tested where the
database really makes the later one wait: PostgreSQL (the ledger row lock) and SQLite (the
write lock taken at BEGIN IMMEDIATE). fakesnow's DuckDB does not wait on locks - a second
transaction writing the same ledger row fails at once with "Conflict on update", which reaches
the client as HTTP 500 and is classified transient - so on Snowflake only the sequential
orders are tested; the waiting is Snowflake's documented DML locking, not verified here.

fakesnow 0.12 cannot run a transforming COPY (`COPY INTO t FROM (SELECT $1, METADATA$FILENAME,
METADATA$FILE_ROW_NUMBER FROM @stage/...)`), which the target uses to keep each row's lineage.
`windowpipe.demo.fakesnow.teach_fakesnow_metadata_copy` extends its COPY translation for exactly
that select list (the file's JSON value, its path relative to the stage, its 1-based line number);
everything else (stage resolution, FILES=, gzip JSON parsing, ON_ERROR, transactions, VARIANT paths,
binding) is fakesnow's own.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import snowflake.connector
import sqlalchemy as sa
import sqlglot
from snowflake.connector import errors as sf_errors
from sqlglot import exp

from connectors.local import LocalStaging
from connectors.snowflake import SnowflakeTarget, sql
from connectors.snowflake.client import translate
from connectors.sql_target import SqlTarget, ledger_table, record_fence, target_table
from core.checksum import EMPTY_CHECKSUM, ids_checksum
from core.config import LocalStagingConfig, SnowflakeTargetConfig, SqlTargetConfig
from core.errors import LostOwnershipError, StaleFenceError, TerminalError, TransientError
from core.instants import as_utc
from core.ports import Batch, Document, Manifest, StagingArea, Target, TargetAudit
from core.windows import Window
from tests.support import wait_until
from windowpipe.demo.fakesnow import teach_fakesnow_metadata_copy

PIPELINE = "orders"
WINDOW = Window(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 1, 0, 15, tzinfo=UTC))
NEXT_WINDOW = Window(WINDOW.end, WINDOW.end + timedelta(minutes=15))
SF_PASSWORD_ENV = "WP_TEST_SF_PASSWORD"


# --- fakesnow ---------------------------------------------------------------------------------


def snowflake_config(
    kwargs: dict[str, Any], database: str, **overrides: Any
) -> SnowflakeTargetConfig:
    values: dict[str, Any] = {
        "type": "snowflake",
        "account": kwargs["account"],
        "user": kwargs["user"],
        "password_env": SF_PASSWORD_ENV,
        "database": database,
        "schema": "EVENTS",
        "table": "ORDERS_LOADED",
        "stage": "ORDERS_STAGE",
        "host": kwargs["host"],
        "port": kwargs["port"],
        "protocol": kwargs["protocol"],
        "login_timeout": 5,
    }
    return SnowflakeTargetConfig(**(values | overrides))


# --- backends ---------------------------------------------------------------------------------


@dataclass
class Backend:
    """A target under test, the staging it loads from, and a way to look at its table."""

    name: str
    staging: LocalStaging
    make: Callable[..., Target]
    """A new target over the same table (keyword overrides of its config)."""
    rows: Callable[[Window], list[dict[str, Any]]]
    """The window's rows: doc_id, doc (parsed), window_end (aware UTC), source_file, file_row."""
    drop_table: Callable[[], None]
    ledger: Callable[[Window], list[dict[str, Any]]]
    """The window's ledger rows (one once loaded): fence, row_count, loaded_at (aware UTC)."""
    url: str = ""
    """The SQL backends' database URL."""
    add_ledger_row: Callable[[Window, int], None] | None = None
    """Snowflake: insert one more ledger row for the window. Snowflake does not enforce
    primary keys, so a ledger can come to hold duplicates; fakesnow's DuckDB would, so the
    first call recreates the (empty) ledger without its key, as Snowflake treats it."""


def _snowflake_backend(
    kwargs: dict[str, Any], staging: LocalStaging, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    monkeypatch.setenv(SF_PASSWORD_ENV, kwargs["password"])
    database = f"WP_{uuid.uuid4().hex[:8].upper()}"
    plain = {k: v for k, v in kwargs.items() if k != "session_parameters"}
    admin = snowflake.connector.connect(**plain, database=database, schema="EVENTS")
    admin.cursor().execute(
        f'CREATE STAGE "{database}"."EVENTS"."ORDERS_STAGE" URL=\'file://{staging.root}/\''
    )
    teach_fakesnow_metadata_copy(staging.root)
    table = f'"{database}"."EVENTS"."ORDERS_LOADED"'
    ledger_name = f'"{database}"."EVENTS"."ORDERS_LOADED_WINDOWPIPE_LEDGER"'
    targets: list[SnowflakeTarget] = []

    def make(**overrides: Any) -> Target:
        target = SnowflakeTarget(snowflake_config(kwargs, database, **overrides))
        targets.append(target)
        return target

    def rows(window: Window) -> list[dict[str, Any]]:
        cursor = admin.cursor()
        cursor.execute(
            "SELECT doc_id, TO_JSON(doc), window_end, source_file, file_row "
            f"FROM {table} WHERE pipeline = %s AND window_start = %s",
            (PIPELINE, window.start.replace(tzinfo=None)),
        )
        return [
            {
                "doc_id": doc_id,
                "doc": json.loads(doc),
                "window_end": end.replace(tzinfo=UTC),
                "source_file": source_file,
                "file_row": int(file_row),
            }
            for doc_id, doc, end, source_file, file_row in cursor.fetchall()
        ]

    def drop_table() -> None:
        admin.cursor().execute(f"DROP TABLE {table}")

    def ledger(window: Window) -> list[dict[str, Any]]:
        cursor = admin.cursor()
        cursor.execute(
            f"SELECT fence, row_count, loaded_at FROM {ledger_name} "
            "WHERE pipeline = %s AND window_start = %s",
            (PIPELINE, window.start.replace(tzinfo=None)),
        )
        return [
            {"fence": int(fence), "row_count": int(count), "loaded_at": as_utc(at)}
            for fence, count, at in cursor.fetchall()
        ]

    unenforced: list[bool] = []

    def add_ledger_row(window: Window, fence: int) -> None:
        if not unenforced:
            admin.cursor().execute(f"DROP TABLE {ledger_name}")
            admin.cursor().execute(
                sql.create_ledger_sql(ledger_name).replace(
                    ", PRIMARY KEY (pipeline, window_start)", ""
                )
            )
            unenforced.append(True)
        admin.cursor().execute(
            f"INSERT INTO {ledger_name} (pipeline, window_start, fence, row_count, loaded_at) "
            "VALUES (%s, %s, %s, 0, %s)",
            (PIPELINE, window.start.replace(tzinfo=None), fence, datetime(2026, 1, 1)),
        )

    yield Backend(
        "snowflake", staging, make, rows, drop_table, ledger, add_ledger_row=add_ledger_row
    )
    for target in targets:
        target.close()
    admin.close()


def _sql_backend(name: str, url: str, staging: LocalStaging) -> Iterator[Backend]:
    engine = sa.create_engine(url)
    targets: list[SqlTarget] = []

    def make(**overrides: Any) -> Target:
        values: dict[str, Any] = {"type": "sql", "url": url, "table": "events_loaded"}
        target = SqlTarget(SqlTargetConfig(**(values | {"batch_size": 7} | overrides)))
        targets.append(target)
        return target

    def rows(window: Window) -> list[dict[str, Any]]:
        table = target_table("events_loaded", sa.MetaData())
        start = window.start if name == "postgresql" else window.start.replace(tzinfo=None)
        query = sa.select(
            table.c.doc_id, table.c.doc, table.c.window_end, table.c.source_file, table.c.file_row
        ).where(table.c.pipeline == PIPELINE, table.c.window_start == start)
        with engine.connect() as conn:
            return [
                {
                    "doc_id": doc_id,
                    "doc": doc,
                    "window_end": as_utc(end),
                    "source_file": source_file,
                    "file_row": file_row,
                }
                for doc_id, doc, end, source_file, file_row in conn.execute(query)
            ]

    def drop_table() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE events_loaded"))

    def ledger(window: Window) -> list[dict[str, Any]]:
        table = ledger_table("events_loaded", sa.MetaData())
        start = window.start if name == "postgresql" else window.start.replace(tzinfo=None)
        query = sa.select(table.c.fence, table.c.row_count, table.c.loaded_at).where(
            table.c.pipeline == PIPELINE, table.c.window_start == start
        )
        with engine.connect() as conn:
            return [
                {"fence": fence, "row_count": count, "loaded_at": as_utc(at)}
                for fence, count, at in conn.execute(query)
            ]

    yield Backend(name, staging, make, rows, drop_table, ledger, url)
    for target in targets:
        target.close()
    engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("snowflake", marks=pytest.mark.integration),
        pytest.param("postgresql", marks=pytest.mark.integration),
        "sqlite",
    ]
)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    # Small parts, so that a window spans several files and lineage is exercised.
    staging = LocalStaging(
        LocalStagingConfig(type="local", path=str(tmp_path / "staging"), max_file_bytes=4096)
    )
    if request.param == "snowflake":
        yield from _snowflake_backend(
            request.getfixturevalue("fakesnow_server"), staging, monkeypatch
        )
    elif request.param == "postgresql":
        yield from _sql_backend("postgresql", request.getfixturevalue("pg_schema_url"), staging)
    else:
        yield from _sql_backend("sqlite", request.getfixturevalue("sqlite_url"), staging)


# --- documents --------------------------------------------------------------------------------


def documents(window: Window, count: int, tag: str = "a") -> list[Document]:
    return [
        Document(
            id=f"{tag}-{index}",
            timestamp=window.start + timedelta(seconds=index % 900),
            body={"id": f"{tag}-{index}", "n": index, "tag": tag, "nested": {"list": [1, 2.5]}},
        )
        for index in range(count)
    ]


def stage_window(staging: StagingArea, window: Window, docs: list[Document], run: str) -> Manifest:
    return staging.write_window(PIPELINE, window, run, [Batch(documents=docs)])


def staged_lines(
    staging: LocalStaging, manifest: Manifest
) -> dict[tuple[str, int], dict[str, Any]]:
    """(file, 1-based line) -> the staged object, for checking lineage."""
    lines = {}
    for staged in manifest.files:
        for number, line in enumerate(staging.iter_lines(staged.path), start=1):
            lines[(staged.path, number)] = json.loads(line)
    return lines


# --- the contract -----------------------------------------------------------------------------


def test_loading_a_window_stores_each_document_once_with_its_lineage(backend: Backend) -> None:
    target = backend.make()
    docs = documents(WINDOW, 40)
    manifest = stage_window(backend.staging, WINDOW, docs, "run1")
    assert len(manifest.files) > 1

    assert target.load_window(PIPELINE, manifest, backend.staging, fence=1) == 40
    assert target.count_window(PIPELINE, WINDOW) == 40
    rows = backend.rows(WINDOW)
    assert sorted(row["doc_id"] for row in rows) == sorted(doc.id for doc in docs)
    assert {row["doc_id"]: row["doc"] for row in rows} == {doc.id: doc.body for doc in docs}
    assert {row["window_end"] for row in rows} == {WINDOW.end}
    lines = staged_lines(backend.staging, manifest)
    assert {(row["source_file"], row["file_row"]) for row in rows} == set(lines)
    for row in rows:
        assert lines[(row["source_file"], row["file_row"])]["id"] == row["doc_id"]


def test_loading_the_same_manifest_again_does_not_duplicate(backend: Backend) -> None:
    target = backend.make()
    manifest = stage_window(backend.staging, WINDOW, documents(WINDOW, 25), "run1")
    target.load_window(PIPELINE, manifest, backend.staging, fence=1)

    assert target.load_window(PIPELINE, manifest, backend.staging, fence=2) == 25
    assert (
        backend.make().load_window(PIPELINE, manifest, backend.staging, fence=3) == 25
    )  # another worker
    assert target.count_window(PIPELINE, WINDOW) == 25
    assert len({row["doc_id"] for row in backend.rows(WINDOW)}) == 25


def test_loading_a_re_extracted_window_replaces_its_rows(backend: Backend) -> None:
    target = backend.make()
    first = stage_window(backend.staging, WINDOW, documents(WINDOW, 30, "old"), "run1")
    target.load_window(PIPELINE, first, backend.staging, fence=1)

    second = stage_window(backend.staging, WINDOW, documents(WINDOW, 12, "new"), "run2")
    assert target.load_window(PIPELINE, second, backend.staging, fence=2) == 12

    assert target.count_window(PIPELINE, WINDOW) == 12
    assert {row["doc"]["tag"] for row in backend.rows(WINDOW)} == {"new"}


def test_reloading_a_window_leaves_the_next_window_untouched(backend: Backend) -> None:
    target = backend.make()
    target.load_window(
        PIPELINE,
        stage_window(backend.staging, NEXT_WINDOW, documents(NEXT_WINDOW, 9, "b"), "r1"),
        backend.staging,
        fence=1,
    )
    manifest = stage_window(backend.staging, WINDOW, documents(WINDOW, 5), "r1")
    target.load_window(PIPELINE, manifest, backend.staging, fence=1)
    target.load_window(PIPELINE, manifest, backend.staging, fence=2)

    assert target.count_window(PIPELINE, WINDOW) == 5
    assert target.count_window(PIPELINE, NEXT_WINDOW) == 9
    assert {row["doc"]["tag"] for row in backend.rows(NEXT_WINDOW)} == {"b"}


def test_an_empty_manifest_empties_the_window(backend: Backend) -> None:
    target = backend.make()
    assert target.count_window(PIPELINE, WINDOW) == 0
    target.load_window(
        PIPELINE,
        stage_window(backend.staging, WINDOW, documents(WINDOW, 3), "r1"),
        backend.staging,
        fence=1,
    )

    empty = stage_window(backend.staging, WINDOW, [], "r2")
    assert empty.rows == 0
    assert target.load_window(PIPELINE, empty, backend.staging, fence=2) == 0
    assert target.count_window(PIPELINE, WINDOW) == 0


def test_unicode_and_large_documents_round_trip(backend: Backend) -> None:
    target = backend.make()
    bodies: list[dict[str, Any]] = [
        {"text": "Grüße, 東京, emoji 🧪, rtl שלום", "quote": 'it\'s "quoted" \\ back'},
        {
            "big": "x" * 300_000,
            "values": list(range(2000)),
            "deep": {"a": {"b": {"c": [None, True]}}},
        },
        {"numbers": [0, -1, 1.5, 1e-7, 12345678901234], "empty": {}, "none": None, "list": []},
    ]
    docs = [
        Document(id=f"ü-{index}", timestamp=WINDOW.start, body=body)
        for index, body in enumerate(bodies)
    ]
    manifest = stage_window(backend.staging, WINDOW, docs, "r1")

    assert target.load_window(PIPELINE, manifest, backend.staging, fence=1) == 3
    assert {row["doc_id"]: row["doc"] for row in backend.rows(WINDOW)} == {
        doc.id: doc.body for doc in docs
    }


def test_a_manifest_that_disagrees_with_its_files_is_refused_and_nothing_changes(
    backend: Backend,
) -> None:
    target = backend.make()
    manifest = stage_window(backend.staging, WINDOW, documents(WINDOW, 6), "r1")
    target.load_window(PIPELINE, manifest, backend.staging, fence=1)
    replacement = stage_window(backend.staging, WINDOW, documents(WINDOW, 4, "new"), "r2")
    replacement.rows = 5  # the files hold 4

    with pytest.raises(TerminalError, match="manifest"):
        target.load_window(PIPELINE, replacement, backend.staging, fence=2)
    assert target.count_window(PIPELINE, WINDOW) == 6


def test_counting_a_dropped_table_is_terminal(backend: Backend) -> None:
    target = backend.make()
    assert target.count_window(PIPELINE, WINDOW) == 0  # creates the table
    backend.drop_table()

    with pytest.raises(TerminalError):
        target.count_window(PIPELINE, WINDOW)


# --- the contract: fenced loads ---------------------------------------------------------------

A_FENCE, B_FENCE = 3, 5
"""A paused owner's fence and the fence of the owner that took the window over."""


@dataclass
class FencedLoad:
    """A load staged under its fence's run, with documents tagged by the fence."""

    fence: int
    manifest: Manifest
    ids: set[str]


def fenced_load(staging: LocalStaging, fence: int, count: int) -> FencedLoad:
    """Stage the window for the owner holding `fence` (replacing earlier runs' files, as a real
    extract does)."""
    docs = documents(WINDOW, count, tag=f"f{fence}")
    manifest = stage_window(staging, WINDOW, docs, f"f{fence:08d}")
    return FencedLoad(fence, manifest, {doc.id for doc in docs})


@pytest.mark.parametrize(
    ("first", "second"),
    [(A_FENCE, B_FENCE), (B_FENCE, A_FENCE), (B_FENCE, B_FENCE)],
    ids=["older-then-newer", "newer-then-older", "same-fence-twice"],
)
def test_a_load_whose_fence_is_older_is_refused_and_changes_nothing(
    backend: Backend, first: int, second: int
) -> None:
    worker_one, worker_two = backend.make(), backend.make()
    counts = {A_FENCE: 7, B_FENCE: 5}

    earlier = fenced_load(backend.staging, first, counts[first])
    assert (
        worker_one.load_window(PIPELINE, earlier.manifest, backend.staging, first) == counts[first]
    )
    before = (backend.rows(WINDOW), backend.ledger(WINDOW))
    later = fenced_load(backend.staging, second, counts[second])
    if second >= first:
        # A newer fence replaces the rows; the same fence again is its owner's own retry.
        assert worker_two.load_window(PIPELINE, later.manifest, backend.staging, second) == 5
    else:
        with pytest.raises(StaleFenceError) as refused:
            worker_two.load_window(PIPELINE, later.manifest, backend.staging, second)
        message = str(refused.value)
        assert message.startswith("snowflake target: " if backend.name == "snowflake" else "sql")
        assert (
            f"refused a stale load of window {PIPELINE} 2026-11-01T00:00:00Z: its fence "
            f"{second} is older than fence {first}, which loaded the window last"
        ) in message
        assert "\n" not in message
        assert isinstance(refused.value, LostOwnershipError)  # the runner stops, no retry
        assert (backend.rows(WINDOW), backend.ledger(WINDOW)) == before

    # Either way: the rows of the fence-5 load, once, and the ledger says so.
    newest = earlier if first == B_FENCE else later
    rows = backend.rows(WINDOW)
    assert sorted(row["doc_id"] for row in rows) == sorted(newest.ids)
    assert worker_one.count_window(PIPELINE, WINDOW) == 5
    [entry] = backend.ledger(WINDOW)
    assert (entry["fence"], entry["row_count"]) == (B_FENCE, 5)


def test_the_ledger_records_the_fence_and_rows_of_each_window_load(backend: Backend) -> None:
    target = backend.make()
    assert target.count_window(PIPELINE, WINDOW) == 0  # creates the table and its ledger
    assert backend.ledger(WINDOW) == []
    before = datetime.now(UTC)

    target.load_window(PIPELINE, fenced_load(backend.staging, 3, 7).manifest, backend.staging, 3)
    [entry] = backend.ledger(WINDOW)
    assert (entry["fence"], entry["row_count"]) == (3, 7)
    # fakesnow's server mode truncates instants to the second.
    assert entry["loaded_at"] >= before.replace(microsecond=0) - timedelta(seconds=1)

    empty = stage_window(backend.staging, WINDOW, [], "f00000009")
    target.load_window(PIPELINE, empty, backend.staging, 9)
    [entry] = backend.ledger(WINDOW)
    assert (entry["fence"], entry["row_count"]) == (9, 0)
    assert backend.ledger(NEXT_WINDOW) == []


def test_a_refused_load_leaves_other_windows_loadable(backend: Backend) -> None:
    target = backend.make()
    target.load_window(PIPELINE, fenced_load(backend.staging, 5, 4).manifest, backend.staging, 5)
    with pytest.raises(StaleFenceError):
        target.load_window(
            PIPELINE, fenced_load(backend.staging, 3, 2).manifest, backend.staging, 3
        )

    # Fences are per window: fence 1 of the next window is its first load.
    manifest = stage_window(backend.staging, NEXT_WINDOW, documents(NEXT_WINDOW, 6, "n"), "r1")
    assert target.load_window(PIPELINE, manifest, backend.staging, 1) == 6
    assert target.count_window(PIPELINE, WINDOW) == 4


# --- overlapping loads (PostgreSQL and SQLite) ---------------------------------------------------


class PostgresHold:
    """A test connection holding the target table in EXCLUSIVE mode: a load's ledger upsert
    goes through, then its DELETE waits, inside its transaction. `pg_stat_activity` shows who
    waits where."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)
        self.conn = self.engine.connect()

    def __enter__(self) -> PostgresHold:
        self.conn.execute(sa.text("LOCK TABLE events_loaded IN EXCLUSIVE MODE"))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
        self.conn.close()
        self.engine.dispose()

    def release(self) -> None:
        if self.conn.in_transaction():
            self.conn.rollback()

    def _waiting(self, pattern: str) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND query ILIKE :pattern"
                    ),
                    {"pattern": pattern},
                ).scalar_one()
            )

    def wait_inside(self, thread: str) -> None:
        """The first load has its ledger row and waits at its DELETE."""
        wait_until(
            lambda: self._waiting("DELETE FROM%events_loaded%") == 1,
            timeout=30,
            what="the first load to block",
            every=0.02,
        )

    def wait_queued(self, thread: str) -> None:
        """The second load waits on the first one's ledger row."""
        wait_until(
            lambda: self._waiting("%windowpipe_ledger%") == 1,
            timeout=30,
            what="the second load to queue",
            every=0.02,
        )


class SqliteHold:
    """A test connection holding a read transaction (SQLite's SHARED lock): a load takes the
    write lock at BEGIN IMMEDIATE, runs its statements and then waits to COMMIT, inside its
    transaction; a second load waits at its own BEGIN IMMEDIATE. SQLite shows no waiters, so
    the statements each load's thread sends are watched through SQLAlchemy's engine events
    (observed, not changed)."""

    def __init__(self, url: str) -> None:
        self.reader = sqlite3.connect(sa.make_url(url).database or "", isolation_level=None)
        self.seen: set[tuple[str, str]] = set()
        self._changed = threading.Condition()

    def _note(self, kind: str) -> None:
        with self._changed:
            self.seen.add((threading.current_thread().name, kind))
            self._changed.notify_all()

    def _statement(self, conn: sa.Connection, cursor: Any, statement: str, *_: Any) -> None:
        self._note(statement)

    def _commit(self, conn: sa.Connection) -> None:
        self._note("COMMIT")  # before the driver's commit, which then waits

    def __enter__(self) -> SqliteHold:
        sa.event.listen(sa.Engine, "before_cursor_execute", self._statement)
        sa.event.listen(sa.Engine, "commit", self._commit)
        self.reader.execute("BEGIN")
        self.reader.execute("SELECT count(*) FROM events_loaded").fetchall()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
        self.reader.close()
        sa.event.remove(sa.Engine, "before_cursor_execute", self._statement)
        sa.event.remove(sa.Engine, "commit", self._commit)

    def release(self) -> None:
        if self.reader.in_transaction:
            self.reader.execute("ROLLBACK")

    def _wait_seen(self, thread: str, kind: str, what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: (thread, kind) in self.seen, timeout=30):
                raise AssertionError(f"{what}: not seen in 30s")

    def wait_inside(self, thread: str) -> None:
        """The first load sent COMMIT, which waits for the reader to finish."""
        self._wait_seen(thread, "COMMIT", "first load at COMMIT")

    def wait_queued(self, thread: str) -> None:
        """The second load sent BEGIN IMMEDIATE, which waits for the first's write lock."""
        self._wait_seen(thread, "BEGIN IMMEDIATE", "second load at BEGIN IMMEDIATE")


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.integration), "sqlite"])
def sql_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    staging = LocalStaging(
        LocalStagingConfig(type="local", path=str(tmp_path / "staging"), max_file_bytes=4096)
    )
    url = request.getfixturevalue(
        "pg_schema_url" if request.param == "postgresql" else "sqlite_url"
    )
    yield from _sql_backend(request.param, str(url), staging)


@pytest.mark.parametrize(
    ("first", "second"),
    [(A_FENCE, B_FENCE), (B_FENCE, A_FENCE)],
    ids=["older-holds-newer-waits", "newer-holds-older-waits"],
)
def test_overlapping_loads_of_one_window_serialise_and_leave_its_rows_once(
    sql_backend: Backend, first: int, second: int
) -> None:
    # Each owner's run in a staging directory of its own: staging B's run in A's would delete
    # the files A is about to read inside its transaction.
    root = Path(sql_backend.staging.config.path)
    stages = {
        fence: LocalStaging(LocalStagingConfig(type="local", path=str(root / f"owner-{fence}")))
        for fence in (A_FENCE, B_FENCE)
    }
    loads = {fence: fenced_load(stages[fence], fence, 10 - fence) for fence in stages}
    workers = {fence: sql_backend.make() for fence in loads}
    for worker in workers.values():  # both connected, the table and ledger created
        assert worker.count_window(PIPELINE, WINDOW) == 0
    hold = (
        PostgresHold(sql_backend.url)
        if sql_backend.name == "postgresql"
        else SqliteHold(sql_backend.url)
    )
    futures: dict[int, Future[int]] = {}
    with hold, ThreadPoolExecutor(2, thread_name_prefix="load") as pool:

        def start(fence: int) -> str:
            name = f"load-fence-{fence}"

            def run() -> int:
                threading.current_thread().name = name
                return workers[fence].load_window(
                    PIPELINE, loads[fence].manifest, stages[fence], fence
                )

            futures[fence] = pool.submit(run)
            return name

        hold.wait_inside(start(first))
        hold.wait_queued(start(second))
        assert not futures[first].done() and not futures[second].done()
        hold.release()

        assert futures[first].result(timeout=60) == 10 - first
        if second > first:
            assert futures[second].result(timeout=60) == 10 - second
        else:
            with pytest.raises(StaleFenceError, match=f"its fence {second} is older"):
                futures[second].result(timeout=60)

    rows = sql_backend.rows(WINDOW)
    assert sorted(row["doc_id"] for row in rows) == sorted(loads[B_FENCE].ids)
    [entry] = sql_backend.ledger(WINDOW)
    assert (entry["fence"], entry["row_count"]) == (B_FENCE, 5)


@pytest.mark.parametrize("dialect_upsert", [True, False], ids=["upsert", "portable"])
def test_recording_a_fence_moves_only_forward(sql_backend: Backend, dialect_upsert: bool) -> None:
    engine = sa.create_engine(sql_backend.url)
    ledger = ledger_table("events_loaded", sa.MetaData())
    ledger.create(engine)
    start = WINDOW.start if sql_backend.name == "postgresql" else WINDOW.start.replace(tzinfo=None)
    recorded = []
    try:
        for fence in (3, 5, 4, 5, 6):
            with engine.begin() as conn:
                recorded.append(
                    record_fence(
                        conn,
                        ledger,
                        pipeline=PIPELINE,
                        window_start=start,
                        fence=fence,
                        rows=fence * 10,
                        loaded_at=start,
                        dialect_upsert=dialect_upsert,
                    )
                )
        with engine.connect() as conn:
            stored = conn.execute(sa.select(ledger.c.fence, ledger.c.row_count)).all()
    finally:
        engine.dispose()
    assert recorded == [None, None, 5, None, None]  # 5 again: its owner's retry
    assert [tuple(row) for row in stored] == [(6, 60)]


# --- Snowflake only ---------------------------------------------------------------------------


@pytest.fixture
def snowflake_backend(
    fakesnow_server: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    staging = LocalStaging(
        LocalStagingConfig(type="local", path=str(tmp_path / "staging"), max_file_bytes=1024)
    )
    yield from _snowflake_backend(fakesnow_server, staging, monkeypatch)


@pytest.mark.integration
def test_snowflake_loads_more_than_1000_files_in_several_copies(snowflake_backend: Backend) -> None:
    # Each ~900-byte document fills a 1 KiB part on its own: 1,005 documents, 1,005 files.
    docs = [
        Document(id=str(index), timestamp=WINDOW.start, body={"pad": "p" * 900, "n": index})
        for index in range(1005)
    ]
    manifest = stage_window(snowflake_backend.staging, WINDOW, docs, "r1")
    assert len(manifest.files) == 1005
    statements = sql.copy_statements('"L"', '"S"', [f.path for f in manifest.files])
    assert [statement.count(".ndjson.gz'") for statement in statements] == [1000, 5]

    target = snowflake_backend.make()
    assert target.load_window(PIPELINE, manifest, snowflake_backend.staging, fence=1) == 1005
    assert target.count_window(PIPELINE, WINDOW) == 1005


@pytest.mark.integration
def test_snowflake_missing_stage_is_terminal_and_keeps_the_window(
    snowflake_backend: Backend,
) -> None:
    manifest = stage_window(snowflake_backend.staging, WINDOW, documents(WINDOW, 4), "r1")
    snowflake_backend.make().load_window(PIPELINE, manifest, snowflake_backend.staging, fence=1)

    with pytest.raises(TerminalError, match="does not exist") as caught:
        snowflake_backend.make(stage="NO_SUCH_STAGE").load_window(
            PIPELINE, manifest, snowflake_backend.staging, fence=2
        )
    assert "\n" not in str(caught.value)
    assert snowflake_backend.make().count_window(PIPELINE, WINDOW) == 4


@pytest.mark.integration
def test_snowflake_unreachable_host_is_transient(
    fakesnow_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SF_PASSWORD_ENV, "secret-password")
    config = snowflake_config(fakesnow_server, "RAW", port=1, login_timeout=1)

    with pytest.raises(TransientError) as caught:
        SnowflakeTarget(config).count_window(PIPELINE, WINDOW)
    assert "secret-password" not in str(caught.value)


# --- SQL only ---------------------------------------------------------------------------------


def test_sql_target_unreachable_host_is_transient() -> None:
    target = SqlTarget(
        SqlTargetConfig(type="sql", url="postgresql+psycopg://postgres:pw@127.0.0.1:1/x", table="t")
    )
    with pytest.raises(TransientError) as caught:
        target.count_window(PIPELINE, WINDOW)
    assert ":pw@" not in str(caught.value)


# --- audit and empty loads (every target) ------------------------------------------------------


def test_audit_window_reports_the_rows_their_ids_checksum_and_the_ledger_row(
    backend: Backend,
) -> None:
    target = backend.make()
    assert target.audit_window(PIPELINE, WINDOW) == TargetAudit(0, EMPTY_CHECKSUM, None, None)
    load = fenced_load(backend.staging, 3, 23)
    target.load_window(PIPELINE, load.manifest, backend.staging, 3)

    held = target.audit_window(PIPELINE, WINDOW)

    # The target computes the checksum extract recorded in the manifest while staging.
    assert held == TargetAudit(23, ids_checksum(load.ids), 3, 23)
    assert load.manifest.checksum == held.checksum
    assert target.audit_window(PIPELINE, NEXT_WINDOW) == TargetAudit(0, EMPTY_CHECKSUM, None, None)


def test_a_fenced_empty_load_clears_the_window_and_no_older_load_lands_after_it(
    backend: Backend,
) -> None:
    """Timeline: A (fence 3) loads the window; the source is purged; B (fence 5) finds it
    empty and clears it, moving the ledger to 5 with 0 rows. A frozen load of fence 4 (staged
    before the purge) wakes and is refused: the window stays empty. A clear with an older fence
    is refused too."""
    target, frozen = backend.make(), backend.make()
    target.load_window(PIPELINE, fenced_load(backend.staging, 3, 7).manifest, backend.staging, 3)
    late = fenced_load(backend.staging, 4, 6)

    assert target.clear_window(PIPELINE, WINDOW, 5) == 7

    assert backend.rows(WINDOW) == []
    [entry] = backend.ledger(WINDOW)
    assert (entry["fence"], entry["row_count"]) == (5, 0)
    with pytest.raises(StaleFenceError) as refused:
        frozen.load_window(PIPELINE, late.manifest, backend.staging, 4)
    assert refused.value.recorded == 5
    with pytest.raises(StaleFenceError):
        frozen.clear_window(PIPELINE, WINDOW, 4)
    assert backend.rows(WINDOW) == [] and target.count_window(PIPELINE, WINDOW) == 0
    # A window never loaded is cleared too: its ledger row is created at the fence.
    assert target.clear_window(PIPELINE, NEXT_WINDOW, 2) == 0
    assert [e["fence"] for e in backend.ledger(NEXT_WINDOW)] == [2]


@pytest.mark.integration
def test_snowflake_duplicate_ledger_rows_cannot_let_a_stale_fence_through(
    snowflake_backend: Backend,
) -> None:
    """Snowflake does not enforce the ledger's primary key, so a window can come to hold two
    ledger rows (fences 3 and 7). A load with fence 5 would match the row of 3 under a per-row
    `fence <= 5` guard and pass; the guard compares with the window's newest fence (7) and
    refuses it. A newer fence moves every row of the window."""
    assert snowflake_backend.add_ledger_row is not None
    target = snowflake_backend.make()
    target.count_window(PIPELINE, WINDOW)  # creates the table and its ledger
    snowflake_backend.add_ledger_row(WINDOW, 3)
    snowflake_backend.add_ledger_row(WINDOW, 7)

    with pytest.raises(StaleFenceError) as refused:
        target.load_window(
            PIPELINE,
            fenced_load(snowflake_backend.staging, 5, 4).manifest,
            snowflake_backend.staging,
            5,
        )
    assert refused.value.recorded == 7 and snowflake_backend.rows(WINDOW) == []

    target.load_window(
        PIPELINE,
        fenced_load(snowflake_backend.staging, 8, 4).manifest,
        snowflake_backend.staging,
        8,
    )
    assert sorted(e["fence"] for e in snowflake_backend.ledger(WINDOW)) == [8, 8]
    assert target.audit_window(PIPELINE, WINDOW).ledger_fence == 8


# --- Snowflake SQL, offline -------------------------------------------------------------------

NAMES = sql.Names.of("raw", "Events", "ORDERS", "orders_stage")
LANDING = sql.quote_identifier("WINDOWPIPE_LANDING_0123")


def every_statement(paths: list[str]) -> list[str]:
    return [
        sql.create_table_sql(NAMES.table),
        sql.create_ledger_sql(NAMES.ledger),
        sql.create_landing_sql(LANDING),
        *sql.copy_statements(LANDING, NAMES.stage, paths),
        sql.BEGIN,
        sql.advance_fence_sql(NAMES.ledger),
        sql.insert_fence_sql(NAMES.ledger),
        sql.recorded_fence_sql(NAMES.ledger),
        sql.delete_window_sql(NAMES.table),
        sql.insert_window_sql(NAMES.table, LANDING),
        sql.COMMIT,
        sql.ROLLBACK,
        sql.count_window_sql(NAMES.table),
        sql.window_ids_sql(NAMES.table),
        sql.ledger_row_sql(NAMES.ledger),
        sql.drop_landing_sql(LANDING),
    ]


def test_every_statement_parses_as_snowflake_sql() -> None:
    paths = [f"orders/2026/11/01/w/r1-part-{index:05d}.ndjson.gz" for index in range(3)]
    for statement in every_statement(paths):
        assert sqlglot.parse_one(statement, read="snowflake") is not None, statement


def test_identifiers_are_upper_cased_and_quoted() -> None:
    assert NAMES.table == '"RAW"."EVENTS"."ORDERS"'
    assert NAMES.stage == '"RAW"."EVENTS"."ORDERS_STAGE"'
    copy = sql.copy_sql(LANDING, NAMES.stage, "orders/2026/11/01/w", ["a.ndjson.gz"])
    assert 'FROM @"RAW"."EVENTS"."ORDERS_STAGE"/orders/2026/11/01/w/)' in copy
    parsed = sqlglot.parse_one(sql.delete_window_sql(NAMES.table), read="snowflake")
    table = parsed.find(exp.Table)
    assert table is not None and table.name == "ORDERS" and table.this.quoted


@pytest.mark.parametrize(
    "name", ["a;drop", 'x"y', "orders table", "1abc", "", "a.b", "ö", "a" * 256, "t--"]
)
def test_unsafe_identifiers_are_refused(name: str) -> None:
    with pytest.raises(TerminalError, match="unsafe"):
        sql.Names.of("RAW", "EVENTS", name, "STAGE")


@pytest.mark.parametrize(
    "path", ["a/b'c.gz", "a/../b.gz", "a//b.gz", "k=v/x.gz", "/abs.gz", "a/b c.gz", "a\\b.gz"]
)
def test_unsafe_staged_paths_are_refused(path: str) -> None:
    with pytest.raises(TerminalError, match="unsafe staged path"):
        sql.copy_statements(LANDING, NAMES.stage, [path])


def test_copy_splits_files_at_1000_and_by_directory() -> None:
    paths = [f"p/w1/r-part-{index:05d}.ndjson.gz" for index in range(2001)] + ["p/w2/x.ndjson.gz"]
    statements = sql.copy_statements(LANDING, NAMES.stage, paths)

    assert [statement.count(".ndjson.gz'") for statement in statements] == [1000, 1000, 1, 1]
    assert "/p/w2/)" in statements[-1] and "FILES = ('x.ndjson.gz')" in statements[-1]
    for statement in statements:
        copy = sqlglot.parse_one(statement, read="snowflake")
        assert isinstance(copy, exp.Copy)
        assert "ON_ERROR = ABORT_STATEMENT" in statement and "FORCE = TRUE" in statement
    assert sql.copy_statements(LANDING, NAMES.stage, []) == []
    with pytest.raises(ValueError):
        sql.copy_sql(LANDING, NAMES.stage, "p", ["f"] * 1001)


def test_window_statements_bind_their_values() -> None:
    assert sql.delete_window_sql(NAMES.table).count("?") == 2
    assert sql.count_window_sql(NAMES.table).count("?") == 2
    insert = sql.insert_window_sql(NAMES.table, LANDING)
    assert insert.count("?") == 4 and "v:id::STRING, v:doc" in insert


def test_each_table_has_its_own_ledger_and_its_statements_bind_their_values() -> None:
    assert NAMES.ledger == '"RAW"."EVENTS"."ORDERS_WINDOWPIPE_LEDGER"'
    other = sql.Names.of("raw", "Events", "REFUNDS", "orders_stage")
    assert other.ledger == '"RAW"."EVENTS"."REFUNDS_WINDOWPIPE_LEDGER"'
    advance = sql.advance_fence_sql(NAMES.ledger)
    # The guard compares with the window's newest fence, not with whichever row matches.
    assert advance.count("?") == 8 and "? >= (SELECT MAX(fence)" in advance
    assert sql.window_ids_sql(NAMES.table).count("?") == 2
    assert sql.ledger_row_sql(NAMES.ledger).count("?") == 2
    insert = sql.insert_fence_sql(NAMES.ledger)
    assert insert.count("?") == 7 and "WHERE NOT EXISTS" in insert
    assert sql.recorded_fence_sql(NAMES.ledger).count("?") == 2
    # ROWS is reserved in Snowflake: the ledger's count column is row_count.
    create = sqlglot.parse_one(sql.create_ledger_sql(NAMES.ledger), read="snowflake")
    columns = [column.name for column in create.find_all(exp.ColumnDef)]
    assert columns == ["pipeline", "window_start", "fence", "row_count", "loaded_at"]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (sf_errors.OperationalError(msg="Could not connect", errno=250001), TransientError),
        (sf_errors.OperationalError(msg="connection closed", errno=250002), TransientError),
        (sf_errors.ServiceUnavailableError(msg="503"), TransientError),
        (sf_errors.TooManyRequests(msg="429"), TransientError),
        (sf_errors.GatewayTimeoutError(msg="504"), TransientError),
        (
            sf_errors.ProgrammingError(msg="Statement reached its timeout", errno=630),
            TransientError,
        ),
        (
            sf_errors.DatabaseError(msg="Incorrect username or password", errno=390100),
            TerminalError,
        ),
        (sf_errors.OperationalError(msg="user locked", errno=390101), TerminalError),
        (sf_errors.ProgrammingError(msg="Object does not exist", errno=2003), TerminalError),
        (sf_errors.ProgrammingError(msg="Insufficient privileges", errno=3001), TerminalError),
        (sf_errors.ProgrammingError(msg="Error parsing JSON", errno=100069), TerminalError),
    ],
)
def test_snowflake_errors_are_classified(error: Exception, kind: type[Exception]) -> None:
    translated = translate(error, "load window")
    assert type(translated) is kind
    assert str(translated).startswith("snowflake target: load window failed")


def test_snowflake_error_messages_are_one_line_without_the_secret() -> None:
    error = sf_errors.ProgrammingError(msg="bad\nthing with hunter2 inside", errno=2003)
    message = str(translate(error, "connect", secret="hunter2"))
    assert "\n" not in message and "hunter2" not in message
