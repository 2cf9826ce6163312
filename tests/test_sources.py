"""One contract suite for every Source: OpenSearch and Elasticsearch (osmem-server), and SQL
(PostgreSQL and SQLite).

Each flavour loads the same records into a fresh index or table and builds a source over it;
the contract tests only look at what the `Source` protocol promises. Flavour-specific behaviour
(point in time, slices, bad timestamps in an index, SQL value conversion) follows the suite.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from opensearchpy import OpenSearch
from osmem_server import OsmemServer

from connectors.elasticsearch import ElasticsearchSource, OpenSearchSource
from connectors.sql import SqlSource
from core.config import ElasticsearchSourceConfig, OpenSearchSourceConfig, SqlSourceConfig
from core.errors import TerminalError, TransientError
from core.ports import Batch, Document, Rejection, Source
from core.recheck import Fingerprint
from core.windows import Window
from tests.support import free_port
from tests.support.osmem import OsmemCompatibleNode, open_pit_ids

pytestmark = pytest.mark.integration

START = datetime(2026, 11, 1, tzinfo=UTC)
WINDOW = Window(START, START + timedelta(minutes=15))
PLUS_TWO = timezone(timedelta(hours=2))

ALL_FLAVOURS = ["opensearch", "elasticsearch", "sql-postgresql", "sql-sqlite"]
NETWORK_FLAVOURS = ["opensearch", "elasticsearch", "sql-postgresql"]
SEARCH_FLAVOURS = ["opensearch", "elasticsearch"]


@dataclass(frozen=True)
class Record:
    """One source document as the tests write it: an integer id, an instant, a payload."""

    id: int
    ts: datetime
    payload: str = "p"


def read_all(source: Source, window: Window = WINDOW) -> tuple[list[Document], list[Rejection]]:
    documents: list[Document] = []
    rejected: list[Rejection] = []
    for batch in source.iter_batches(window):
        assert isinstance(batch, Batch)
        documents.extend(batch.documents)
        rejected.extend(batch.rejected)
    return documents, rejected


# --- flavours ------------------------------------------------------------------------------------


class SearchFlavour:
    """An index on osmem-server, read through opensearch-py or elasticsearch-py."""

    def __init__(self, kind: str, server: OsmemServer) -> None:
        self.name = kind
        self.server = server
        self.index = f"wp-{uuid.uuid4().hex[:10]}"
        self.admin = OpenSearch(hosts=[server.url])

    def create_index(
        self, index: str | None = None, timestamp_type: str = "date", **extra: Any
    ) -> None:
        mapping = {"@timestamp": {"type": timestamp_type, **extra}}
        self.admin.indices.create(
            index=index or self.index, body={"mappings": {"properties": mapping}}
        )

    def load(self, records: list[Record]) -> None:
        self.load_raw(
            [(str(r.id), {"@timestamp": r.ts.isoformat(), "payload": r.payload}) for r in records]
        )

    def load_raw(self, docs: list[tuple[str, dict[str, Any]]], index: str | None = None) -> None:
        index = index or self.index
        if not self.admin.indices.exists(index=index):
            self.create_index(index)
        lines: list[str] = []
        size = 0
        for doc_id, body in docs:
            lines.append(json.dumps({"index": {"_index": index, "_id": doc_id}}))
            lines.append(json.dumps(body, ensure_ascii=False))
            size += len(lines[-1])
            if size > 4_000_000:
                self._bulk(lines)
                lines, size = [], 0
        if lines:
            self._bulk(lines)
        self.admin.indices.refresh(index=index)

    def _bulk(self, lines: list[str]) -> None:
        reply = self.admin.bulk(body="\n".join(lines) + "\n")
        assert not reply["errors"], reply

    def source(
        self, index: str | None = None, hosts: list[str] | None = None, **options: Any
    ) -> Any:
        values: dict[str, Any] = {
            "type": self.name,
            "hosts": hosts or [self.server.url],
            "index": index or self.index,
            "page_size": 100,
            "request_timeout": 5,
            **options,
        }
        if self.name == "opensearch":
            return OpenSearchSource(OpenSearchSourceConfig(**values))
        return ElasticsearchSource(
            ElasticsearchSourceConfig(**values), node_class=OsmemCompatibleNode
        )

    def missing_source(self) -> Any:
        return self.source(index=f"missing-{uuid.uuid4().hex[:8]}")

    def unreachable_source(self) -> Any:
        return self.source(hosts=[f"http://elastic:s3cret-pw@127.0.0.1:{free_port()}"])

    def open_cursors(self) -> list[str]:
        return open_pit_ids(self.server.url)

    def close(self) -> None:
        if self.admin.indices.exists(index=f"{self.index}*"):
            self.admin.indices.delete(index=f"{self.index}*")
        self.admin.close()


class SqlFlavour:
    """A table `events(id, created_at, payload)`: timestamptz on PostgreSQL, naive on SQLite."""

    def __init__(self, kind: str, url: str) -> None:
        self.name = kind
        self.url = url
        self.engine = sa.create_engine(url)
        self.aware = kind == "sql-postgresql"
        self.table = sa.Table(
            "events",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("created_at", sa.DateTime(timezone=self.aware), nullable=False),
            sa.Column("payload", sa.Text),
        )

    def load(self, records: list[Record]) -> None:
        self.table.create(self.engine, checkfirst=True)
        rows = [
            {
                "id": r.id,
                # What an application writes into a naive column: the instant in UTC.
                "created_at": r.ts if self.aware else r.ts.astimezone(UTC).replace(tzinfo=None),
                "payload": r.payload,
            }
            for r in records
        ]
        with self.engine.begin() as conn:
            for chunk in range(0, len(rows), 5000):
                conn.execute(self.table.insert(), rows[chunk : chunk + 5000])

    def source(self, **options: Any) -> SqlSource:
        values: dict[str, Any] = {
            "type": "sql",
            "url": self.url,
            "table": "events",
            "page_size": 100,
        }
        values.update(options)
        return SqlSource(SqlSourceConfig(**values))

    def missing_source(self) -> SqlSource:
        return self.source(table="no_such_table")

    def unreachable_source(self) -> SqlSource:
        url = f"postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:{free_port()}/test"
        return self.source(url=url)

    def open_cursors(self) -> list[str]:
        return []

    def close(self) -> None:
        self.engine.dispose()


Flavour = SearchFlavour | SqlFlavour


@pytest.fixture(scope="module")
def osmem() -> Iterator[OsmemServer]:
    server = OsmemServer.start(addr="127.0.0.1:0")
    yield server
    server.close()


@pytest.fixture(params=ALL_FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> Iterator[Flavour]:
    """A fresh index or table per test, in each source flavour."""
    kind: str = request.param
    made: Flavour
    if kind in SEARCH_FLAVOURS:
        made = SearchFlavour(kind, request.getfixturevalue("osmem"))
    elif kind == "sql-postgresql":
        made = SqlFlavour(kind, request.getfixturevalue("pg_schema_url"))
    else:
        made = SqlFlavour(kind, request.getfixturevalue("sqlite_url"))
    try:
        yield made
    finally:
        made.close()


def network_flavours() -> Any:
    return pytest.mark.parametrize("flavour", NETWORK_FLAVOURS, indirect=True)


def search_flavours() -> Any:
    return pytest.mark.parametrize("flavour", SEARCH_FLAVOURS, indirect=True)


# --- the contract --------------------------------------------------------------------------------


def test_source_satisfies_the_protocol(flavour: Flavour) -> None:
    flavour.load([Record(1, START)])
    source = flavour.source()
    assert isinstance(source, Source)
    source.close()


def test_window_start_is_included_and_window_end_excluded(flavour: Flavour) -> None:
    flavour.load(
        [
            Record(1, START - timedelta(milliseconds=1)),
            Record(2, START),
            Record(3, WINDOW.end - timedelta(milliseconds=1)),
            Record(4, WINDOW.end),
        ]
    )
    source = flavour.source()
    assert source.count(WINDOW) == 2
    documents, rejected = read_all(source)
    assert sorted(d.id for d in documents) == ["2", "3"]
    assert rejected == []
    assert {d.id: d.timestamp for d in documents} == {
        "2": START,
        "3": WINDOW.end - timedelta(milliseconds=1),
    }
    assert all(
        d.timestamp.tzinfo is not None and d.timestamp.utcoffset() == timedelta(0)
        for d in documents
    )


def test_documents_sharing_a_timestamp_are_each_yielded_once_across_pages(
    flavour: Flavour,
) -> None:
    same = START + timedelta(minutes=5)
    flavour.load([Record(i, same) for i in range(2500)] + [Record(9999, START)])
    source = flavour.source(page_size=100)
    assert source.count(WINDOW) == 2501
    batches = list(source.iter_batches(WINDOW))
    ids = [d.id for batch in batches for d in batch.documents]
    assert len(ids) == 2501
    assert set(ids) == {str(i) for i in range(2500)} | {"9999"}
    assert max(len(batch.documents) + len(batch.rejected) for batch in batches) <= 100
    assert flavour.open_cursors() == []


def test_documents_come_in_timestamp_order_within_an_unsliced_read(flavour: Flavour) -> None:
    flavour.load([Record(i, START + timedelta(seconds=(i * 37) % 900)) for i in range(300)])
    documents, _ = read_all(flavour.source(page_size=50))
    stamps = [d.timestamp for d in documents]
    assert stamps == sorted(stamps)
    assert len(documents) == 300


def test_unicode_and_megabyte_documents_arrive_intact(flavour: Flavour) -> None:
    big = "abcdefghij" * 100_000 + "🙂"
    records = [
        Record(1, START, "emoji 🚀🙂 and CJK 中文字 日本語 한국어"),
        Record(2, START + timedelta(seconds=1), big),
        Record(3, START + timedelta(seconds=2), "\u0000 nul and ünïcödé"),
    ]
    if flavour.name == "sql-postgresql":  # PostgreSQL text cannot hold NUL
        records[2] = Record(3, START + timedelta(seconds=2), "ünïcödé")
    flavour.load(records)
    documents, rejected = read_all(flavour.source())
    assert rejected == []
    assert {d.id: d.body["payload"] for d in documents} == {str(r.id): r.payload for r in records}


def test_document_over_max_bytes_is_rejected_not_dropped(flavour: Flavour) -> None:
    flavour.load([Record(1, START, "small"), Record(2, START, "x" * 20_000)])
    source = flavour.source(max_document_bytes=10_000)
    assert source.count(WINDOW) == 2
    documents, rejected = read_all(source)
    assert [d.id for d in documents] == ["1"]
    assert rejected == [Rejection("2", "oversized document")]


def test_empty_window_counts_zero_and_yields_no_documents(flavour: Flavour) -> None:
    flavour.load(
        [Record(1, START - timedelta(hours=1)), Record(2, WINDOW.end + timedelta(hours=1))]
    )
    source = flavour.source()
    assert source.count(WINDOW) == 0
    assert read_all(source) == ([], [])
    assert flavour.open_cursors() == []


def test_timestamps_with_an_offset_are_compared_as_utc_instants(flavour: Flavour) -> None:
    flavour.load(
        [
            Record(1, datetime(2026, 11, 1, 2, 5, tzinfo=PLUS_TWO)),  # 00:05Z: inside
            Record(2, datetime(2026, 11, 1, 0, 5, tzinfo=PLUS_TWO)),  # 22:05Z the day before
            Record(3, datetime(2026, 11, 1, 2, 15, tzinfo=PLUS_TWO)),  # 00:15Z: the end, outside
        ]
    )
    source = flavour.source()
    assert source.count(WINDOW) == 1
    documents, rejected = read_all(source)
    assert rejected == []
    assert [(d.id, d.timestamp) for d in documents] == [("1", START + timedelta(minutes=5))]


def test_missing_index_or_table_is_terminal(flavour: Flavour) -> None:
    source = flavour.missing_source()
    with pytest.raises(TerminalError) as counted:
        source.count(WINDOW)
    with pytest.raises(TerminalError):
        read_all(source)
    assert "\n" not in str(counted.value)


@network_flavours()
def test_unreachable_host_is_transient_and_the_message_hides_credentials(
    flavour: Flavour,
) -> None:
    source = flavour.unreachable_source()
    with pytest.raises(TransientError) as counted:
        source.count(WINDOW)
    with pytest.raises(TransientError):
        read_all(source)
    message = str(counted.value)
    assert "\n" not in message
    assert "s3cret-pw" not in message
    source.close()


def test_close_then_reuse_builds_the_client_again(flavour: Flavour) -> None:
    flavour.load([Record(1, START)])
    source = flavour.source()
    assert source.count(WINDOW) == 1
    source.close()
    assert source.count(WINDOW) == 1
    source.close()


# --- Elasticsearch / OpenSearch ------------------------------------------------------------------


@search_flavours()
def test_sliced_point_in_time_yields_each_document_once(flavour: SearchFlavour) -> None:
    records = [Record(i, START + timedelta(seconds=i % 7)) for i in range(2500)]
    flavour.load(records)
    source = flavour.source(page_size=100, slices=3)
    documents, rejected = read_all(source)
    ids = [d.id for d in documents]
    assert len(ids) == 2500 and set(ids) == {str(r.id) for r in records}
    assert rejected == []
    assert flavour.open_cursors() == []


def _slice_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("windowpipe-slice-")]


def _wait_for_no_slice_threads(seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while _slice_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _slice_threads() == []


@search_flavours()
def test_sliced_extract_equals_unsliced_extract_id_for_id(flavour: SearchFlavour) -> None:
    """Slices are read at once, in threads: together they are the unsliced read, each
    document exactly once, with the same timestamp and body."""
    records = [Record(i, START + timedelta(seconds=(i * 13) % 900), f"p{i}") for i in range(3000)]
    flavour.load(records)
    one, rejected_one = read_all(flavour.source(page_size=100, slices=1))
    three, rejected_three = read_all(flavour.source(page_size=100, slices=3))
    assert rejected_one == rejected_three == []
    assert len(one) == len(three) == 3000
    assert len({d.id for d in three}) == 3000
    key = {d.id: (d.timestamp, d.body) for d in one}
    assert {d.id: (d.timestamp, d.body) for d in three} == key
    assert flavour.open_cursors() == []
    _wait_for_no_slice_threads()


@search_flavours()
def test_a_slice_thread_asks_for_the_next_page_while_the_caller_converts_this_one(
    flavour: SearchFlavour, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slice threads only fetch pages: every hit is checked and turned into a document in
    the caller's thread, so the next request never waits for that work."""
    import connectors.elasticsearch.source as search_module

    flavour.load([Record(i, START + timedelta(seconds=i)) for i in range(250)])
    source = flavour.source(page_size=100, slices=1)
    adapter = source.adapter
    real_search = adapter.search
    second_page_asked = threading.Event()
    searches: list[str] = []

    def counting_search(body: dict[str, Any]) -> dict[str, Any]:
        searches.append(threading.current_thread().name)
        if len(searches) >= 2:
            second_page_asked.set()
        return real_search(body)

    real_hit_to_record = search_module.hit_to_record
    converted_in: set[str] = set()

    def waiting_hit_to_record(*args: Any) -> Any:
        if not converted_in:  # the first hit of the first page
            assert second_page_asked.wait(10), "the next page was not asked for meanwhile"
        converted_in.add(threading.current_thread().name)
        return real_hit_to_record(*args)

    monkeypatch.setattr(adapter, "search", counting_search)
    monkeypatch.setattr(search_module, "hit_to_record", waiting_hit_to_record)
    documents, rejected = read_all(source)
    assert len(documents) == 250 and rejected == []
    assert converted_in == {threading.current_thread().name}
    assert searches == ["windowpipe-slice-0"] * 3
    assert flavour.open_cursors() == []


