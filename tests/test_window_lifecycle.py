"""Whole windows through generation, dispatch, the runner and cleanup, without services.

The real `core` code runs against in-memory systems (tests/support/memory.py), fakeredis (with
Lua, for the locks' scripts) and a SQLite state store in the test's directory, so each test drives
windows through the state machine in milliseconds. The same flows run on real Celery workers,
Redis and PostgreSQL in tests/test_runtime.py and tests/test_faults.py.
"""

from __future__ import annotations

import gzip
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from connectors.base import Batch, Manifest, encode_line
from core.config import Config, PipelineConfig, config_from_dict
from core.dispatch import dispatch, generation_tick
from core.errors import StaleFenceError, TerminalError, TransientError
from core.instants import format_instant, utc_now
from core.keys import window_lock_key
from core.records import Stage, WindowKind, WindowRecord, WindowStatus
from core.recovery import CleanupReport, cleanup
from core.runner import Outcome, Runtime, StageResult, run_stage
from core.store import StateStore
from core.windows import Window
from tests.support.memory import (
    MemoryBroker,
    MemoryConnectors,
    MemorySource,
    MemoryStagingArea,
    MemoryTarget,
    document,
    documents_per_window,
)

ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
PIPELINE = "events"
LOCK_TTL = timedelta(seconds=60)
"""Long enough that no renewal runs within a test (a renewal would find a deleted key gone and
mark the lock lost)."""
STALE_AFTER = timedelta(minutes=2)

DEAD_PID = 2**22 + 1
"""Above Linux's largest pid_max: no process ever has it."""


def start(index: int) -> datetime:
    return ORIGIN + index * SIZE


def window(index: int) -> Window:
    return Window(start(index), start(index + 1))


def make_config(tmp_path: Path, **pipeline: Any) -> Config:
    """One pipeline of 15-minute windows; its connectors' config is never used (the runner gets
    the in-memory ones). No waits: retries and failed windows go again at once."""
    body = {
        "window": "15m",
        "start": format_instant(ORIGIN),
        "max_windows_per_tick": 6,
        "max_attempts": 3,
        "step_attempts": 2,
        "step_backoff": 0,
        "task_retries": 1,
        "task_backoff": 0,
        "source": {"type": "sql", "url": "sqlite://", "table": "events"},
        "staging": {"type": "local", "path": str(tmp_path / "unused-staging")},
        "target": {"type": "sql", "url": "sqlite://", "table": "events_loaded"},
        **pipeline,
    }
    return config_from_dict(
        {
            "windowpipe": {
                "state_url": f"sqlite:///{tmp_path}/state.db",
                "lock_ttl": f"{int(LOCK_TTL.total_seconds())}s",
                "stale_after": f"{int(STALE_AFTER.total_seconds())}s",
                "failed_retry_base": "0s",
            },
            "pipelines": {PIPELINE: body},
        }
    )


