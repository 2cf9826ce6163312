"""The search sources decode their SDK's replies with orjson (`connectors.elasticsearch.
decode_reply`, through `opensearch_serializer` and `elasticsearch_serializer`): the same values
and the same errors as the SDKs' own stdlib decoding, only faster.

Every comparison is against the SDK's default serializer: a source built with it (the
`stdlib_source` fixture) next to the source as shipped, on the same osmem-server index; values
are compared by `repr`, so an int that became a float (`1 == 1.0`) is a difference.
"""

from __future__ import annotations

import json
import random
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opensearchpy import OpenSearch
from osmem_server import OsmemServer

import connectors.elasticsearch.adapters as search_adapters
from connectors.base import Rejection, encode_line
from connectors.elasticsearch import (
    ElasticsearchSource,
    OpenSearchSource,
    SearchEngineSource,
    decode_reply,
    elasticsearch_serializer,
    opensearch_serializer,
    orjson_exact,
)
from core.config import ElasticsearchSourceConfig, OpenSearchSourceConfig
from core.errors import TerminalError
from core.windows import Window
from tests.support.osmem import OsmemCompatibleNode

START = datetime(2026, 11, 1, tzinfo=UTC)
WINDOW = Window(START, START + timedelta(minutes=15))
SEARCH_FLAVOURS = ["opensearch", "elasticsearch"]

TEXTS = [
    '{"a":1,"b":[true,false,null],"c":{"d":"e"}}',
    '{"s":"\\u00e9\\ud83d\\ude00 \\"q\\" \\\\ \\/ \\n\\t\\u0000\\u0001","u":"日本語 😀"}',
    '{"f":[0.1,1e-7,5e-324,1.7976931348623157e308,2.2250738585072011e-308,-0.0,1E2,-0,1e-400]}',
    '{"i64":[9223372036854775807,-9223372036854775808],"u64":18446744073709551615}',
    '{"big":18446744073709551616}',
    '{"big":123456789012345678901234567890}',
    '{"neg":-9223372036854775809}',
    '{"digits":"12345678901234567890123","id":"-1234567890123456789"}',
    '{"inf":1e400}',
    '{"ninf":-1e400}',
    '{"nan":NaN}',
    '{"inf":Infinity}',
    '{"lone":"\\ud800x"}',
    '{"a":1,"a":2}',
    "[" * 2000 + "]" * 2000,
    '{"a":1,}',
    '{"truncated":',
    "",
    " ",
    "{}x",
    '"\\x41"',
    "\ufeff{}",
]
"""JSON texts on which orjson and the stdlib can disagree (integers beyond 64 bits, NaN and
infinities, lone surrogates, deep nesting) or that neither can decode, and some ordinary ones."""


def outcome(decode: Callable[[Any], Any], data: Any) -> tuple[str, str]:
    """`("value", repr)` of what `decode` returns, or `("error", type: message)` of its error."""
    try:
        return "value", repr(decode(data))
    except Exception as error:  # compared, whatever it is
        return "error", f"{type(error).__module__}.{type(error).__qualname__}: {error}"


# --- decoding, without a server ----------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_decode_reply_gives_what_json_gives(text: str) -> None:
    assert outcome(lambda data: decode_reply(data, json.loads), text) == outcome(json.loads, text)
    raw = text.encode("utf-8", "surrogatepass")
    assert outcome(lambda data: decode_reply(data, json.loads), raw) == outcome(json.loads, raw)


@pytest.mark.parametrize("text", TEXTS)
def test_the_serializers_decode_as_the_sdks_default_ones(text: str) -> None:
    from elasticsearch.serializer import JsonSerializer
    from opensearchpy.serializer import JSONSerializer

    assert outcome(opensearch_serializer().loads, text) == outcome(JSONSerializer().loads, text)
    raw = text.encode("utf-8", "surrogatepass")
    assert outcome(elasticsearch_serializer().loads, raw) == outcome(JsonSerializer().loads, raw)


def test_random_doubles_decode_to_the_same_floats() -> None:
    rng = random.Random(14)
    values: list[str] = []
    while len(values) < 20_000:
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if value == value and abs(value) != float("inf"):  # finite
            values += [repr(value), f"{value:.17g}", f"{value:.6e}"]
    # Those with 20 digits in a row (`0.00035322269898662199`) would go to the stdlib.
    fast = [value for value in values if orjson_exact(value.encode())]
    assert len(fast) > 0.9 * len(values)
    text = "[" + ",".join(fast) + "]"
    assert orjson_exact(text.encode())  # the orjson path, not the fallback
    assert repr(decode_reply(text, json.loads)) == repr(json.loads(text))


def test_only_a_reply_with_a_run_of_19_or_20_digits_goes_to_the_stdlib() -> None:
    assert orjson_exact(b'{"sort":[1772323500123,4294967296],"n":-922337203685477580}')
    assert orjson_exact(b'{"u64":1844674407370955161,"i":"123456789012345678"}')
    assert not orjson_exact(b'{"n":18446744073709551616}')
    assert not orjson_exact(b'{"n":-9223372036854775809}')
    assert not orjson_exact(b'{"s":"id 12345678901234567890"}')  # in a string too: safe side


