"""Test-only helpers for running elasticsearch-py against osmem-server.

osmem speaks OpenSearch's dialect, which differs from Elasticsearch's in two ways that matter
to elasticsearch-py 8/9:

- the client sends `application/vnd.elasticsearch+json; compatible-with=N`, which osmem answers
  with 406; `OsmemCompatibleNode` sends plain `application/json` instead;
- Elasticsearch opens a point in time with `POST /<index>/_pit` (answer `{"id": ...}`) and
  closes it with `DELETE /_pit` (body `{"id": ...}`); OpenSearch uses
  `POST /<index>/_search/point_in_time` (answer `{"pit_id": ...}`) and
  `DELETE /_search/point_in_time` (body `{"pit_id": [...]}`). The node maps one onto the other,
  requests and responses both, so production code keeps calling the real Elasticsearch API.

Usage (tests, the demo):

    ElasticsearchSource(config, node_class=OsmemCompatibleNode)
    Elasticsearch(url, node_class=OsmemCompatibleNode)
"""

from __future__ import annotations

import json
import re
from typing import Any

from elastic_transport import HttpHeaders, Urllib3HttpNode
from elastic_transport._node import NodeApiResponse

_COMPAT_TYPE = re.compile(
    r"application/vnd\.elasticsearch\+(json|x-ndjson)\s*;\s*compatible-with=\d+"
)
_OPEN_PIT = re.compile(r"^(?P<index>/[^/?]+)/_pit(?P<query>\?.*)?$")
_CLOSE_PIT = re.compile(r"^/_pit(?P<query>\?.*)?$")


def _plain_type(value: str) -> str:
    return _COMPAT_TYPE.sub(lambda match: f"application/{match.group(1)}", value)


def _plain_headers(headers: Any) -> HttpHeaders:
    plain = HttpHeaders()
    for key, value in headers.items():
        plain[key] = _plain_type(value) if key.lower() in ("accept", "content-type") else value
    return plain


class OsmemCompatibleNode(Urllib3HttpNode):
    """An elasticsearch-py transport node that osmem-server understands (see module docstring)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # The node's default headers carry the compatible-with types too.
        self._headers = _plain_headers(self._headers)

    def perform_request(  # type: ignore[override]
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: HttpHeaders | None = None,
        **kwargs: Any,
    ) -> NodeApiResponse:
        plain = _plain_headers(headers or HttpHeaders())
        open_match = _OPEN_PIT.match(target) if method == "POST" else None
        close_match = _CLOSE_PIT.match(target) if method == "DELETE" else None
        if open_match:
            target = f"{open_match['index']}/_search/point_in_time{open_match['query'] or ''}"
        elif close_match:
            pit_id = json.loads(body or b"{}").get("id")
            body = json.dumps({"pit_id": [pit_id]}).encode()
            plain["content-type"] = "application/json"
            target = f"/_search/point_in_time{close_match['query'] or ''}"
        response = super().perform_request(method, target, body, plain, **kwargs)
        if not (open_match or close_match) or response.meta.status >= 300:
            return response
        data = json.loads(response.body or b"{}")
        if open_match:
            data = {"id": data.get("pit_id"), "_shards": data.get("_shards", {})}
        else:
            freed = [item for item in data.get("pits", []) if item.get("successful")]
            data = {"succeeded": bool(freed), "num_freed": len(freed)}
        return NodeApiResponse(response.meta, json.dumps(data).encode())


def open_pit_ids(server_url: str) -> list[str]:
    """The point-in-time ids osmem holds now (`GET /_search/point_in_time/_all`)."""
    import urllib.request

    with urllib.request.urlopen(f"{server_url}/_search/point_in_time/_all", timeout=10) as reply:
        data = json.loads(reply.read() or b"{}")
    return [item["pit_id"] for item in data.get("pits", [])]