@dataclass
class MemoryDeployment:
    """windowpipe's core on in-memory systems: what beat, the control worker and the stage
    workers would do, each one call away."""

    config: Config
    store: StateStore
    redis: fakeredis.FakeRedis
    connectors: MemoryConnectors
    broker: MemoryBroker

    @property
    def pipeline(self) -> PipelineConfig:
        return self.config.pipeline(PIPELINE)

    @property
    def runtime(self) -> Runtime:
        return Runtime(self.config, self.store, self.redis, self.connectors)

    @property
    def source(self) -> MemorySource:
        return self.connectors.source

    @property
    def staging(self) -> MemoryStagingArea:
        return self.connectors.staging

    @property
    def target(self) -> MemoryTarget:
        return self.connectors.target

    def tick(self, now: datetime = start(6)) -> list[WindowRecord]:
        """Beat's generation tick at `now` (by default: windows 0 to 5 are due): create the due
        windows, dispatch; returns the windows it queued."""
        report = generation_tick(
            self.store,
            self.redis,
            self.pipeline,
            self.broker.send,
            now,
            failed_retry_base=self.config.settings.failed_retry_base,
        )
        assert not report.problems, report.problems
        return report.queued

    def dispatch(self) -> tuple[list[WindowRecord], int]:
        return dispatch(
            self.store,
            self.redis,
            self.pipeline,
            self.broker.send,
            utc_now(),
            failed_retry_base=self.config.settings.failed_retry_base,
        )

    def work(self) -> list[StageResult]:
        """The stage workers take every sent chain to its end."""
        return self.broker.run(self.runtime)

    def run_stage(self, index: int, stage: Stage) -> StageResult:
        """One stage of window `index`, as a worker given its message runs it."""
        return run_stage(self.runtime, stage, PIPELINE, start(index))

    def settle(self, rounds: int = 20) -> None:
        """Dispatch and work until nothing is left to run (what finishing windows' dispatch
        requests do)."""
        for _ in range(rounds):
            self.dispatch()
            if not self.broker.messages:
                return
            self.work()
        raise AssertionError(f"not settled after {rounds} rounds: {self.statuses()}")

    def cleanup(self, after: timedelta) -> CleanupReport:
        """The stale-lock cleanup, `after` from now."""
        return cleanup(self.store, self.redis, self.config, self.broker.send, utc_now() + after)

    def record(self, index: int) -> WindowRecord:
        found = self.store.get(PIPELINE, start(index))
        assert found is not None
        return found

    def records(self) -> list[WindowRecord]:
        return self.store.list_records(PIPELINE)

    def statuses(self) -> list[WindowStatus]:
        return [r.status for r in self.records()]


DeployFactory = Callable[..., MemoryDeployment]


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[DeployFactory]:
    """`deploy(**pipeline_keys)`: a deployment whose source holds six windows of documents:
    2, 0, 3, 1, 5 and 4 (the second one empty)."""
    stores: list[StateStore] = []

    def make(**pipeline: Any) -> MemoryDeployment:
        config = make_config(tmp_path, **pipeline)
        store = StateStore(config.settings.state_url)
        store.migrate()
        stores.append(store)
        source = MemorySource(documents_per_window(ORIGIN, SIZE, [2, 0, 3, 1, 5, 4]))
        return MemoryDeployment(
            config,
            store,
            fakeredis.FakeRedis(server=fakeredis.FakeServer()),
            MemoryConnectors(source=source),
            MemoryBroker(),
        )

    yield make
    for store in stores:
        store.dispose()


@pytest.fixture
def deployment(deploy: DeployFactory) -> MemoryDeployment:
    return deploy()


def source_ids(source: MemorySource) -> Counter[str]:
    return Counter(d.id for d in source.documents)


def done(results: list[StageResult]) -> Counter[str]:
    """How often each stage ran to its commit."""
    return Counter(r.stage.value for r in results if r.outcome == Outcome.DONE)


# --- the happy path -----------------------------------------------------------------------------


def test_generated_windows_run_to_the_end_and_the_target_holds_each_document_once(
    deployment: MemoryDeployment,
) -> None:
    queued = deployment.tick()
    assert [r.window_start for r in queued] == [start(i) for i in range(6)]
    deployment.work()

    records = deployment.records()
    assert [r.status for r in records] == [
        WindowStatus.SUCCEEDED,
        WindowStatus.SKIPPED,
        *[WindowStatus.SUCCEEDED] * 4,
    ]
    for record, expected in zip(records, [2, 0, 3, 1, 5, 4], strict=True):
        assert record.source_count == record.staged_count == record.target_count == expected
        assert record.attempts == 1 and record.error is None
    assert deployment.target.ids() == source_ids(deployment.source)
    # Nothing left to do: a second tick creates and queues nothing.
    assert deployment.tick() == [] and not deployment.broker.messages


