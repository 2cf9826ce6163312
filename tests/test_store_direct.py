"""The hot statements on psycopg directly (`core.store.direct`) do exactly what SQLAlchemy's path
does on PostgreSQL: every move a worker, cleanup or dispatch makes, the record read after a
refused claim and the waiting windows, run both ways from the same row at the same instant,
return the same record field for field (types, time zones, JSON) or fail the same way."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from core.records import Stage, WindowKind, WindowRecord, WindowStatus
from core.store import StateStore
from core.store.schema import WINDOWS
from core.windows import Window

pytestmark = pytest.mark.integration

S = WindowStatus
ORIGIN = datetime(2026, 11, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
PIPELINE = "orders"
NOW = datetime(2026, 11, 2, 3, 4, 5, 678901, tzinfo=UTC)
"""The instant every move of a comparison runs at (both paths see the same clock)."""

DRIFT = {
    "at": "2026-11-02T03:04:05Z",
    "by": "recheck",
    "count_before": 10,
    "count_after": 12,
    "version_before": None,
    "version_after": 'v-Grüße "q" %s %(x)s',
    "nested": {"list": [1, 2.5, None, True], "empty": {}},
}


@pytest.fixture
def stores(pg_schema_url: str) -> Iterator[tuple[StateStore, StateStore]]:
    """The direct path and SQLAlchemy's path on one PostgreSQL schema."""
    direct = StateStore(pg_schema_url)
    direct.migrate()
    plain = StateStore(pg_schema_url, direct=False)
    assert direct.direct and not plain.direct
    yield direct, plain
    direct.dispose()
    plain.dispose()


_STAGES = (Stage.PRECHECK, Stage.EXTRACT, Stage.LOAD, Stage.AUDIT)


def running(store: StateStore, stage: Stage = Stage.PRECHECK) -> WindowRecord:
    """The window queued and claimed at `stage` (walked there from precheck)."""
    queued(store)
    record = store.claim_stage(PIPELINE, ORIGIN, Stage.PRECHECK)
    assert record is not None
    for nxt in (Stage.EXTRACT, Stage.LOAD, Stage.AUDIT)[: _STAGES.index(stage)]:
        store.transition(PIPELINE, ORIGIN, S.QUEUED, fence=record.fence, stage=nxt)
        record = store.claim_stage(PIPELINE, ORIGIN, nxt)
        assert record is not None
    return record


def queued(store: StateStore) -> WindowRecord:
    record = store.queue(PIPELINE, ORIGIN, expect=[S.PENDING])
    assert record is not None
    return record


def succeeded(store: StateStore) -> WindowRecord:
    record = running(store, Stage.AUDIT)
    return store.transition(PIPELINE, ORIGIN, S.SUCCEEDED, fence=record.fence, stage=None)


def pending(store: StateStore) -> WindowRecord:
    record = store.get(PIPELINE, ORIGIN)
    assert record is not None
    return record


Setup = Callable[[StateStore], WindowRecord]
Move = Callable[[StateStore, WindowRecord], object]

