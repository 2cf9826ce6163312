"""`windowpipe metrics`: the numbers computed from the window records (on SQLite and on
PostgreSQL), the broker's queue depth (real Redis, real kombu messages), the alert rules and
the dashboard naming only what the exporter serves, and the exporter over HTTP following real
workers: freshness moving forward as windows succeed, a window that fails its audit showing as
dead and audit-failed; counters that never go down across a forced re-run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from core.config import Config, load_config
from core.instants import format_instant
from core.metrics import (
    CHAIN_SECONDS_BUCKETS,
    cumulative_buckets,
    freshness_seconds,
    read_window_metrics,
)
from core.records import Stage, WindowKind, WindowStatus
from core.store import StateStore
from core.store.schema import WINDOWS
from core.windows import Window
from tests.support import wait_until
from tests.support.deployment import REPO, Deployment, write_config

# Fixtures: a Redis DB of our own, deployments stopped after the test.
from windowpipe.exporter import (
    QUEUES,
    ScrapeCache,
    WindowpipeCollector,
    queue_depths,
    queue_list_names,
    render,
)

ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
NOW = datetime(2026, 3, 1, tzinfo=UTC)
ALERTS = REPO / "deploy" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "dashboards" / "windowpipe.json"


def window(index: int) -> Window:
    return Window(ORIGIN + index * SIZE, ORIGIN + (index + 1) * SIZE)


# --- pure computations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("complete_through", "start", "now", "expected"),
    [
        (ORIGIN + SIZE, ORIGIN, ORIGIN + 2 * SIZE, 900.0),
        (None, ORIGIN, ORIGIN + SIZE, 900.0),  # nothing complete: measured from the start
        (None, ORIGIN + SIZE, ORIGIN, 0.0),  # a start in the future is not behind
        (ORIGIN + 2 * SIZE, ORIGIN, ORIGIN + SIZE, 0.0),  # clock skew: never negative
        (ORIGIN, ORIGIN, ORIGIN + timedelta(seconds=1.5), 1.5),
    ],
)
def test_freshness_is_now_minus_the_complete_point_never_negative(
    complete_through: datetime | None, start: datetime, now: datetime, expected: float
) -> None:
    assert freshness_seconds(complete_through, start, now) == expected


def test_buckets_never_hold_fewer_than_the_one_before() -> None:
    assert cumulative_buckets([0, 2, 2, 5]) == (0, 2, 2, 5)
    assert cumulative_buckets([3, 1]) == (3, 3)


def test_queue_lists_are_the_ones_kombu_publishes_to() -> None:
    from kombu.transport.redis import Channel

    expected = [Channel._q_for_pri(Channel.__new__(Channel), "extract", p) for p in (0, 3, 6, 9)]
    assert queue_list_names("extract") == expected
    assert queue_list_names("extract")[0] == "extract"


@pytest.mark.integration  # starts another program
def test_the_exporter_reports_every_queue_of_the_app() -> None:
    env = {
        "WINDOWPIPE_CONFIG": str(REPO / "windowpipe.example.toml"),
        "SF_PASSWORD": "x",
        "S3_ACCESS_KEY_ID": "x",
        "S3_SECRET_ACCESS_KEY": "x",
    }
    out = subprocess.run(
        [sys.executable, "-c", "import workers; print(' '.join(workers.QUEUES))"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(QUEUES) == sorted(out)


# --- records in every state -----------------------------------------------------------------------


@pytest.fixture
def store(state_url: str) -> Iterator[StateStore]:
    store = StateStore(state_url)
    store.migrate()
    yield store
    store.dispose()


def claim(store: StateStore, pipeline: str, index: int, stage: Stage) -> int:
    record = store.claim_stage(pipeline, window(index).start, stage)
    assert record is not None, (pipeline, index, stage)
    return record.fence


def commit(
    store: StateStore, pipeline: str, index: int, fence: int, to: WindowStatus, **fields: Any
) -> None:
    store.transition(
        pipeline, window(index).start, to, expect=[WindowStatus.RUNNING], fence=fence, **fields
    )


def queue(store: StateStore, pipeline: str, index: int) -> Stage:
    """A new attempt of the window; returns the stage it resumes at."""
    expect = [WindowStatus.PENDING, WindowStatus.FAILED]
    record = store.queue(pipeline, window(index).start, expect=expect)
    assert record is not None and record.stage is not None
    return record.stage


def run_to(
    store: StateStore, pipeline: str, index: int, stage: Stage | None, docs: int = 3
) -> None:
    """Queue a window and run its chain as the runner commits it, from the stage it resumes
    at until it waits at `stage` (None: to the end, succeeded)."""
    run_from(store, pipeline, index, queue(store, pipeline, index), stage, docs)


def run_from(
    store: StateStore, pipeline: str, index: int, resume: Stage, stage: Stage | None, docs: int
) -> None:
    """Run a queued window's chain from `resume` until it waits at `stage` (None: to the
    end), committing each stage as the runner does."""
    counts = {
        Stage.PRECHECK: {"source_count": docs},
        Stage.EXTRACT: {"staged_count": docs},
        Stage.LOAD: {"target_count": docs},
    }
    order = list(Stage)
    for position in range(order.index(resume), len(order)):
        current = order[position]
        if current == stage:
            return
        fence = claim(store, pipeline, index, current)
        if current == Stage.AUDIT:
            commit(store, pipeline, index, fence, WindowStatus.SUCCEEDED, target_count=docs)
            return
        following = order[position + 1]
        commit(
            store, pipeline, index, fence, WindowStatus.QUEUED, stage=following, **counts[current]
        )


def succeed(store: StateStore, pipeline: str, index: int, docs: int = 3) -> None:
    run_to(store, pipeline, index, None, docs=docs)


def skip(store: StateStore, pipeline: str, index: int) -> None:
    queue(store, pipeline, index)
    fence = claim(store, pipeline, index, Stage.PRECHECK)
    commit(
        store,
        pipeline,
        index,
        fence,
        WindowStatus.SKIPPED,
        source_count=0,
        staged_count=0,
        target_count=0,
    )


def fail(
    store: StateStore, pipeline: str, index: int, at: Stage, error: str, **fields: Any
) -> None:
    run_to(store, pipeline, index, at)
    fence = claim(store, pipeline, index, at)
    commit(store, pipeline, index, fence, WindowStatus.FAILED, error=error, **fields)


def create(store: StateStore, pipeline: str, count: int) -> None:
    store.create_windows(pipeline, [window(i) for i in range(count)])


def metrics_of(store: StateStore, *pipelines: str) -> Any:
    return read_window_metrics(store, {name: ORIGIN for name in pipelines}, NOW)


def test_freshness_stops_at_the_oldest_window_not_succeeded_or_skipped(store: StateStore) -> None:
    metrics = metrics_of(store, "events")
    assert metrics.pipelines["events"].freshness.complete_through is None
    assert metrics.pipelines["events"].freshness.seconds == (NOW - ORIGIN).total_seconds()

    create(store, "events", 6)
    for index in (0, 2, 4):
        succeed(store, "events", index)
    skip(store, "events", 1)
    fail(store, "events", 3, Stage.EXTRACT, "extract: boom")
    fresh = metrics_of(store, "events").pipelines["events"].freshness
    assert fresh.complete_through == window(2).end  # window 3 failed; 4 succeeded after it
    assert fresh.seconds == (NOW - window(2).end).total_seconds()

    # Window 3 runs again and succeeds: the frontier jumps to window 4 (5 is still pending).
    succeed(store, "events", 3)
    assert (
        metrics_of(store, "events").pipelines["events"].freshness.complete_through == window(4).end
    )
    succeed(store, "events", 5)
    assert (
        metrics_of(store, "events").pipelines["events"].freshness.complete_through == window(5).end
    )


def test_a_first_window_not_finished_leaves_nothing_complete(store: StateStore) -> None:
    create(store, "events", 2)
    succeed(store, "events", 1)
    fresh = metrics_of(store, "events").pipelines["events"].freshness
    assert fresh.complete_through is None
    assert fresh.seconds == (NOW - ORIGIN).total_seconds()


def test_windows_by_status_backlog_attempts_dead_and_audit_failures(store: StateStore) -> None:
    create(store, "events", 9)
    succeed(store, "events", 0)
    run_to(store, "events", 1, Stage.EXTRACT)  # queued at extract
    run_to(store, "events", 2, Stage.EXTRACT)
    run_to(store, "events", 3, Stage.LOAD)
    claim(store, "events", 3, Stage.LOAD)  # running at load
    queue(store, "events", 4)  # queued at precheck
    # The audit found the counts differ: failed, and sent back to precheck (as the runner does).
    fail(
        store,
        "events",
        5,
        Stage.AUDIT,
        "audit: counts disagree (source=3 staged=3 target=2)",
        stage=Stage.PRECHECK,
    )
    # The audit stage could not reach the target, twice: not an audit failure, but retrying.
    for _ in range(2):
        fail(store, "events", 6, Stage.AUDIT, "audit: cannot reach the target (gave up)")
    # Three failed attempts, then dead at max_attempts=3.
    for _ in range(3):
        fail(store, "events", 7, Stage.PRECHECK, "precheck: source table missing")
    assert store.mark_dead_exhausted("events", max_attempts=3) == 1
    # (window 8 stays pending)

    item = metrics_of(store, "events").pipelines["events"]
    assert item.windows == {
        "pending": 1,
        "queued": 3,
        "running": 1,
        "succeeded": 1,
        "skipped": 0,
        "failed": 2,
        "dead": 1,
    }
    assert item.waiting == {"precheck": 1, "extract": 2, "load": 0, "audit": 0}
    assert item.running == {"precheck": 0, "extract": 0, "load": 1, "audit": 0}
    assert item.dead == 1
    # Window 6 is on its second attempt; the dead window's three count as dead, not retrying.
    assert item.max_attempts_unfinished == 2
    assert item.audit_failures == 1

    # The dead window is re-run and succeeds: nothing dead, attempts back to those in flight.
    assert store.reset_for_rerun("events", [window(7).start]) == 1
    succeed(store, "events", 7)
    item = metrics_of(store, "events").pipelines["events"]
    assert item.dead == 0 and item.max_attempts_unfinished == 2
    assert item.windows["succeeded"] == 2


def set_duration(store: StateStore, pipeline: str, index: int, seconds: float) -> None:
    """Give a succeeded window's attempt a known duration (the store stamps real instants)."""
    started = ORIGIN + timedelta(days=1)
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(WINDOWS)
            .where(WINDOWS.c.pipeline == pipeline, WINDOWS.c.window_start == window(index).start)
            .values(started_at=started, finished_at=started + timedelta(seconds=seconds))
        )


