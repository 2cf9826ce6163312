"""The data path's fast encodings say exactly what the plain ones said (bench 2's changes):
one serialization of a document reused for its size check and its staged line, orjson printing
UTC instants, buffered gzip writes, chunked line reads, and COPY text built without psycopg's
`write_row`."""

from __future__ import annotations

import gzip
import io
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pydantic
import pytest
import sqlalchemy as sa

from connectors import staging
from connectors.base import Batch, Document, encode_body, encode_line
from connectors.local import LocalStage
from connectors.sql import SqlSource
from connectors.sql_target import SqlTarget
from core.config import LocalStageConfig, SqlSourceConfig, SqlTargetConfig
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
    stage = LocalStage(LocalStageConfig(type="local", path=str(tmp_path), **options))
    assert stage.gzip_level == (level or 1)
    docs = [
        Document(id=str(n), timestamp=WINDOW.start, body={"n": n, "pad": "p" * (n % 700)})
        for n in range(3000)
    ]
    manifest = stage.write_window("p", WINDOW, "r1", [Batch(documents=docs)])
    (staged,) = manifest.files
    raw = (stage.root / staged.path).read_bytes()
    assert gzip.decompress(raw) == b"".join(encode_line(d) for d in docs)
    assert list(stage.iter_lines(staged.path, sha256=staged.sha256)) == [
        encode_line(d)[:-1] for d in docs
    ]


@pytest.mark.parametrize("level", [0, 10])
def test_gzip_level_is_one_to_nine(tmp_path: Path, level: int) -> None:
    with pytest.raises(pydantic.ValidationError):
        LocalStageConfig(type="local", path=str(tmp_path), gzip_level=level)


def test_copy_text_escapes_what_copy_would_misread(pg_schema_url: str, tmp_path: Path) -> None:
    stage = LocalStage(LocalStageConfig(type="local", path=str(tmp_path)))
    ids = ["tab\there", "nl\nhere", "cr\rhere", "back\\slash", "\\N", "\\.", "plain"]
    docs = [
        Document(
            id=doc_id,
            timestamp=WINDOW.start,
            body={"id": doc_id, "s": "\\N \\. \t \n \r \\\\ \u2028 \x01", "n": n},
        )
        for n, doc_id in enumerate(ids)
    ]
    manifest = stage.write_window("p\\1", WINDOW, "r1", [Batch(documents=docs)])
    target = SqlTarget(SqlTargetConfig(type="sql", url=pg_schema_url, table="loaded"))
    assert target.load_window("p\\1", manifest, stage, fence=1) == len(docs)
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