@search_flavours()
def test_slice_threads_reuse_kept_alive_connections(
    flavour: SearchFlavour, caplog: pytest.LogCaptureFixture
) -> None:
    flavour.load([Record(i, START + timedelta(seconds=i % 600)) for i in range(2000)])
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        documents, _ = read_all(flavour.source(page_size=100, slices=4))
    assert len(documents) == 2000
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


@search_flavours()
def test_an_error_in_one_slice_surfaces_and_stops_the_other_slices(
    flavour: SearchFlavour, monkeypatch: pytest.MonkeyPatch
) -> None:
    flavour.load([Record(i, START + timedelta(seconds=i % 600)) for i in range(3000)])
    source = flavour.source(page_size=100, slices=3)
    adapter = source.adapter
    real_search = adapter.search
    calls: list[int] = []
    lock = threading.Lock()

    def failing_search(body: dict[str, Any]) -> dict[str, Any]:
        slice_id = body["slice"]["id"]
        with lock:
            calls.append(slice_id)
            nth = calls.count(slice_id)
        if slice_id == 1 and nth == 2:
            raise _api_error(flavour.name, 429)
        return real_search(body)

    monkeypatch.setattr(adapter, "search", failing_search)
    with pytest.raises(TransientError, match="429"):
        read_all(source)
    assert flavour.open_cursors() == []
    _wait_for_no_slice_threads()
    # Stopped, not read to the end: 10 pages per slice would be 30 searches or more.
    assert len(calls) < 30


