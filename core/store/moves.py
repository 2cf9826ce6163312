"""The compiler from `core.transitions` moves to guarded UPDATEs, and the INSERT of new pending
records: the only places a window's status is written."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from core.records import Stage, WindowKind, WindowStatus
from core.store.schema import WINDOWS, UTCDateTime, _values
from core.transitions import (
    RESTART_FROM_PRECHECK,
    Move,
    Rule,
)
from core.windows import Window


class _Unguarded:
    """No guard on the stage column (the default of `StateStore._move_one`)."""


_UNGUARDED = _Unguarded()


_NEW_ROW_KEY = ["pipeline", "window_start"]

_SQLITE_INSERT_NEW = (
    sqlite.insert(WINDOWS)
    .on_conflict_do_nothing(index_elements=_NEW_ROW_KEY)
    .returning(WINDOWS.c.pipeline, WINDOWS.c.window_start)
)
"""Executed with a list of `_new_row`s; compiled once, sent as multi-row VALUES; RETURNING
the pipeline and start of each row created."""

_PG_ARRAY_OF_INSTANTS = postgresql.ARRAY(UTCDateTime())
_PG_ARRAY_OF_NAMES = postgresql.ARRAY(sa.String())


def _pg_insert_new(
    rows: Sequence[tuple[str, Window]], kind: WindowKind, now: datetime
) -> tuple[sa.Executable, dict[str, Any]]:
    """`INSERT ... SELECT ... FROM unnest(:pipelines, :starts, :ends) ON CONFLICT DO NOTHING
    RETURNING` the pipeline and start of each row created, for `(pipeline, window)` rows (of
    one pipeline or many).

    Three array parameters instead of thousands of scalar ones: psycopg parses a query with
    9,000 placeholders slowly, so this is several times faster for a year of 15m windows.
    """
    bounds = (
        sa.func.unnest(
            sa.bindparam("pipelines", type_=_PG_ARRAY_OF_NAMES),
            sa.bindparam("starts", type_=_PG_ARRAY_OF_INSTANTS),
            sa.bindparam("ends", type_=_PG_ARRAY_OF_INSTANTS),
        )
        .table_valued("pipeline", "window_start", "window_end")
        .render_derived(name="bounds")
    )
    pending = sa.select(
        bounds.c.pipeline,
        bounds.c.window_start,
        bounds.c.window_end,
        sa.literal(WindowStatus.PENDING.value, sa.String()),
        sa.literal(kind.value, sa.String()),
        sa.literal(0, sa.Integer()),
        sa.literal(first_fence(now), sa.BigInteger()),
        sa.literal(now, UTCDateTime()),
        sa.literal(now, UTCDateTime()),
    )
    columns = ["pipeline", "window_start", "window_end", "status", "kind", "attempts", "fence"]
    statement = (
        postgresql.insert(WINDOWS)
        .from_select([*columns, "created_at", "updated_at"], pending)
        .on_conflict_do_nothing(index_elements=_NEW_ROW_KEY)
        .returning(WINDOWS.c.pipeline, WINDOWS.c.window_start)
    )
    params = {
        "pipelines": [pipeline for pipeline, _ in rows],
        "starts": [window.start for _, window in rows],
        "ends": [window.end for _, window in rows],
    }
    return statement, params


def first_fence(now: datetime) -> int:
    """A new record's fencing token: the microseconds since the Unix epoch at its creation.

    Each claim adds one, so a window's fences only grow while its record lives. Starting from
    the clock instead of 0 keeps them growing across records too: a window whose record was
    deleted and created again (a new state store, a rebuild) must not start below the fence a
    target's ledger last took for it, or the ledger would refuse every load of it as stale.
    """
    return int(now.timestamp() * 1_000_000)


def _new_row(pipeline: str, window: Window, kind: WindowKind, now: datetime) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "window_start": window.start,
        "window_end": window.end,
        "status": WindowStatus.PENDING.value,
        "kind": kind.value,
        "attempts": 0,
        "fence": first_fence(now),
        "created_at": now,
        "updated_at": now,
    }


@dataclass(frozen=True)
class _UpdateShape:
    """What makes two guarded UPDATEs of one record the same statement."""

    move: str
    sources: frozenset[WindowStatus]
    fenced: bool
    stage: str | _Unguarded
    """"equal" (stage = :guard_stage), "null" (stage IS NULL), or unguarded."""
    taken: tuple[str, ...]


_GUARDED_UPDATES: dict[_UpdateShape, sa.Update] = {}
"""Built statements by shape: a few dozen at most (moves x guards x fields taken)."""


def _guarded_update(move: Move, shape: _UpdateShape) -> sa.Update:
    """The UPDATE … RETURNING of `shape`, with bound parameters for the window's key
    (`key_pipeline`, `key_start`), the guards (`guard_fence`, `guard_stage`), `now` and each
    field taken (`set_<name>`)."""
    now = sa.bindparam("now", type_=UTCDateTime())
    taken = {name: sa.bindparam(f"set_{name}", type_=WINDOWS.c[name].type) for name in shape.taken}
    guards = [
        WINDOWS.c.pipeline == sa.bindparam("key_pipeline"),
        WINDOWS.c.window_start == sa.bindparam("key_start", type_=UTCDateTime()),
        _status_in(shape.sources),
    ]
    if shape.fenced:
        guards.append(WINDOWS.c.fence == sa.bindparam("guard_fence"))
    if shape.stage == "equal":
        guards.append(WINDOWS.c.stage == sa.bindparam("guard_stage"))
    elif shape.stage == "null":
        guards.append(WINDOWS.c.stage.is_(None))
    values = _move_values(move, now, taken)
    return sa.update(WINDOWS).where(*guards).values(**values).returning(*WINDOWS.c)


def _checked_taken(move: Move, taken: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a caller gives a move, as stored (enums as their values); a field the move
    does not take is the caller's bug (TypeError)."""
    unknown = set(taken) - move.takes
    if unknown:
        allowed = ", ".join(sorted(move.takes)) or "nothing"
        raise TypeError(
            f"cannot set {', '.join(sorted(unknown))} on a window record "
            f"({move.name} takes {allowed})"
        )
    checked = dict(taken)
    if checked.get("stage") is not None and not isinstance(checked["stage"], sa.BindParameter):
        checked["stage"] = Stage(checked["stage"]).value
    if "kind" in checked and not isinstance(checked["kind"], sa.BindParameter):
        checked["kind"] = WindowKind(checked["kind"]).value
    return checked