# --- the sources on osmem-server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def osmem() -> Iterator[OsmemServer]:
    server = OsmemServer.start(addr="127.0.0.1:0")
    yield server
    server.close()


@pytest.fixture
def index(osmem: OsmemServer) -> Iterator[str]:
    """A fresh index mapping only `@timestamp` (`dynamic: false`): osmem keeps every other value
    of `_source` as the text it was given, as Elasticsearch does, so the replies carry them."""
    name = f"wp-replies-{uuid.uuid4().hex[:10]}"
    admin = OpenSearch(hosts=[osmem.url])
    admin.indices.create(
        index=name,
        body={"mappings": {"dynamic": False, "properties": {"@timestamp": {"type": "date"}}}},
    )
    try:
        yield name
    finally:
        admin.indices.delete(index=name)
        admin.close()


def load(server: OsmemServer, index: str, sources: dict[str, str]) -> None:
    """Index each raw JSON text as it is (never through a Python dict: `1e400` and integers
    beyond 64 bits must reach the server as written)."""
    admin = OpenSearch(hosts=[server.url])
    try:
        for doc_id, text in sources.items():
            admin.transport.perform_request("PUT", f"/{index}/_doc/{doc_id}", body=text)
        admin.indices.refresh(index=index)
    finally:
        admin.close()


def build(kind: str, url: str, index: str, **options: Any) -> SearchEngineSource:
    values: dict[str, Any] = {
        "type": kind,
        "hosts": [url],
        "index": index,
        "page_size": 3,
        "request_timeout": 5,
        **options,
    }
    source: SearchEngineSource
    if kind == "opensearch":
        source = OpenSearchSource(OpenSearchSourceConfig(**values))
    else:
        source = ElasticsearchSource(
            ElasticsearchSourceConfig(**values), node_class=OsmemCompatibleNode
        )
    _ = source.adapter  # built now: `stdlib_source` patches only while it is built
    return source


@pytest.fixture
def stdlib_source(monkeypatch: pytest.MonkeyPatch) -> Callable[..., SearchEngineSource]:
    """`build`, but the client decodes with the SDK's default serializer (stdlib `json`)."""

    def make(kind: str, url: str, index: str, **options: Any) -> SearchEngineSource:
        from elasticsearch.serializer import JsonSerializer
        from opensearchpy.serializer import JSONSerializer

        with monkeypatch.context() as patch:
            patch.setattr(search_adapters, "opensearch_serializer", JSONSerializer)
            patch.setattr(search_adapters, "elasticsearch_serializer", JsonSerializer)
            return build(kind, url, index, **options)

    return make


def read(source: SearchEngineSource) -> tuple[str, list[tuple[str, str, str, bytes]]]:
    """Every document (id, timestamp, body repr, staged line) and rejection of the window, or
    the error the read ended with."""
    documents: list[tuple[str, str, str, bytes]] = []
    rejected: list[Rejection] = []
    try:
        for batch in source.iter_batches(WINDOW):
            documents.extend(
                (d.id, d.timestamp.isoformat(), repr(d.body), encode_line(d))
                for d in batch.documents
            )
            rejected.extend(batch.rejected)
    except Exception as error:
        return f"error {type(error).__qualname__}: {error}", documents
    finally:
        source.close()
    return f"rejected {sorted((r.id or '', r.reason) for r in rejected)}", documents


