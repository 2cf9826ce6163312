"""The one connector contract: what the runner calls on a source, a staging area and a target,
and the values that pass between them.

- A `Source` counts a window and streams its documents in batches (`Batch` of `Document`s,
  with the `Rejection`s it could not stage).
- A `StagingArea` writes a window's documents to files plus a `Manifest`, and reads them back.
- A `Target` loads a window from the staging area idempotently, counts it and audits it
  (`TargetAudit`).

The protocols live in core so the runner can name them (layers go one way: `connectors`
imports `core`); every connector implements them (connectors/base.py holds the staged file
format they share), and so do the in-memory doubles of the fast tests (tests/memory.py).
`ConnectorFactory` is how the runner gets a pipeline's connector for a role: the registry's
`connector_for` in a worker.

Connectors translate their SDK's exceptions into `TransientError` (worth retrying) or
`TerminalError` (fail the window now); see `core.errors`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload, runtime_checkable

import orjson

from core.instants import format_instant, parse_instant
from core.recheck import Fingerprint
from core.windows import Window

if TYPE_CHECKING:
    from core.config import PipelineConfig


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
        """The manifest as indented JSON with sorted keys. Encoded by orjson (the stdlib's
        indented encoding is pure Python, a fifth of a tiny window's staging); by the stdlib
        when a rejected id holds a lone surrogate (an undecodable source id), which orjson
        refuses and the stdlib escapes."""
        data: dict[str, Any] = {item.name: getattr(self, item.name) for item in fields(self)}
        data["window_start"] = format_instant(self.window_start)
        data["window_end"] = format_instant(self.window_end)
        data["files"] = [
            {item.name: getattr(staged, item.name) for item in fields(staged)}
            for staged in self.files
        ]
        try:
            return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        except TypeError:
            return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        data = json.loads(raw)
        data["window_start"] = parse_instant(data["window_start"])
        data["window_end"] = parse_instant(data["window_end"])
        data["files"] = [StagedFile(**item) for item in data["files"]]
        return cls(**data)


@dataclass(frozen=True)
class TargetAudit:
    """What a target holds for one window, as the audit compares it with the record."""

    rows: int
    checksum: str
    """Of the rows' document ids (`core.checksum.checksum_text`)."""
    ledger_fence: int | None
    """The fence that loaded (or cleared) the window last; None when its ledger has no row."""
    ledger_rows: int | None
    """The rows that load recorded in the ledger."""


class StagedLines(Protocol):
    """The part of a staging area a target reads: a staged file's lines."""

    def iter_lines(self, path: str, sha256: str | None = None) -> Iterator[bytes]: ...


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


class ConnectorFactory(Protocol):
    """(role, pipeline) -> that pipeline's process-wide connector for the role.

    `connectors.registry.connector_for` in a worker; an in-memory stand-in in the fast tests.
    """

    @overload
    def __call__(self, role: Literal["source"], pipeline: PipelineConfig) -> Source: ...

    @overload
    def __call__(self, role: Literal["staging"], pipeline: PipelineConfig) -> StagingArea: ...

    @overload
    def __call__(self, role: Literal["target"], pipeline: PipelineConfig) -> Target: ...
