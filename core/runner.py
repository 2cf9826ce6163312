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
from typing import Any, Protocol, TypeVar

import redis

from core.checksum import EMPTY_CHECKSUM
from core.config import Config, PipelineConfig
from core.errors import (
    TIME_LIMIT_ERRORS,
    InvalidTransitionError,
    LockLostError,
    LostOwnershipError,
    StagedDataLostError,
    StageTimeLimitError,
    StaleFenceError,
    TerminalError,
    TransientError,
)
from core.instants import format_instant, utc_now
from core.locks import WindowLock
from core.logs import get_logger
from core.ports import Batch, ConnectorFactory, Source, StagingArea, Target, TargetAudit
from core.recheck import drift_of
from core.records import (
    ACTIVE,
    AUDIT_ERROR_PREFIX,
    STAGE_ORDER,
    Stage,
    WindowRecord,
    WindowStatus,
)
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
class Runtime:
    """What a stage needs from the process: config, store, Redis and connectors."""

    config: Config
    store: StateStore
    redis: redis.Redis
    connectors: ConnectorFactory


@dataclass
class _Step:
    runtime: Runtime
    pipeline: PipelineConfig
    record: WindowRecord
    fence: int
    policy: StagePolicy
    lock: WindowLock

    @property
    def window(self) -> Window:
        return self.record.window

    def source(self) -> Source:
        return self.runtime.connectors("source", self.pipeline)

    def staging(self) -> StagingArea:
        return self.runtime.connectors("staging", self.pipeline)

    def target(self) -> Target:
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

    def while_owned(self, batches: Iterable[Batch]) -> Iterator[Batch]:
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
    runtime: Runtime,
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
    step: _Step,
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
    step: _Step, stage: Stage, retry: int, result: Callable[..., StageResult]
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


def _precheck(step: _Step) -> WindowRecord:
    source = step.source()
    # The count, and the max of the version field where one is configured: what a recheck
    # compares the source with later (core/recheck.py). The count only decides whether the
    # window is empty: extract records what it read, and the audit checks that.
    found = call_with_retries(step.policy, lambda: source.fingerprint(step.window))
    if found.count == 0:
        return _skip_empty(step, source_version=found.version)
    return step.commit(
        WindowStatus.QUEUED,
        stage=Stage.EXTRACT,
        source_count=found.count,
        source_version=found.version,
        error=None,
    )


def _skip_empty(step: _Step, **fields: Any) -> WindowRecord:
    """Skip a window found empty, after a fenced empty load: the target's rows of the window
    are deleted and its ledger moves to this fence in one transaction (`clear_window`).

    So a window emptied at the source is empty in the target too (a purge, then a re-run,
    converges), and a frozen older load cannot land after the skip: its fence is below the
    ledger's now. Timeline: A loads with fence 3 and freezes before its commit; the window is
    re-run and found empty by B (fence 6), whose clear waits on A's ledger row or runs first.
    A commits first: B's clear then deletes A's rows (ledger 6). B first: A's guard sees 6 > 3,
    A rolls back. Either way the target holds no row of the window.
    """
    target = step.target()
    name, window = step.pipeline.name, step.window
    _fenced_write(step, lambda fence: target.clear_window(name, window, fence))
    return step.commit(
        WindowStatus.SKIPPED,
        source_count=0,
        staged_count=0,
        target_count=0,
        checksum=EMPTY_CHECKSUM,
        target_checksum=EMPTY_CHECKSUM,
        load_fence=step.fence,
        error=None,
        **fields,
    )


MAX_FENCE_RAISES = 3
"""How often one fenced write raises the window's fence above a target ledger's before it
gives up (`_fenced_write`): once is enough unless the ledger keeps moving, which only a newer
owner does."""

_T = TypeVar("_T")


def _fenced_write(step: _Step, write: Callable[[int], _T]) -> _T:
    """`write(fence)` to the target with the step's fence (retrying transient errors). When the
    target's ledger refuses the fence as stale although the state store still holds it, the
    store is behind the ledger: the window's fence is raised above the ledger's (REFENCE, no
    attempt used) and the write is tried again with it.

    Why that is safe: every owner claims a new fence in the store before it writes, so a newer
    owner would have moved the store's fence; `raise_fence` matches only while the store still
    holds this step's fence. Timeline: the store is restored from last night's backup (fence 5
    for the window) while the ledger holds fence 9 from this morning's load. A claims (6), its
    load is refused (9 > 6); the store still says 6, so no owner of this store's history wrote
    9: A moves the record to fence 10 and loads (ledger 10). Had B claimed meanwhile (7), the
    store says 7, `raise_fence` matches nothing and A stops as a stale owner (its
    StaleFenceError) while B goes on.
    """
    log = get_logger("windowpipe.stage", pipeline=step.pipeline.name)
    for _ in range(MAX_FENCE_RAISES):
        try:
            return call_with_retries(step.policy, lambda: write(step.fence))
        except StaleFenceError as error:
            if error.recorded is None:
                raise
            raised = step.runtime.store.raise_fence(
                step.pipeline.name,
                step.record.window_start,
                fence=step.fence,
                above=error.recorded,
            )
            if raised is None:
                raise
            log.warning(
                "the target's ledger is ahead of the state store: fence raised",
                window=format_instant(step.record.window_start),
                refused=step.fence,
                ledger=error.recorded,
                fence=raised.fence,
            )
            step.fence, step.record = raised.fence, raised
    return call_with_retries(step.policy, lambda: write(step.fence))