def test_chain_seconds_and_rows_come_from_succeeded_windows_only(store: StateStore) -> None:
    create(store, "events", 6)
    durations = {0: 0.5, 1: 10.0, 2: 100.0, 3: 5000.0}
    for index, seconds in durations.items():
        succeed(store, "events", index, docs=index + 1)
        set_duration(store, "events", index, seconds)
    skip(store, "events", 4)
    run_to(store, "events", 5, Stage.AUDIT, docs=50)  # counted so far, not succeeded yet

    item = metrics_of(store, "events").pipelines["events"]
    histogram = item.chain_seconds
    assert histogram.bounds == CHAIN_SECONDS_BUCKETS
    at_or_below = dict(zip(histogram.bounds, histogram.cumulative, strict=True))
    assert at_or_below[1] == 1 and at_or_below[5] == 1
    assert at_or_below[15] == 2 and at_or_below[60] == 2
    assert at_or_below[120] == 3 and at_or_below[3600] == 3
    assert at_or_below[7200] == 4 and at_or_below[86400] == 4
    assert histogram.count == 4
    assert histogram.total == pytest.approx(sum(durations.values()), abs=1e-3)
    assert item.rows == {"precheck": 10, "extract": 10, "load": 10}


def test_only_configured_pipelines_are_reported(store: StateStore) -> None:
    create(store, "removed", 1)
    metrics = read_window_metrics(store, {"events": ORIGIN}, NOW)
    assert set(metrics.pipelines) == {"events"}
    assert metrics.pipelines["events"].windows == dict.fromkeys([s.value for s in WindowStatus], 0)