CASES: dict[str, tuple[Setup, Move]] = {
    "claim a queued window": (queued, lambda s, r: s.claim_stage(PIPELINE, ORIGIN, Stage.PRECHECK)),
    "claim at the wrong stage (refused)": (
        queued,
        lambda s, r: s.claim_stage(PIPELINE, ORIGIN, Stage.EXTRACT),
    ),
    "claim a running window again (fences the owner out)": (
        running,
        lambda s, r: s.claim_stage(PIPELINE, ORIGIN, Stage.PRECHECK),
    ),
    "precheck's commit": (
        running,
        lambda s, r: s.transition(
            PIPELINE,
            ORIGIN,
            S.QUEUED,
            expect=[S.RUNNING],
            fence=r.fence,
            stage=Stage.EXTRACT,
            source_count=12,
            source_version="2026-11-01T00:14:59.999999Z",
        ),
    ),
    "extract's commit": (
        lambda s: running(s, Stage.EXTRACT),
        lambda s, r: s.transition(
            PIPELINE,
            ORIGIN,
            S.QUEUED,
            expect=[S.RUNNING],
            fence=r.fence,
            stage=Stage.LOAD,
            staged_count=12,
            manifest='{"files": ["part-0.jsonl.gz"], "note": "Grüße %s"}',
            checksum="0123456789abcdef",
        ),
    ),
    "load's commit": (
        lambda s: running(s, Stage.LOAD),
        lambda s, r: s.transition(
            PIPELINE,
            ORIGIN,
            S.QUEUED,
            expect=[S.RUNNING],
            fence=r.fence,
            stage=Stage.AUDIT,
            target_count=12,
            rejected_count=0,
            load_fence=2**62 + 1,
        ),
    ),
    "audit's commit with drift": (
        lambda s: running(s, Stage.AUDIT),
        lambda s, r: s.transition(
            PIPELINE,
            ORIGIN,
            S.SUCCEEDED,
            expect=[S.RUNNING],
            fence=r.fence,
            stage=None,
            target_checksum="fedcba9876543210",
            drift=[DRIFT, {"at": "later"}],
        ),
    ),
    "audit's commit, no drift given": (
        lambda s: running(s, Stage.AUDIT),
        lambda s, r: s.transition(
            PIPELINE, ORIGIN, S.SUCCEEDED, expect=[S.RUNNING], fence=r.fence, error=None
        ),
    ),
    "audit's commit, drift None": (
        lambda s: running(s, Stage.AUDIT),
        lambda s, r: s.transition(
            PIPELINE, ORIGIN, S.SUCCEEDED, expect=[S.RUNNING], fence=r.fence, drift=None
        ),
    ),
    "an empty window skipped": (
        running,
        lambda s, r: s.transition(
            PIPELINE,
            ORIGIN,
            S.SKIPPED,
            expect=[S.RUNNING],
            fence=r.fence,
            source_count=0,
            source_version=None,
        ),
    ),
    "a stage gives up": (
        lambda s: running(s, Stage.LOAD),
        lambda s, r: s.transition(
            PIPELINE,
            ORIGIN,
            S.FAILED,
            expect=[S.RUNNING],
            fence=r.fence,
            stage=Stage.EXTRACT,
            error="load: staged data lost; 'quoted' %s %(name)s \\ back",
        ),
    ),
    "a lost lock gives the window back": (
        running,
        lambda s, r: s.transition(
            PIPELINE, ORIGIN, S.QUEUED, expect=[S.RUNNING], fence=r.fence, error="sent again"
        ),
    ),
    "a stale owner's commit (refused: fence)": (
        running,
        lambda s, r: s.transition(
            PIPELINE, ORIGIN, S.QUEUED, expect=[S.RUNNING], fence=r.fence - 1, stage=Stage.LOAD
        ),
    ),
    "a commit of a window not running (refused: status)": (
        queued,
        lambda s, r: s.transition(PIPELINE, ORIGIN, S.SUCCEEDED, expect=[S.RUNNING], fence=r.fence),
    ),
    "a commit of no record": (
        queued,
        lambda s, r: s.transition(PIPELINE, ORIGIN + SIZE, S.SKIPPED, fence=1),
    ),
    "a refused fence raised above a ledger's": (
        running,
        lambda s, r: s.raise_fence(PIPELINE, ORIGIN, fence=r.fence, above=r.fence + 40),
    ),
    "dispatch queues a pending window as manual": (
        pending,
        lambda s, r: s.queue(
            PIPELINE, ORIGIN, expect=[S.PENDING, S.FAILED], kind=WindowKind.MANUAL
        ),
    ),
    "cleanup requeues a lost running window": (
        lambda s: running(s, Stage.LOAD),
        lambda s, r: s.queue(PIPELINE, ORIGIN, expect=[S.RUNNING], fence=r.fence),
    ),
    "cleanup sends a queued window's message again": (
        queued,
        lambda s, r: s.touch_queued(PIPELINE, ORIGIN, fence=r.fence, stage=r.stage),
    ),
    "cleanup's resend of a window no longer queued (refused)": (
        pending,
        lambda s, r: s.touch_queued(PIPELINE, ORIGIN, fence=r.fence, stage=None),
    ),
    "a recheck finds drift": (
        succeeded,
        lambda s, r: s.record_check(r, rechecks_done=1, drift=DRIFT),
    ),
    "the record after a refused claim": (running, lambda s, r: s.get(PIPELINE, ORIGIN)),
    "no record": (running, lambda s, r: s.get(PIPELINE, ORIGIN - SIZE)),
    "the waiting windows of some pipelines": (
        pending,
        lambda s, r: s.waiting([PIPELINE, "absent", PIPELINE]),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_every_hot_statement_returns_what_sqlalchemy_returns(
    stores: tuple[StateStore, StateStore], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    direct, plain = stores
    setup, move = CASES[case]
    plain.create_windows(PIPELINE, [Window(ORIGIN, ORIGIN + SIZE)])
    before = setup(plain)
    row = _row(plain)
    monkeypatch.setattr("core.store.repository.utc_now", lambda: NOW)

    outcomes = []
    for store in (plain, direct):
        _restore(plain, row)
        outcomes.append((_outcome(move, store, before), _row(plain)))

    assert outcomes[0] == outcomes[1]
    assert direct._direct_statements, "the direct store did not take its direct path"


def _outcome(move: Move, store: StateStore, before: WindowRecord) -> object:
    """What a move returned, with every field's type and time zone (repr), or what it
    raised."""
    try:
        result = move(store, before)
    except Exception as error:
        return type(error), str(error)
    if isinstance(result, WindowRecord):
        _check_types(result)
        return [(field.name, repr(getattr(result, field.name))) for field in _fields()]
    return repr(result)


def _fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(WindowRecord)


def _check_types(record: WindowRecord) -> None:
    """What `_to_record` promised before the direct path: enums, aware UTC, a JSON list."""
    assert type(record.status) is WindowStatus and type(record.kind) is WindowKind
    assert record.stage is None or type(record.stage) is Stage
    for field in _fields():
        value = getattr(record, field.name)
        if isinstance(value, datetime):
            assert value.tzinfo is UTC, field.name
    assert isinstance(record.drift, list)


def _row(store: StateStore) -> dict[str, Any]:
    with store.engine.connect() as conn:
        found = conn.execute(sa.select(WINDOWS).where(WINDOWS.c.pipeline == PIPELINE)).one()
    return dict(found._mapping)


def _restore(store: StateStore, row: dict[str, Any]) -> None:
    values = {**row, "drift": sa.null() if row["drift"] is None else row["drift"]}
    with store.engine.begin() as conn:
        conn.execute(sa.update(WINDOWS).where(WINDOWS.c.id == row["id"]).values(**values))


def test_a_drift_written_directly_reads_back_as_sqlalchemy_wrote_it(
    stores: tuple[StateStore, StateStore],
) -> None:
    direct, plain = stores
    direct.create_windows(PIPELINE, [Window(ORIGIN, ORIGIN + SIZE)])
    record = running(direct, Stage.AUDIT)
    done = direct.transition(PIPELINE, ORIGIN, S.SUCCEEDED, fence=record.fence, drift=[DRIFT])

    assert done.drift == [DRIFT]
    assert plain.get(PIPELINE, ORIGIN) == done == direct.get(PIPELINE, ORIGIN)
    with plain.engine.connect() as conn:
        kind = conn.execute(sa.text("SELECT json_typeof(drift) FROM windows")).scalar_one()
    assert kind == "array"


def test_a_listener_on_the_engine_sees_the_hot_statements(
    stores: tuple[StateStore, StateStore],
) -> None:
    direct, _ = stores
    direct.create_windows(PIPELINE, [Window(ORIGIN, ORIGIN + SIZE)])
    queued(direct)
    seen: list[str] = []

    def statement(*args: Any) -> None:
        seen.append(str(args[2]))

    sa.event.listen(direct.engine, "before_cursor_execute", statement)
    try:
        assert direct.claim_stage(PIPELINE, ORIGIN, Stage.PRECHECK) is not None
    finally:
        sa.event.remove(direct.engine, "before_cursor_execute", statement)

    assert [s for s in seen if s.startswith("UPDATE windows")]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "sqlalchemy"])
def test_a_claim_on_a_terminated_backend_fails_once_then_the_next_claim_reconnects(
    pg_schema_url: str, direct: bool
) -> None:
    store = StateStore(pg_schema_url, direct=direct)
    store.migrate()
    store.create_windows(PIPELINE, [Window(ORIGIN, ORIGIN + SIZE)])
    queued(store)
    first = store.claim_stage(PIPELINE, ORIGIN, Stage.PRECHECK)
    assert first is not None
    pooled = store.engine.raw_connection()
    backend = pooled.driver_connection.info.backend_pid  # type: ignore[union-attr]
    pooled.close()
    admin = sa.create_engine(pg_schema_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.select(sa.func.pg_terminate_backend(backend)))
            # Wait until the server has ended it, so the claim meets a dead connection.
            while conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": backend}
            ).scalar_one():
                pass

        with pytest.raises(sa.exc.OperationalError) as failed:
            store.claim_stage(PIPELINE, ORIGIN, Stage.PRECHECK)
        assert failed.value.connection_invalidated
        unchanged = store.get(PIPELINE, ORIGIN)  # a fresh connection, without an error
        assert unchanged is not None and unchanged.fence == first.fence
        again = store.claim_stage(PIPELINE, ORIGIN, Stage.PRECHECK)
        assert again is not None and again.fence == first.fence + 1
        later = store.engine.raw_connection()
        assert later.driver_connection.info.backend_pid != backend  # type: ignore[union-attr]
        later.close()
    finally:
        admin.dispose()
        store.dispose()