def _move_values(
    move: Move,
    now: datetime | sa.BindParameter[datetime],
    taken: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The SET clause of `move` at `now`: its status, `updated_at`, its field rules as SQL, and
    the fields the caller gave (`taken`, which must be fields the move takes).

    The only place a status is written besides a new record's `pending` (tests check the source
    for that). SQL evaluates every SET expression against the row as it was before the UPDATE,
    so the rules that depend on the old status (`RESUME_STAGE`, `CLEARED_ON_RESTART`) decide and
    apply in the same statement.
    """
    taken = _checked_taken(move, taken or {})
    instant = now if isinstance(now, sa.BindParameter) else sa.literal(now, UTCDateTime())
    values: dict[str, Any] = {"status": move.to.value, "updated_at": now}
    restarts = WINDOWS.c.status.in_(_values(RESTART_FROM_PRECHECK))
    precheck = Stage.PRECHECK.value
    for name, rule in move.sets.items():
        column = WINDOWS.c[name]
        if isinstance(rule, WindowKind):
            values[name] = rule.value
        elif rule == Rule.NOW:
            values[name] = now
        elif rule == Rule.CLEARED:
            values[name] = None
        elif rule == Rule.PLUS_ONE:
            values[name] = column + 1
        elif rule == Rule.ZERO:
            values[name] = 0
        elif rule == Rule.NOW_IF_UNSET:
            values[name] = sa.func.coalesce(column, instant)
        elif rule == Rule.RESUME_STAGE:  # core.transitions.resume_stage, in SQL
            values[name] = sa.case((restarts, precheck), else_=sa.func.coalesce(column, precheck))
        elif rule == Rule.CLEARED_ON_RESTART:
            values[name] = sa.case((restarts, sa.null()), else_=column)
        else:  # pragma: no cover - a Rule added without its SQL
            raise AssertionError(f"no SQL for {rule!r}")
    values.update(taken)
    return values


def _sources(move: Move, expect: Collection[WindowStatus] | None) -> frozenset[WindowStatus]:
    """The statuses a move's UPDATE matches: `expect` (within the move's), else the move's."""
    return move.sources if expect is None else frozenset(WindowStatus(s) for s in expect)


def _status_in(statuses: Collection[WindowStatus]) -> sa.ColumnElement[bool]:
    return WINDOWS.c.status.in_(_values(statuses))