def test_every_family_is_one_statement_for_all_pipelines(store: StateStore) -> None:
    names = [f"p{i:03}" for i in range(40)]
    for name in names:
        create(store, name, 3)
        succeed(store, name, 0)
    statements: list[str] = []

    def count(*args: Any) -> None:
        if args[2].lstrip().upper().startswith("SELECT"):
            statements.append(args[2])

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        metrics = read_window_metrics(
            store, dict.fromkeys(names, ORIGIN), NOW, recheck={name: [SIZE] for name in names}
        )
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
    # Frontier, tally, backlog, unfinished, recheck tally, due rechecks (one horizon set).
    assert len(statements) == 6, statements
    assert all(m.windows["succeeded"] == 1 for m in metrics.pipelines.values())
    assert all(m.freshness.complete_through == window(0).end for m in metrics.pipelines.values())


# --- the exporter's output ------------------------------------------------------------------------


def example_config(tmp_path: Path, state_url: str, redis_url: str) -> Config:
    path = write_config(
        tmp_path / "windowpipe.toml",
        {"redis_url": redis_url, "state_url": state_url},
        {
            "events": {
                "window": "15m",
                "start": format_instant(ORIGIN),
                "lag": "5m",
                "every": "10m",
                "source": {"type": "sql", "url": "sqlite://", "table": "events"},
                "staging": {"type": "local", "path": str(tmp_path / "staging")},
                "target": {"type": "sql", "url": "sqlite://", "table": "events_loaded"},
            }
        },
    )
    return load_config(path, require_secrets=False)


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def served_names(text: str) -> set[str]:
    """Every family and sample name in an exposition (`windowpipe_rows` and
    `windowpipe_rows_total`, `windowpipe_stage_seconds` and its `_bucket`, ...)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


@pytest.mark.integration
def test_the_exporter_serves_every_metric_of_the_issue(
    tmp_path: Path, sqlite_url: str, redis_db: str
) -> None:
    store = StateStore(sqlite_url)
    store.migrate()
    create(store, "events", 3)
    succeed(store, "events", 0)
    config = example_config(tmp_path, sqlite_url, redis_db)
    text = render(WindowpipeCollector(config, store, clock=lambda: NOW))
    store.dispose()
    names = served_names(text)
    for name in (
        "windowpipe_freshness_seconds",
        "windowpipe_windows",
        "windowpipe_window_attempts",
        "windowpipe_dead_windows",
        "windowpipe_stage_seconds_bucket",
        "windowpipe_rows_total",
        "windowpipe_queue_depth",
        "windowpipe_windows_waiting",
        "windowpipe_windows_running",
        "windowpipe_audit_failures",
        "windowpipe_exporter_source_up",
    ):
        assert name in names, name
    found = families(text)
    (sample,) = found["windowpipe_freshness_seconds"].samples
    assert sample.value == (NOW - window(0).end).total_seconds()
    assert found["windowpipe_stage_seconds"].type == "histogram"
    assert found["windowpipe_rows"].type == "counter"
    window_setting = {
        s.labels["pipeline"]: s.value for s in found["windowpipe_pipeline_window_seconds"].samples
    }
    assert window_setting == {"events": 900.0}
    up = {s.labels["source"]: s.value for s in found["windowpipe_exporter_source_up"].samples}
    assert up == {"state_store": 1.0, "broker": 1.0}


def counter_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the counter and histogram families of a scrape, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.type in ("counter", "histogram")
        for sample in family.samples
    }


@pytest.mark.integration  # runs `windowpipe enqueue --force` against the real Redis broker
def test_counters_never_decrease_across_a_forced_re_run(
    tmp_path: Path, sqlite_url: str, redis_db: str
) -> None:
    store = StateStore(sqlite_url)
    store.migrate()
    create(store, "events", 4)
    for index in range(4):
        succeed(store, "events", index, docs=10)
        set_duration(store, "events", index, 30.0 * (index + 1))
    config = example_config(tmp_path, sqlite_url, redis_db)
    collector = WindowpipeCollector(config, store, clock=lambda: NOW)
    before = counter_samples(render(collector))
    assert before[("windowpipe_rows_total", (("pipeline", "events"), ("stage", "load")))] == 40

    # An operator re-runs two succeeded windows: their counts are cleared until they succeed.
    forced = subprocess.run(
        [
            *(sys.executable, "-m", "windowpipe", "enqueue", "events", "--force"),
            *("--start", format_instant(window(1).start), "--end", format_instant(window(3).start)),
        ],
        cwd=tmp_path,
        env={**os.environ, "WINDOWPIPE_CONFIG": str(config.path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert forced.returncode == 0, forced.stderr
    after = counter_samples(render(collector))
    assert after.keys() == before.keys()
    lowered = {key: (before[key], after[key]) for key in before if after[key] < before[key]}
    assert lowered == {}
    # The records did shrink: a collector with no memory of the first scrape reports less.
    afresh = counter_samples(render(WindowpipeCollector(config, store, clock=lambda: NOW)))
    assert afresh[("windowpipe_rows_total", (("pipeline", "events"), ("stage", "load")))] == 20
    assert (
        afresh[("windowpipe_stage_seconds_count", (("pipeline", "events"), ("stage", "chain")))]
        == 2
    )

    # The re-run windows succeed with more documents (late data): the counters move on.
    for index in (1, 2):
        record = store.get("events", window(index).start)
        assert record is not None and record.status == WindowStatus.QUEUED
        run_from(store, "events", index, Stage.PRECHECK, None, docs=25)
    again = counter_samples(render(collector))
    assert again[("windowpipe_rows_total", (("pipeline", "events"), ("stage", "load")))] == 70
    assert all(again[key] >= after[key] for key in after)
    store.dispose()


class Flaky(Collector):
    """A collector that counts its reads, and fails them on demand."""

    def __init__(self) -> None:
        self.reads = 0
        self.tries = 0
        self.failing = False

    def collect(self) -> Iterator[Metric]:
        self.tries += 1
        if self.failing:
            raise RuntimeError("store gone")
        self.reads += 1
        family = GaugeMetricFamily("windowpipe_test_reads", "Reads so far.")
        family.add_metric([], self.reads)
        yield family


def test_the_scrape_cache_serves_its_last_reading_with_its_age() -> None:
    now = [100.0]
    collector = Flaky()
    cache = ScrapeCache(collector, clock=lambda: now[0])
    cache.refresh()
    now[0] += 4.0

    def served(name: str) -> float:
        return float(families(cache.exposition().decode())[name].samples[0].value)

    assert served("windowpipe_test_reads") == 1
    assert served("windowpipe_exporter_data_age_seconds") == 4.0
    # Readings that fail in the background leave the last one served; its age keeps growing.
    collector.failing = True
    stop = threading.Event()
    runner = threading.Thread(target=cache.run, args=(stop, 0.01))
    runner.start()
    try:
        wait_until(lambda: collector.tries >= 3, 30, "three failed readings")
    finally:
        stop.set()
        runner.join(10)
    now[0] += 60.0
    assert served("windowpipe_test_reads") == 1
    assert served("windowpipe_exporter_data_age_seconds") == 64.0
    collector.failing = False
    cache.refresh()
    assert served("windowpipe_test_reads") == 2
    assert served("windowpipe_exporter_data_age_seconds") == 0.0


@pytest.mark.integration
def test_the_exporter_refreshing_in_the_background_follows_the_store(
    tmp_path: Path, sqlite_url: str, redis_db: str
) -> None:
    store = StateStore(sqlite_url)
    store.migrate()
    config = example_config(tmp_path, sqlite_url, redis_db)
    dep = Deployment(Path(config.path), tmp_path)
    exporter = Exporter(dep, "--refresh", "0.5")
    try:
        first = exporter.scrape()
        assert first.value("windowpipe_windows", pipeline="events", status="pending") == 0
        assert 0 <= first.value("windowpipe_exporter_data_age_seconds") < 60
        create(store, "events", 3)

        def pending() -> float:
            return exporter.scrape().value(
                "windowpipe_windows", pipeline="events", status="pending"
            )

        wait_until(lambda: pending() == 3, 60, "the new windows served")
    finally:
        exporter.close()
        store.dispose()


@pytest.mark.integration
def test_a_store_without_the_schema_is_reported_down_and_left_alone(
    tmp_path: Path, redis_db: str
) -> None:
    database = tmp_path / "never.db"
    url = f"sqlite:///{database}"
    config = example_config(tmp_path, url, redis_db)
    store = StateStore(url)
    text = render(WindowpipeCollector(config, store))
    store.dispose()
    up = {
        s.labels["source"]: s.value for s in families(text)["windowpipe_exporter_source_up"].samples
    }
    assert up == {"state_store": 0.0, "broker": 1.0}
    assert "windowpipe_freshness_seconds" not in served_names(text)
    assert not database.exists()  # the exporter never creates or migrates a store
    # `--once`, like every read command, refuses in one line, exit 2.
    result = subprocess.run(
        [sys.executable, "-m", "windowpipe", "metrics", "--once", "--config", config.path],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "windowpipe migrate" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not database.exists()


@pytest.mark.integration
def test_queue_depth_counts_messages_of_every_priority_and_no_other_queue(redis_db: str) -> None:
    """Real kombu messages on the real Redis broker, no worker consuming: LLEN of the queue's
    own list misses the messages sent with a priority; the exporter's depth does not."""
    import redis
    from celery import Celery

    app = Celery(broker=redis_db)
    try:
        for priority in (0, 0, 5, 9):
            app.send_task(
                "windowpipe.extract",
                ("events", "2026-01-01T00:00:00Z"),
                queue="extract",
                priority=priority,
            )
        app.send_task("windowpipe.load", ("events", "2026-01-01T00:00:00Z"), queue="load")
    finally:
        app.close()
    client = redis.Redis.from_url(redis_db)
    assert client.llen("extract") == 2  # the two priority-0 messages only
    assert queue_depths(client, QUEUES) == {
        "precheck": 0,
        "extract": 4,
        "load": 1,
        "audit": 0,
        "control": 0,
        "recheck": 0,
    }


