"""The data path's fast encodings say exactly what the plain ones said (bench 2's changes):
one serialization of a document reused for its size check and its staged line, orjson printing
UTC instants, buffered gzip writes, chunked line reads, and COPY text built without psycopg's
`write_row`."""

from __future__ import annotations

import dataclasses
import gzip
import io
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pydantic
import pytest
import sqlalchemy as sa

from connectors import sql, staging
from connectors.base import (
    INSTANT_OPTIONS,
    Batch,
    Document,
    encode_body,
    encode_line,
    staged_line,
    unencodable_reason,
)
from connectors.local import LocalStaging
from connectors.sql import SqlSource
from connectors.sql_target import SqlTarget
from core.config import LocalStagingConfig, SqlSourceConfig, SqlTargetConfig
from core.errors import TerminalError
from core.instants import format_instant
from core.windows import Window

WINDOW = Window(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 1, 0, 15, tzinfo=UTC))
BODIES: list[dict[str, Any]] = [
    {"a": 1},
    {"text": 'Grüße 🧪 \\ "q" \t tab \n nl', "n": [1, 2.5, None, True], "deep": {"x": {}}},
    {"at": "2026-11-01T00:00:00Z", "big": "x" * 5000},
]
STAMPS = [
    WINDOW.start,
    WINDOW.start + timedelta(microseconds=1),
    WINDOW.start + timedelta(seconds=7, microseconds=120000),
    datetime(2026, 11, 1, 1, 0, tzinfo=timezone(timedelta(hours=1))),  # not UTC: converted
]


def _plain_line(document: Document) -> bytes:
    """The staged line as it was built before the fast path."""
    item = {"id": document.id, "ts": format_instant(document.timestamp), "doc": document.body}
    return orjson.dumps(item, option=orjson.OPT_NON_STR_KEYS) + b"\n"


@pytest.mark.parametrize("stamp", STAMPS)
@pytest.mark.parametrize("body", BODIES)
def test_a_staged_line_is_byte_for_byte_the_plain_encoding(
    body: dict[str, Any], stamp: datetime
) -> None:
    plain = Document(id="id-1", timestamp=stamp, body=body)
    encoded = Document(id="id-1", timestamp=stamp, body=body, encoded=encode_body(body))
    assert encode_line(plain) == encode_line(encoded) == _plain_line(plain)
    assert encoded == plain  # the cached bytes are not part of a document's identity


def test_sql_documents_carry_the_bytes_their_size_was_checked_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'src.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE events (id INTEGER PRIMARY KEY, created_at DATETIME, t TEXT)")
        )
        conn.execute(
            sa.text(
                "INSERT INTO events VALUES (1, '2026-11-01 00:01:00.000000', 'a\\b'), "
                "(2, '2026-11-01 00:02:00.250000', 'Grüße'), "
                "(3, '2026-11-01 00:03:00.000000', :big)"
            ),
            {"big": "y" * 3000},
        )
    engine.dispose()
    source = SqlSource(
        SqlSourceConfig(type="sql", url=url, table="events", max_document_bytes=2000)
    )
    batches = list(source.iter_batches(WINDOW))
    documents = [d for b in batches for d in b.documents]
    assert [d.body for d in documents] == [
        {"id": 1, "created_at": "2026-11-01T00:01:00Z", "t": "a\\b"},
        {"id": 2, "created_at": "2026-11-01T00:02:00.250000Z", "t": "Grüße"},
    ]
    assert all(d.encoded == orjson.dumps(d.body) for d in documents)
    assert all(d.line == encode_line(d) == _plain_line(d) for d in documents)
    assert all(d.timestamp.tzinfo is UTC for d in documents)
    assert [(r.id, r.reason) for b in batches for r in b.rejected] == [("3", "oversized document")]
    source.close()


