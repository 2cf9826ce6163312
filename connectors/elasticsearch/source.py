"""The paging source: point in time + `search_after`, optionally sliced, over a client adapter."""

from __future__ import annotations

import functools
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from connectors.base import (
    Batch,
    Document,
)
from connectors.elasticsearch.adapters import (
    ElasticsearchAdapter,
    OpenSearchAdapter,
    SearchClientAdapter,
)
from connectors.elasticsearch.slices import Page, Pit, SliceReaders
from connectors.elasticsearch.timestamps import hit_to_record, range_query
from connectors.shared import Lease, lease
from core.config import ElasticsearchSourceConfig, OpenSearchSourceConfig, resolve_secret
from core.errors import (
    ConfigError,
    StageTimeLimitError,
    TerminalError,
    WindowpipeError,
    one_line,
)
from core.recheck import Fingerprint
from core.windows import Window

log = logging.getLogger("connectors.elasticsearch")


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
        pit = Pit(
            self._call(
                f"open point in time on {config.index}",
                adapter.open_pit,
                config.index,
                config.pit_keep_alive,
            )
        )
        readers = SliceReaders(config.slices)
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

    def _read_slice(self, window: Window, pit: Pit, slice_id: int | None) -> Iterator[Page]:
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
    (`tests.support.osmem.OsmemCompatibleNode`, to talk to osmem-server).
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
