"""Hits to records: a hit's timestamp parsed, its fields read, and the window's range query."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from connectors.base import (
    INSTANT_OPTIONS,
    Document,
    Rejection,
    encode_body,
    staged_line,
    unencodable_reason,
)
from core.instants import as_utc, format_instant
from core.windows import Window

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_MILLIS = re.compile(r"^-?\d+$")


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
