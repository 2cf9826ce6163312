"""What the runner needs from the connectors, stated in core.

Layers go one way (`connectors` imports `core`, never the reverse), so the runner cannot name
`connectors.base`'s `Source`, `StagingArea` and `Target`. These protocols are the part of
each one the runner calls; the connectors' protocols satisfy them structurally, and mypy
checks that where the registry's factory becomes a `ConnectorFactory` (connectors/registry.py)
and wherever a `Runtime` is built.

Two type parameters carry the connectors' own data through the runner untouched: a source's
batches go into the staging area (`BatchT`), and the manifest the staging area returns goes to
the target (`RunT`). Of a manifest, the runner reads only what `StagedRun` names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar, overload

from core.recheck import Fingerprint
from core.windows import Window

if TYPE_CHECKING:
    from core.config import PipelineConfig


class StagedFileEntry(Protocol):
    """One file a manifest lists."""

    @property
    def path(self) -> str:
        """Relative to the staging area's root."""
        ...


class StagedRun(Protocol):
    """What one extraction run of a window wrote, as the runner reads its manifest."""

    @property
    def path(self) -> str:
        """Where the manifest itself lies (recorded on the window for load)."""
        ...

    @property
    def run(self) -> str: ...

    @property
    def rows(self) -> int: ...

    @property
    def files(self) -> Sequence[StagedFileEntry]: ...

    @property
    def rejected(self) -> Mapping[str, int]:
        """Rejected documents by reason."""
        ...

    @property
    def rejected_ids(self) -> Sequence[str]: ...

    @property
    def rejected_count(self) -> int: ...

    @property
    def checksum(self) -> str | None:
        """The staged ids' checksum (`core.checksum`); None from an older manifest."""
        ...


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


BatchT = TypeVar("BatchT")
RunT = TypeVar("RunT", bound=StagedRun)
BatchT_co = TypeVar("BatchT_co", covariant=True)
BatchT_contra = TypeVar("BatchT_contra", contravariant=True)
RunT_co = TypeVar("RunT_co", bound=StagedRun, covariant=True)
RunT_contra = TypeVar("RunT_contra", bound=StagedRun, contravariant=True)


class WindowSource(Protocol[BatchT_co]):
    """What precheck and extract call on a source."""

    def fingerprint(self, window: Window) -> Fingerprint: ...

    def iter_batches(self, window: Window) -> Iterator[BatchT_co]: ...


class StagedLines(Protocol):
    """What a target reads of the staging area the runner hands it."""

    def iter_lines(self, path: str, sha256: str | None = None) -> Iterator[bytes]: ...


class WindowStaging(StagedLines, Protocol[BatchT_contra, RunT_co]):
    """What extract and load call on a staging area (and what a target reads of it)."""

    def write_window(
        self, pipeline: str, window: Window, run: str, batches: Iterable[BatchT_contra]
    ) -> RunT_co: ...

    def read_manifest(self, path: str) -> RunT_co: ...

    def list_files(self, pipeline: str, window: Window) -> list[str]: ...


class WindowTarget(Protocol[RunT_contra]):
    """What load and audit call on a target."""

    def load_window(
        self, pipeline: str, manifest: RunT_contra, staging: StagedLines, fence: int
    ) -> int: ...

    def clear_window(self, pipeline: str, window: Window, fence: int) -> int: ...

    def audit_window(self, pipeline: str, window: Window) -> TargetAudit: ...


class ConnectorFactory(Protocol[BatchT, RunT]):
    """(role, pipeline) -> that pipeline's process-wide connector for the role.

    `connectors.registry.connector_for` in a worker; an in-memory stand-in in the fast tests.
    """

    @overload
    def __call__(
        self, role: Literal["source"], pipeline: PipelineConfig
    ) -> WindowSource[BatchT]: ...

    @overload
    def __call__(
        self, role: Literal["staging"], pipeline: PipelineConfig
    ) -> WindowStaging[BatchT, RunT]: ...

    @overload
    def __call__(self, role: Literal["target"], pipeline: PipelineConfig) -> WindowTarget[RunT]: ...
