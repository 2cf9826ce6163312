"""The contracts every connector fulfils, and the staged file format they share.

- A `Source` counts a window and streams its documents in batches.
- A `StagingArea` writes a window's documents to files plus a manifest, and reads them back.
- A `Target` loads a window from the staging area idempotently and counts it.

The runner sees these through the smaller protocols of `core.ports`, which they satisfy.

Connectors translate their SDK's exceptions into `TransientError` (worth retrying) or
`TerminalError` (fail the window now); see `core.errors`.

Staged files are gzip NDJSON; each line is one document:
    {"id": "<document id>", "ts": "2026-11-01T00:00:00Z", "doc": {...the whole document...}}
Paths in a manifest are relative to the staging area's root (bucket + prefix, or directory +
prefix), so a Snowflake stage over that root can name them in `COPY INTO ... FILES=(...)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import orjson

from core.instants import format_instant, parse_instant
from core.ports import StagedLines, TargetAudit
from core.recheck import Fingerprint
from core.windows import Window


@dataclass(frozen=True, slots=True)
class Document:
    """One source document: its id, its timestamp, and the whole document as JSON-able data."""

    id: str
    timestamp: datetime
    body: dict[str, Any]
    encoded: bytes | None = field(default=None, compare=False, repr=False)
    """`body` already serialized by `encode_body`, when the source had to serialize it anyway
    (to check its size): the staged line reuses these bytes instead of serializing it again."""
    line: bytes | None = field(default=None, compare=False, repr=False)
    """The whole staged line, when the source built it (`staged_line`, from the timestamp text
    it printed for the body anyway): `encode_line` returns it as it is."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """A source document that cannot be staged; counted and reported, never silently dropped."""

    id: str | None
    reason: str
    """A short, stable reason: `missing timestamp`, `unparseable timestamp`, `not UTF-8`,
    `oversized document`, `timestamp outside window`, `integer beyond 64 bits`, `not
    encodable as JSON` (`unencodable_reason`)."""


@dataclass(slots=True)
class Batch:
    """One page from a source: the documents it yielded and the ones it rejected."""

    documents: list[Document] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StagedFile:
    path: str
    """Relative to the staging root: `<pipeline>/YYYY/MM/DD/<window>/<run>-part-00000.ndjson.gz`."""
    rows: int
    bytes: int
    sha256: str


@dataclass(slots=True)
class Manifest:
    """What one extraction run of one window wrote to the staging area."""

    pipeline: str
    window_start: datetime
    window_end: datetime
    run: str
    """Identifies the extraction run (the window's fencing token): a late writer's files never
    mix with the current run's."""
    files: list[StagedFile]
    rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    """Rejected documents by reason."""
    rejected_ids: list[str] = field(default_factory=list)
    """Ids of rejected documents (the first 100), for the error message and the operator."""
    path: str = ""
    """Where this manifest itself lives, relative to the staging root."""
    checksum: str | None = None
    """The order-independent checksum of the staged documents' ids (`core.checksum`), taken
    as they streamed past; None in a manifest written before checksums existed."""

    @property
    def window(self) -> Window:
        return Window(self.window_start, self.window_end)

    @property
    def rejected_count(self) -> int:
        return sum(self.rejected.values())

    def to_json(self) -> bytes:
        data = asdict(self)
        data["window_start"] = format_instant(self.window_start)
        data["window_end"] = format_instant(self.window_end)
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        data = json.loads(raw)
        data["window_start"] = parse_instant(data["window_start"])
        data["window_end"] = parse_instant(data["window_end"])
        data["files"] = [StagedFile(**item) for item in data["files"]]
        return cls(**data)


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


@runtime_checkable
class Source(Protocol):
    """Where documents come from."""

    def count(self, window: Window) -> int:
        """How many documents have `window.start <= timestamp < window.end`."""
        ...

    def fingerprint(self, window: Window) -> Fingerprint:
        """The window's count and, with the source's version field configured, that field's
        max: what precheck records and a recheck compares (`core.recheck`)."""
        ...

    def iter_batches(self, window: Window) -> Iterator[Batch]:
        """Every document of the window exactly once, in bounded batches (flat memory)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class StagingArea(Protocol):
    """Where documents wait between extract and load."""

    def write_window(
        self, pipeline: str, window: Window, run: str, batches: Iterable[Batch]
    ) -> Manifest:
        """Write the window's files and then its manifest; replace (never append to) any files
        an earlier run of the window left behind."""
        ...

    def read_manifest(self, path: str) -> Manifest:
        """The manifest at `path` (as returned in `Manifest.path`)."""
        ...

    def iter_lines(self, path: str, sha256: str | None = None) -> Iterator[bytes]:
        """The decompressed NDJSON lines of one staged file. A missing or corrupt file, or one
        whose bytes do not hash to `sha256` (when given), raises `StagedDataLostError`."""
        ...

    def list_files(self, pipeline: str, window: Window) -> list[str]:
        """Every path under the window's directory, sorted."""
        ...

    def delete_window(self, pipeline: str, window: Window) -> int:
        """Delete everything under the window's directory; returns how many files went."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Target(Protocol):
    """Where documents end up; one row per source document."""

    def load_window(
        self, pipeline: str, manifest: Manifest, staging: StagedLines, fence: int
    ) -> int:
        """Replace the window's rows with the manifest's files, atomically; rows loaded.

        `staging` is the staging area the manifest came from (a target that reads the files
        itself, like Snowflake through its own stage, ignores it).

        Fenced: the target keeps, per window, the newest fencing token that loaded it, updated
        in the same transaction as the rows. A load whose `fence` is older than that is
        refused with `StaleFenceError` and changes nothing. The same fence loads again: only
        the owner of a fence holds it (each claim takes a new one), so that is its own retry,
        e.g. after a commit whose acknowledgement was lost."""
        ...

    def clear_window(self, pipeline: str, window: Window, fence: int) -> int:
        """A fenced empty load: delete the window's rows and move its ledger row to `fence`
        (row count 0) in one transaction; rows deleted. Refused like `load_window`
        (`StaleFenceError`, nothing changed) when a newer fence loaded the window: a frozen
        older load cannot land after the window was found empty, nor this clear after a newer
        load."""
        ...

    def count_window(self, pipeline: str, window: Window) -> int:
        """How many rows the target holds for the window."""
        ...

    def audit_window(self, pipeline: str, window: Window) -> TargetAudit:
        """What the target holds for the window: rows, their ids' checksum (`core.checksum`),
        and its ledger row (the fence that loaded it last and the rows it recorded)."""
        ...

    def close(self) -> None: ...
