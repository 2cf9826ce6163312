"""The state machine has one home: `core.transitions.MOVES`.

- the table is consistent, and `ALLOWED_TRANSITIONS` is exactly its edges;
- the diagrams (core/records.py, README) and the README's table say what the table says;
- no status is written anywhere but the store's one interpreter of moves (a scan of the source);
- every store method that changes a status does what its move says, from every status (SQLite).
"""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import core.records
from core.errors import InvalidTransitionError
from core.instants import utc_now
from core.records import Stage, WindowKind, WindowRecord, WindowStatus
from core.store import StateStore
from core.transitions import (
    ALLOWED_TRANSITIONS,
    MOVES,
    RESTART_FROM_PRECHECK,
    Move,
    Rule,
    move_for,
    resume_stage,
)
from core.validation import RebuildPlan
from core.windows import Window

ROOT = Path(__file__).resolve().parent.parent
S = WindowStatus
EDGES = {(source, move.name, move.to) for move in MOVES for source in move.sources}

# --- the table ---------------------------------------------------------------------------------


def test_allowed_transitions_are_exactly_the_edges_the_moves_take() -> None:
    listed = {(s, to) for s, targets in ALLOWED_TRANSITIONS.items() for to in targets}
    assert listed == {(source, to) for source, _, to in EDGES}
    assert set(ALLOWED_TRANSITIONS) == set(WindowStatus)


def test_every_move_is_named_once_and_applied_by_a_store_method() -> None:
    names = [move.name for move in MOVES]
    assert len(names) == len(set(names))
    for move in MOVES:
        assert move.sources, move.name
        assert callable(getattr(StateStore, move.by, None)), move.by
        assert not set(move.sets) & move.takes, move.name  # a field has one rule
        assert {"status", "updated_at"}.isdisjoint({*move.sets, *move.takes}), move.name


def test_every_status_is_reached_and_left() -> None:
    reached = {to for _, _, to in EDGES}
    left = {source for source, _, _ in EDGES}
    assert reached == left == set(WindowStatus)


@pytest.mark.parametrize(
    ("to", "expect", "move"),
    [
        (S.QUEUED, None, "ADVANCE"),  # a stage's commit
        (S.QUEUED, [S.RUNNING], "ADVANCE"),
        (S.QUEUED, [S.FAILED], "ENQUEUE"),
        (S.QUEUED, [S.PENDING, S.DEAD], "ENQUEUE"),
        (S.QUEUED, [S.QUEUED], "RESEND"),
        (S.RUNNING, None, "CLAIM"),
        (S.RUNNING, [S.QUEUED], "CLAIM"),
        (S.RUNNING, [S.RUNNING], "CLAIM"),
        (S.FAILED, [S.RUNNING], "FAIL"),
        (S.DEAD, None, "BURY"),
        (S.PENDING, [S.PENDING], "REBUILD_RESET"),
    ],
)
def test_move_for_picks_the_move_the_expected_states_leave_by(
    to: WindowStatus, expect: list[WindowStatus] | None, move: str
) -> None:
    assert move_for(to, expect).name == move