def _extract(step: _Step) -> WindowRecord:
    source = step.source()
    staging = step.staging()
    run = f"f{step.fence:08d}"
    manifest = call_with_retries(
        step.policy,
        lambda: staging.write_window(
            step.pipeline.name, step.window, run, step.while_owned(source.iter_batches(step.window))
        ),
    )
    if manifest.rows == 0 and manifest.rejected_count == 0:
        # Emptied since precheck counted it: empty in the target too.
        return _skip_empty(step)
    return step.commit(
        WindowStatus.QUEUED,
        stage=Stage.LOAD,
        # What extract read is the window's snapshot: the audit and rechecks compare with it,
        # not with precheck's earlier count.
        source_count=manifest.rows + manifest.rejected_count,
        staged_count=manifest.rows,
        rejected_count=manifest.rejected_count,
        manifest=manifest.path,
        checksum=manifest.checksum,
        error=_rejections_text(manifest.rejected, manifest.rejected_ids) or None,
    )


def _load(step: _Step) -> WindowRecord:
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
    name = step.pipeline.name
    loaded = _fenced_write(
        step, lambda fence: target.load_window(name, manifest, staging, fence=fence)
    )
    return step.commit(
        WindowStatus.QUEUED, stage=Stage.AUDIT, target_count=loaded, load_fence=step.fence
    )


def _audit(step: _Step) -> WindowRecord:
    target = step.target()
    source = step.source()
    record = step.record
    name, window = step.pipeline.name, step.window
    held = call_with_retries(step.policy, lambda: target.audit_window(name, window))
    problems = audit_problems(record, held)
    if problems:
        detail = "; ".join(problems)
        if record.error and record.rejected_count:
            detail = f"{detail}; {record.error}"
        # A failed audit re-runs the whole chain on the next attempt.
        return step.commit(
            WindowStatus.FAILED,
            stage=Stage.PRECHECK,
            target_count=held.rows,
            target_checksum=held.checksum,
            error=f"{AUDIT_ERROR_PREFIX}{detail}"[:2000],
        )
    # The target holds exactly what extract read. Documents that arrived (or went) since are
    # not this run's failure: they are drift, for recheck or reconcile (or a re-run now).
    now = call_with_retries(step.policy, lambda: source.fingerprint(window))
    drift = drift_of(record, now, at=utc_now(), by="audit")
    rerun = drift is not None and step.pipeline.rerun_on_drift
    # The drift history is written only when it grows: an empty one stays NULL (the metrics
    # count windows that ever drifted by `drift IS NOT NULL`).
    grown = {"drift": [*record.drift, drift]} if drift is not None and not rerun else {}
    done = step.commit(
        WindowStatus.SUCCEEDED,
        target_count=held.rows,
        target_checksum=held.checksum,
        error=None,
        **grown,
    )
    if drift is None:
        return done
    get_logger("windowpipe.stage", pipeline=name).warning(
        "the source changed since extract's snapshot",
        window=format_instant(window.start),
        rerun=rerun,
        **drift,
    )
    if rerun:
        # `rerun_on_drift`: back to pending at once (RECHECK_RERUN records the drift), as a
        # recheck would; None when someone reset the window meanwhile.
        again = step.runtime.store.record_check(done, rechecks_done=done.rechecks_done, drift=drift)
        return again or done
    return done


def audit_problems(record: WindowRecord, held: TargetAudit) -> list[str]:
    """Why the target does not hold exactly what extract staged (empty when it does): counts
    and id checksums equal, the ledger still holding the fence and row count of the window's
    load, no document rejected."""
    problems = []
    counts = f"source={record.source_count} staged={record.staged_count} target={held.rows}"
    if record.staged_count is None:
        problems.append(f"counts missing ({counts})")
    elif record.staged_count != held.rows:
        problems.append(f"counts disagree ({counts})")
    elif record.checksum is not None and record.checksum != held.checksum:
        problems.append(f"ids disagree (staged checksum {record.checksum}, target {held.checksum})")
    if record.load_fence is not None and (
        held.ledger_fence != record.load_fence or held.ledger_rows != record.target_count
    ):
        problems.append(
            f"ledger disagrees (fence {held.ledger_fence} rows {held.ledger_rows}; the load "
            f"recorded fence {record.load_fence} rows {record.target_count})"
        )
    if record.rejected_count:
        problems.append(f"{record.rejected_count} source documents rejected")
    return problems


def _rejections_text(rejected: Mapping[str, int], ids: Sequence[str]) -> str:
    if not rejected:
        return ""
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(rejected.items()))
    sample = ", ".join(ids[:5])
    return f"rejected documents ({reasons}); first ids: {sample}"


class _StageWork(Protocol):
    """The work of one stage, for any connectors' types."""

    def __call__(self, step: _Step) -> WindowRecord: ...


STAGE_STEPS: dict[Stage, _StageWork] = {
    Stage.PRECHECK: _precheck,
    Stage.EXTRACT: _extract,
    Stage.LOAD: _load,
    Stage.AUDIT: _audit,
}
"""The work of each stage; each commits its result guarded by the fence."""