class _Chunks(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
@pytest.mark.parametrize(
    "data",
    [b"", b"\n", b"a", b"a\n", b"a\nbb\n", b"a\n\nccc", b"\n\nlong-line-longer-than-chunks\nz\n"],
)
def test_split_lines_matches_readline_at_any_chunk_size(
    data: bytes, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "READ_CHUNK_BYTES", chunk)
    expected = [line[:-1] if line.endswith(b"\n") else line for line in io.BytesIO(data)]
    assert list(staging._split_lines(_Chunks(data))) == expected


@pytest.mark.parametrize("level", [None, 1, 6, 9])
def test_every_gzip_level_stages_the_same_lines(tmp_path: Path, level: int | None) -> None:
    options = {} if level is None else {"gzip_level": level}
    staging = LocalStaging(LocalStagingConfig(type="local", path=str(tmp_path), **options))
    assert staging.gzip_level == (level or 1)
    docs = [
        Document(id=str(n), timestamp=WINDOW.start, body={"n": n, "pad": "p" * (n % 700)})
        for n in range(3000)
    ]
    manifest = staging.write_window("p", WINDOW, "r1", [Batch(documents=docs)])
    (staged,) = manifest.files
    raw = (staging.root / staged.path).read_bytes()
    assert gzip.decompress(raw) == b"".join(encode_line(d) for d in docs)
    assert list(staging.iter_lines(staged.path, sha256=staged.sha256)) == [
        encode_line(d)[:-1] for d in docs
    ]


@pytest.mark.parametrize("level", [0, 10])
def test_gzip_level_is_one_to_nine(tmp_path: Path, level: int) -> None:
    with pytest.raises(pydantic.ValidationError):
        LocalStagingConfig(type="local", path=str(tmp_path), gzip_level=level)


def test_copy_text_escapes_what_copy_would_misread(pg_schema_url: str, tmp_path: Path) -> None:
    staging = LocalStaging(LocalStagingConfig(type="local", path=str(tmp_path)))
    ids = ["tab\there", "nl\nhere", "cr\rhere", "back\\slash", "\\N", "\\.", "plain"]
    docs = [
        Document(
            id=doc_id,
            timestamp=WINDOW.start,
            body={"id": doc_id, "s": "\\N \\. \t \n \r \\\\ \u2028 \x01", "n": n},
        )
        for n, doc_id in enumerate(ids)
    ]
    manifest = staging.write_window("p\\1", WINDOW, "r1", [Batch(documents=docs)])
    target = SqlTarget(SqlTargetConfig(type="sql", url=pg_schema_url, table="loaded"))
    assert target.load_window("p\\1", manifest, staging, fence=1) == len(docs)
    engine = sa.create_engine(pg_schema_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT pipeline, window_start, window_end, doc_id, doc, source_file, file_row "
                "FROM loaded ORDER BY file_row"
            )
        ).all()
    engine.dispose()
    target.close()
    assert [tuple(row) for row in rows] == [
        ("p\\1", WINDOW.start, WINDOW.end, d.id, d.body, manifest.files[0].path, n)
        for n, d in enumerate(docs, start=1)
    ]


ODD_IDS = ["plain", 'quote " and \\ backslash', "tab\tnl\n", "Grüße 🧪", "\u2028", ""]


@pytest.mark.parametrize("stamp", [*STAMPS, WINDOW.start.replace(tzinfo=None)])
@pytest.mark.parametrize("doc_id", ODD_IDS)
def test_a_line_assembled_from_its_parts_is_the_encoded_line(doc_id: str, stamp: datetime) -> None:
    body = BODIES[1]
    document = Document(id=doc_id, timestamp=stamp.replace(tzinfo=stamp.tzinfo or UTC), body=body)
    encoded = encode_body(body)
    if stamp.tzinfo is None or stamp.tzinfo is UTC:
        ts_json = orjson.dumps(stamp, option=INSTANT_OPTIONS)
    else:
        ts_json = orjson.dumps(format_instant(stamp))
    assert ts_json == orjson.dumps(format_instant(document.timestamp))
    line = staged_line(doc_id, ts_json, encoded)
    assert line == encode_line(document) == _plain_line(document)
    assert encode_line(Document(doc_id, document.timestamp, body, encoded, line)) == line


