"""Every legal move of a window record, named once: from which states, to which, setting what.

`MOVES` is the whole state machine. `StateStore` applies a move as one guarded UPDATE: the
move's from-states (or the caller's narrower `expect`) are the `WHERE status IN (...)` guard, its
to-state is the new status, and its field rules are the SET clause (the store turns each `Rule`
into SQL in one function, `core.store.moves._move_values`). No status is written any other
way, except the `pending` of a newly created record; tests/test_transitions.py checks the
source for that, and checks the diagram in `core.records` and the README against this table.

Every move also sets `updated_at` to its instant. Where a window's next attempt starts (precheck,
or the stage it stopped at) is decided here only: `resume_stage`, applied in SQL by ENQUEUE and
REQUEUE_LOST (`Rule.RESUME_STAGE`, `Rule.CLEARED_ON_RESTART`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from core.records import Stage, WindowKind, WindowStatus

S = WindowStatus


class Rule(StrEnum):
    """How a move sets one field; the value is how the README's table reads (`{}`: the field)."""

    NOW = "{} = now"
    """The move's instant."""
    CLEARED = "{} cleared"
    """NULL."""
    PLUS_ONE = "{} + 1"
    """The field's value plus one (attempts, the fencing token)."""
    ZERO = "{} = 0"
    NOW_IF_UNSET = "{} = now if unset"
    """The move's instant unless the field holds one (an attempt starts once)."""
    RESUME_STAGE = "{} = where the chain resumes"
    """`resume_stage(status before the move, stage)`."""
    CLEARED_ON_RESTART = "{} cleared if the chain restarts"
    """NULL when `resume_stage` restarts the chain at precheck, kept when it resumes."""


FieldRule = Rule | WindowKind
"""A `Rule`, or a constant the field is set to."""

RESULT_FIELDS: tuple[str, ...] = (
    "source_count",
    "staged_count",
    "target_count",
    "rejected_count",
    "manifest",
    "source_version",
    "checksum",
    "target_checksum",
    "load_fence",
)
"""What a run produced; cleared when a window's chain starts over from precheck."""

STAGE_FIELDS = frozenset({"stage", "error", *RESULT_FIELDS})
"""What a stage's commit may record besides its status: the next stage, counts, the error."""

RESTART_FROM_PRECHECK = frozenset({S.PENDING, S.SUCCEEDED, S.SKIPPED, S.DEAD})
"""Statuses from which a new attempt starts the chain over; from the others it resumes."""


def resume_stage(status: WindowStatus, stage: Stage | None) -> Stage:
    """Where the chain of a window in `status` at `stage` runs next when it is queued.

    From pending, succeeded, skipped or dead it starts over at precheck; from failed (or from
    running, a worker lost) it resumes at its recorded stage, which a failing stage set to where
    the retry must begin (extract when staged data was lost, precheck after a failed audit).
    """
    if status in RESTART_FROM_PRECHECK or stage is None:
        return Stage.PRECHECK
    return stage


@dataclass(frozen=True, eq=False)
class Move:
    """One legal change of a window record's status."""

    name: str
    sources: frozenset[WindowStatus]
    """The statuses the move starts from: the guard of its UPDATE."""
    to: WindowStatus
    sets: Mapping[str, FieldRule] = field(default_factory=dict)
    """Fields the move sets, besides `status` and `updated_at`."""
    takes: frozenset[str] = frozenset()
    """Fields the caller supplies (validated: anything else is a caller's bug)."""
    by: str = ""
    """The `StateStore` method that applies it."""
    why: str = ""

    @property
    def edges(self) -> frozenset[tuple[WindowStatus, WindowStatus]]:
        return frozenset((source, self.to) for source in self.sources)

    def describe_sets(self) -> str:
        """The field rules in words (fields under one rule together; the result fields as
        "results"), as the README's table shows them."""
        groups: dict[str, list[str]] = {}
        for name, rule in self.sets.items():
            text = rule.value if isinstance(rule, Rule) else "{} = " + rule.value
            groups.setdefault(text, []).append(name)
        if self.takes:
            stage_fields = ["stage", "error", *RESULT_FIELDS]
            groups["{} as given"] = (
                stage_fields if self.takes == STAGE_FIELDS else sorted(self.takes)
            )
        parts = []
        for text, names in groups.items():
            if set(RESULT_FIELDS) <= set(names):
                names = [n for n in names if n not in RESULT_FIELDS] + ["results"]
            parts.append(text.format(", ".join(names)))
        return "; ".join(parts) or "nothing else"