class Interrupted(Exception):
    """What a signal handler raises mid-statement, as Celery's soft time limit does."""


def test_an_interrupted_statement_raises_the_interruption_and_its_connection_is_not_reused(
    stores: tuple[StateStore, StateStore],
) -> None:
    direct, plain = stores
    direct.create_windows(PIPELINE, [Window(ORIGIN, ORIGIN + SIZE)])
    first = queued(direct)
    pooled = direct.engine.raw_connection()
    backend = pooled.driver_connection.info.backend_pid  # type: ignore[union-attr]
    pooled.close()

    def interrupt(*_: object) -> None:
        raise Interrupted("soft time limit")

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with plain.engine.connect() as locker:
            # The claim waits for this row lock until the alarm interrupts it.
            locker.execute(sa.select(WINDOWS.c.id).with_for_update())
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Interrupted):
                direct.claim_stage(PIPELINE, ORIGIN, Stage.PRECHECK)
            locker.rollback()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    # The server may still finish the abandoned claim (its fence is then nobody's), as on
    # SQLAlchemy's path; the next claim runs on a fresh connection and fences it out.
    again = direct.claim_stage(PIPELINE, ORIGIN, Stage.PRECHECK)
    assert again is not None and again.fence > first.fence
    later = direct.engine.raw_connection()
    assert later.driver_connection.info.backend_pid != backend  # type: ignore[union-attr]
    later.close()