def test_an_empty_window_is_skipped_after_a_fenced_empty_load_without_staging(
    deployment: MemoryDeployment,
) -> None:
    deployment.store.create_windows(PIPELINE, [window(1)], kind=WindowKind.MANUAL)
    deployment.dispatch()
    results = deployment.work()

    assert [(r.stage, r.outcome) for r in results] == [(Stage.PRECHECK, Outcome.FINISHED)]
    record = deployment.record(1)
    assert record.status == WindowStatus.SKIPPED
    assert (record.source_count, record.staged_count, record.target_count) == (0, 0, 0)
    assert deployment.staging.files == {}
    # The ledger moved to the skip's fence: an older load can no longer land.
    key = (PIPELINE, window(1).start)
    assert deployment.target.ledger == {key: record.fence} and record.load_fence == record.fence
    assert deployment.target.ledger_rows == {key: 0}


# --- failures ------------------------------------------------------------------------------------


def test_a_transient_failure_is_sent_again_and_the_window_succeeds_in_the_same_attempt(
    deployment: MemoryDeployment,
) -> None:
    # Both tries of the step fail (step_attempts = 2): the stage is re-sent once.
    deployment.source.faults.fail("iter_batches", *[TransientError("connection reset")] * 2)
    deployment.store.create_windows(PIPELINE, [window(0)])
    deployment.dispatch()
    results = deployment.work()

    assert [(r.stage, r.outcome) for r in results] == [
        (Stage.PRECHECK, Outcome.DONE),
        (Stage.EXTRACT, Outcome.RETRY),
        (Stage.EXTRACT, Outcome.DONE),
        (Stage.LOAD, Outcome.DONE),
        (Stage.AUDIT, Outcome.FINISHED),
    ]
    assert [m.retry for m in deployment.broker.sent] == [0, 1]
    record = deployment.record(0)
    assert record.status == WindowStatus.SUCCEEDED
    assert record.attempts == 1 and record.error is None


def test_transient_failures_past_the_task_retries_fail_the_window_and_it_resumes_there(
    deployment: MemoryDeployment,
) -> None:
    # Two runs (task_retries = 1) of two tries each.
    deployment.source.faults.fail("iter_batches", *[TransientError("connection reset")] * 4)
    deployment.store.create_windows(PIPELINE, [window(0)])
    deployment.dispatch()
    deployment.work()

    failed = deployment.record(0)
    assert failed.status == WindowStatus.FAILED and failed.stage == Stage.EXTRACT
    assert failed.error == "extract: connection reset (gave up after 2 tries)"

    deployment.settle()
    assert deployment.broker.sent[-1].stage == Stage.EXTRACT
    record = deployment.record(0)
    assert record.status == WindowStatus.SUCCEEDED and record.attempts == 2
    # Precheck ran once (the retry resumed at extract); the audit looked at the source once.
    assert deployment.source.faults.calls["fingerprint"] == 2


def test_a_terminal_failure_fails_the_window_at_once_and_the_next_attempt_resumes_there(
    deployment: MemoryDeployment,
) -> None:
    deployment.target.faults.fail("load_window", TerminalError("permission denied"))
    deployment.store.create_windows(PIPELINE, [window(2)])
    deployment.dispatch()
    deployment.work()

    failed = deployment.record(2)
    assert failed.status == WindowStatus.FAILED and failed.stage == Stage.LOAD
    assert failed.error == "load: permission denied"
    assert deployment.target.faults.calls["load_window"] == 1  # terminal: never retried

    deployment.settle()
    assert deployment.broker.sent[-1].stage == Stage.LOAD
    record = deployment.record(2)
    assert record.status == WindowStatus.SUCCEEDED and record.attempts == 2
    assert deployment.source.faults.calls["iter_batches"] == 1  # extracted once
    assert deployment.target.ids() == Counter(["w2-0", "w2-1", "w2-2"])


def _lose_a_part(staging: MemoryStagingArea, manifest: Manifest) -> None:
    del staging.files[manifest.files[0].path]


def _replace_a_part(staging: MemoryStagingArea, manifest: Manifest) -> None:
    # Valid gzip NDJSON, but not the bytes the manifest's sha256 describes.
    line = encode_line(document("intruder", start(2)))
    staging.files[manifest.files[0].path] = gzip.compress(line, mtime=0)


def _lose_the_manifest(staging: MemoryStagingArea, manifest: Manifest) -> None:
    del staging.files[manifest.path]