@pytest.mark.parametrize(
    ("to", "expect", "message"),
    [
        (S.RUNNING, [S.PENDING], "never allows pending -> running"),
        (S.QUEUED, [S.FAILED, S.QUEUED], "no single move"),
        (S.PENDING, None, "no single move"),
        (S.QUEUED, [], "at least one"),
    ],
)
def test_move_for_refuses_edges_and_choices_the_table_does_not_settle(
    to: WindowStatus, expect: list[WindowStatus] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        move_for(to, expect)


@pytest.mark.parametrize("status", list(WindowStatus))
@pytest.mark.parametrize("stage", [None, *Stage])
def test_a_new_attempt_restarts_at_precheck_or_resumes_at_the_recorded_stage(
    status: WindowStatus, stage: Stage | None
) -> None:
    expected = Stage.PRECHECK if status in RESTART_FROM_PRECHECK or stage is None else stage
    assert resume_stage(status, stage) == expected


# --- the diagrams ------------------------------------------------------------------------------

_STATES = r"[a-z]+(?:\|[a-z]+)*"
_TOKEN = re.compile(rf"\s*(?:(?P<states>{_STATES})|──(?P<right>[A-Z_]+)──▶|◀──(?P<left>[A-Z_]+)──)")


def diagram_edges(lines: list[str]) -> set[tuple[WindowStatus, str, WindowStatus]]:
    """The edges of a diagram in the notation of core/records.py: `a ──MOVE──▶ b`,
    `a ◀──MOVE── b`, `a|b` for several states. Anything else on a line is an error."""
    edges = set()
    for line in lines:
        tokens: list[tuple[str, str]] = []
        position = 0
        while position < len(line.rstrip()):
            match = _TOKEN.match(line, position)
            assert match, f"cannot read the diagram at {line[position:]!r}"
            kind = match.lastgroup
            assert kind is not None
            tokens.append((kind, match.group(kind)))
            position = match.end()
        for index, (kind, value) in enumerate(tokens):
            if kind == "states":
                continue
            before, after = tokens[index - 1], tokens[index + 1]
            assert before[0] == after[0] == "states", f"an arrow between two states: {line!r}"
            sources, targets = (before, after) if kind == "right" else (after, before)
            for source in sources[1].split("|"):
                for target in targets[1].split("|"):
                    edges.add((WindowStatus(source), value, WindowStatus(target)))
    return edges


def diagram_lines(text: str) -> list[str]:
    """The lines of the first block (indented, after a blank line) that holds an arrow."""
    blocks = re.split(r"\n\s*\n", text)
    for block in blocks:
        if "──" in block and all(line.startswith("    ") for line in block.splitlines()):
            return block.splitlines()
    raise AssertionError("no diagram found")


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def test_the_records_docstring_diagram_matches_the_table() -> None:
    assert core.records.__doc__ is not None
    assert diagram_edges(diagram_lines(core.records.__doc__)) == EDGES


def test_the_readme_diagram_matches_the_table() -> None:
    assert diagram_edges(diagram_lines(readme_section("Window states"))) == EDGES


def moves_table() -> str:
    """The README's table of moves, as the table says it."""
    rows = ["| move | from | to | sets | when (store method) |", "|---|---|---|---|---|"]
    for move in MOVES:
        sources = ", ".join(s.value for s in WindowStatus if s in move.sources)
        rows.append(
            f"| {move.name} | {sources} | {move.to.value} | {move.describe_sets()} "
            f"| {move.why} (`{move.by}`) |"
        )
    return "\n".join(rows)


def test_the_readme_table_of_moves_is_the_table() -> None:
    assert moves_table() in readme_section("Window states"), (
        "regenerate the README's table of moves:\n" + moves_table()
    )


def test_the_diagram_reader_rejects_what_it_cannot_read() -> None:
    assert diagram_edges(["    pending ──ENQUEUE──▶ queued ◀──ADVANCE── running"]) == {
        (S.PENDING, "ENQUEUE", S.QUEUED),
        (S.RUNNING, "ADVANCE", S.QUEUED),
    }
    with pytest.raises(AssertionError):
        diagram_edges(["    pending → queued"])


# --- no status written outside the moves ---------------------------------------------------------

SCANNED = ["core", "workers", "connectors", "windowpipe", "beat_schedule.py"]

STATUS_WRITERS = {
    ("core/store/moves.py", "_move_values"),  # every move
    ("core/store/moves.py", "_new_row"),  # a new record is pending (SQLite insert)
    ("core/store/moves.py", "_pg_insert_new"),  # the same, PostgreSQL insert
}
"""The only functions that may write the `status` column."""

_SQL_CALLS = {"values", "ordered_values", "update", "insert", "execute", "exec_driver_sql", "dict"}
_SQL_WRITE_TEXT = re.compile(r"(?is)\b(update\b.+\bset\b.+\bstatus\b|insert\s+into\b.+\bstatus\b)")


class _StatusWrites(ast.NodeVisitor):
    """Finds what could write a `status` column: `.values(status=...)` and the like, dicts and
    column lists naming `status` (in modules that use SQLAlchemy or the store's table), and SQL
    text that updates or inserts a status."""

    def __init__(self, sql_module: bool) -> None:
        self.sql_module = sql_module
        self.functions: list[str] = []
        self.found: list[tuple[int, str]] = []

    def _hit(self, node: ast.AST) -> None:
        where = self.functions[-1] if self.functions else "<module>"
        self.found.append((getattr(node, "lineno", 0), where))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self._skip_docstring(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._skip_docstring(node)

    def visit_Module(self, node: ast.Module) -> None:
        self._skip_docstring(node)

    def _skip_docstring(self, node: ast.Module | ast.ClassDef | ast.FunctionDef | Any) -> None:
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]
        for child in ast.iter_child_nodes(node):
            if child not in node.body or child in body:
                self.visit(child)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        writes = name in _SQL_CALLS and any(k.arg == "status" for k in node.keywords)
        if writes and (name != "dict" or self.sql_module):
            self._hit(node)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        if self.sql_module and any(_names_status(key) for key in node.keys):
            self._hit(node)
        self.generic_visit(node)

    def visit_List(self, node: ast.List | ast.Tuple | ast.Set) -> None:
        # Column names for an INSERT; a list of column objects is a SELECT's.
        names = [item.value for item in node.elts if isinstance(item, ast.Constant)]
        if self.sql_module and "status" in names:
            self._hit(node)
        self.generic_visit(node)

    visit_Tuple = visit_List
    visit_Set = visit_List

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if self.sql_module and isinstance(node.ctx, ast.Store) and _names_status(node.slice):
            self._hit(node)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and _SQL_WRITE_TEXT.search(node.value):
            self._hit(node)


def _names_status(node: ast.AST | None) -> bool:
    """`"status"`, or a column `....c.status`."""
    if isinstance(node, ast.Constant):
        return node.value == "status"
    return isinstance(node, ast.Attribute) and node.attr == "status"


def _uses_sql(tree: ast.Module) -> bool:
    """The module imports SQLAlchemy or the store's table (and so could write to it)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(
            a.name.startswith("sqlalchemy") for a in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom):
            if (node.module or "").startswith("sqlalchemy"):
                return True
            if (node.module or "").startswith("core.store") and {"WINDOWS", "METADATA"} & {
                a.name for a in node.names
            }:
                return True
    return False


def status_writes(source: str) -> list[tuple[int, str]]:
    """`(line, function)` of everything in `source` that could write a window's status."""
    tree = ast.parse(source)
    finder = _StatusWrites(_uses_sql(tree))
    finder.visit(tree)
    return finder.found


def source_files() -> Iterator[Path]:
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from sorted(p for p in path.rglob("*.py") if "migrations" not in p.parts)


def test_no_status_is_written_outside_the_moves_and_the_creation_of_records() -> None:
    found: dict[tuple[str, str], list[int]] = {}
    for path in source_files():
        relative = path.relative_to(ROOT).as_posix()
        for line, function in status_writes(path.read_text()):
            found.setdefault((relative, function), []).append(line)
    elsewhere = {key: lines for key, lines in found.items() if key not in STATUS_WRITERS}
    assert elsewhere == {}, (
        "a window's status is written outside core.store.moves._move_values: add a move to "
        "core/transitions.py and apply it instead"
    )
    # The scan sees the writes that are allowed, so it would see a new one too.
    assert set(found) == STATUS_WRITERS


@pytest.mark.parametrize(
    "snippet",
    [
        "def f(): sa.update(WINDOWS).values(status='dead')",
        "def f(): conn.execute(WINDOWS.update(), {'status': 'dead'})",
        "def f(): conn.execute(sa.text(\"UPDATE windows SET status = 'dead' WHERE id = 1\"))",
        "def f(): conn.exec_driver_sql(\"update windows set attempts = 0, status = 'x'\")",
        "def f(): values['status'] = 'dead'",
        "def f(): stmt.values({WINDOWS.c.status: 'dead'})",
        "def f(): sa.insert(WINDOWS).from_select(['pipeline', 'status'], rows)",
        "def f(): values = dict(status='dead')",
    ],
)
def test_the_scan_finds_a_raw_status_write(snippet: str) -> None:
    assert status_writes("import sqlalchemy as sa\n" + snippet) == [(2, "f")]


def test_the_scan_ignores_reads_and_docstrings() -> None:
    reads = '''
"""UPDATE windows SET status = 'x' is what a docstring may say."""
import sqlalchemy as sa

def f():
    """`INSERT INTO windows (status)` in a docstring."""
    query = sa.select(WINDOWS).where(WINDOWS.c.status == "failed")
    return WindowRecord(status=WindowStatus(row["status"]))
'''
    assert status_writes(reads) == []


# --- every store method does what its move says ----------------------------------------------

ORIGIN = datetime(2026, 11, 1, tzinfo=UTC)
WINDOW = Window(ORIGIN, ORIGIN + timedelta(minutes=15))
RECORDED_STAGE = Stage.LOAD
"""The stage a window stopped at before each move: not precheck, so restart and resume differ."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StateStore]:
    store = StateStore(f"sqlite:///{tmp_path_factory.mktemp('moves')}/state.db")
    store.migrate()
    yield store
    store.dispose()


def record_in(store: StateStore, pipeline: str, status: WindowStatus) -> WindowRecord:
    """A new record of `pipeline` driven to `status`, its chain stopped at `RECORDED_STAGE`."""
    store.create_windows(pipeline, [WINDOW])
    start = WINDOW.start
    if status != S.PENDING:
        assert store.queue(pipeline, start, expect=[S.PENDING]) is not None
        if status != S.QUEUED:
            assert store.claim_stage(pipeline, start, Stage.PRECHECK) is not None
            results = {"source_count": 3, "staged_count": 3, "manifest": "m.json"}
            ending = {S.RUNNING: S.QUEUED, S.DEAD: S.FAILED}.get(status, status)
            store.transition(pipeline, start, ending, stage=RECORDED_STAGE, **results)
            if status == S.RUNNING:
                assert store.claim_stage(pipeline, start, RECORDED_STAGE) is not None
            if status == S.DEAD:
                store.transition(pipeline, start, S.DEAD)
    record = store.get(pipeline, start)
    assert record is not None and record.status == status
    return record


def apply(store: StateStore, move: Move, record: WindowRecord) -> None:
    """Ask the store method that applies `move` to apply it to `record` (it may refuse)."""
    pipeline, start = record.pipeline, record.window_start
    calls: dict[str, Callable[[], object]] = {
        "queue": lambda: store.queue(
            pipeline,
            start,
            expect=move.sources,
            fence=record.fence if move.name == "REQUEUE_LOST" else None,
        ),
        "claim_stage": lambda: store.claim_stage(pipeline, start, record.stage or Stage.PRECHECK),
        "transition": lambda: store.transition(pipeline, start, move.to, expect=move.sources),
        "touch_queued": lambda: store.touch_queued(
            pipeline, start, fence=record.fence, stage=record.stage
        ),
        "mark_dead_exhausted": lambda: store.mark_dead_exhausted(pipeline, max_attempts=0),
        "reset_for_rerun": lambda: store.reset_for_rerun(pipeline, [start]),
        "apply_rebuild": lambda: store.apply_rebuild(pipeline, RebuildPlan(reset_starts=[start])),
        "record_check": lambda: store.record_check(record, rechecks_done=1, drift={"by": "test"}),
        "raise_fence": lambda: store.raise_fence(
            pipeline, start, fence=record.fence, above=record.fence + 10
        ),
    }
    with contextlib.suppress(InvalidTransitionError):  # refused: the caller checks nothing changed
        calls[move.by]()


def expected_value(move: Move, name: str, before: WindowRecord) -> Any:
    """What `move` leaves in field `name` of `before`; `Rule.NOW` for the move's instant."""
    rule = move.sets[name]
    old = getattr(before, name)
    if isinstance(rule, WindowKind):
        return rule
    if rule == Rule.CLEARED:
        return None
    if rule == Rule.PLUS_ONE:
        return old + 1
    if rule == Rule.ZERO:
        return 0
    if rule == Rule.RESUME_STAGE:
        return resume_stage(before.status, before.stage)
    if rule == Rule.CLEARED_ON_RESTART:
        return None if before.status in RESTART_FROM_PRECHECK else old
    if rule == Rule.NOW_IF_UNSET and old is not None:
        return old
    return Rule.NOW


@pytest.mark.parametrize("status", list(WindowStatus))
@pytest.mark.parametrize("move", MOVES, ids=lambda move: move.name)
def test_each_store_method_applies_its_move_from_its_states_only(
    store: StateStore, move: Move, status: WindowStatus
) -> None:
    pipeline = f"{move.name.lower()}-{status.value}"
    before = record_in(store, pipeline, status)
    began = utc_now()
    apply(store, move, before)
    after = store.get(pipeline, WINDOW.start)
    assert after is not None
    if status not in move.sources:
        assert after == before, f"{move.name} changed a {status.value} record"
        return
    assert after.status == move.to
    ended = utc_now()
    for name in move.sets:
        expected = expected_value(move, name, before)
        value = getattr(after, name)
        if expected == Rule.NOW:
            assert value is not None and began <= value <= ended, name
        else:
            assert value == expected, f"{move.name} from {status.value}: {name}"
    assert after.updated_at is not None and after.updated_at >= began
    identity = {"pipeline", "window_start", "window_end", "id", "created_at"}
    others = {f.name for f in fields(before)} - identity - {"status", "updated_at"} - set(move.sets)
    for name in others - move.takes:
        assert getattr(after, name) == getattr(before, name), f"{move.name} changed {name}"
