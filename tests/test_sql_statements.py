"""The SQL connectors build their statements once per table and compile them into a cache of
their own (`connectors.sql.CompiledCache`): connectors of many tables sharing one engine each
read and write their own table, and none compiles a statement again, whatever the engine's own
cache evicted meanwhile."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine.default import CACHE_MISS

from connectors import shared
from connectors.local import LocalStaging
from connectors.sql import PROBE_ROWS, SqlSource
from connectors.sql_target import SqlTarget
from core.checksum import ids_checksum
from core.config import LocalStagingConfig, SqlSourceConfig, SqlTargetConfig
from core.windows import Window

START = datetime(2026, 11, 1, tzinfo=UTC)
WINDOWS = [Window(START + timedelta(hours=n), START + timedelta(hours=n + 1)) for n in range(2)]
TABLES = 3


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database holding `src_<i>`: table i has i + 1 rows in each window (ids unique across
    tables), and a version column `v` whose max differs by table and window."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_schema_url")
        stamp = "TIMESTAMPTZ"
    else:
        url = f"sqlite:///{tmp_path}/data.db"
        stamp = "DATETIME"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table in range(TABLES):
            columns = f"id BIGINT PRIMARY KEY, created_at {stamp} NOT NULL, v INT"
            conn.exec_driver_sql(f"CREATE TABLE src_{table} ({columns})")
            rows = [
                {
                    "id": table * 1000 + number * 100 + row,
                    "created_at": window.start + timedelta(minutes=row + 1),
                    "v": table * 10 + number + row,
                }
                for number, window in enumerate(WINDOWS)
                for row in range(table + 1)
            ]
            conn.execute(sa.text(f"INSERT INTO src_{table} VALUES (:id, :created_at, :v)"), rows)
    engine.dispose()
    yield url
    shared.close_all()


def _expected_ids(table: int, number: int) -> list[str]:
    return [str(table * 1000 + number * 100 + row) for row in range(table + 1)]


def test_connectors_of_many_tables_on_one_engine_each_see_their_own_table_and_compile_once(
    url: str, tmp_path: Path
) -> None:
    sources = [
        SqlSource(
            SqlSourceConfig(
                type="sql", url=url, table=f"src_{table}", version_column="v", page_size=2
            )
        )
        for table in range(TABLES)
    ]
    targets = [
        SqlTarget(SqlTargetConfig(type="sql", url=url, table=f"dst_{table}"))
        for table in range(TABLES)
    ]
    staging = LocalStaging(LocalStagingConfig(type="local", path=str(tmp_path / "staging")))
    engines = {sources[0]._connect()[0], targets[0]._connect()[0]}
    compiled: list[str] = []

    def count_compiled(*args: Any) -> None:
        context = args[4]
        if context is not None and context.cache_hit is CACHE_MISS:
            compiled.append(args[2])

    for engine in engines:
        sa.event.listen(engine, "after_cursor_execute", count_compiled)

    fence = 0
    for attempt in range(2):
        # As if 1,000 other tables' statements had pushed these out of the engine's own cache.
        for engine in engines:
            engine.clear_compiled_cache()
        compiled.clear()
        for number, window in enumerate(WINDOWS):
            for table in range(TABLES):
                fence += 1
                source, target = sources[table], targets[table]
                found = source.fingerprint(window)
                ids = [
                    document.id
                    for batch in source.iter_batches(window)
                    for document in batch.documents
                ]
                manifest = staging.write_window(
                    f"p{table}", window, f"f{fence:08d}", source.iter_batches(window)
                )
                loaded = target.load_window(f"p{table}", manifest, staging, fence=fence)
                audit = target.audit_window(f"p{table}", window)

                expected = _expected_ids(table, number)
                assert ids == expected
                assert found.count == source.count(window) == len(expected)
                assert found.version == str(table * 10 + number + table)
                assert loaded == audit.rows == target.count_window(f"p{table}", window)
                assert audit.rows == len(expected)
                assert audit.checksum == ids_checksum(expected)
                assert (audit.ledger_fence, audit.ledger_rows) == (fence, len(expected))
        if attempt == 1:
            # Every statement of every table was compiled on the first pass, into its
            # connector's cache, which the engine's clearing does not touch.
            assert compiled == []
    for item in (*sources, *targets):
        item.close()


def test_a_window_of_several_pages_is_read_in_one_snapshot(pg_schema_url: str) -> None:
    """Its first page comes back full when read alone, so the window is read again in one
    transaction: a row committed after the first page was yielded is not read."""
    engine = sa.create_engine(pg_schema_url)
    window = WINDOWS[0]
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE src (id BIGINT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL)"
        )
        conn.execute(
            sa.text("INSERT INTO src VALUES (:id, :at)"),
            [{"id": n, "at": window.start + timedelta(minutes=n)} for n in range(1, 5)],
        )
    source = SqlSource(SqlSourceConfig(type="sql", url=pg_schema_url, table="src", page_size=2))
    batches = source.iter_batches(window)
    first = next(batches)
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO src VALUES (:id, :at)"),
            {"id": 9, "at": window.start + timedelta(minutes=9)},
        )
    rest = list(batches)

    assert [d.id for b in [first, *rest] for d in b.documents] == ["1", "2", "3", "4"]
    assert source.count(window) == 5
    source.close()
    engine.dispose()


def test_a_window_bigger_than_the_probe_is_read_whole_once_in_its_pages(
    pg_schema_url: str,
) -> None:
    """More rows than `PROBE_ROWS` (set aside) but fewer than a page: one batch of every row,
    each once; and a window of several pages read after the probe is one snapshot."""
    engine = sa.create_engine(pg_schema_url)
    window = WINDOWS[0]
    rows = PROBE_ROWS + 50
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE src (id BIGINT PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL)"
        )
        conn.execute(
            sa.text("INSERT INTO src VALUES (:id, :at)"),
            [{"id": n, "at": window.start + timedelta(seconds=n)} for n in range(1, rows + 1)],
        )
    whole = SqlSource(SqlSourceConfig(type="sql", url=pg_schema_url, table="src"))
    batches = list(whole.iter_batches(window))
    assert [len(b.documents) for b in batches] == [rows]
    assert [d.id for d in batches[0].documents] == [str(n) for n in range(1, rows + 1)]
    whole.close()

    paged = SqlSource(SqlSourceConfig(type="sql", url=pg_schema_url, table="src", page_size=120))
    pages = paged.iter_batches(window)
    first = next(pages)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO src VALUES (1000, :at)"), {"at": window.start})
    read = [d.id for b in [first, *pages] for d in b.documents]
    assert read == [str(n) for n in range(1, rows + 1)]
    paged.close()
    engine.dispose()
