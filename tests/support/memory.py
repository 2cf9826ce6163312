"""In-memory stand-ins for the external systems, so runner, dispatch and recovery run whole
windows in milliseconds without services (as dramatiq's tests run against its `StubBroker`).

These are test doubles of the systems windowpipe talks to, never of windowpipe's own code: each
implements the same protocol as the real connectors (`core.ports`), with the behaviour the
runner relies on.

- `MemorySource`: documents in a list; counts, fingerprints and pages a window.
- `MemoryStagingArea`: the real staged format (`connectors.staging.ObjectStaging`: gzip NDJSON
  parts, sha256, manifests, a new run replacing older ones) over a dict of bytes.
- `MemoryTarget`: rows per window and the fence ledger of the real targets: a load whose fence
  is older than the one that loaded the window last is refused (`StaleFenceError`) and changes
  nothing; the same fence loads again (its owner's retry).
- `MemoryConnectors`: hands them to the runner (`core.ports.ConnectorFactory`).
- `MemoryBroker`: stands in for Celery and its broker. `send` is the `SendChain` dispatch and
  cleanup call; `run` works the sent chains as the stage workers do
  (`workers.stage_task.execute_stage`): a stage that continues the chain is followed by the
  next, a retry is sent again from its stage with `retry + 1`.

Every connector can be told to fail: `source.faults.fail("fingerprint", TransientError("..."))`
makes the next call raise it; `faults.calls` counts the calls by method.
"""

from __future__ import annotations

import io
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, BinaryIO, Literal, overload

from connectors.base import decode_line
from connectors.sql_target import stale_fence_error
from connectors.staging import ObjectStaging, PartSink
from core.checksum import ids_checksum
from core.config import PipelineConfig
from core.errors import StagedDataLostError, StaleFenceError
from core.ports import (
    Batch,
    Document,
    Manifest,
    Source,
    StagedLines,
    StagingArea,
    Target,
    TargetAudit,
)
from core.recheck import Fingerprint
from core.records import STAGE_ORDER, Stage
from core.runner import Outcome, Runtime, StageResult, run_stage
from core.windows import Window


class Faults:
    """Errors the next calls of a connector's methods raise, in order; and every call counted."""

    def __init__(self) -> None:
        self._planned: dict[str, deque[BaseException]] = {}
        self.calls: Counter[str] = Counter()

    def fail(self, method: str, *errors: BaseException) -> None:
        """The next `len(errors)` calls of `method` raise these, one each; later calls work."""
        self._planned.setdefault(method, deque()).extend(errors)

    def check(self, method: str) -> None:
        """Count a call of `method`, raising its next planned error if there is one."""
        self.calls[method] += 1
        planned = self._planned.get(method)
        if planned:
            raise planned.popleft()


class MemorySource:
    """A source over a list of documents (a `core.ports.Source`)."""

    def __init__(self, documents: Iterable[Document] = (), page_size: int = 3) -> None:
        self.documents = list(documents)
        self.page_size = page_size
        self.faults = Faults()

    def _in(self, window: Window) -> list[Document]:
        found = [d for d in self.documents if window.start <= d.timestamp < window.end]
        return sorted(found, key=lambda d: (d.timestamp, d.id))

    def count(self, window: Window) -> int:
        self.faults.check("count")
        return len(self._in(window))

    def fingerprint(self, window: Window) -> Fingerprint:
        self.faults.check("fingerprint")
        return Fingerprint(len(self._in(window)))

    def iter_batches(self, window: Window) -> Iterator[Batch]:
        self.faults.check("iter_batches")
        found = self._in(window)
        for offset in range(0, len(found), self.page_size):
            yield Batch(documents=found[offset : offset + self.page_size])

    def close(self) -> None:
        return


class _MemoryPart:
    """One part file being written: visible in `files` only once committed, whole."""

    def __init__(self, files: dict[str, bytes], path: str) -> None:
        self._files, self._path, self._data = files, path, bytearray()

    def write(self, data: bytes) -> None:
        self._data += data

    def commit(self) -> None:
        self._files[self._path] = bytes(self._data)

    def abort(self) -> None:
        self._data.clear()