@search_flavours()
def test_sliced_reader_stopped_early_closes_the_pit_and_stops_its_threads(
    flavour: SearchFlavour,
) -> None:
    flavour.load([Record(i, START) for i in range(3000)])
    batches = flavour.source(page_size=100, slices=3).iter_batches(WINDOW)
    first = next(batches)
    assert len(first.documents) == 100
    assert len(flavour.open_cursors()) == 1
    batches.close()
    assert flavour.open_cursors() == []
    _wait_for_no_slice_threads()


@search_flavours()
def test_soft_time_limit_while_waiting_for_a_slice_closes_the_pit_and_stops_its_threads(
    flavour: SearchFlavour, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery raises the soft time limit in the main thread, wherever it is: here, waiting for
    the slice threads' next batch. It goes up as it is; the threads stop, the PIT is closed."""
    from billiard.exceptions import SoftTimeLimitExceeded

    flavour.load([Record(i, START) for i in range(1000)])
    source = flavour.source(page_size=100, slices=2)
    adapter = source.adapter
    real_search = adapter.search

    def slow_search(body: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.2)
        return real_search(body)

    def soft_limit(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(adapter, "search", slow_search)
    previous = signal.signal(signal.SIGALRM, soft_limit)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(SoftTimeLimitExceeded):
            read_all(source)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert flavour.open_cursors() == []
    _wait_for_no_slice_threads()


@search_flavours()
def test_point_in_time_is_closed_when_the_reader_stops_early(flavour: SearchFlavour) -> None:
    flavour.load([Record(i, START) for i in range(250)])
    batches = flavour.source(page_size=100).iter_batches(WINDOW)
    first = next(batches)
    assert len(first.documents) == 100
    assert len(flavour.open_cursors()) == 1
    batches.close()
    assert flavour.open_cursors() == []


@search_flavours()
def test_point_in_time_is_closed_when_a_page_fails(
    flavour: SearchFlavour, monkeypatch: pytest.MonkeyPatch
) -> None:
    flavour.load([Record(i, START) for i in range(250)])
    source = flavour.source(page_size=100)
    adapter = source.adapter
    real_search = adapter.search
    calls = []

    def failing_search(body: dict[str, Any]) -> dict[str, Any]:
        calls.append(body)
        if len(calls) == 2:
            # What the SDK raises when the cluster throttles: HTTP 429.
            raise _api_error(flavour.name, 429)
        return real_search(body)

    monkeypatch.setattr(adapter, "search", failing_search)
    with pytest.raises(TransientError, match="429"):
        read_all(source)
    assert flavour.open_cursors() == []


@search_flavours()
def test_search_always_sorts_by_timestamp_then_shard_doc(
    flavour: SearchFlavour, monkeypatch: pytest.MonkeyPatch
) -> None:
    flavour.load([Record(i, START) for i in range(5)])
    source = flavour.source(page_size=2)
    adapter = source.adapter
    real_search = adapter.search
    bodies: list[dict[str, Any]] = []

    def recording_search(body: dict[str, Any]) -> dict[str, Any]:
        bodies.append(json.loads(json.dumps(body)))
        return real_search(body)

    monkeypatch.setattr(adapter, "search", recording_search)
    read_all(source)
    assert len(bodies) == 3
    for body in bodies:
        assert [next(iter(key)) for key in body["sort"]] == ["@timestamp", "_shard_doc"]
        assert body["size"] == 2 and "pit" in body
    assert "search_after" not in bodies[0] and "search_after" in bodies[1]


@search_flavours()
def test_pattern_matching_no_index_counts_zero(flavour: SearchFlavour) -> None:
    source = flavour.source(index=f"nothing-{uuid.uuid4().hex[:8]}-*")
    assert source.count(WINDOW) == 0
    assert read_all(source) == ([], [])


@search_flavours()
def test_epoch_millis_and_naive_timestamps_are_utc(flavour: SearchFlavour) -> None:
    five = START + timedelta(minutes=5)
    flavour.load_raw(
        [
            ("millis", {"@timestamp": int(five.timestamp() * 1000)}),
            ("naive", {"@timestamp": "2026-11-01T00:06:00"}),
            ("nanos", {"@timestamp": "2026-11-01T00:07:00.123456789Z"}),
        ]
    )
    documents, rejected = read_all(flavour.source())
    assert rejected == []
    assert {d.id: d.timestamp for d in documents} == {
        "millis": five,
        "naive": START + timedelta(minutes=6),
        "nanos": START + timedelta(minutes=7, microseconds=123456),
    }


@search_flavours()
def test_bad_timestamps_become_rejections_with_reasons(flavour: SearchFlavour) -> None:
    # An index that maps the field as keyword compares text, so bad values land in the window;
    # a null_value makes a document without a timestamp match too.
    flavour.create_index(timestamp_type="keyword", null_value="2026-11-01T00:01:00Z")
    flavour.load_raw(
        [
            ("good", {"@timestamp": "2026-11-01T00:02:00Z"}),
            ("missing", {"@timestamp": None}),
            ("garbage", {"@timestamp": "2026-11-01T00:03 nonsense"}),
            ("shifted", {"@timestamp": "2026-11-01T00:04:00+02:00"}),
        ]
    )
    source = flavour.source()
    assert source.count(WINDOW) == 4
    documents, rejected = read_all(source)
    assert [d.id for d in documents] == ["good"]
    assert sorted(rejected, key=lambda r: str(r.id)) == [
        Rejection("garbage", "unparseable timestamp"),
        Rejection("missing", "missing timestamp"),
        Rejection("shifted", "timestamp outside window"),
    ]


@search_flavours()
def test_nested_timestamp_field_is_found_by_its_dotted_path(flavour: SearchFlavour) -> None:
    index = f"{flavour.index}-nested"
    flavour.admin.indices.create(
        index=index,
        body={"mappings": {"properties": {"event": {"properties": {"created": {"type": "date"}}}}}},
    )
    flavour.load_raw([("n1", {"event": {"created": "2026-11-01T00:05:00Z"}})], index=index)
    source = flavour.source(index=index, timestamp_field="event.created")
    assert source.count(WINDOW) == 1
    documents, _ = read_all(source)
    assert [(d.id, d.timestamp) for d in documents] == [("n1", START + timedelta(minutes=5))]


@search_flavours()
def test_bad_request_is_terminal(flavour: SearchFlavour) -> None:
    flavour.load([Record(1, START)])
    source = flavour.source(pit_keep_alive="for-a-while")
    with pytest.raises(TerminalError, match="400"):
        read_all(source)


def _api_error(kind: str, status: int) -> Exception:
    """The exception each SDK raises for an HTTP error status."""
    if kind == "opensearch":
        from opensearchpy import exceptions as opensearch_errors

        os_class = opensearch_errors.HTTP_EXCEPTIONS.get(status, opensearch_errors.TransportError)
        return os_class(status, "some_exception", {"error": {"reason": "why"}})
    from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
    from elasticsearch import exceptions as es_errors

    meta = ApiResponseMeta(status, "1.1", HttpHeaders(), 0.0, NodeConfig("http", "localhost", 9200))
    es_class = es_errors.HTTP_EXCEPTIONS.get(status, es_errors.ApiError)
    return es_class("some_exception", meta, {"error": {"reason": "why"}})


def _connection_error(kind: str) -> Exception:
    if kind == "opensearch":
        from opensearchpy.exceptions import ConnectionTimeout

        return ConnectionTimeout("TIMEOUT", "read timed out", None)
    from elastic_transport import ConnectionTimeout as EsConnectionTimeout

    return EsConnectionTimeout("read timed out")


@pytest.mark.parametrize("kind", SEARCH_FLAVOURS)
@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, TerminalError),
        (401, TerminalError),
        (403, TerminalError),
        (404, TerminalError),
        (429, TransientError),
        (502, TransientError),
        (503, TransientError),
        (504, TransientError),
    ],
)
def test_http_status_decides_transient_or_terminal(
    kind: str, status: int, expected: type[Exception]
) -> None:
    config: dict[str, Any] = {"type": kind, "hosts": ["http://127.0.0.1:1"], "index": "i"}
    source = (
        OpenSearchSource(OpenSearchSourceConfig(**config))
        if kind == "opensearch"
        else ElasticsearchSource(ElasticsearchSourceConfig(**config))
    )
    translated = source.adapter.translate(_api_error(kind, status), "count on i")
    assert type(translated) is expected
    assert str(status) in str(translated) and "why" in str(translated)
    assert type(source.adapter.translate(_connection_error(kind), "search")) is TransientError
    assert source.adapter.translate(KeyError("bug"), "search") is None