# --- alert rules and dashboard --------------------------------------------------------------------

PROMQL_NAME = re.compile(r"\bwindowpipe_[a-z_]+\b")


def rule_expressions() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    found = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            found[rule["alert"]] = rule["expr"]
    return found


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The names in a scrape of a store with windows in every state."""
    tmp_path = tmp_path_factory.mktemp("exported")
    url = f"sqlite:///{tmp_path}/state.db"
    store = StateStore(url)
    store.migrate()
    create(store, "events", 3)
    succeed(store, "events", 0)
    fail(store, "events", 1, Stage.LOAD, "load: boom")
    from tests.conftest import REDIS_TEST_URL

    config = example_config(tmp_path, url, f"{REDIS_TEST_URL}/0")
    # As served by default: read in the background, with the reading's age.
    cache = ScrapeCache(WindowpipeCollector(config, store, broker=None))
    cache.refresh()
    text = cache.exposition().decode()
    store.dispose()
    # No broker client: queue depth is left out of this scrape, but served with a broker.
    return served_names(text) | {"windowpipe_queue_depth"}


def test_the_alert_rules_cover_freshness_dead_windows_and_audit_failures() -> None:
    exprs = rule_expressions()
    assert "windowpipe_freshness_seconds" in exprs["WindowpipePipelineStale"]
    for name in ("window", "lag"):
        assert f"windowpipe_pipeline_{name}_seconds" in exprs["WindowpipePipelineStale"]
    assert "windowpipe_dead_windows" in exprs["WindowpipeDeadWindow"]
    assert "windowpipe_audit_failures" in exprs["WindowpipeAuditFailed"]


@pytest.mark.integration  # `exported` scrapes the control activity from the real Redis
def test_every_metric_the_alerts_and_the_dashboard_name_is_exported(exported: set[str]) -> None:
    named = set()
    for expr in [*rule_expressions().values(), *dashboard_expressions()]:
        named.update(PROMQL_NAME.findall(expr))
    assert named, "no windowpipe metric found in the rules and the dashboard"
    assert named - exported == set()
    # And the dashboard shows the metrics the issue asks for.
    shown = {n for expr in dashboard_expressions() for n in PROMQL_NAME.findall(expr)}
    for name in (
        "windowpipe_freshness_seconds",
        "windowpipe_windows",
        "windowpipe_dead_windows",
        "windowpipe_window_attempts",
        "windowpipe_stage_seconds_bucket",
        "windowpipe_rows_total",
        "windowpipe_queue_depth",
        "windowpipe_windows_waiting",
    ):
        assert name in shown, name


@pytest.mark.integration  # starts another program
def test_promtool_accepts_the_rules_and_every_dashboard_query(tmp_path: Path) -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The dashboard's queries, as recording rules, so promtool parses each one.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$pipeline", ".+")}
        for i, expr in enumerate(dashboard_expressions())
        if not expr.startswith("label_values(")
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- the exporter over HTTP, following real workers -----------------------------------------------


class Exporter:
    """`windowpipe metrics --port 0` as a subprocess of a deployment; scraped over HTTP. By
    default it reads the store at each scrape (`--refresh 0`), so a scrape's numbers are of the
    instant it was made."""

    def __init__(self, dep: Deployment, *options: str) -> None:
        self.options = options or ("--refresh", "0")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "windowpipe",
                "metrics",
                "--port",
                "0",
                "--address",
                "127.0.0.1",
                *self.options,
            ],
            cwd=dep.workdir,
            env=dep.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"http://\S+/metrics", line)
        assert match, (line, self.process.stderr.read() if self.process.poll() is not None else "")
        self.url = match.group(0)

    def scrape(self) -> Scrape:
        """One scrape's samples, and the clock just before and just after it."""
        import urllib.request

        before = datetime.now(UTC)
        with urllib.request.urlopen(self.url, timeout=30) as response:
            text = response.read().decode()
        after = datetime.now(UTC)
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        return Scrape(samples, before, after)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@dataclass
class Scrape:
    samples: list[Any]
    before: datetime
    after: datetime

    def value(self, name: str, **labels: str) -> float:
        """The one sample called `name` (`windowpipe_rows_total`, `..._bucket`) with `labels`."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) == 1, (name, labels, found)
        return float(found[0])

    def assert_complete_through(self, pipeline: str, expected: datetime) -> None:
        """The exporter read its clock between `before` and `after`: its freshness puts the
        point up to which the target is complete at `expected` (to the millisecond)."""
        freshness = self.value("windowpipe_freshness_seconds", pipeline=pipeline)
        low = (self.before - expected).total_seconds() - 0.001
        high = (self.after - expected).total_seconds() + 0.001
        assert low <= freshness <= high, (pipeline, freshness, low, high)


@pytest.mark.integration
def test_the_exporter_over_http_follows_real_workers(
    tmp_path: Path, pg_schema_url: str, redis_db: str, stop_all: list[Deployment]
) -> None:
    import sqlite3

    from tests.test_faults import ALL_QUEUES, pipeline, seed_events, sql_source, sql_target

    docs = [3, 5, 2, 4]
    seed_events(pg_schema_url, docs)
    # "broken": window 1 holds a document above max_document_bytes; extract rejects it and the
    # audit fails the window; with max_attempts=1 it is dead at once.
    broken_source = f"sqlite:///{tmp_path}/broken.db"
    seed_events(broken_source, [2, 3, 2])
    with sqlite3.connect(tmp_path / "broken.db") as conn:
        conn.execute("UPDATE events SET payload = ? WHERE id = 4", ["x" * 5000])
    config = write_config(
        tmp_path / "windowpipe.toml",
        {
            "redis_url": redis_db,
            "state_url": f"sqlite:///{tmp_path}/state.db",
            "lock_ttl": "4s",
            "stale_after": "10s",
            "failed_retry_base": "1s",
        },
        {
            "events": pipeline(
                sql_source(pg_schema_url),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(pg_schema_url),
                len(docs),
            ),
            "broken": pipeline(
                sql_source(broken_source, max_document_bytes=2000),
                {"type": "local", "path": str(tmp_path / "stage-broken")},
                sql_target(pg_schema_url, table="broken_loaded"),
                3,
                max_attempts=1,
            ),
        },
    )
    dep = Deployment(config_path=config, workdir=tmp_path)
    stop_all.append(dep)
    dep.cli("migrate")
    exporter = Exporter(dep)
    try:
        # Nothing ran yet: nothing complete, measured from the pipelines' start.
        first = exporter.scrape()
        first.assert_complete_through("events", ORIGIN)
        assert first.value("windowpipe_windows", pipeline="events", status="succeeded") == 0

        dep.start_workers(ALL_QUEUES, concurrency=2)

        def enqueue(name: str, start: int, end: int, check: bool = True) -> None:
            dep.cli(
                "enqueue",
                name,
                "--start",
                format_instant(window(start).start),
                "--end",
                format_instant(window(end - 1).end),
                "--wait",
                "--timeout",
                "120",
                check=check,
            )

        # One window succeeds: the target is complete through its end.
        enqueue("events", 0, 1)
        after_one = exporter.scrape()
        after_one.assert_complete_through("events", window(0).end)
        found = after_one
        assert found.value("windowpipe_windows", pipeline="events", status="succeeded") == 1
        assert found.value("windowpipe_stage_seconds_count", pipeline="events", stage="chain") == 1
        for stage in ("precheck", "extract", "load"):
            assert found.value("windowpipe_rows_total", pipeline="events", stage=stage) == docs[0]

        # The rest succeed: complete through the last window; freshness moved forward by
        # three windows (less the time between the scrapes).
        enqueue("events", 1, len(docs))
        after_all = exporter.scrape()
        after_all.assert_complete_through("events", window(len(docs) - 1).end)
        earlier = after_one.value("windowpipe_freshness_seconds", pipeline="events")
        later = after_all.value("windowpipe_freshness_seconds", pipeline="events")
        elapsed = (after_all.after - after_one.before).total_seconds()
        assert later <= earlier - 3 * SIZE.total_seconds() + elapsed
        found = after_all
        assert found.value("windowpipe_windows", pipeline="events", status="succeeded") == 4
        assert found.value("windowpipe_stage_seconds_count", pipeline="events", stage="chain") == 4
        assert (
            found.value(
                "windowpipe_stage_seconds_bucket", pipeline="events", stage="chain", le="+Inf"
            )
            == 4
        )
        assert found.value("windowpipe_stage_seconds_sum", pipeline="events", stage="chain") > 0
        for stage in ("precheck", "extract", "load"):
            assert found.value("windowpipe_rows_total", pipeline="events", stage=stage) == sum(docs)
        assert found.value("windowpipe_dead_windows", pipeline="events") == 0
        assert found.value("windowpipe_window_attempts", pipeline="events") == 0

        # The broken pipeline: window 1 fails its audit and is dead; window 2 succeeds after
        # it, but the target is complete only through window 0.
        enqueue("broken", 0, 3, check=False)
        found = exporter.scrape()
        found.assert_complete_through("broken", window(0).end)
        assert found.value("windowpipe_dead_windows", pipeline="broken") == 1
        assert found.value("windowpipe_windows", pipeline="broken", status="dead") == 1
        assert found.value("windowpipe_windows", pipeline="broken", status="succeeded") == 2
        # The dead window is dead, not retrying: no window is being retried.
        assert found.value("windowpipe_window_attempts", pipeline="broken") == 0
        assert found.value("windowpipe_audit_failures", pipeline="broken") == 1
        # Rows count succeeded windows only (2 + 2 documents).
        assert found.value("windowpipe_rows_total", pipeline="broken", stage="precheck") == 4

        # Every queue was drained by the workers; no window waits or runs.
        for queue_name in QUEUES:
            assert found.value("windowpipe_queue_depth", queue=queue_name) == 0
        for pipeline_name in ("events", "broken"):
            for stage in Stage:
                assert (
                    found.value(
                        "windowpipe_windows_waiting", pipeline=pipeline_name, stage=stage.value
                    )
                    == 0
                )
                assert (
                    found.value(
                        "windowpipe_windows_running", pipeline=pipeline_name, stage=stage.value
                    )
                    == 0
                )
        assert found.value("windowpipe_exporter_source_up", source="state_store") == 1
        assert found.value("windowpipe_exporter_source_up", source="broker") == 1
    finally:
        exporter.close()

    # `status` says the same, one line per pipeline.
    out = dep.cli("status").stdout
    assert f"events: complete through {format_instant(window(len(docs) - 1).end)}," in out
    assert f"broken: complete through {format_instant(window(0).end)}," in out
    rows = json.loads(dep.cli("status", "--json").stdout)
    assert isinstance(rows, list) and all("window_start" in row for row in rows)
    assert WindowKind.MANUAL.value in {row["kind"] for row in rows}
