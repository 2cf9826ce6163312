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

The package, by idea: `timestamps` (a hit's timestamp and fields, the range query), `replies`
(decoding with orjson), `adapters` (one per SDK), `slices` (a thread per slice), `source`
(the paging source).
"""

from connectors.elasticsearch.adapters import (
    CLIENT_OPTIONS,
    TRANSIENT_STATUSES,
    ElasticsearchAdapter,
    OpenSearchAdapter,
    SearchClientAdapter,
)
from connectors.elasticsearch.replies import (
    decode_reply,
    elasticsearch_serializer,
    opensearch_serializer,
    orjson_exact,
)
from connectors.elasticsearch.source import (
    ElasticsearchSource,
    OpenSearchSource,
    SearchEngineSource,
)
from connectors.elasticsearch.timestamps import (
    field_value,
    hit_to_record,
    parse_timestamp,
    range_query,
)

__all__ = [
    "CLIENT_OPTIONS",
    "TRANSIENT_STATUSES",
    "ElasticsearchAdapter",
    "ElasticsearchSource",
    "OpenSearchAdapter",
    "OpenSearchSource",
    "SearchClientAdapter",
    "SearchEngineSource",
    "decode_reply",
    "elasticsearch_serializer",
    "field_value",
    "hit_to_record",
    "opensearch_serializer",
    "orjson_exact",
    "parse_timestamp",
    "range_query",
]