# --- SQL -----------------------------------------------------------------------------------------


def test_sqlite_text_that_is_not_utf8_becomes_a_rejection(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE events (id INTEGER PRIMARY KEY, created_at DATETIME, "
                "payload TEXT, raw BLOB)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO events VALUES "
                "(1, '2026-11-01 00:01:00.000000', 'fine', x'6f6b'),"
                "(2, '2026-11-01 00:02:00.000000', CAST(x'ff61' AS TEXT), NULL),"
                "(3, '2026-11-01 00:03:00.000000', 'blob', x'c328')"
            )
        )
    engine.dispose()
    source = SqlSource(SqlSourceConfig(type="sql", url=sqlite_url, table="events"))
    assert source.count(WINDOW) == 3
    documents, rejected = read_all(source)
    assert [(d.id, d.body) for d in documents] == [
        ("1", {"id": 1, "created_at": "2026-11-01T00:01:00Z", "payload": "fine", "raw": "ok"})
    ]
    assert rejected == [Rejection("2", "not UTF-8"), Rejection("3", "not UTF-8")]


def test_postgres_naive_timestamps_are_utc_and_values_become_json(pg_schema_url: str) -> None:
    engine = sa.create_engine(pg_schema_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE orders (order_id text PRIMARY KEY, placed timestamp NOT NULL, "
                "amount numeric(12, 2), raw bytea, tags text[], meta jsonb, day date)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO orders VALUES "
                "('a', '2026-11-01 00:00:00', 12.30, 'hi'::bytea, '{x,y}', "
                "'{\"k\": [1, 2]}', '2026-11-01'),"
                "('b', '2026-11-01 00:15:00', 1, NULL, NULL, NULL, NULL)"
            )
        )
    engine.dispose()
    source = SqlSource(
        SqlSourceConfig(
            type="sql",
            url=pg_schema_url,
            table="orders",
            timestamp_column="placed",
            id_column="order_id",
        )
    )
    assert source.count(WINDOW) == 1
    documents, rejected = read_all(source)
    assert rejected == []
    assert [(d.id, d.timestamp, d.body) for d in documents] == [
        (
            "a",
            START,
            {
                "order_id": "a",
                "placed": "2026-11-01T00:00:00Z",
                "amount": str(Decimal("12.30")),
                "raw": "hi",
                "tags": ["x", "y"],
                "meta": {"k": [1, 2]},
                "day": "2026-11-01",
            },
        )
    ]
    source.close()