@pytest.mark.parametrize("damage", [_lose_a_part, _replace_a_part, _lose_the_manifest])
def test_staged_data_lost_before_load_sends_the_window_back_to_extract(
    deployment: MemoryDeployment, damage: Any
) -> None:
    deployment.store.create_windows(PIPELINE, [window(2)])
    deployment.dispatch()
    deployment.broker.messages.clear()  # this test runs the stages itself
    assert deployment.run_stage(2, Stage.PRECHECK).outcome == Outcome.DONE
    assert deployment.run_stage(2, Stage.EXTRACT).outcome == Outcome.DONE
    extracted = deployment.record(2)
    assert extracted.manifest is not None
    damage(deployment.staging, Manifest.from_json(deployment.staging.files[extracted.manifest]))

    result = deployment.run_stage(2, Stage.LOAD)
    assert result.outcome == Outcome.FINISHED
    failed = deployment.record(2)
    assert failed.status == WindowStatus.FAILED and failed.stage == Stage.EXTRACT
    assert failed.error is not None and "the next attempt extracts again" in failed.error
    assert deployment.target.ledger == {}  # nothing of the damaged run was loaded

    deployment.settle()
    assert deployment.broker.sent[-1].stage == Stage.EXTRACT
    record = deployment.record(2)
    assert record.status == WindowStatus.SUCCEEDED and record.attempts == 2
    assert deployment.target.ids() == Counter(["w2-0", "w2-1", "w2-2"])


def test_attempts_exhausted_make_the_window_dead(deployment: MemoryDeployment) -> None:
    deployment.source.faults.fail("fingerprint", *[TerminalError("index missing")] * 3)
    deployment.store.create_windows(PIPELINE, [window(0)])
    deployment.settle()

    record = deployment.record(0)
    assert record.status == WindowStatus.DEAD and record.attempts == 3
    assert record.error == "precheck: index missing"
    assert deployment.source.faults.calls["fingerprint"] == 3
    assert deployment.dispatch() == ([], 0)  # dead stays dead


# --- owners and messages lost -------------------------------------------------------------------


def test_an_owner_paused_past_its_lock_is_refused_by_the_target_ledger(
    deployment: MemoryDeployment,
) -> None:
    """A claims load (fence f) and freezes before its load; its lock expires; B claims (fence
    f + 1), loads and commits; A wakes and loads with fence f: refused by the target's ledger,
    which has f + 1, and nothing of A's changes the target or the record."""
    deployment.store.create_windows(PIPELINE, [window(4)])
    deployment.dispatch()
    deployment.broker.messages.clear()
    deployment.run_stage(4, Stage.PRECHECK)
    deployment.run_stage(4, Stage.EXTRACT)

    fences: list[int] = []
    results_of_b: list[StageResult] = []

    def pause_the_first_owner(fence: int) -> None:
        fences.append(fence)
        if len(fences) == 1:  # A, frozen here: its lock expires and B takes the window over
            deployment.redis.delete(window_lock_key(PIPELINE, start(4)))
            results_of_b.append(deployment.run_stage(4, Stage.LOAD))

    deployment.target.before_load = pause_the_first_owner
    result_of_a = deployment.run_stage(4, Stage.LOAD)

    fence_a, fence_b = fences
    assert fence_b == fence_a + 1
    assert [r.outcome for r in results_of_b] == [Outcome.DONE]
    assert result_of_a.outcome == Outcome.STOPPED
    assert "lost the window to a newer owner" in result_of_a.detail
    assert deployment.target.ledger == {(PIPELINE, start(4)): fence_b}
    record = deployment.record(4)
    assert record.status == WindowStatus.QUEUED and record.stage == Stage.AUDIT
    assert record.fence == fence_b and record.target_count == 5
    assert deployment.run_stage(4, Stage.AUDIT).status == WindowStatus.SUCCEEDED


