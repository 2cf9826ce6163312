"""Elasticsearch and OpenSearch sources: point in time + `search_after`, optionally sliced.

One paging implementation (`SearchEngineSource`) drives a thin client adapter per SDK:
elasticsearch-py for `type = "elasticsearch"`, opensearch-py for `type = "opensearch"`. The
adapters differ only in how a point in time is opened and closed, and in the SDK's exceptions.

Why a point in time and `[timestamp, _shard_doc]`: the PIT freezes the index, so a window read
while documents are still arriving (or being deleted) is one consistent snapshot; `_shard_doc`
is the tiebreaker that makes `search_after` exact when thousands of documents share a
timestamp (without it, documents at a page boundary are skipped).

Each hit becomes a `Document`, or a `Rejection` when its timestamp is missing, unparseable or
outside the window (possible when an index maps the field as text or keyword), or when the
document is larger than `max_document_bytes`. Rejections are counted by the caller, never
dropped here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from connectors.base import (
    INSTANT_OPTIONS,
    Batch,
    Document,
    Rejection,
    encode_body,
    staged_line,
    unencodable_reason,
)
from connectors.shared import Lease, lease
from core.config import ElasticsearchSourceConfig, OpenSearchSourceConfig, resolve_secret
from core.errors import (
    ConfigError,
    StageTimeLimitError,
    TerminalError,
    TransientError,
    WindowpipeError,
    one_line,
)
from core.instants import as_utc, format_instant
from core.recheck import Fingerprint
from core.retry import SDK_RETRIES, as_time_limit
from core.windows import Window

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses worth retrying: timeouts, throttling, an overloaded or restarting cluster."""