def test_sql_table_without_the_configured_columns_is_terminal(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE events (id INTEGER PRIMARY KEY, created_at TEXT)"))
    engine.dispose()
    wrong_column = SqlSource(
        SqlSourceConfig(type="sql", url=sqlite_url, table="events", timestamp_column="ts")
    )
    with pytest.raises(TerminalError, match="no column 'ts'"):
        wrong_column.count(WINDOW)
    not_a_timestamp = SqlSource(SqlSourceConfig(type="sql", url=sqlite_url, table="events"))
    with pytest.raises(TerminalError, match="not a timestamp column"):
        not_a_timestamp.count(WINDOW)


def _peak_bytes_while_reading(source: SqlSource, window: Window) -> tuple[int, int]:
    """(documents read, peak traced bytes) for one pass over `window`, batches discarded."""
    tracemalloc.start()
    try:
        read = 0
        for batch in source.iter_batches(window):
            read += len(batch.documents)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return read, peak


def test_streaming_200k_rows_keeps_memory_flat(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE events (id INTEGER PRIMARY KEY, created_at DATETIME, payload TEXT)"
            )
        )
        conn.execute(sa.text("CREATE INDEX events_ts ON events (created_at, id)"))
        # 200,000 rows, 10 ms apart from START; a 30-byte payload each.
        conn.execute(
            sa.text(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 199999) "
                "INSERT INTO events SELECT i, "
                "strftime('%Y-%m-%d %H:%M:%f', '2026-11-01 00:00:00', "
                "printf('+%.3f seconds', i / 100.0)) "
                "|| '000', printf('payload-%022d', i) FROM n"
            )
        )
    engine.dispose()
    source = SqlSource(SqlSourceConfig(type="sql", url=sqlite_url, table="events", page_size=1000))
    small = Window(START, START + timedelta(seconds=200))  # 20,000 rows
    large = Window(START, START + timedelta(hours=1))  # all 200,000 rows
    assert source.count(small) == 20_000
    assert source.count(large) == 200_000
    read_small, peak_small = _peak_bytes_while_reading(source, small)
    read_large, peak_large = _peak_bytes_while_reading(source, large)
    assert (read_small, read_large) == (20_000, 200_000)
    # Ten times the rows, about the same peak: one page at a time, never the window.
    assert peak_large < peak_small * 1.5 + 512 * 1024, (peak_small, peak_large)
    assert peak_large < 16 * 1024 * 1024
    source.close()