class MemoryStagingArea(ObjectStaging):
    """The staged file format over a dict `path -> bytes` (a `core.ports.StagingArea`).

    `files` is the storage itself: delete or change an entry to lose or corrupt staged data.
    """

    def __init__(self, max_file_bytes: int = 64 * 1024) -> None:
        self.max_file_bytes = max_file_bytes
        self.files: dict[str, bytes] = {}
        self.faults = Faults()

    def write_window(
        self, pipeline: str, window: Window, run: str, batches: Iterable[Batch]
    ) -> Manifest:
        self.faults.check("write_window")
        return super().write_window(pipeline, window, run, batches)

    def read_manifest(self, path: str) -> Manifest:
        self.faults.check("read_manifest")
        return super().read_manifest(path)

    def _open_part(self, path: str) -> PartSink:
        return _MemoryPart(self.files, path)

    def _put(self, path: str, data: bytes) -> None:
        self.files[path] = data

    @contextmanager
    def _reading(self, path: str) -> Iterator[BinaryIO]:
        try:
            data = self.files[path]
        except KeyError:
            raise StagedDataLostError(f"memory staging read {path} failed: no such file") from None
        yield io.BytesIO(data)

    def _open_read(self, path: str) -> AbstractContextManager[BinaryIO]:
        return self._reading(path)

    def _list(self, directory: str) -> list[str]:
        return [path for path in self.files if path.startswith(f"{directory}/")]

    def _delete(self, paths: list[str]) -> int:
        return sum(1 for path in paths if self.files.pop(path, None) is not None)

    def _read_errors(self, action: str, path: str) -> AbstractContextManager[None]:
        return nullcontext()


class MemoryTarget:
    """Rows per window and a fence ledger (a `core.ports.Target`), as the SQL and Snowflake
    targets keep them: the ledger moves to the load's fence and the rows are replaced together,
    or nothing changes."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, datetime], list[dict[str, Any]]] = {}
        self.ledger: dict[tuple[str, datetime], int] = {}
        """Per window, the fence that loaded it last."""
        self.ledger_rows: dict[tuple[str, datetime], int] = {}
        """Per window, the rows that load recorded."""
        self.faults = Faults()
        self.before_load: Callable[[int], None] | None = None
        """Called with the fence at the start of every load: where a test pauses an owner."""

    def load_window(
        self, pipeline: str, manifest: Manifest, staging: StagedLines, fence: int
    ) -> int:
        if self.before_load is not None:
            self.before_load(fence)
        self.faults.check("load_window")
        key = (pipeline, manifest.window_start)
        self._check_fence(key, fence)
        rows = [
            decode_line(line)
            for staged in manifest.files
            for line in staging.iter_lines(staged.path, sha256=staged.sha256)
            if line.strip()
        ]
        if len(rows) != manifest.rows:
            raise StagedDataLostError(
                f"memory target: the staged files of run {manifest.run} hold {len(rows)} rows "
                f"but the manifest lists {manifest.rows}"
            )
        self.ledger[key] = fence
        self.ledger_rows[key] = len(rows)
        self.rows[key] = rows
        return len(rows)

    def _check_fence(self, key: tuple[str, datetime], fence: int) -> None:
        recorded = self.ledger.get(key)
        if recorded is not None and fence < recorded:
            raise StaleFenceError(
                "memory target: " + stale_fence_error(key[0], key[1], fence, recorded),
                recorded=recorded,
            )

    def clear_window(self, pipeline: str, window: Window, fence: int) -> int:
        if self.before_load is not None:
            self.before_load(fence)
        self.faults.check("clear_window")
        key = (pipeline, window.start)
        self._check_fence(key, fence)
        self.ledger[key] = fence
        self.ledger_rows[key] = 0
        return len(self.rows.pop(key, []))

    def count_window(self, pipeline: str, window: Window) -> int:
        self.faults.check("count_window")
        return len(self.rows.get((pipeline, window.start), []))

    def audit_window(self, pipeline: str, window: Window) -> TargetAudit:
        self.faults.check("audit_window")
        key = (pipeline, window.start)
        rows = self.rows.get(key, [])
        return TargetAudit(
            rows=len(rows),
            checksum=ids_checksum(str(row["id"]) for row in rows),
            ledger_fence=self.ledger.get(key),
            ledger_rows=self.ledger_rows.get(key),
        )

    def ids(self) -> Counter[str]:
        """Every loaded document id, with how often the target holds it."""
        return Counter(str(row["id"]) for rows in self.rows.values() for row in rows)

    def close(self) -> None:
        return


class MemoryConnectors:
    """The runner's `ConnectorFactory` over one source, staging area and target (every pipeline
    gets the same three)."""

    def __init__(
        self,
        source: MemorySource | None = None,
        staging: MemoryStagingArea | None = None,
        target: MemoryTarget | None = None,
    ) -> None:
        self.source = source or MemorySource()
        self.staging = staging or MemoryStagingArea()
        self.target = target or MemoryTarget()

    @overload
    def __call__(self, role: Literal["source"], pipeline: PipelineConfig) -> Source: ...
    @overload
    def __call__(self, role: Literal["staging"], pipeline: PipelineConfig) -> StagingArea: ...
    @overload
    def __call__(self, role: Literal["target"], pipeline: PipelineConfig) -> Target: ...
    def __call__(
        self, role: Literal["source", "staging", "target"], pipeline: PipelineConfig
    ) -> Source | StagingArea | Target:
        if role == "source":
            return self.source
        if role == "staging":
            return self.staging
        return self.target


@dataclass(frozen=True)
class Message:
    """One chain sent to the broker: a window's stages from `stage` on."""

    pipeline: str
    window_start: datetime
    stage: Stage
    retry: int = 0