def test_a_direct_write_leaves_the_pooled_connection_out_of_autocommit(
    stores: tuple[StateStore, StateStore],
) -> None:
    direct, _ = stores
    direct.create_windows(PIPELINE, [Window(ORIGIN, ORIGIN + SIZE)])
    queued(direct)
    assert direct.claim_stage(PIPELINE, ORIGIN, Stage.PRECHECK) is not None
    pooled = direct.engine.raw_connection()
    try:
        assert pooled.driver_connection.autocommit is False  # type: ignore[union-attr]
    finally:
        pooled.close()
    # A transaction on the pool is still one: its first write is not kept when it fails.
    with pytest.raises(RuntimeError), direct.engine.begin() as conn:
        conn.execute(sa.update(WINDOWS).values(error="half done"))
        raise RuntimeError("abort")
    assert direct.get(PIPELINE, ORIGIN).error is None  # type: ignore[union-attr]


def test_the_direct_path_is_postgresql_only(tmp_path: Any) -> None:
    with StateStore(f"sqlite:///{tmp_path}/state.db") as store:
        assert not store.direct


def test_a_statement_whose_sql_depends_on_a_given_value_is_refused() -> None:
    from core.store.direct import compile_direct

    statement = sa.select(WINDOWS.c.id).where(WINDOWS.c.pipeline.in_(sa.bindparam("names")))
    dialect = sa.create_engine("postgresql+psycopg://").dialect
    with pytest.raises(ValueError, match="changes the SQL"):
        compile_direct(statement, dialect)


def test_a_direct_statement_refuses_missing_or_unknown_parameters() -> None:
    from core.store.direct import compile_direct

    statement = sa.select(WINDOWS.c.id).where(WINDOWS.c.pipeline == sa.bindparam("name"))
    compiled = compile_direct(statement, sa.create_engine("postgresql+psycopg://").dialect)
    assert compiled.parameters({"name": "a"}) == {"name": "a"}
    with pytest.raises(KeyError):
        compiled.parameters({})
    with pytest.raises(KeyError):
        compiled.parameters({"name": "a", "other": 1})