def at(minute: int) -> str:
    return (START + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z")


STAGEABLE = {
    "plain": f'{{"@timestamp":"{at(1)}","user":42,"kind":"view","tags":["a","b"]}}',
    "text": f'{{"@timestamp":"{at(2)}","s":"\\u00e9\\ud83d\\ude00 \\"q\\" \\\\ \\n\\t\\u0001",'
    '"u":"日本語 😀"}',
    "floats": f'{{"@timestamp":"{at(3)}","f":[0.1,1e-7,5e-324,1.7976931348623157e308,'
    "2.2250738585072011e-308,-0.0,1E2,-0]}",
    "ints": f'{{"@timestamp":"{at(4)}","i64":[9223372036854775807,-9223372036854775808],'
    '"u64":18446744073709551615}',
    "digits": f'{{"@timestamp":"{at(5)}","card":"12345678901234567890123"}}',
    "infinite": f'{{"@timestamp":"{at(6)}","inf":1e400}}',
    "nested": f'{{"@timestamp":"{at(7)}","a":{{"b":{{"c":[1,{{"d":null}}]}}}}}}',
    "large": f'{{"@timestamp":"{at(8)}","payload":"{"x" * 600}"}}',
}
"""Documents windowpipe stages (or rejects) the same whichever decoder read them; with
`page_size = 3`, some pages take the orjson path and some the stdlib fallback. With
`max_document_bytes = 500`, "large" is rejected."""


@pytest.mark.integration
@pytest.mark.parametrize("kind", SEARCH_FLAVOURS)
def test_the_window_reads_the_same_documents_and_staged_lines_as_with_json(
    kind: str,
    osmem: OsmemServer,
    index: str,
    stdlib_source: Callable[..., SearchEngineSource],
) -> None:
    load(osmem, index, STAGEABLE)
    ours = read(build(kind, osmem.url, index, max_document_bytes=500))
    theirs = read(stdlib_source(kind, osmem.url, index, max_document_bytes=500))
    assert ours == theirs
    assert [row[0] for row in ours[1]] == list(STAGEABLE)[:-1]
    assert ours[0] == "rejected [('large', 'oversized document')]"
    # And the slices: each slice a thread of its own, the same documents in all.
    sliced = read(build(kind, osmem.url, index, max_document_bytes=500, slices=2))
    assert sorted(sliced[1]) == sorted(ours[1]) and sliced[0] == ours[0]


@pytest.mark.integration
@pytest.mark.parametrize("kind", SEARCH_FLAVOURS)
def test_integers_beyond_64_bits_and_lone_surrogates_come_back_as_json_reads_them(
    kind: str,
    osmem: OsmemServer,
    index: str,
    stdlib_source: Callable[..., SearchEngineSource],
) -> None:
    """orjson alone would read 2**64 as a float (a silent change of the value) and refuse the
    lone surrogate; the reply goes to the stdlib instead."""
    load(
        osmem,
        index,
        {
            "big": f'{{"@timestamp":"{at(1)}","big":123456789012345678901234567890,'
            '"over":18446744073709551616,"neg":-9223372036854775809}',
            "lone": f'{{"@timestamp":"{at(2)}","lone":"\\ud800x"}}',
        },
    )
    hits: dict[str, list[Any]] = {}
    for doc_id in ("big", "lone"):  # one reply each: either alone sends its reply to the stdlib
        body = {"query": {"ids": {"values": [doc_id]}}}
        for name, source in (
            ("ours", build(kind, osmem.url, index)),
            ("theirs", stdlib_source(kind, osmem.url, index)),
        ):
            hits.setdefault(name, []).extend(
                source.adapter.search_index(index, body)["hits"]["hits"]
            )
            source.close()
    ours, theirs = hits["ours"], hits["theirs"]
    assert [hit["_id"] for hit in ours] == ["big", "lone"]
    assert repr(ours) == repr(theirs)
    assert ours[0]["_source"]["big"] == 123456789012345678901234567890
    assert type(ours[0]["_source"]["over"]) is int
    assert ours[1]["_source"]["lone"] == "\ud800x"
    # What the extract then does with them is the same: neither can be staged as it is (a
    # staged integer beyond 64 bits would be read back as a float), so each is a rejection
    # with its reason, and the window goes on.
    ours_read = read(build(kind, osmem.url, index))
    assert ours_read == read(stdlib_source(kind, osmem.url, index))
    assert ours_read == (
        "rejected [('big', 'integer beyond 64 bits'), ('lone', 'not UTF-8')]",
        [],
    )


@pytest.mark.integration
@pytest.mark.parametrize("kind", SEARCH_FLAVOURS)
def test_error_replies_give_the_same_clear_errors_as_with_json(
    kind: str,
    osmem: OsmemServer,
    index: str,
    stdlib_source: Callable[..., SearchEngineSource],
) -> None:
    load(osmem, index, {"plain": STAGEABLE["plain"]})
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(TerminalError) as ours:
        build(kind, osmem.url, missing).count(WINDOW)
    with pytest.raises(TerminalError) as theirs:
        stdlib_source(kind, osmem.url, missing).count(WINDOW)
    assert str(ours.value) == str(theirs.value)
    assert "404" in str(ours.value) and missing in str(ours.value)  # the reason was decoded
    # A bad request in the middle of the read (the PIT's keep-alive is refused).
    bad = read(build(kind, osmem.url, index, pit_keep_alive="for-a-while"))
    assert bad == read(stdlib_source(kind, osmem.url, index, pit_keep_alive="for-a-while"))
    assert bad[0].startswith("error TerminalError:") and "400" in bad[0]


class _Garbled(BaseHTTPRequestHandler):
    """Answers every request 200 `application/json` with a body cut short."""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = b'{"count": 1, "_shards": {"total": '
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-elastic-product", "Elasticsearch")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def garbled_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbled)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", SEARCH_FLAVOURS)
def test_an_undecodable_reply_fails_with_the_same_error_as_with_json(
    kind: str, garbled_server: str, stdlib_source: Callable[..., SearchEngineSource]
) -> None:
    def count(source: SearchEngineSource) -> tuple[str, str]:
        return outcome(lambda window: source.count(window), WINDOW)

    ours = count(build(kind, garbled_server, "events"))
    assert ours == count(stdlib_source(kind, garbled_server, "events"))
    assert ours[0] == "error" and "SerializationError" in ours[1] and '"_shards"' in ours[1]