CLIENT_OPTIONS: dict[str, Any] = {"max_retries": SDK_RETRIES, "retry_on_timeout": False}
"""Both SDKs' own retries off (by default they retry a connection error, and HTTP 502/503/504,
three times). Every retry is counted in core/retry.py's budget instead; and inside a request
the SDKs would take a soft time limit for a connection error and retry it."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_MILLIS = re.compile(r"^-?\d+$")


# --- timestamps and hits ---------------------------------------------------------------------


def parse_timestamp(value: Any) -> datetime | None:
    """An Elasticsearch date value as an aware UTC datetime; None when it cannot be one.

    Accepted: epoch milliseconds (a number or a string of digits, like ES's `epoch_millis`) and
    ISO 8601 text with or without an offset. ES stores a date without an offset as UTC, so a
    naive value is UTC here too.
    """
    if type(value) is str and len(value) > 10 and value[4] == "-":
        # The common case first (once per hit): ISO text such as `2026-03-01T00:05:00.123Z`.
        # A `-` at index 4 can never be epoch milliseconds, so the digits check is skipped.
        try:
            parsed = datetime.fromisoformat(value)
        except (ValueError, OverflowError):
            parsed = None
        if parsed is not None:
            return as_utc(parsed)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            return _EPOCH + timedelta(milliseconds=value)
        if not isinstance(value, str):
            return None
        text = value.strip()
        if _EPOCH_MILLIS.match(text):
            return _EPOCH + timedelta(milliseconds=int(text))
        parsed = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        return None
    return as_utc(parsed)


def field_value(source: dict[str, Any], path: str) -> Any:
    """The value at `path` in a document: a literal key (`@timestamp`, `event.created` written
    flat) first, else the dotted path through nested objects; None when absent."""
    if path in source:
        return source[path]
    value: Any = source
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def hit_to_record(
    hit: dict[str, Any], window: Window, timestamp_field: str, max_document_bytes: int
) -> Document | Rejection:
    """One search hit as a `Document`, or the `Rejection` that says why it cannot be staged."""
    doc_id = str(hit.get("_id"))
    body = hit.get("_source")
    if not isinstance(body, dict):
        return Rejection(doc_id, "missing source")
    raw = field_value(body, timestamp_field)
    if raw is None:
        return Rejection(doc_id, "missing timestamp")
    timestamp = parse_timestamp(raw)
    if timestamp is None:
        return Rejection(doc_id, "unparseable timestamp")
    if not window.contains(timestamp):
        return Rejection(doc_id, "timestamp outside window")
    # Serialized once: the size check and the staged line (`encode_line`) share the bytes.
    try:
        encoded = encode_body(body)
    except orjson.JSONEncodeError as error:
        return Rejection(doc_id, unencodable_reason(error))
    if len(encoded) > max_document_bytes:
        return Rejection(doc_id, "oversized document")
    # The staged line from its parts (`timestamp` is in UTC): what `encode_line` would build.
    line = staged_line(doc_id, orjson.dumps(timestamp, option=INSTANT_OPTIONS), encoded)
    return Document(id=doc_id, timestamp=timestamp, body=body, encoded=encoded, line=line)


def range_query(timestamp_field: str, window: Window) -> dict[str, Any]:
    """`start <= timestamp < end`, with the bounds as ISO instants in UTC."""
    return {
        "range": {
            timestamp_field: {
                "gte": format_instant(window.start),
                "lt": format_instant(window.end),
                # The bounds' format, whatever format the index declares for the field.
                "format": "strict_date_optional_time",
            }
        }
    }


# --- decoding replies ---------------------------------------------------------------------------


def _digit_table() -> bytes:
    """A `bytes.translate` table: an ASCII digit becomes `0`, `-` stays, any other byte becomes
    a space; a run of digits is then a run of `0`s that `in` finds at C speed."""
    table = bytearray(b" " * 256)
    table[ord("-")] = ord("-")
    for digit in b"0123456789":
        table[digit] = ord("0")
    return bytes(table)


_DIGITS_ONLY = _digit_table()
_LONG_POSITIVE = b"0" * 20
_LONG_NEGATIVE = b"-" + b"0" * 19


def orjson_exact(data: bytes) -> bool:
    """False when orjson might decode `data` differently from the stdlib's `json`: it turns an
    integer outside [-2**63, 2**64 - 1] into a float where `json` keeps the exact int. Such an
    integer has 20 digits or more, or is negative with 19; any such run of digits in the reply
    (in a string too: this does not parse) sends it to `json`. About 1 ms for a 1 MB page."""
    digits = data.translate(_DIGITS_ONLY)
    return _LONG_POSITIVE not in digits and _LONG_NEGATIVE not in digits


def decode_reply(data: bytes | str, fallback: Callable[[Any], Any]) -> Any:
    """A search engine's JSON reply, decoded by orjson (about 2.5x faster than `json.loads`),
    or by `fallback` (the SDK's own stdlib decoding) wherever the two could differ: a reply with
    an integer beyond 64 bits (`orjson_exact`), and any reply orjson refuses (NaN, Infinity or
    an overflowing number, a lone surrogate, nesting deeper than 1024, malformed JSON). So the
    values are the ones `json` gives, and a reply `json` cannot decode fails with the SDK's own
    error, as before."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if orjson_exact(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return fallback(data)


@functools.cache
def opensearch_serializer() -> Any:
    """opensearch-py's `JSONSerializer` (requests encoded by the stdlib as before) whose replies
    are decoded by `decode_reply`; opensearch-py has no orjson serializer of its own."""
    from opensearchpy.serializer import JSONSerializer

    class OrjsonDecodingSerializer(JSONSerializer):
        def loads(self, s: str) -> Any:
            return decode_reply(s, super().loads)

    return OrjsonDecodingSerializer()


@functools.cache
def elasticsearch_serializer() -> Any:
    """elasticsearch-py's own `OrjsonSerializer` (requests and replies through orjson), its
    decoding made exact by `decode_reply` with the stdlib `json.loads` of its `JsonSerializer`
    as the fallback (the SDK's wrapping into `SerializationError` is unchanged)."""
    from elasticsearch.serializer import OrjsonSerializer

    class ExactOrjsonSerializer(OrjsonSerializer):
        def json_loads(self, data: bytes) -> Any:
            return decode_reply(data, json.loads)

    return ExactOrjsonSerializer()


# --- client adapters ---------------------------------------------------------------------------


class SearchClientAdapter(ABC):
    """The few calls the paging logic needs, over one SDK's client."""

    flavour: str
    """`elasticsearch` or `opensearch`, for error messages."""

    @abstractmethod
    def count(self, index: str, query: dict[str, Any]) -> int: ...

    @abstractmethod
    def search_index(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        """A search of `index` (no point in time): for the fingerprint's count and max."""

    @abstractmethod
    def open_pit(self, index: str, keep_alive: str) -> str: ...

    @abstractmethod
    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        """A search over a point in time (the PIT is in `body`, so no index)."""

    @abstractmethod
    def close_pit(self, pit_id: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def translate(self, error: Exception, action: str) -> WindowpipeError | None:
        """The windowpipe error for an SDK exception; None for exceptions that are not the
        SDK's (bugs, which propagate as they are). A soft time limit, raw or wrapped by the SDK
        into a connection error, is `StageTimeLimitError`: transient, never retried in the step."""
        limit = as_time_limit(error, f"{self.flavour}: {action}")
        if limit is not None:
            return limit
        return self._translate_sdk_error(error, action)

    @abstractmethod
    def _translate_sdk_error(self, error: Exception, action: str) -> WindowpipeError | None:
        """`translate` for errors that are not a soft time limit."""


def _classify(flavour: str, action: str, status: Any, detail: str) -> WindowpipeError:
    message = one_line(f"{flavour}: {action} failed: {detail}")
    if isinstance(status, int) and status in TRANSIENT_STATUSES:
        return TransientError(message)
    if isinstance(status, int):
        return TerminalError(message)
    # No HTTP status: the request never got an answer (refused, reset, timed out).
    return TransientError(message)


class ElasticsearchAdapter(SearchClientAdapter):
    """elasticsearch-py 8/9: `open_point_in_time` / `close_point_in_time`."""

    flavour = "elasticsearch"

    def __init__(self, config: ElasticsearchSourceConfig, node_class: Any = None) -> None:
        from elasticsearch import Elasticsearch

        options: dict[str, Any] = {
            "request_timeout": config.request_timeout,
            **CLIENT_OPTIONS,
            "verify_certs": config.verify_certs,
        }
        if config.ca_certs:
            options["ca_certs"] = config.ca_certs
        if config.username:
            options["basic_auth"] = (config.username, resolve_secret(config.password_env) or "")
        if config.api_key_env:
            options["api_key"] = resolve_secret(config.api_key_env)
        if node_class is not None:
            options["node_class"] = node_class
        # A kept-alive connection per slice thread (the SDK's default is 10 per node).
        options["connections_per_node"] = max(10, config.slices)
        # Replies decoded by orjson, with the stdlib's values and errors (`decode_reply`).
        options["serializers"] = {"application/json": elasticsearch_serializer()}
        self._client = Elasticsearch(config.hosts, **options)

    def count(self, index: str, query: dict[str, Any]) -> int:
        return int(self._client.count(index=index, query=query)["count"])

    def search_index(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._client.search(index=index, body=body).body)

    def open_pit(self, index: str, keep_alive: str) -> str:
        return str(self._client.open_point_in_time(index=index, keep_alive=keep_alive)["id"])

    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._client.search(body=body).body)

    def close_pit(self, pit_id: str) -> None:
        self._client.close_point_in_time(id=pit_id)

    def close(self) -> None:
        self._client.close()

    def _translate_sdk_error(self, error: Exception, action: str) -> WindowpipeError | None:
        from elastic_transport import TransportError
        from elasticsearch import ApiError

        if isinstance(error, ApiError):
            return _classify(self.flavour, action, error.meta.status, _api_detail(error))
        if isinstance(error, TransportError):
            return _classify(self.flavour, action, None, f"{type(error).__name__}: {error}")
        return None


class OpenSearchAdapter(SearchClientAdapter):
    """opensearch-py: `create_pit` / `delete_pit`."""

    flavour = "opensearch"

    def __init__(self, config: OpenSearchSourceConfig) -> None:
        from opensearchpy import OpenSearch

        options: dict[str, Any] = {
            "timeout": config.request_timeout,
            **CLIENT_OPTIONS,
            "verify_certs": config.verify_certs,
        }
        if config.ca_certs:
            options["ca_certs"] = config.ca_certs
        if config.username:
            options["http_auth"] = (config.username, resolve_secret(config.password_env) or "")
        # A kept-alive connection per slice thread: urllib3's default pool keeps one, so every
        # other slice would connect again for each page (and log "Connection pool is full").
        options["pool_maxsize"] = max(10, config.slices)
        # Replies decoded by orjson, with the stdlib's values and errors (`decode_reply`).
        options["serializer"] = opensearch_serializer()
        self._client = OpenSearch(hosts=config.hosts, **options)

    def count(self, index: str, query: dict[str, Any]) -> int:
        return int(self._client.count(index=index, body={"query": query})["count"])

    def search_index(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._client.search(index=index, body=body))

    def open_pit(self, index: str, keep_alive: str) -> str:
        reply = self._client.create_pit(index=index, params={"keep_alive": keep_alive})
        return str(reply["pit_id"])

    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._client.search(body=body))

    def close_pit(self, pit_id: str) -> None:
        self._client.delete_pit(body={"pit_id": [pit_id]})

    def close(self) -> None:
        self._client.close()

    def _translate_sdk_error(self, error: Exception, action: str) -> WindowpipeError | None:
        from opensearchpy.exceptions import ConnectionError, TransportError

        if isinstance(error, ConnectionError):  # status "N/A": no answer at all
            return _classify(self.flavour, action, None, f"{type(error).__name__}: {error.info}")
        if isinstance(error, TransportError):
            status = error.status_code if isinstance(error.status_code, int) else None
            return _classify(self.flavour, action, status, _opensearch_detail(error))
        return None


def _api_detail(error: Any) -> str:
    """`404 index_not_found_exception: no such index [x]` from an elasticsearch-py ApiError."""
    reason = ""
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        reason = str(body["error"].get("reason") or "")
    return f"{error.meta.status} {error.error}" + (f": {reason}" if reason else "")


def _opensearch_detail(error: Any) -> str:
    reason = ""
    info = getattr(error, "info", None)
    if isinstance(info, dict) and isinstance(info.get("error"), dict):
        reason = str(info["error"].get("reason") or "")
    return f"{error.status_code} {error.error}" + (f": {reason}" if reason else "")


# --- concurrent slice readers --------------------------------------------------------------------


class _Pit:
    """The point in time's id, shared by the slice threads (the latest id Elasticsearch gave)."""

    def __init__(self, pit_id: Any) -> None:
        self.id = str(pit_id)

    def update(self, pit_id: Any) -> None:
        if pit_id:
            self.id = str(pit_id)  # one attribute store: atomic under the GIL


_DONE = object()
"""What a slice thread puts on the queue when its slice is read to the end."""

_POLL_SECONDS = 0.1
"""How often a blocked thread (queue full) or the caller (queue empty) looks up: a thread sees
the stop event within this, and the caller notices a thread that died without a word."""


Page = list[dict[str, Any]]
"""One page of a slice: its hits as the SDK decoded them."""


class _SliceReaders:
    """Daemon threads, one per slice, each running a page iterator into one bounded queue.

    `pages()` yields pages as they arrive until every thread is done, raising the first error
    any thread met; `stop()` (always called) makes every thread stop between pages and
    waits briefly for them (a thread in the middle of a request is not waited for: it is a
    daemon, and it puts nothing more once it sees the stop event).
    """

    def __init__(self, slices: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=slices + 1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, read: Callable[[], Iterator[Page]]) -> None:
        thread = threading.Thread(
            target=self._run, args=(read,), name=f"windowpipe-slice-{len(self._threads)}"
        )
        thread.daemon = True
        self._threads.append(thread)
        thread.start()

    def _run(self, read: Callable[[], Iterator[Page]]) -> None:
        try:
            for page in read():
                if not self._put(page):
                    return
        except BaseException as error:
            self._put(error)
            return
        self._put(_DONE)

    def _put(self, item: Any) -> bool:
        """Hand `item` to the caller, waiting while the queue is full; False once stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def pages(self) -> Iterator[Page]:
        running = len(self._threads)
        while running:
            try:
                item = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not any(thread.is_alive() for thread in self._threads) and self._queue.empty():
                    raise RuntimeError("a slice reader stopped without finishing") from None
                continue
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def stop(self, wait: float = 1.0) -> None:
        self._stop.set()
        # Free any thread blocked on a full queue at once (it re-checks the event anyway).
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


# --- the source --------------------------------------------------------------------------------


class SearchEngineSource(ABC):
    """The paging logic shared by the Elasticsearch and OpenSearch sources.

    The client is leased on first use from `connectors.shared`, keyed by hosts, credentials
    and the options that shape it (`_client_key`): every pipeline of a process that reads the
    same cluster the same way shares one client and its connection pool. It is safe to share
    between threads (the slice threads of many windows included).
    """

    def __init__(self, config: ElasticsearchSourceConfig) -> None:
        self.config = config
        self._lease: Lease[SearchClientAdapter] | None = None
        self._lock = threading.Lock()

    @abstractmethod
    def _build_adapter(self) -> SearchClientAdapter:
        """The SDK's client, wrapped: one subclass per SDK (Elasticsearch, OpenSearch)."""

    def _client_key(self) -> tuple[Any, ...]:
        """What the client is built from: two sources with the same key share a client."""
        config = self.config
        return (
            config.type,
            tuple(config.hosts),
            config.username,
            resolve_secret(config.password_env),
            resolve_secret(config.api_key_env),
            config.verify_certs,
            config.ca_certs,
            config.request_timeout,
            max(10, config.slices),  # the connection pool's size (see the adapters)
        )

    @property
    def adapter(self) -> SearchClientAdapter:
        """The client adapter, leased on first use."""
        with self._lock:
            if self._lease is None:
                try:
                    self._lease = lease(self._client_key(), self._build_adapter, _close_adapter)
                except ValueError as error:  # the SDK refusing a host URL or an option
                    raise TerminalError(one_line(f"{self.config.type} client: {error}")) from None
            return self._lease.client

    def _call(self, action: str, call: Any, *args: Any) -> Any:
        adapter = self.adapter
        try:
            return call(*args)
        except Exception as error:
            translated = adapter.translate(error, action)
            if translated is None:
                raise
            raise translated from error

    def count(self, window: Window) -> int:
        """How many documents have `window.start <= timestamp < window.end`.

        An index pattern matching no index counts 0; a named index that does not exist is a
        TerminalError.
        """
        query = range_query(self.config.timestamp_field, window)
        adapter = self.adapter
        return int(
            self._call(f"count on {self.config.index}", adapter.count, self.config.index, query)
        )

    def fingerprint(self, window: Window) -> Fingerprint:
        """The window's count and, with `version_field`, the max of that field (a `max`
        aggregation in the same request; its `value_as_string` for dates)."""
        field = self.config.version_field
        if field is None:
            return Fingerprint(self.count(window))
        body = {
            "size": 0,
            "track_total_hits": True,
            "query": range_query(self.config.timestamp_field, window),
            "aggs": {"version": {"max": {"field": field}}},
        }
        adapter = self.adapter
        reply = self._call(
            f"fingerprint on {self.config.index}", adapter.search_index, self.config.index, body
        )
        total = reply.get("hits", {}).get("total", {})
        count = int(total.get("value", 0) if isinstance(total, dict) else total)
        version = reply.get("aggregations", {}).get("version", {})
        value = version.get("value_as_string", version.get("value"))
        return Fingerprint(count, None if value is None else str(value))

    def iter_batches(self, window: Window) -> Iterator[Batch]:
        """Every document of the window once, a page (`page_size` hits) per batch.

        Every slice (one when `slices = 1`) is read by its own daemon thread over the same
        point in time, all at once, so the next page is already on its way while the caller
        converts and writes this one, and `slices = N` keeps N requests in flight. A thread
        only asks for pages and hands them over as decoded (the hits are checked and turned
        into documents here, in the caller), so it asks for the next page as soon as a reply
        is decoded. The threads hand pages over through a queue of at most `slices + 1` pages
        and wait while it is full, so memory stays at about `2 * slices + 1` pages whatever
        the window's size.

        The first error of any thread is raised here and stops the others; the threads also
        stop (between pages) when the caller stops early or is interrupted, e.g. by a soft time
        limit. The point in time is closed however the iteration ends.
        """
        config = self.config
        if self.count(window) == 0:
            # Nothing to read; also spares opening a PIT over a pattern that matches no index.
            return
        adapter = self.adapter
        pit = _Pit(
            self._call(
                f"open point in time on {config.index}",
                adapter.open_pit,
                config.index,
                config.pit_keep_alive,
            )
        )
        readers = _SliceReaders(config.slices)
        try:
            slice_ids: list[int | None] = (
                list(range(config.slices)) if config.slices > 1 else [None]
            )
            for slice_id in slice_ids:
                readers.start(functools.partial(self._read_slice, window, pit, slice_id))
            for hits in readers.pages():
                yield self._batch(hits, window)
        finally:
            readers.stop()
            try:
                self._call("close point in time", adapter.close_pit, pit.id)
            except StageTimeLimitError:
                raise  # the stage must stop now; never hide its soft time limit
            except WindowpipeError as error:
                # It expires after pit_keep_alive anyway; never hide the real outcome.
                log.warning("could not close point in time: %s", error)

    def _read_slice(self, window: Window, pit: _Pit, slice_id: int | None) -> Iterator[Page]:
        """One slice's pages (the whole PIT when `slice_id` is None), as the hits of each."""
        config = self.config
        adapter = self.adapter
        query = range_query(config.timestamp_field, window)
        sort = [
            {config.timestamp_field: {"order": "asc", "unmapped_type": "date"}},
            {"_shard_doc": "asc"},
        ]
        search_after: list[Any] | None = None
        while True:
            body: dict[str, Any] = {
                "size": config.page_size,
                "query": query,
                "pit": {"id": pit.id, "keep_alive": config.pit_keep_alive},
                "sort": sort,
                "track_total_hits": False,
            }
            if slice_id is not None:
                body["slice"] = {"id": slice_id, "max": config.slices}
            if search_after is not None:
                body["search_after"] = search_after
            reply = self._call(f"search on {config.index}", adapter.search, body)
            # Elasticsearch may hand back a new id for the same PIT; use the latest.
            pit.update(reply.get("pit_id"))
            hits: Page = reply["hits"]["hits"]
            if not hits:
                return
            yield hits
            if len(hits) < config.page_size:
                return
            search_after = hits[-1]["sort"]

    def _batch(self, hits: list[dict[str, Any]], window: Window) -> Batch:
        batch = Batch()
        field, limit = self.config.timestamp_field, self.config.max_document_bytes
        for hit in hits:
            record = hit_to_record(hit, window, field, limit)
            if isinstance(record, Document):
                batch.documents.append(record)
            else:
                batch.rejected.append(record)
        return batch

    def close(self) -> None:
        """Give the client back (the last source using it closes it); leased again on next
        use."""
        with self._lock:
            held, self._lease = self._lease, None
        if held is not None:
            held.release()


def _close_adapter(adapter: SearchClientAdapter) -> None:
    adapter.close()


class ElasticsearchSource(SearchEngineSource):
    """An Elasticsearch index (or pattern) through elasticsearch-py.

    `node_class` is elasticsearch-py's transport node class; only tests and the demo pass one
    (`tests.osmem_support.OsmemCompatibleNode`, to talk to osmem-server).
    """

    def __init__(self, config: ElasticsearchSourceConfig, node_class: Any = None) -> None:
        super().__init__(config)
        self._node_class = node_class

    def _build_adapter(self) -> SearchClientAdapter:
        return ElasticsearchAdapter(self.config, node_class=self._node_class)

    def _client_key(self) -> tuple[Any, ...]:
        return (*super()._client_key(), self._node_class)


class OpenSearchSource(SearchEngineSource):
    """An OpenSearch index (or pattern) through opensearch-py; no API keys in OpenSearch."""

    def __init__(self, config: OpenSearchSourceConfig) -> None:
        if config.api_key_env:
            raise ConfigError(
                "opensearch source: api_key_env is not supported; use username and password_env"
            )
        super().__init__(config)

    def _build_adapter(self) -> SearchClientAdapter:
        assert isinstance(self.config, OpenSearchSourceConfig)
        return OpenSearchAdapter(self.config)