def test_the_target_ledger_refuses_an_older_fence_and_loads_the_same_fence_again() -> None:
    staging, target = MemoryStagingArea(), MemoryTarget()
    docs = documents_per_window(ORIGIN, SIZE, [3])
    manifest = staging.write_window(PIPELINE, window(0), "f1", [Batch(documents=docs)])

    assert target.load_window(PIPELINE, manifest, staging, fence=7) == 3
    assert target.load_window(PIPELINE, manifest, staging, fence=7) == 3  # its owner's retry
    with pytest.raises(StaleFenceError, match="fence 6 is older than fence 7"):
        target.load_window(PIPELINE, manifest, staging, fence=6)
    assert target.ledger == {(PIPELINE, start(0)): 7}
    assert target.count_window(PIPELINE, window(0)) == 3
    assert target.load_window(PIPELINE, manifest, staging, fence=8) == 3
    assert target.ids() == Counter(d.id for d in docs)


def test_a_lost_queued_message_is_sent_again_without_using_an_attempt(
    deployment: MemoryDeployment,
) -> None:
    deployment.store.create_windows(PIPELINE, [window(0)])
    deployment.dispatch()
    deployment.broker.messages.clear()  # the broker lost it (a Redis restart)

    # Waiting is not lost: past a lock TTL but before stale_after, cleanup leaves it alone.
    assert deployment.cleanup(after=LOCK_TTL + timedelta(seconds=1)).requeued == []

    report = deployment.cleanup(after=STALE_AFTER + timedelta(seconds=1))
    [(requeued, why)] = report.requeued
    assert requeued.window_start == start(0)
    assert why.startswith("queued at precheck for ")
    assert why.endswith("with no worker on it; message sent again, no attempt used")
    assert deployment.record(0).attempts == 1
    deployment.work()
    record = deployment.record(0)
    assert record.status == WindowStatus.SUCCEEDED and record.attempts == 1


def test_a_dead_workers_running_window_is_requeued_with_an_attempt_and_its_lock_released(
    deployment: MemoryDeployment,
) -> None:
    deployment.store.create_windows(PIPELINE, [window(3)])
    deployment.dispatch()
    deployment.broker.messages.clear()
    # A worker on this host claimed the window and died inside precheck, holding its lock.
    assert deployment.store.claim_stage(PIPELINE, start(3), Stage.PRECHECK) is not None
    lock_key = window_lock_key(PIPELINE, start(3))
    deployment.redis.set(lock_key, f"{socket.gethostname()}:{DEAD_PID}:0a1b2c", px=60_000)

    report = deployment.cleanup(after=LOCK_TTL + timedelta(seconds=1))

    assert [(h.pipeline, h.window_start) for h in report.released] == [(PIPELINE, start(3))]
    assert not deployment.redis.exists(lock_key)
    assert [why for _, why in report.requeued] == ["running at precheck but its lock is gone"]
    assert [(m.window_start, m.stage) for m in deployment.broker.messages] == [
        (start(3), Stage.PRECHECK)
    ]
    assert deployment.record(3).attempts == 2
    deployment.work()
    record = deployment.record(3)
    assert record.status == WindowStatus.SUCCEEDED and record.attempts == 2


def test_a_dead_workers_window_without_attempts_left_fails_and_then_dies(
    deploy: DeployFactory,
) -> None:
    deployment = deploy(max_attempts=1)
    deployment.store.create_windows(PIPELINE, [window(3)])
    deployment.dispatch()
    deployment.broker.messages.clear()
    assert deployment.store.claim_stage(PIPELINE, start(3), Stage.PRECHECK) is not None

    report = deployment.cleanup(after=LOCK_TTL + timedelta(seconds=1))
    assert [r.window_start for r, _ in report.failed] == [start(3)]
    assert not deployment.broker.messages
    # The same cleanup's safety net dispatches the pipeline, and dispatch buries the window.
    assert report.dispatched == {PIPELINE: 0}
    assert deployment.record(3).status == WindowStatus.DEAD
    assert deployment.dispatch() == ([], 0)