def test_fingerprint_counts_the_window_and_takes_the_max_of_the_version_field(
    flavour: Flavour,
) -> None:
    records = [Record(1, START), Record(2, START + timedelta(minutes=1)), Record(3, WINDOW.end)]
    if isinstance(flavour, SearchFlavour):
        flavour.load_raw(
            [(str(r.id), {"@timestamp": r.ts.isoformat(), "seq": r.id}) for r in records]
        )
        versioned = flavour.source(version_field="seq")
    else:
        flavour.load(records)
        versioned = flavour.source(version_column="id")
    # Without a version field: the count alone, as precheck recorded it before.
    assert flavour.source().fingerprint(WINDOW) == Fingerprint(2, None)
    found = versioned.fingerprint(WINDOW)
    assert found.count == 2 and found.version is not None and float(found.version) == 2
    # An in-place update that moves the version: same count, another fingerprint.
    if isinstance(flavour, SearchFlavour):
        flavour.load_raw([("1", {"@timestamp": START.isoformat(), "seq": 10})])
    else:
        with flavour.engine.begin() as conn:
            conn.execute(sa.text("UPDATE events SET id = 10 WHERE id = 1"))
    updated = versioned.fingerprint(WINDOW)
    assert updated.count == 2 and updated.version is not None and float(updated.version) == 10
    # An empty window: zero and no version.
    empty = Window(START - timedelta(hours=1), START)
    assert versioned.fingerprint(empty) == Fingerprint(0, None)