def test_staging_lines_in_batches_rolls_parts_as_line_by_line(tmp_path: Path) -> None:
    docs = [
        Document(id=str(n), timestamp=WINDOW.start, body={"n": n, "pad": "p" * (n % 300)})
        for n in range(2000)
    ]
    batches = [
        Batch(documents=docs[at : at + size]) for at, size in ((0, 1), (1, 999), (1000, 1000))
    ]
    one_by_one = [Batch(documents=[d]) for d in docs]
    staged = []
    for number, given in enumerate((batches, one_by_one)):
        staging = LocalStaging(
            LocalStagingConfig(type="local", path=str(tmp_path / str(number)), max_file_bytes=65536)
        )
        manifest = staging.write_window("p", WINDOW, "r1", given)
        staged.append(
            [
                (f.path, f.rows, f.sha256, (staging.root / f.path).read_bytes())
                for f in manifest.files
            ]
        )
    assert len(staged[0]) > 3
    assert staged[0] == staged[1]
    lines = b"".join(gzip.decompress(raw) for *_, raw in staged[0])
    assert lines == b"".join(encode_line(d) for d in docs)
    assert all(len(gzip.decompress(raw)) <= 65536 for *_, raw in staged[0])


_TYPES_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'süß');
CREATE TABLE events (
    id bigint PRIMARY KEY, created_at timestamptz NOT NULL, naive timestamp, other timestamptz,
    t text, v varchar(20), n numeric, f float8, r real, i int, small smallint, b bool,
    j json, jb jsonb, raw bytea, u uuid, d date, tm time, ttz timetz, iv interval,
    tags text[], m mood, moods mood[], bits bit(3), span int4range, ip inet, cash money
)"""

_TYPES_ROWS = """
INSERT INTO events VALUES
(1, '2026-11-01 00:00:00+00', '2026-11-01 00:00:00', '2026-11-01 02:00:00+02', 'Grüße 🧪 "q"',
 'v', 12.30, 1.5, 0.25, 7, 3, true, '{"a": [1, 2.5, null], "ü": "\\u00e9"}',
 '{"k": {"deep": [true, "x"]}, "n": 1.0}', 'hi', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
 '2026-11-01', '12:34:56.789', '12:00:00+05:30', '1 day 2 hours', '{x,"y z",NULL}', 'süß',
 '{ok,sad}', '101', '[1,3)', '10.0.0.1', 12.5),