@dataclass
class MemoryBroker:
    """The stage queues, as a list of sent chains; `run` works them like the stage workers."""

    messages: deque[Message] = field(default_factory=deque)
    sent: list[Message] = field(default_factory=list)
    """Every message ever sent, in order."""
    results: list[StageResult] = field(default_factory=list)
    """Every stage run, in order."""

    def send(self, pipeline: str, window_start: datetime, first_stage: Stage) -> str:
        """`core.dispatch.SendChain`: queue a window's chain from `first_stage` on."""
        return self._send(Message(pipeline, window_start, first_stage))

    def _send(self, message: Message) -> str:
        self.messages.append(message)
        self.sent.append(message)
        return f"chain-{len(self.sent)}"

    def run(self, runtime: Runtime) -> list[StageResult]:
        """Work every queued chain (and the retries they send) until the queues are empty;
        returns the stage results of this call.

        Chains advance one stage at a time in turn, as concurrent workers would interleave
        them: two messages for one window meet at every stage.
        """
        ran: list[StageResult] = []
        in_flight: deque[tuple[Message, int]] = deque()
        while self.messages or in_flight:
            while self.messages:
                in_flight.append((self.messages.popleft(), 0))
            message, index = in_flight.popleft()
            stages = STAGE_ORDER[STAGE_ORDER.index(message.stage) :]
            stage = stages[index]
            # Only a chain's first stage carries the retry number, as in workers.runtime.
            retry = message.retry if index == 0 else 0
            result = run_stage(runtime, stage, message.pipeline, message.window_start, retry)
            ran.append(result)
            if result.outcome == Outcome.RETRY:
                # The retry's countdown passes at once here.
                self._send(Message(message.pipeline, message.window_start, stage, retry + 1))
            elif result.continues_chain and index + 1 < len(stages):
                in_flight.append((message, index + 1))
        self.results.extend(ran)
        return ran


def document(doc_id: str, at: datetime, **body: Any) -> Document:
    """A source document with `id` and `at` in its body too."""
    return Document(doc_id, at, {"id": doc_id, "at": at.isoformat(), **body})


def documents_per_window(
    origin: datetime, size: timedelta, counts: Iterable[int]
) -> list[Document]:
    """`counts[i]` documents in window i of `size` from `origin` (the first one exactly on the
    window's start, the others 37 s apart), with ids `w<i>-<n>`."""
    found = []
    for index, count in enumerate(counts):
        start = origin + index * size
        found += [
            document(f"w{index}-{n}", start + timedelta(seconds=37 * n)) for n in range(count)
        ]
    return found