_NEW_ATTEMPT: dict[str, FieldRule] = {
    "attempts": Rule.PLUS_ONE,
    "stage": Rule.RESUME_STAGE,
    **dict.fromkeys(RESULT_FIELDS, Rule.CLEARED_ON_RESTART),
    "error": Rule.CLEARED,
    "started_at": Rule.CLEARED,
    "finished_at": Rule.CLEARED,
}
"""A new attempt: counted, its chain restarted or resumed (`resume_stage`), no error yet."""

_BACK_TO_PENDING: dict[str, FieldRule] = {
    "fence": Rule.PLUS_ONE,
    "stage": Rule.CLEARED,
    "attempts": Rule.ZERO,
    "error": Rule.CLEARED,
    **dict.fromkeys(RESULT_FIELDS, Rule.CLEARED),
    "started_at": Rule.CLEARED,
    "finished_at": Rule.CLEARED,
}
"""A record put back to pending outside the workers: its chain starts over. The fence moves on
too, so a worker still holding the window gets `LostOwnershipError` at its next guarded commit
instead of writing into the reset record."""

_ENDS_ATTEMPT: dict[str, FieldRule] = {"finished_at": Rule.NOW}

ENQUEUE = Move(
    "ENQUEUE",
    frozenset({S.PENDING, S.FAILED, S.SUCCEEDED, S.SKIPPED, S.DEAD}),
    S.QUEUED,
    _NEW_ATTEMPT,
    takes=frozenset({"kind"}),
    by="queue",
    why="dispatch starts a window's next attempt; also a forced re-run of a finished one",
)
CLAIM = Move(
    "CLAIM",
    frozenset({S.QUEUED, S.RUNNING}),
    S.RUNNING,
    {"fence": Rule.PLUS_ONE, "started_at": Rule.NOW_IF_UNSET, "finished_at": Rule.CLEARED},
    takes=frozenset({"stage"}),
    by="claim_stage",
    why="a worker takes the window at its stage; a newer claim fences an older owner out",
)
ADVANCE = Move(
    "ADVANCE",
    frozenset({S.RUNNING}),
    S.QUEUED,
    {"finished_at": Rule.CLEARED},
    takes=STAGE_FIELDS,
    by="transition",
    why="a stage is done and the next waits; the same stage again after a transient failure",
)
SUCCEED = Move(
    "SUCCEED",
    frozenset({S.RUNNING}),
    S.SUCCEEDED,
    _ENDS_ATTEMPT,
    takes=STAGE_FIELDS | {"drift"},
    by="transition",
    why="audit found stage and target agree (the source's later drift recorded, if any)",
)
SKIP = Move(
    "SKIP",
    frozenset({S.RUNNING}),
    S.SKIPPED,
    _ENDS_ATTEMPT,
    takes=STAGE_FIELDS,
    by="transition",
    why="precheck or extract found 0 documents (after a fenced empty load of the target)",
)
FAIL = Move(
    "FAIL",
    frozenset({S.RUNNING}),
    S.FAILED,
    _ENDS_ATTEMPT,
    takes=STAGE_FIELDS,
    by="transition",
    why="a stage gave up, or cleanup found a lost window out of attempts",
)
REFENCE = Move(
    "REFENCE",
    frozenset({S.RUNNING}),
    S.RUNNING,
    takes=frozenset({"fence"}),
    by="raise_fence",
    why="the target's ledger holds a newer fence than the store ever issued: the owner's "
    "fence jumps above it (no attempt)",
)
RESEND = Move(
    "RESEND",
    frozenset({S.QUEUED}),
    S.QUEUED,
    by="touch_queued",
    why="cleanup sends a waiting window's message again, without an attempt",
)
REQUEUE_LOST = Move(
    "REQUEUE_LOST",
    frozenset({S.RUNNING}),
    S.QUEUED,
    _NEW_ATTEMPT,
    by="queue",
    why="cleanup: the worker died inside the stage; that attempt counts",
)
BURY = Move(
    "BURY",
    frozenset({S.FAILED}),
    S.DEAD,
    _ENDS_ATTEMPT,
    by="mark_dead_exhausted",
    why="a failed window has no attempts left",
)
RESET = Move(
    "RESET",
    frozenset({S.SUCCEEDED, S.SKIPPED, S.DEAD}),
    S.PENDING,
    _BACK_TO_PENDING,
    takes=frozenset({"kind"}),
    by="reset_for_rerun",
    why="`enqueue --force` re-runs finished or dead windows",
)
REBUILD_RESET = Move(
    "REBUILD_RESET",
    frozenset({S.PENDING, S.QUEUED, S.RUNNING, S.FAILED, S.DEAD}),
    S.PENDING,
    _BACK_TO_PENDING,
    by="apply_rebuild",
    why="`validate --rebuild` restarts a kept unfinished window; finished work is never reset",
)
RECHECK_RERUN = Move(
    "RECHECK_RERUN",
    frozenset({S.SUCCEEDED, S.SKIPPED}),
    S.PENDING,
    {**_BACK_TO_PENDING, "kind": WindowKind.MANUAL, "checked_at": Rule.NOW},
    takes=frozenset({"drift", "rechecks_done"}),
    by="record_check",
    why="a recheck or reconcile found the source drifted: the window runs again",
)