(2, '2026-11-01 01:00:00.000001+01', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(3, '2026-11-01 00:00:00.000001+00', '2026-11-01 00:00:00.5', '1999-12-31 23:59:59.999999-08',
 '', '\\', 'NaN', 'NaN', '-Infinity', -1, 0, false, '[]', '"text"', '\\xc328', NULL,
 '0001-01-01', '00:00', '23:59:59-01', '-3 days', '{}', 'sad', '{}', '000', 'empty', '::1', -1),
(4, '2026-11-01 00:07:30.120000+00', NULL, '2026-11-01 00:07:30.12+00', 'tab\tnl\nend', 'x',
 -0.000000000000000000000000000001, 1e300, 3.4e38, 2147483647, -32768, NULL,
 'null', '[1.25, -3, 1e-7]', 'ok', NULL, NULL, NULL, NULL, NULL, '{"\\\\"}',
 NULL, NULL, NULL, '(,)', NULL, NULL),
(5, '2026-11-01 00:07:30.12+00', NULL, NULL, 'same instant as 4', NULL, 1e20, -0.0, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL),
(6, '2026-11-01 00:14:59.999999+00', NULL, NULL, repeat('x', 3000), NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL),
(7, '2026-11-01 00:15:00+00', NULL, NULL, 'outside the window', NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL)
"""


def _off_utc(url: str) -> str:
    """`url` with a session time zone that is not UTC (and not a whole hour off it)."""
    return f"{url}%20-ctimezone%3DAsia/Kathmandu"


@pytest.mark.parametrize("page_size", [2, 100])
def test_psycopg_rows_stage_what_sqlalchemy_rows_stage(
    pg_schema_url: str, monkeypatch: pytest.MonkeyPatch, page_size: int
) -> None:
    """The PostgreSQL source reads psycopg's tuples (`driver_rows`) instead of SQLAlchemy
    `Row`s, and converts a page column by column unless a row of it is rejected: documents and
    staged lines are the same, byte for byte, whichever way, for every column type, NULLs,
    non-UTF-8 bytes (rejected), oversized rows (rejected) and page boundaries inside a run of
    equal timestamps - and they are what the plain encoding of each value says."""
    engine = sa.create_engine(pg_schema_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(_TYPES_DDL)
        conn.exec_driver_sql(_TYPES_ROWS)
    engine.dispose()
    url = _off_utc(pg_schema_url)
    calls: list[int] = []
    driver_rows = sql._driver_rows

    def counted(*args: Any) -> Any:
        rows = driver_rows(*args)
        calls.append(len(rows))
        return rows

    monkeypatch.setattr(sql, "_driver_rows", counted)
    by_page: list[int | str | None] = []
    page_documents = SqlSource._page_documents

    def counted_pages(self: SqlSource, *args: Any) -> Any:
        try:
            documents = page_documents(self, *args)
        except Exception as error:
            by_page.append(type(error).__name__)
            raise
        by_page.append(None if documents is None else len(documents))
        return documents

    monkeypatch.setattr(SqlSource, "_page_documents", counted_pages)
    read: dict[tuple[bool, bool], tuple[list[tuple[Any, ...]], list[tuple[str | None, str]]]] = {}
    for driver, columns in ((True, True), (False, True), (True, False)):
        source = SqlSource(
            SqlSourceConfig(
                type="sql", url=url, table="events", page_size=page_size, max_document_bytes=2500
            )
        )
        source.driver_rows = driver
        if not columns:
            monkeypatch.setattr(SqlSource, "_page_documents", lambda *args: None)
        batches = list(source.iter_batches(WINDOW))
        source.close()
        read[driver, columns] = (
            [
                (d.id, d.timestamp, d.body, d.encoded, encode_line(d))
                for b in batches
                for d in b.documents
            ],
            [(r.id, r.reason) for b in batches for r in b.rejected],
        )
    # The driver's path read every page of the first and third runs (a full first page twice:
    # once alone, in autocommit, set aside when it turned out full, then again in the
    # window's snapshot). In the first two, pages went column by column (rows 1 and 2: every
    # type, then every NULL) unless a row was to be rejected (3: not UTF-8, raised; 6:
    # oversized, None): those went row by row.
    pages = [2, 2, 2, 2, 0] if page_size == 2 else [6]
    assert calls == pages + pages
    assert (
        by_page
        == ([2, "UnicodeDecodeError", None] if page_size == 2 else ["UnicodeDecodeError"]) * 2
    )
    assert read[True, True] == read[False, True] == read[True, False]
    documents, rejected = read[True, True]
    assert rejected == [("3", "not UTF-8"), ("6", "oversized document")]
    assert [d[0] for d in documents] == ["1", "2", "4", "5"]
    assert [d[1] for d in documents] == [
        WINDOW.start,
        WINDOW.start + timedelta(microseconds=1),
        WINDOW.start + timedelta(minutes=7, seconds=30, microseconds=120000),
        WINDOW.start + timedelta(minutes=7, seconds=30, microseconds=120000),
    ]
    assert all(d[1].tzinfo is UTC for d in documents)
    # The plain encoding: every value through `json_value`, the line through `format_instant`,
    # from rows read by SQLAlchemy in a session whose time zone is not UTC.
    plain = sa.create_engine(url)
    table = sa.Table("events", sa.MetaData(), autoload_with=plain)
    with plain.connect() as conn:
        rows = conn.execute(
            sa.select(table).where(table.c.id.in_([1, 2, 4, 5])).order_by(table.c.id)
        ).all()
    plain.dispose()
    expected = {}
    for row in rows:
        body = {str(name): sql.json_value(value) for name, value in row._mapping.items()}
        stamp = row.created_at.astimezone(UTC)
        expected[str(row.id)] = (
            str(row.id),
            stamp,
            body,
            orjson.dumps(body),
            _plain_line(Document(id=str(row.id), timestamp=stamp, body=body)),
        )
    assert documents == [expected[d[0]] for d in documents]
    first = documents[0][2]
    assert first["created_at"] == "2026-11-01T00:00:00Z"
    assert first["other"] == "2026-11-01T00:00:00Z"
    assert first["naive"] == "2026-11-01T00:00:00Z"
    assert first["n"] == "12.30" and first["raw"] == "hi" and first["moods"] == ["ok", "sad"]
    assert first["jb"] == {"k": {"deep": [True, "x"]}, "n": 1.0}
    assert documents[1][2]["created_at"] == "2026-11-01T00:00:00.000001Z"
    assert documents[3][2]["f"] == -0.0 and documents[3][2]["n"] == "100000000000000000000"


def test_a_driver_error_while_fetching_is_translated_as_sqlalchemy_would(
    pg_schema_url: str,
) -> None:
    engine = sa.create_engine(pg_schema_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE events (id int PRIMARY KEY, created_at timestamptz, later timestamp);"
            "INSERT INTO events VALUES (1, '2026-11-01 00:01:00+00', 'infinity')"
        )
    engine.dispose()
    messages = []
    for driver in (True, False):
        source = SqlSource(SqlSourceConfig(type="sql", url=pg_schema_url, table="events"))
        source.driver_rows = driver
        with pytest.raises(TerminalError) as raised:
            list(source.iter_batches(WINDOW))
        messages.append(str(raised.value))
        source.close()
    assert messages[0] == messages[1]
    assert "DataError" in messages[0]


def _nested(depth: int) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for _ in range(depth):
        body = {"a": body}
    return body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"n": 2**64}, "integer beyond 64 bits"),
        ({"n": -(2**63) - 1}, "integer beyond 64 bits"),
        ({"s": "\ud800x"}, "not UTF-8"),
        ({"deep": _nested(300)}, "not encodable as JSON"),
    ],
)
def test_a_body_that_cannot_be_staged_as_it_is_gets_a_rejection_reason(
    body: dict[str, Any], reason: str
) -> None:
    with pytest.raises(orjson.JSONEncodeError) as refused:
        encode_body(body)
    assert unencodable_reason(refused.value) == reason


def test_the_widest_64_bit_integers_are_staged_as_they_are() -> None:
    assert (
        encode_body({"u": 2**64 - 1, "i": -(2**63)})
        == b'{"u":18446744073709551615,"i":-9223372036854775808}'
    )


_SEARCH_WINDOW = Window(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC))


@pytest.mark.parametrize(
    ("doc_id", "timestamp"),
    [
        ("plain", "2026-11-01T00:05:00Z"),
        ("millis", "2026-11-01T00:05:00.123Z"),
        ("micros", "2026-11-01T00:05:00.000001Z"),
        ("nanos", "2026-11-01T00:05:00.123456789Z"),
        ("offset", "2026-11-01T02:05:00+02:00"),
        ("naive", "2026-11-01T00:05:00"),
        ("epoch millis", 1793491500123),
        ("epoch text", "1793491500000"),
        ('q"uote\\ é 😀', "2026-11-01T23:59:59.999999Z"),
    ],
)
def test_a_search_hits_staged_line_is_what_encode_line_makes(doc_id: str, timestamp: Any) -> None:
    from connectors.elasticsearch import hit_to_record

    hit = {"_id": doc_id, "_source": {"@timestamp": timestamp, "n": 1, "s": "ü\n"}}
    document = hit_to_record(hit, _SEARCH_WINDOW, "@timestamp", 10_000)
    assert isinstance(document, Document) and document.line is not None
    assert document.line == encode_line(dataclasses.replace(document, line=None, encoded=None))