def test_pending_windows_whose_dispatch_was_lost_are_dispatched_by_cleanup(
    deploy: DeployFactory,
) -> None:
    deployment = deploy(max_active_windows=2)
    deployment.store.create_windows(PIPELINE, [window(0), window(2), window(3)])
    # Nobody dispatched them (the message died with the broker): cleanup does, within the cap.
    report = deployment.cleanup(after=timedelta(0))
    assert report.dispatched == {PIPELINE: 2}
    assert [m.window_start for m in deployment.broker.messages] == [start(0), start(2)]
    # A pipeline at its cap is left alone: running windows' finishing requests dispatch it.
    assert deployment.cleanup(after=timedelta(0)).dispatched == {}
    deployment.work()
    assert deployment.cleanup(after=timedelta(0)).dispatched == {PIPELINE: 1}
    deployment.work()
    assert deployment.statuses() == [WindowStatus.SUCCEEDED] * 3
    assert deployment.cleanup(after=timedelta(0)).dispatched == {}


def test_duplicate_messages_run_each_stage_once(deployment: MemoryDeployment) -> None:
    deployment.store.create_windows(PIPELINE, [window(4)])
    deployment.dispatch()
    for _ in range(3):  # redelivered, sent again by cleanup, enqueued by hand
        deployment.broker.send(PIPELINE, start(4), Stage.PRECHECK)
    results = deployment.work()

    assert done(results) == Counter({"precheck": 1, "extract": 1, "load": 1})
    finished = [r for r in results if r.outcome == Outcome.FINISHED]
    assert [(r.stage, r.status) for r in finished] == [(Stage.AUDIT, WindowStatus.SUCCEEDED)]
    assert {r.outcome for r in results} <= {
        Outcome.DONE,
        Outcome.PASSED,
        Outcome.STOPPED,
        Outcome.FINISHED,
    }
    calls = (
        deployment.source.faults.calls
        + deployment.staging.faults.calls
        + deployment.target.faults.calls
    )
    assert calls["write_window"] == calls["load_window"] == 1
    assert calls["fingerprint"] == 2  # precheck's count and the audit's
    record = deployment.record(4)
    assert record.status == WindowStatus.SUCCEEDED and record.attempts == 1
    assert deployment.target.ids() == Counter(f"w4-{n}" for n in range(5))


# --- caps ---------------------------------------------------------------------------------------


def test_dispatch_keeps_scheduled_and_backfill_windows_within_their_caps(
    deploy: DeployFactory,
) -> None:
    deployment = deploy(max_active_windows=2, max_backfill_windows=1)
    # A backfill of windows 6 to 8, then beat's tick creates the scheduled windows 0 to 5.
    deployment.store.create_windows(
        PIPELINE, [window(i) for i in (6, 7, 8)], kind=WindowKind.MANUAL
    )
    queued = deployment.tick()

    def active(kind: WindowKind) -> int:
        return deployment.store.count_active(PIPELINE, kind)

    assert sorted(r.window_start for r in queued) == [start(0), start(1), start(6)]
    assert (active(WindowKind.SCHEDULED), active(WindowKind.MANUAL)) == (2, 1)
    assert deployment.dispatch() == ([], 0)  # full: nothing more until a window finishes

    for _ in range(10):
        deployment.work()
        queued, _ = deployment.dispatch()
        assert active(WindowKind.SCHEDULED) <= 2 and active(WindowKind.MANUAL) <= 1
        if not queued:
            break
    assert all(s in (WindowStatus.SUCCEEDED, WindowStatus.SKIPPED) for s in deployment.statuses())
    assert len(deployment.records()) == 9
    # The backfill ran one at a time, beside the scheduled windows, never ahead of their cap.
    order = [m.window_start for m in deployment.broker.sent]
    assert order.index(start(7)) > order.index(start(1))


# --- what the audit checks ---------------------------------------------------------------------


def run_to_load(deployment: MemoryDeployment, index: int) -> None:
    """Queue window `index` and run its precheck and extract."""
    deployment.store.create_windows(PIPELINE, [window(index)], kind=WindowKind.MANUAL)
    deployment.dispatch()
    for stage in (Stage.PRECHECK, Stage.EXTRACT):
        assert deployment.run_stage(index, stage).outcome == Outcome.DONE


