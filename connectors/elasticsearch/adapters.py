"""One thin adapter per SDK (elasticsearch-py, opensearch-py): the client, the point in time, and
the SDK's exceptions classified as transient or terminal."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from connectors.elasticsearch.replies import elasticsearch_serializer, opensearch_serializer
from core.config import ElasticsearchSourceConfig, OpenSearchSourceConfig, resolve_secret
from core.errors import (
    TerminalError,
    TransientError,
    WindowpipeError,
    one_line,
)
from core.retry import SDK_RETRIES, as_time_limit

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses worth retrying: timeouts, throttling, an overloaded or restarting cluster."""

CLIENT_OPTIONS: dict[str, Any] = {"max_retries": SDK_RETRIES, "retry_on_timeout": False}
"""Both SDKs' own retries off (by default they retry a connection error, and HTTP 502/503/504,
three times). Every retry is counted in core/retry.py's budget instead; and inside a request
the SDKs would take a soft time limit for a connection error and retry it."""


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