MOVES: tuple[Move, ...] = (
    ENQUEUE,
    CLAIM,
    ADVANCE,
    SUCCEED,
    SKIP,
    FAIL,
    REFENCE,
    RESEND,
    REQUEUE_LOST,
    BURY,
    RESET,
    REBUILD_RESET,
    RECHECK_RERUN,
)
"""The state machine: every legal move of a window record."""


def _allowed() -> dict[WindowStatus, frozenset[WindowStatus]]:
    edges = {edge for move in MOVES for edge in move.edges}
    return {s: frozenset(to for source, to in edges if source == s) for s in WindowStatus}


ALLOWED_TRANSITIONS: dict[WindowStatus, frozenset[WindowStatus]] = _allowed()
"""Which status may follow which: exactly the edges of `MOVES`."""


def move_for(
    to: WindowStatus,
    expect: Collection[WindowStatus] | None = None,
    among: Collection[Move] = MOVES,
) -> Move:
    """The move `among` to `to` whose from-states include every status of `expect`.

    Where several match (running -> queued is ADVANCE and REQUEUE_LOST), the one
    `StateStore.transition` applies (a stage's commit) is taken; failing that, the most general
    one, whose from-states include every other candidate's (running -> running is CLAIM, not
    REFENCE, which only `raise_fence` applies). Raises ValueError for an edge the state machine
    never allows, or a choice `expect` leaves open: both are callers' bugs.
    """
    to = WindowStatus(to)
    sources = None if expect is None else frozenset(WindowStatus(s) for s in expect)
    if sources is not None:
        if not sources:
            raise ValueError("expect must name at least one status")
        refused = sorted(s.value for s in sources if to not in ALLOWED_TRANSITIONS[s])
        if refused:
            raise ValueError(f"the state machine never allows {', '.join(refused)} -> {to.value}")
    found = [m for m in among if m.to == to and (sources is None or sources <= m.sources)]
    commits = [m for m in found if m.by == "transition"]
    if len(commits) == 1:
        return commits[0]
    if len(found) == 1:
        return found[0]
    widest = [m for m in found if all(other.sources <= m.sources for other in found)]
    if len(widest) == 1:
        return widest[0]
    names = ", ".join(m.name for m in found) or "none"
    wanted = "any status" if sources is None else ", ".join(sorted(s.value for s in sources))
    raise ValueError(f"no single move from {wanted} -> {to.value} (candidates: {names})")
