"""The staged file format every connector shares, and the helpers that write it.

The connector contract itself (the `Source`, `StagingArea` and `Target` protocols and the
values passing between them: `Document`, `Rejection`, `Batch`, `StagedFile`, `Manifest`) is
`core.ports`; its value types are imported here too, for the connectors that build them.

Staged files are gzip NDJSON; each line is one document:
    {"id": "<document id>", "ts": "2026-11-01T00:00:00Z", "doc": {...the whole document...}}
Paths in a manifest are relative to the staging area's root (bucket + prefix, or directory +
prefix), so a Snowflake stage over that root can name them in `COPY INTO ... FILES=(...)`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from core.instants import format_instant
from core.ports import Batch as Batch
from core.ports import Document as Document
from core.ports import Manifest as Manifest
from core.ports import Rejection as Rejection
from core.ports import StagedFile as StagedFile
from core.windows import Window


def window_dir(pipeline: str, window: Window) -> str:
    """`<pipeline>/YYYY/MM/DD/<start>_<end>`: one directory per window, relative to the root.

    No `=` in it: DuckDB (behind fakesnow) reads `key=value/` as a partition column.
    """
    start = window.start
    compact = "%Y%m%dT%H%M%SZ"
    return (
        f"{pipeline}/{start:%Y}/{start:%m}/{start:%d}/"
        f"{window.start.strftime(compact)}_{window.end.strftime(compact)}"
    )


def unencodable_reason(error: orjson.JSONEncodeError) -> str:
    """The rejection reason of a body `encode_body` refused: text with a lone surrogate (not
    UTF-8), an integer beyond 64 bits (staged, it would be read back as a float: a silent
    change of the value), or anything else (nesting too deep)."""
    text = str(error)
    if "UTF-8" in text:
        return "not UTF-8"
    if "64-bit" in text:
        return "integer beyond 64 bits"
    return "not encodable as JSON"


def encode_body(body: dict[str, Any]) -> bytes:
    """A document's body as JSON, exactly as its staged line holds it under `doc`."""
    return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS, default=_json_default)


INSTANT_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC
"""orjson printing a UTC or naive (meaning UTC) datetime as `format_instant` does, quoted: `Z`,
microseconds only when not zero. An instant with any other zone must be converted first."""


STAGED_LINE = b'{"id":%b,"ts":%b,"doc":%b}\n'
"""A staged line from its parts, as JSON: `STAGED_LINE % (id, ts, doc)` (`staged_line`)."""


def staged_line(doc_id: str, ts_json: bytes, encoded: bytes) -> bytes:
    """The staged line `encode_line` makes, from its parts: the document id, the timestamp as a
    JSON string (`orjson.dumps` of its `format_instant` text, or of the UTC instant with
    `INSTANT_OPTIONS`) and the body as `encode_body` serialized it."""
    return STAGED_LINE % (orjson.dumps(doc_id), ts_json, encoded)


def encode_line(document: Document) -> bytes:
    """One staged NDJSON line (with its newline) for `document`.

    `Document.line` if the source built it. Otherwise the body is serialized once
    (`Document.encoded` if the source did it already) and spliced in as a fragment; an aware
    UTC timestamp is printed by orjson itself (`OPT_UTC_Z` prints what `format_instant` does:
    `Z`, microseconds only when not zero).
    """
    if document.line is not None:
        return document.line
    encoded = document.encoded if document.encoded is not None else encode_body(document.body)
    ts = document.timestamp
    return orjson.dumps(
        {
            "id": document.id,
            "ts": ts if ts.tzinfo is UTC else format_instant(ts),
            "doc": orjson.Fragment(encoded),
        },
        option=orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE,
        default=_json_default,
    )


def decode_line(line: bytes) -> dict[str, Any]:
    """The object of one staged line: `{"id", "ts", "doc"}`."""
    value: dict[str, Any] = orjson.loads(line)
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_instant(value) if value.tzinfo else value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8")
    # Decimal, UUID and the like: their text form is exact.
    return str(value)