def test_documents_arriving_after_extract_are_drift_not_an_audit_failure(
    deployment: MemoryDeployment,
) -> None:
    run_to_load(deployment, 2)
    deployment.source.documents.append(document("late", start(2) + timedelta(minutes=9)))
    for stage in (Stage.LOAD, Stage.AUDIT):
        deployment.run_stage(2, stage)

    record = deployment.record(2)
    assert record.status == WindowStatus.SUCCEEDED and record.error is None
    assert (record.source_count, record.staged_count, record.target_count) == (3, 3, 3)
    [drift] = record.drift
    assert (drift["by"], drift["count_before"], drift["count_after"]) == ("audit", 3, 4)
    # Left to recheck/reconcile: nothing runs the window again by itself.
    deployment.settle()
    assert deployment.record(2).target_count == 3


def test_with_rerun_on_drift_late_documents_run_the_window_again_at_once(
    deploy: DeployFactory,
) -> None:
    deployment = deploy(rerun_on_drift=True)
    run_to_load(deployment, 2)
    deployment.source.documents.append(document("late", start(2) + timedelta(minutes=9)))
    for stage in (Stage.LOAD, Stage.AUDIT):
        deployment.run_stage(2, stage)
    assert deployment.record(2).status == WindowStatus.PENDING

    deployment.settle()

    record = deployment.record(2)
    assert record.status == WindowStatus.SUCCEEDED and record.target_count == 4
    assert [d["by"] for d in record.drift] == ["audit"]
    assert deployment.target.ids() == Counter(["w2-0", "w2-1", "w2-2", "late"])


def test_a_target_holding_the_right_count_of_the_wrong_ids_fails_the_audit(
    deployment: MemoryDeployment,
) -> None:
    run_to_load(deployment, 2)
    deployment.run_stage(2, Stage.LOAD)
    key = (PIPELINE, start(2))
    deployment.target.rows[key] = [
        {**row, "id": f"x{row['id']}"} for row in deployment.target.rows[key]
    ]
    deployment.run_stage(2, Stage.AUDIT)

    failed = deployment.record(2)
    assert failed.status == WindowStatus.FAILED and failed.stage == Stage.PRECHECK
    assert failed.error is not None and failed.error.startswith("audit: ids disagree")
    assert failed.target_count == failed.staged_count == 3
    deployment.settle()  # the next attempt replaces the rows
    assert deployment.record(2).status == WindowStatus.SUCCEEDED
    assert deployment.target.ids() == Counter(["w2-0", "w2-1", "w2-2"])


def test_a_ledger_ahead_of_the_store_raises_the_fence_without_an_attempt(
    deployment: MemoryDeployment,
) -> None:
    run_to_load(deployment, 2)
    ahead = deployment.record(2).fence + 1000
    deployment.target.ledger[(PIPELINE, start(2))] = ahead
    deployment.settle()

    record = deployment.record(2)
    assert record.status == WindowStatus.SUCCEEDED and record.attempts == 1
    assert record.load_fence == ahead + 1 and record.fence == ahead + 2
    assert deployment.target.ledger[(PIPELINE, start(2))] == ahead + 1


def test_a_stale_owner_refused_by_the_ledger_does_not_raise_the_fence(
    deployment: MemoryDeployment,
) -> None:
    """A (fence f) is about to load; B claims the window (f+1) meanwhile and loads. A's load
    is refused by the ledger (f+1); the store's fence moved on, so A stops as a stale owner
    instead of raising the fence above B's."""
    run_to_load(deployment, 2)
    paused: list[int] = []

    def b_takes_over(fence: int) -> None:
        if not paused:
            paused.append(fence)
            deployment.redis.delete(window_lock_key(PIPELINE, start(2)))
            assert deployment.run_stage(2, Stage.LOAD).outcome == Outcome.DONE

    deployment.target.before_load = b_takes_over
    result = deployment.run_stage(2, Stage.LOAD)

    assert result.outcome == Outcome.STOPPED and "newer owner" in result.detail
    assert deployment.target.ledger[(PIPELINE, start(2))] == paused[0] + 1
    assert deployment.record(2).load_fence == paused[0] + 1
