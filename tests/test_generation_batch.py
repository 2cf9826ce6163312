"""Generation over many pipelines in one task: the beat schedule groups pipelines, their last
scheduled ends are read in one statement, and one pipeline's failure leaves the others to run."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import sqlalchemy as sa
from celery.schedules import crontab

from beat_schedule import build_schedule
from core.config import Config, config_from_dict
from core.dispatch import dispatch, generation_batch, generation_tick
from core.instants import format_instant
from core.records import Stage, WindowKind, WindowStatus
from core.store import StateStore
from core.store.schema import WINDOWS
from core.windows import Window

ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
NOW = ORIGIN + timedelta(hours=3, minutes=5)


def pipeline(every: str = "1m", window: str = "1h") -> dict[str, Any]:
    return {
        "window": window,
        "start": "2026-01-01T00:00:00Z",
        "every": every,
        "source": {"type": "sql", "url": "sqlite://", "table": "events"},
        "staging": {"type": "local", "path": "/tmp/windowpipe-staging"},
        "target": {"type": "sql", "url": "sqlite://", "table": "loaded"},
    }


def config(pipelines: dict[str, dict[str, Any]], **settings: Any) -> Config:
    return config_from_dict({"windowpipe": settings, "pipelines": pipelines})


def test_beat_sends_one_generation_task_per_group_of_pipelines_sharing_an_every() -> None:
    pipelines = {f"m{index:03}": pipeline("1m") for index in range(120)}
    pipelines |= {"hourly-a": pipeline("1h"), "hourly-b": pipeline("1h")}

    schedule = build_schedule(config(pipelines, generation_batch=50))

    generation = {name: entry for name, entry in schedule.items() if name.startswith("generate")}
    assert sorted(generation) == [
        "generate:3600s:hourly-a",
        "generate:60s:m000",
        "generate:60s:m050",
        "generate:60s:m100",
    ]
    groups = [entry["args"][0] for entry in generation.values()]
    assert sorted(name for group in groups for name in group) == sorted(pipelines)
    assert generation["generate:60s:m100"]["args"] == ([f"m{i:03}" for i in range(100, 120)],)
    assert generation["generate:3600s:hourly-a"]["schedule"] == crontab(minute="0")
    assert {entry["task"] for entry in generation.values()} == {"windowpipe.generate_batch"}


def test_pipelines_sharing_an_every_but_not_a_phase_are_generated_by_separate_tasks() -> None:
    """A pipeline whose windows fall due two minutes into each five is ticked then, apart from
    those due on the five (core/ticks.py)."""
    lagged = pipeline("5m", window="5m") | {"lag": "2m"}
    schedule = build_schedule(
        config({"a": pipeline("5m", "5m"), "b": pipeline("5m", "5m"), "c": lagged})
    )
    generation = {k: (v["args"], v["schedule"]) for k, v in schedule.items() if "generate" in k}
    assert generation == {
        "generate:300s:a": ((["a", "b"],), crontab(minute="0-59/5")),
        "generate:c": ((["c"],), crontab(minute="2-59/5")),
    }


def test_a_generation_batch_of_one_is_a_task_per_pipeline_under_its_old_name() -> None:
    schedule = build_schedule(config({"a": pipeline(), "b": pipeline()}, generation_batch=1))
    generation = {k: v["args"] for k, v in schedule.items() if k.startswith("generate")}
    assert generation == {"generate:a": (["a"],), "generate:b": (["b"],)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(f"sqlite:///{tmp_path}/state.db") as opened:
        opened.migrate()
        yield opened


def test_last_window_ends_reads_each_pipelines_end_in_one_statement(store: StateStore) -> None:
    hour = timedelta(hours=1)
    store.create_windows("a", [Window(ORIGIN, ORIGIN + hour)], kind=WindowKind.SCHEDULED)
    store.create_windows("a", [Window(ORIGIN + hour, ORIGIN + 2 * hour)], kind=WindowKind.MANUAL)
    store.create_windows("b", [Window(ORIGIN, ORIGIN + 3 * hour)], kind=WindowKind.MANUAL)
    statements: list[str] = []

    def seen(*args: object) -> None:
        statements.append(str(args[2]))

    sa.event.listen(store.engine, "before_cursor_execute", seen)
    ends = store.last_window_ends(["a", "b", "c"], kind=WindowKind.SCHEDULED)
    every_kind = store.last_window_ends(["a", "b"])
    sa.event.remove(store.engine, "before_cursor_execute", seen)

    assert ends == {"a": ORIGIN + hour, "b": None, "c": None}
    assert every_kind == {"a": ORIGIN + 2 * hour, "b": ORIGIN + 3 * hour}
    assert len([s for s in statements if "windows" in s]) == 2


def test_one_pipelines_failure_leaves_the_others_generating(store: StateStore) -> None:
    settings = config({"a": pipeline(), "broken": pipeline(window="1h"), "c": pipeline()}).pipelines
    # `broken`'s stored windows are 40 minutes long: they no longer fit its 1h `window`.
    store.create_windows(
        "broken", [Window(ORIGIN, ORIGIN + timedelta(minutes=40))], kind=WindowKind.SCHEDULED
    )
    sent: list[tuple[str, datetime, Stage]] = []

    def send(name: str, start: datetime, stage: Stage) -> str:
        sent.append((name, start, stage))
        return "chain"

    report = generation_batch(store, fakeredis.FakeRedis(), list(settings.values()), send, NOW)

    assert set(report.failed) == {"broken"}
    assert "did `start` or `window` change" in report.failed["broken"]
    assert [tick.pipeline for tick in report.ticks] == ["a", "c"]
    for name in ("a", "c"):
        assert [r.window_start for r in store.list_records(name)] == [
            ORIGIN + timedelta(hours=i) for i in range(3)
        ]
    assert {name for name, _, _ in sent} == {"a", "c"}
    assert report.summary()["created"] == 6


def test_a_batch_creates_what_a_tick_per_pipeline_creates(tmp_path: Path) -> None:
    pipelines = config({f"p{i}": pipeline() for i in range(5)}).pipelines
    created = []
    for batch in (True, False):
        with StateStore(f"sqlite:///{tmp_path}/state-{batch}.db") as store:
            store.migrate()
            for now in (NOW, NOW + timedelta(hours=2)):
                if batch:
                    generation_batch(
                        store, fakeredis.FakeRedis(), list(pipelines.values()), _none, now
                    )
                else:
                    for settings in pipelines.values():
                        generation_tick(store, fakeredis.FakeRedis(), settings, _none, now)
            created.append([(r.pipeline, r.window_start, r.status) for r in store.list_records()])
    assert created[0] == created[1]
    assert len(created[0]) == 5 * 5


def _none(name: str, start: datetime, stage: Stage) -> None:
    return None


def test_a_batch_queues_waiting_backfills_buries_exhausted_windows_and_skips_idle_pipelines(
    store: StateStore,
) -> None:
    settings = config({"a": pipeline(), "idle": pipeline()}).pipelines
    before_due = ORIGIN + timedelta(minutes=30)  # no scheduled window is due yet
    hour = timedelta(hours=1)
    store.create_windows(
        "a", [Window(ORIGIN + 5 * hour, ORIGIN + 6 * hour)], kind=WindowKind.MANUAL
    )
    store.create_windows(
        "a", [Window(ORIGIN + 7 * hour, ORIGIN + 8 * hour)], kind=WindowKind.MANUAL
    )
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(WINDOWS)
            .where(WINDOWS.c.pipeline == "a", WINDOWS.c.window_start == ORIGIN + 7 * hour)
            .values(status=WindowStatus.FAILED.value, attempts=settings["a"].max_attempts)
        )
    statements: list[str] = []

    def seen(*args: object) -> None:
        statements.append(str(args[2]))

    sa.event.listen(store.engine, "before_cursor_execute", seen)
    report = generation_batch(store, fakeredis.FakeRedis(), [settings["idle"]], _none, before_due)
    idle_batch = len([s for s in statements if "windows" in s])
    statements.clear()
    generation_tick(store, fakeredis.FakeRedis(), settings["idle"], _none, before_due)
    idle_tick = len([s for s in statements if "windows" in s])
    sa.event.remove(store.engine, "before_cursor_execute", seen)
    report = generation_batch(store, fakeredis.FakeRedis(), [settings["a"]], _none, before_due)

    assert [(r.window_start, r.status) for r in store.list_records("a")] == [
        (ORIGIN + 5 * hour, WindowStatus.QUEUED),
        (ORIGIN + 7 * hour, WindowStatus.DEAD),
    ]
    assert report.summary()["queued"] == 1 and report.summary()["dead"] == 1
    # The idle pipeline: its end and waiting windows read with the batch, nothing dispatched.
    assert idle_batch < idle_tick


def test_a_batch_with_no_window_due_reads_three_statements_and_finds_what_a_tick_finds(
    store: StateStore, tmp_path: Path
) -> None:
    pipelines = config({f"p{i}": pipeline() for i in range(4)}).pipelines
    generation_batch(store, fakeredis.FakeRedis(), list(pipelines.values()), _none, NOW)
    hour = timedelta(hours=1)
    # Nothing waits: every window done (skipped, no rows); p1's last one is succeeded without
    # counts (a chain problem); p0 has a manual window where its next scheduled one would go.
    with store.engine.begin() as conn:
        conn.execute(sa.update(WINDOWS).values(status=WindowStatus.SKIPPED.value, source_count=0))
        conn.execute(
            sa.update(WINDOWS)
            .where(WINDOWS.c.pipeline == "p1", WINDOWS.c.window_start == ORIGIN + 2 * hour)
            .values(status=WindowStatus.SUCCEEDED.value, source_count=None)
        )
    store.create_windows("p0", [Window(ORIGIN + 3 * hour, ORIGIN + 4 * hour)], WindowKind.MANUAL)
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(WINDOWS)
            .where(WINDOWS.c.pipeline == "p0", WINDOWS.c.window_start == ORIGIN + 3 * hour)
            .values(status=WindowStatus.SKIPPED.value, source_count=0)
        )
    later = NOW + hour  # p1-p3's next window is due, p0's is not (the manual one is there)
    # Half an hour earlier none is due.
    # The same state, for ticks a pipeline at a time.
    with (
        closing(sqlite3.connect(tmp_path / "state.db")) as here,
        closing(sqlite3.connect(tmp_path / "ticks.db")) as there,
    ):
        here.backup(there)
    statements: list[str] = []

    def seen(*args: object) -> None:
        statements.append(str(args[2]))

    sa.event.listen(store.engine, "before_cursor_execute", seen)
    idle = generation_batch(
        store, fakeredis.FakeRedis(), list(pipelines.values()), _none, NOW + hour / 2
    )
    sa.event.remove(store.engine, "before_cursor_execute", seen)
    batch = {
        tick.pipeline: tick
        for tick in generation_batch(
            store, fakeredis.FakeRedis(), list(pipelines.values()), _none, later
        ).ticks
    }
    with StateStore(f"sqlite:///{tmp_path}/ticks.db") as alone:
        again = {
            name: generation_tick(alone, fakeredis.FakeRedis(), settings, _none, later)
            for name, settings in pipelines.items()
        }

    assert len([s for s in statements if "windows" in s]) == 3
    assert idle.summary()["created"] == 0 and len(idle.ticks) == 4
    assert {name: len(tick.created) for name, tick in batch.items()} == {
        "p0": 0,
        "p1": 1,
        "p2": 1,
        "p3": 1,
    }
    assert [p.message for p in batch["p1"].problems] == [p.message for p in again["p1"].problems]
    assert "succeeded without source" in batch["p1"].problems[0].message
    for name in ("p0", "p2", "p3"):
        assert batch[name].problems == again[name].problems == []


# --- the batch's writes done together: one INSERT, one claim, the chains published at once ------


def _statements(store: StateStore) -> tuple[list[str], Any]:
    statements: list[str] = []

    def seen(*args: object) -> None:
        statements.append(str(args[2]).lstrip().split()[0].upper())

    sa.event.listen(store.engine, "before_cursor_execute", seen)
    return statements, seen


def test_create_windows_many_creates_only_the_missing_windows_of_every_pipeline(
    state_url: str,
) -> None:
    hour = timedelta(hours=1)
    with StateStore(state_url) as store:
        store.migrate()
        store.create_windows("a", [Window(ORIGIN, ORIGIN + hour)])
        store.create_windows("b", [Window(ORIGIN + hour, ORIGIN + 2 * hour)], WindowKind.MANUAL)

        created = store.create_windows_many(
            {
                "a": [Window(ORIGIN + hour, ORIGIN + 2 * hour), Window(ORIGIN, ORIGIN + hour)],
                "b": [Window(ORIGIN, ORIGIN + hour), Window(ORIGIN + hour, ORIGIN + 2 * hour)],
                "c": [],
            }
        )
        again = store.create_windows_many({"a": [Window(ORIGIN, ORIGIN + hour)]})
        records = {(r.pipeline, r.window_start): r for r in store.list_records()}

    assert created == {
        "a": [Window(ORIGIN + hour, ORIGIN + 2 * hour)],
        "b": [Window(ORIGIN, ORIGIN + hour)],
        "c": [],
    }
    assert again == {"a": []}
    assert sorted(records) == [
        ("a", ORIGIN),
        ("a", ORIGIN + hour),
        ("b", ORIGIN),
        ("b", ORIGIN + hour),
    ]
    # The window that existed keeps its record: still the manual one.
    assert records[("b", ORIGIN + hour)].kind == WindowKind.MANUAL
    assert records[("a", ORIGIN + hour)].status == WindowStatus.PENDING


def test_a_batch_creates_its_due_windows_in_one_insert_and_claims_them_in_one_update(
    state_url: str,
) -> None:
    pipelines = config({f"p{i}": pipeline() for i in range(4)}).pipelines
    with StateStore(state_url) as store:
        store.migrate()
        # p1's first due window exists already (created by another tick a moment ago).
        store.create_windows("p1", [Window(ORIGIN, ORIGIN + timedelta(hours=1))])
        statements, seen = _statements(store)
        report = generation_batch(
            store, fakeredis.FakeRedis(), list(pipelines.values()), _none, NOW
        )
        sa.event.remove(store.engine, "before_cursor_execute", seen)
        records = store.list_records()

    assert statements.count("INSERT") == 1
    assert statements.count("UPDATE") == 1
    assert {tick.pipeline: len(tick.created) for tick in report.ticks} == {
        "p0": 3,
        "p1": 2,
        "p2": 3,
        "p3": 3,
    }
    assert len(records) == 12
    assert {(r.status, r.attempts) for r in records} == {(WindowStatus.QUEUED, 1)}
    assert report.summary()["queued"] == 12 and report.failed == {}


def test_a_dispatch_claims_its_windows_in_one_update_and_sends_them_together(
    state_url: str,
) -> None:
    # A pipeline's dispatch (a finishing window's) reads, claims and sends as a batch does:
    # scheduled windows up to their cap first, then the backfill's up to its own, oldest
    # first, one UPDATE for all of them and one send of every chain.
    settings = pipeline() | {"max_active_windows": 2, "max_backfill_windows": 4}
    (one,) = config({"live": settings}).pipelines.values()
    hour = timedelta(hours=1)
    scheduled = [Window(ORIGIN + i * hour, ORIGIN + (i + 1) * hour) for i in range(3)]
    backfill = [Window(ORIGIN - (i + 1) * hour, ORIGIN - i * hour) for i in range(10)]
    sent: list[list[tuple[str, datetime, Stage]]] = []

    def keep(chains: Sequence[tuple[str, datetime, Stage]]) -> None:
        sent.append(list(chains))

    with StateStore(state_url) as store:
        store.migrate()
        store.create_windows("live", scheduled, kind=WindowKind.SCHEDULED)
        store.create_windows("live", backfill, kind=WindowKind.MANUAL)
        waiting = store.waiting(["live"])["live"]
        statements, seen = _statements(store)
        queued, dead = dispatch(
            store,
            fakeredis.FakeRedis(),
            one,
            _refuse_one_by_one,
            NOW,
            waiting=waiting,
            send_batch=keep,
        )
        sa.event.remove(store.engine, "before_cursor_execute", seen)
        again, _ = dispatch(
            store, fakeredis.FakeRedis(), one, _refuse_one_by_one, NOW, send_batch=keep
        )

    oldest_backfill = sorted(w.start for w in backfill)[:4]
    expected = [w.start for w in scheduled[:2]] + oldest_backfill
    assert [r.window_start for r in queued] == expected and dead == 0
    assert statements.count("UPDATE") == 1
    assert sent == [[("live", start, Stage.PRECHECK) for start in expected]]
    assert again == []  # both caps are full now: nothing more is queued or sent


def _refuse_one_by_one(name: str, start: datetime, stage: Stage) -> None:
    raise AssertionError("a dispatch given send_batch sends its chains together")


def _refuse_inserts_of(store: StateStore, pipeline: str) -> None:
    """A trigger that makes the database refuse every new record of `pipeline`."""
    with store.engine.begin() as conn:
        if store.dialect == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON windows "
                f"WHEN NEW.pipeline = '{pipeline}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
            return
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.pipeline = '{pipeline}' THEN RAISE EXCEPTION 'refused'; END IF; "
            "RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON windows FOR EACH ROW EXECUTE FUNCTION refuse()"
        )


def test_a_pipeline_whose_insert_fails_does_not_stop_the_others(state_url: str) -> None:
    pipelines = config({"a": pipeline(), "refused": pipeline(), "c": pipeline()}).pipelines
    sent: list[tuple[str, datetime, Stage]] = []

    def send(name: str, start: datetime, stage: Stage) -> str:
        sent.append((name, start, stage))
        return "chain"

    with StateStore(state_url) as store:
        store.migrate()
        _refuse_inserts_of(store, "refused")
        report = generation_batch(store, fakeredis.FakeRedis(), list(pipelines.values()), send, NOW)
        records = store.list_records()

    assert set(report.failed) == {"refused"} and "refused" in report.failed["refused"]
    assert [tick.pipeline for tick in report.ticks] == ["a", "c"]
    assert sorted((r.pipeline, r.window_start) for r in records) == [
        (name, ORIGIN + timedelta(hours=i)) for name in ("a", "c") for i in range(3)
    ]
    assert sorted(sent) == [
        (name, ORIGIN + timedelta(hours=i), Stage.PRECHECK) for name in ("a", "c") for i in range(3)
    ]


def test_queue_many_claims_only_windows_still_in_the_status_read(state_url: str) -> None:
    hour = timedelta(hours=1)
    with StateStore(state_url) as store:
        store.migrate()
        store.create_windows_many(
            {"a": [Window(ORIGIN, ORIGIN + hour), Window(ORIGIN + hour, ORIGIN + 2 * hour)]}
        )
        # Another dispatcher claimed a's first window after this one read it as pending.
        store.queue("a", ORIGIN, expect=[WindowStatus.PENDING])

        claimed = store.queue_many(
            [
                ("a", ORIGIN, WindowStatus.PENDING),
                ("a", ORIGIN + hour, WindowStatus.PENDING),
                ("b", ORIGIN, WindowStatus.PENDING),  # no such record
            ]
        )
        again = store.queue_many([("a", ORIGIN + hour, WindowStatus.PENDING)])
        records = store.list_records("a")

    assert [(r.pipeline, r.window_start, r.status) for r in claimed] == [
        ("a", ORIGIN + hour, WindowStatus.QUEUED)
    ]
    assert claimed[0].stage == Stage.PRECHECK
    assert again == []
    assert [(r.status, r.attempts) for r in records] == [(WindowStatus.QUEUED, 1)] * 2
    with pytest.raises(ValueError, match="ENQUEUE does not start from queued"):
        store.queue_many([("a", ORIGIN, WindowStatus.QUEUED)])


def test_runnable_many_reads_what_runnable_reads_for_each_pipeline_and_kind(
    state_url: str,
) -> None:
    hour = timedelta(hours=1)
    windows = [Window(ORIGIN + i * hour, ORIGIN + (i + 1) * hour) for i in range(6)]
    with StateStore(state_url) as store:
        store.migrate()
        store.create_windows("a", windows[:4])
        store.create_windows("a", windows[4:], WindowKind.MANUAL)
        store.create_windows("b", windows)
        with store.engine.begin() as conn:
            for start, status, attempts in (
                (windows[0].start, WindowStatus.FAILED, 5),  # out of attempts
                (windows[1].start, WindowStatus.FAILED, 2),
                (windows[2].start, WindowStatus.SUCCEEDED, 1),
            ):
                conn.execute(
                    sa.update(WINDOWS)
                    .where(WINDOWS.c.pipeline == "a", WINDOWS.c.window_start == start)
                    .values(status=status.value, attempts=attempts)
                )
        wanted = [
            ("a", WindowKind.SCHEDULED, 5, 8),
            ("a", WindowKind.MANUAL, 5, 1),
            ("b", WindowKind.SCHEDULED, 3, 2),
            ("c", WindowKind.SCHEDULED, 5, 4),
        ]
        many = store.runnable_many(wanted)
        one = {
            (name, kind): store.runnable(name, kind, max_attempts=attempts, limit=limit)
            for name, kind, attempts, limit in wanted
        }

    assert many == one
    assert [r.window_start for r in many[("a", WindowKind.SCHEDULED)]] == [
        windows[1].start,
        windows[3].start,
    ]
    assert len(many[("b", WindowKind.SCHEDULED)]) == 2 and many[("c", WindowKind.SCHEDULED)] == []


@pytest.fixture
def celery_config(
    redis_db: str, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Config]:
    """Five pipelines, and this process's Celery app on the test's Redis DB (the app that
    `send_chains` publishes through); the app the process had before is back afterwards."""
    import workers.celery_app as celery_app

    monkeypatch.setattr(celery_app, "_app", None)
    monkeypatch.setattr(celery_app, "_config", None)
    settings = config(
        {f"p{i}": pipeline() for i in range(5)}, redis_url=redis_db, state_url=state_url
    )
    app = celery_app.create_app(settings)
    yield settings
    app.close()


def _precheck_messages(redis_url: str) -> list[tuple[str, str, list[str]]]:
    """(pipeline, window start, the later stages' tasks) of each message in the precheck queue."""
    import base64
    import json

    import redis

    client = redis.Redis.from_url(redis_url)
    found = []
    for raw in client.lrange("precheck", 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == "windowpipe.precheck"
        args, _, embed = json.loads(base64.b64decode(message["body"]))
        found.append((args[0], args[1], [step["task"] for step in reversed(embed["chain"])]))
    client.close()
    return found


@pytest.mark.integration
def test_chains_published_together_reach_the_queue_once_each(
    celery_config: Config, redis_db: str, state_url: str
) -> None:
    import redis

    from workers.runtime import send_chain, send_chains

    client = redis.Redis.from_url(redis_db)
    pipelines = list(celery_config.pipelines.values())
    with StateStore(state_url) as store:
        store.migrate()
        for now in (NOW, NOW, NOW + timedelta(hours=1)):  # the second finds nothing to do
            report = generation_batch(
                store, client, pipelines, send_chain, now, send_batch=send_chains
            )
            assert report.failed == {}
        records = store.list_records()
    messages = _precheck_messages(redis_db)

    assert len(records) == 5 * 4
    assert {(r.status, r.attempts) for r in records} == {(WindowStatus.QUEUED, 1)}
    starts = sorted((r.pipeline, format_instant(r.window_start)) for r in records)
    assert sorted((name, start) for name, start, _ in messages) == starts  # each once
    assert {tuple(later) for _, _, later in messages} == {
        ("windowpipe.extract", "windowpipe.load", "windowpipe.audit")
    }
    assert client.keys("*dispatch*") == []  # every dispatch lock released
    client.close()


@pytest.mark.integration
def test_a_pipeline_whose_dispatch_lock_is_held_is_left_to_its_holder(
    celery_config: Config, redis_db: str, state_url: str
) -> None:
    import redis

    from core.keys import dispatch_lock_key
    from core.locks import DispatchLock
    from workers.runtime import send_chain, send_chains

    client = redis.Redis.from_url(redis_db)
    holder = DispatchLock(client, "p1")  # another dispatcher of p1, busy all along
    assert holder.acquire()
    token = client.get(dispatch_lock_key("p1"))
    with StateStore(state_url) as store:
        store.migrate()
        report = generation_batch(
            store,
            client,
            list(celery_config.pipelines.values()),
            send_chain,
            NOW,
            send_batch=send_chains,
        )
        statuses = {(r.pipeline, r.status) for r in store.list_records()}

    # p1 waited for its lock (`DispatchLock`), then left its windows to the holder.
    assert report.failed == {} and len(report.ticks) == 5
    assert statuses == {(f"p{i}", WindowStatus.QUEUED) for i in (0, 2, 3, 4)} | {
        ("p1", WindowStatus.PENDING)
    }
    assert {name for name, _, _ in _precheck_messages(redis_db)} == {"p0", "p2", "p3", "p4"}
    assert client.get(dispatch_lock_key("p1")) == token  # not released by the batch
    holder.release()
    client.close()


@pytest.mark.integration
def test_batches_of_the_same_pipelines_racing_queue_and_send_each_window_once(
    celery_config: Config, redis_db: str, state_url: str
) -> None:
    import threading

    import redis

    from workers.runtime import send_chain, send_chains

    pipelines = list(celery_config.pipelines.values())
    with StateStore(state_url) as store:
        store.migrate()
        start = threading.Barrier(4)
        reports = []

        def one_batch() -> None:
            client = redis.Redis.from_url(redis_db)
            start.wait()
            reports.append(
                generation_batch(store, client, pipelines, send_chain, NOW, send_batch=send_chains)
            )
            client.close()

        threads = [threading.Thread(target=one_batch) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        records = store.list_records()

    assert [report.failed for report in reports] == [{}] * 4
    assert len(records) == 5 * 3
    assert {(r.status, r.attempts) for r in records} == {(WindowStatus.QUEUED, 1)}
    sent = sorted((name, start) for name, start, _ in _precheck_messages(redis_db))
    assert sent == sorted((r.pipeline, format_instant(r.window_start)) for r in records)


def test_runnable_many_reads_more_pipelines_than_sqlite_compounds_in_one_select(
    state_url: str,
) -> None:
    names = [f"p{i:03}" for i in range(260)]  # 520 reads: SQLite allows 500 terms a SELECT
    window = Window(ORIGIN, ORIGIN + timedelta(hours=1))
    with StateStore(state_url) as store:
        store.migrate()
        store.create_windows_many({name: [window] for name in names})
        found = store.runnable_many([(name, kind, 5, 4) for name in names for kind in WindowKind])

    assert len(found) == 520
    assert all(
        [r.window_start for r in found[(name, WindowKind.SCHEDULED)]] == [ORIGIN]
        and found[(name, WindowKind.MANUAL)] == []
        for name in names
    )