def test_fingerprint_of_a_missing_version_column_is_terminal(sqlite_url: str) -> None:
    flavour = SqlFlavour("sql-sqlite", sqlite_url)
    flavour.load([Record(1, START)])
    with pytest.raises(TerminalError, match="no column 'updated_at' \\(version_column\\)"):
        flavour.source(version_column="updated_at").fingerprint(WINDOW)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-01T00:05:00.123Z", START + timedelta(minutes=5, milliseconds=123)),
        ("2026-11-01T02:05:00+02:00", START + timedelta(minutes=5)),
        ("2026-11-01T00:05:00", START + timedelta(minutes=5)),
        (" 2026-11-01T00:05:00Z ", START + timedelta(minutes=5)),
        ("2026-11-01T00:05:00.123456789Z", START + timedelta(minutes=5, microseconds=123456)),
        (str(int((START + timedelta(minutes=5)).timestamp() * 1000)), START + timedelta(minutes=5)),
        (["2026-11-01T00:05:00Z"], START + timedelta(minutes=5)),
        ("2026-13-01T00:00:00Z", None),
        ("2026-11-01T25:00:00Z", None),
        ("not-a-date-at-all", None),
        (True, None),
    ],
)
def test_parse_timestamp_fast_path_agrees_with_the_general_one(
    value: Any, expected: datetime | None
) -> None:
    from connectors.elasticsearch import parse_timestamp

    parsed = parse_timestamp(value)
    assert parsed == expected
    if parsed is not None:
        assert parsed.utcoffset() == timedelta(0)


def test_postgres_json_that_cannot_be_staged_as_it_is_becomes_a_rejection(
    pg_schema_url: str,
) -> None:
    # A jsonb integer beyond 64 bits would be read back from the staging area as a float: rejected
    # with its reason, the rest of the window staged.
    engine = sa.create_engine(pg_schema_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE events (id bigint PRIMARY KEY, created_at timestamptz, meta jsonb)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO events VALUES "
                "(1, '2026-11-01 00:01:00+00', '{\"n\": 18446744073709551615}'),"
                "(2, '2026-11-01 00:02:00+00', '{\"n\": 18446744073709551616}'),"
                "(3, '2026-11-01 00:03:00+00', '{\"n\": -9223372036854775809}')"
            )
        )
    engine.dispose()
    source = SqlSource(SqlSourceConfig(type="sql", url=pg_schema_url, table="events"))
    documents, rejected = read_all(source)
    assert [(d.id, d.body["meta"]) for d in documents] == [("1", {"n": 2**64 - 1})]
    assert rejected == [
        Rejection("2", "integer beyond 64 bits"),
        Rejection("3", "integer beyond 64 bits"),
    ]
