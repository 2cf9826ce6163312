"""Running one stage of one window: lock, fence, work, guarded commit.

The window record is the truth, not the message that asked for the work. A stage task:
1. takes the window's Redis lock without waiting;
2. claims the record in one guarded UPDATE: a new fencing token, status running, matched
   only while the window waits for this stage;
3. does the work while a thread renews the lock;
4. commits its result guarded by the fence: an owner whose lock expired cannot overwrite the
   next owner's result.
When the lock is taken or the claim matches nothing, the record is read to say why: the
stage is already done (pass: let the chain go on), or an earlier stage is not done, the window
is finished or someone else holds it (stop).
Each stage is idempotent: extraction writes a run-specific set of files, loading replaces the
window's rows in one transaction, so a redelivered or duplicated message changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, Protocol

import redis

from core.config import Config, PipelineConfig
from core.errors import (
    TIME_LIMIT_ERRORS,
    InvalidTransitionError,
    LockLostError,
    LostOwnershipError,
    StagedDataLostError,
    StageTimeLimitError,
    TerminalError,
    TransientError,
)
from core.instants import format_instant
from core.locks import WindowLock
from core.logs import get_logger
from core.ports import (
    BatchT,
    ConnectorFactory,
    RunT,
    WindowSource,
    WindowStaging,
    WindowTarget,
)
from core.records import ACTIVE, STAGE_ORDER, Stage, WindowRecord, WindowStatus
from core.retry import StagePolicy, backoff_seconds, call_with_retries, stage_policy
from core.store import StateStore
from core.windows import Window


class Outcome(StrEnum):
    DONE = "done"
    """The stage ran and committed; the chain goes on."""
    PASSED = "passed"
    """The stage was already done (a duplicate message); the chain goes on."""
    STOPPED = "stopped"
    """Someone else owns the window, or it is not active: this chain ends here."""
    FINISHED = "finished"
    """The window reached succeeded, skipped or failed: the chain ends here."""
    RETRY = "retry"
    """A transient failure: send this stage again after `retry_in` seconds."""


@dataclass(frozen=True)
class StageResult:
    """What a stage task returns (small, identifiers and counts only)."""

    outcome: Outcome
    stage: Stage
    pipeline: str
    window_start: datetime
    status: WindowStatus | None = None
    detail: str = ""
    retry_in: float | None = None

    @property
    def continues_chain(self) -> bool:
        return self.outcome in (Outcome.DONE, Outcome.PASSED)

    def summary(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "stage": self.stage.value,
            "pipeline": self.pipeline,
            "window_start": format_instant(self.window_start),
            "status": self.status.value if self.status else None,
            "detail": self.detail,
        }


@dataclass
class Runtime(Generic[BatchT, RunT]):
    """What a stage needs from the process: config, store, Redis and connectors.

    Generic in the connectors' batch and manifest types (`core.ports`), which the runner
    passes from source to staging area to target without looking inside.
    """

    config: Config
    store: StateStore
    redis: redis.Redis
    connectors: ConnectorFactory[BatchT, RunT]


@dataclass
class _Step(Generic[BatchT, RunT]):
    runtime: Runtime[BatchT, RunT]
    pipeline: PipelineConfig
    record: WindowRecord
    fence: int
    policy: StagePolicy
    lock: WindowLock

    @property
    def window(self) -> Window:
        return self.record.window

    def source(self) -> WindowSource[BatchT]:
        return self.runtime.connectors("source", self.pipeline)

    def staging(self) -> WindowStaging[BatchT, RunT]:
        return self.runtime.connectors("stage", self.pipeline)

    def target(self) -> WindowTarget[RunT]:
        return self.runtime.connectors("target", self.pipeline)

    def check_owned(self) -> None:
        """Raise `LockLostError` once the renewer found this window's lock no longer ours.

        Checked before every commit, between extract's batches and before the load: a worker
        that lost its lock (frozen past the TTL, or Redis wiped) stops there instead of
        working on for nothing. Fencing, not this check, keeps a stale commit out."""
        if self.lock.lost:
            raise LockLostError(
                f"the window's lock was lost (expired or wiped) during {self.record.stage}"
            )

    def while_owned(self, batches: Iterable[BatchT]) -> Iterator[BatchT]:
        """`batches`, checking before each one that the lock is still ours. Stopping closes
        the source's iterator at once (ending its read transaction), not at garbage
        collection."""
        iterator = iter(batches)
        try:
            for batch in iterator:
                self.check_owned()
                yield batch
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def commit(self, status: WindowStatus, **fields: Any) -> WindowRecord:
        self.check_owned()
        return self.runtime.store.transition(
            self.pipeline.name,
            self.record.window_start,
            status,
            expect=[WindowStatus.RUNNING],
            fence=self.fence,
            **fields,
        )


def _position(stage: Stage | None) -> int:
    return STAGE_ORDER.index(stage) if stage is not None else 0


def run_stage(
    runtime: Runtime[BatchT, RunT],
    stage: Stage,
    pipeline_name: str,
    window_start: datetime,
    retry: int = 0,
) -> StageResult:
    """Run `stage` of one window, as described in the module docstring."""
    pipeline = runtime.config.pipeline(pipeline_name)
    log = get_logger(
        "windowpipe.stage",
        pipeline=pipeline_name,
        window=format_instant(window_start),
        stage=stage.value,
    )

    def result(outcome: Outcome, detail: str = "", **extra: Any) -> StageResult:
        log.info("stage result", outcome=outcome.value, detail=detail)
        return StageResult(outcome, stage, pipeline_name, window_start, detail=detail, **extra)

    def why_not(otherwise: str) -> StageResult:
        # The record is read only when this stage cannot run: the common path is lock + claim.
        early = _not_for_this_stage(runtime.store.get(pipeline_name, window_start), stage)
        return result(*(early or (Outcome.STOPPED, otherwise)))

    lock = WindowLock(
        runtime.redis,
        pipeline_name,
        window_start,
        runtime.config.settings.lock_ttl.total_seconds(),
    )
    if not lock.acquire():
        return why_not("window is locked by another worker")
    try:
        record = runtime.store.claim_stage(pipeline_name, window_start, stage)
        if record is None:
            return why_not("window changed meanwhile")
        fence = record.fence
        step = _Step(runtime, pipeline, record, fence, stage_policy(stage, pipeline), lock)
        log.info("stage started", fence=fence, attempt=record.attempts, retry=retry)
        try:
            with lock.renewing():
                return _run_guarded(step, stage, retry, result)
        except LockLostError as error:
            return _give_back(step, stage, error, result)
    except LostOwnershipError as error:
        return result(Outcome.STOPPED, f"lost the window to a newer owner: {error}")
    except InvalidTransitionError as error:
        # The record moved under us (a rebuild deleted or reset it): not ours to run.
        return result(Outcome.STOPPED, f"window changed meanwhile: {error}")
    finally:
        lock.release()


def _give_back(
    step: _Step[BatchT, RunT],
    stage: Stage,
    error: LockLostError,
    result: Callable[..., StageResult],
) -> StageResult:
    """The stage lost its lock: put the window back in the queue at this stage (fenced, no new
    attempt) and send the stage again, to run under a lock of its own.

    Timeline, A running with fence 7:
        t0  A's lock is lost (Redis wiped, or A frozen past the TTL); A's renewer marks it
        t1  A reaches its next check and stops: its work is not committed
        t2a nobody claimed the window: the fenced move back to queued matches fence 7, and the
            stage is sent again; its new run takes a fresh lock and a new fence
        t2b B claimed it meanwhile (fence 8): the move is refused (`LostOwnershipError`) and A
            stops; B's run goes on
    Nothing A did before the check is lost: every stage is idempotent and fenced."""
    try:
        step.runtime.store.transition(
            step.pipeline.name,
            step.record.window_start,
            WindowStatus.QUEUED,
            expect=[WindowStatus.RUNNING],
            fence=step.fence,
            error=f"{stage.value}: {error}; sent again",
        )
    except LostOwnershipError as lost:
        return result(Outcome.STOPPED, f"lost the window to a newer owner: {lost}")
    return result(Outcome.RETRY, f"{error}; sent again", retry_in=0.0)


def _not_for_this_stage(record: WindowRecord | None, stage: Stage) -> tuple[Outcome, str] | None:
    """Why this stage must not run now (as an outcome and a reason), or None if it may."""
    if record is None:
        return Outcome.STOPPED, "no such window record"
    if record.status not in ACTIVE:
        return Outcome.STOPPED, f"window is {record.status.value}"
    if _position(record.stage) > _position(stage):
        return Outcome.PASSED, f"{stage.value} already done (window at {record.stage})"
    if _position(record.stage) < _position(stage):
        return Outcome.STOPPED, f"window still at {record.stage}"
    return None


def _run_guarded(
    step: _Step[BatchT, RunT], stage: Stage, retry: int, result: Callable[..., StageResult]
) -> StageResult:
    try:
        try:
            record = STAGE_STEPS[stage](step)
        except TIME_LIMIT_ERRORS as error:
            # The soft time limit interrupts this attempt; like any transient failure it is
            # re-sent (the hard limit follows soon, so nothing retries inside the step).
            raise StageTimeLimitError(
                f"ran past its soft time limit ({step.policy.soft_time_limit:g}s)"
            ) from error
    except TransientError as error:
        if retry < step.policy.task_retries:
            wait = backoff_seconds(
                retry, base=step.policy.backoff_base, cap=step.policy.backoff_cap
            )
            step.commit(
                WindowStatus.QUEUED,
                error=f"{stage.value}: {error} (retry {retry + 1} of {step.policy.task_retries})",
            )
            return result(Outcome.RETRY, str(error), retry_in=wait)
        record = step.commit(
            WindowStatus.FAILED,
            error=f"{stage.value}: {error} (gave up after {retry + 1} tries)",
        )
        return result(Outcome.FINISHED, str(error), status=record.status)
    except StagedDataLostError as error:
        # The staged files are gone or corrupt: loading them again cannot succeed, so the
        # window's next attempt starts at extract (dispatch resumes a failed window at its
        # recorded stage).
        record = step.commit(
            WindowStatus.FAILED,
            stage=Stage.EXTRACT,
            error=f"{stage.value}: {error}; the next attempt extracts again"[:2000],
        )
        return result(Outcome.FINISHED, str(error), status=record.status)
    except TerminalError as error:
        record = step.commit(WindowStatus.FAILED, error=f"{stage.value}: {error}")
        return result(Outcome.FINISHED, str(error), status=record.status)
    except (LostOwnershipError, InvalidTransitionError):
        raise
    except Exception as error:  # a bug or an unclassified SDK error: fail the attempt, visibly
        message = f"{stage.value}: unexpected {type(error).__name__}: {error}"
        record = step.commit(WindowStatus.FAILED, error=message[:2000])
        return result(Outcome.FINISHED, message, status=record.status)
    if record.status in ACTIVE:
        return result(Outcome.DONE, status=record.status)
    return result(Outcome.FINISHED, status=record.status)


def _precheck(step: _Step[BatchT, RunT]) -> WindowRecord:
    source = step.source()
    # The count, and the max of the version field where one is configured: what a recheck
    # compares the source with later (core/recheck.py).
    found = call_with_retries(step.policy, lambda: source.fingerprint(step.window))
    if found.count == 0:
        return step.commit(
            WindowStatus.SKIPPED,
            source_count=0,
            staged_count=0,
            target_count=0,
            source_version=found.version,
            error=None,
        )
    return step.commit(
        WindowStatus.QUEUED,
        stage=Stage.EXTRACT,
        source_count=found.count,
        source_version=found.version,
        error=None,
    )


def _extract(step: _Step[BatchT, RunT]) -> WindowRecord:
    source = step.source()
    staging = step.staging()
    run = f"f{step.fence:08d}"
    manifest = call_with_retries(
        step.policy,
        lambda: staging.write_window(
            step.pipeline.name, step.window, run, step.while_owned(source.iter_batches(step.window))
        ),
    )
    return step.commit(
        WindowStatus.QUEUED,
        stage=Stage.LOAD,
        staged_count=manifest.rows,
        rejected_count=manifest.rejected_count,
        manifest=manifest.path,
        error=_rejections_text(manifest.rejected, manifest.rejected_ids) or None,
    )


def _load(step: _Step[BatchT, RunT]) -> WindowRecord:
    staging = step.staging()
    target = step.target()
    if not step.record.manifest:
        raise TerminalError("no manifest recorded for this window; extract must run first")
    manifest_path = step.record.manifest
    manifest = call_with_retries(step.policy, lambda: staging.read_manifest(manifest_path))
    staged = set(
        call_with_retries(step.policy, lambda: staging.list_files(step.pipeline.name, step.window))
    )
    missing = [f.path for f in manifest.files if f.path not in staged]
    if missing:
        raise StagedDataLostError(
            f"{len(missing)} staged file(s) of run {manifest.run} are gone, e.g. {missing[0]}"
        )
    step.check_owned()
    # The rows the load's own transaction wrote; the audit counts the target again on its own
    # (one count per window instead of two).
    loaded = call_with_retries(
        step.policy,
        lambda: target.load_window(step.pipeline.name, manifest, staging, fence=step.fence),
    )
    return step.commit(WindowStatus.QUEUED, stage=Stage.AUDIT, target_count=loaded)


def _audit(step: _Step[BatchT, RunT]) -> WindowRecord:
    target = step.target()
    record = step.record
    target_count = call_with_retries(
        step.policy, lambda: target.count_window(step.pipeline.name, step.window)
    )
    problems = audit_problems(
        record.source_count, record.staged_count, target_count, record.rejected_count or 0
    )
    if problems:
        detail = "; ".join(problems)
        if record.error and record.rejected_count:
            detail = f"{detail}; {record.error}"
        # A failed audit re-runs the whole chain on the next attempt.
        return step.commit(
            WindowStatus.FAILED,
            stage=Stage.PRECHECK,
            target_count=target_count,
            error=f"audit: {detail}"[:2000],
        )
    return step.commit(WindowStatus.SUCCEEDED, target_count=target_count, error=None)


def audit_problems(
    source_count: int | None, staged_count: int | None, target_count: int, rejected_count: int
) -> list[str]:
    """Why a window's counts do not agree (empty when source = staged = target, none rejected)."""
    problems = []
    counts = f"source={source_count} staged={staged_count} target={target_count}"
    if source_count is None or staged_count is None:
        problems.append(f"counts missing ({counts})")
    elif not source_count == staged_count == target_count:
        problems.append(f"counts disagree ({counts})")
    if rejected_count:
        problems.append(f"{rejected_count} source documents rejected")
    return problems


def _rejections_text(rejected: Mapping[str, int], ids: Sequence[str]) -> str:
    if not rejected:
        return ""
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(rejected.items()))
    sample = ", ".join(ids[:5])
    return f"rejected documents ({reasons}); first ids: {sample}"


class _StageWork(Protocol):
    """The work of one stage, for any connectors' types."""

    def __call__(self, step: _Step[BatchT, RunT]) -> WindowRecord: ...


STAGE_STEPS: dict[Stage, _StageWork] = {
    Stage.PRECHECK: _precheck,
    Stage.EXTRACT: _extract,
    Stage.LOAD: _load,
    Stage.AUDIT: _audit,
}
"""The work of each stage; each commits its result guarded by the fence."""
