"""Every statement the Snowflake target runs, built by pure functions (tested offline).

A window is loaded in three steps on one session:

1. `COPY INTO` a temporary landing table, at most `MAX_FILES_PER_COPY` files per statement
   (Snowflake's limit for `FILES=`), with `ON_ERROR=ABORT_STATEMENT` so a bad line fails the
   load instead of being skipped, and `FORCE=TRUE` because the landing table is new each time
   and idempotency is ours (below), not Snowflake's 64-day load history. The COPY keeps each
   row's lineage: `METADATA$FILENAME` and `METADATA$FILE_ROW_NUMBER`.
2. One explicit transaction: `BEGIN`; move the window's row in the target table's own ledger
   (`<TABLE>_WINDOWPIPE_LEDGER`, beside it) to this load's fencing token, guarded by the
   window's newest recorded fence being at most this one (`advance_fence_sql`, else
   `insert_fence_sql` when the window has no row yet);
   if neither changed a row, a newer load already happened: `ROLLBACK` and refuse. Else
   `DELETE` the window's rows; `INSERT ... SELECT` from the landing table; `COMMIT`. A
   retried, duplicated or forced load replaces the window, never adds to it, and a stale one
   (its worker paused past its lock) changes nothing.
3. Drop the landing table.

A ledger per target table, not one per schema: an UPDATE holds a lock on its whole table until
COMMIT, so with one ledger per schema a load of any pipeline in the schema waited for a load
of any other (and for a frozen one). Now only loads into the same table share a ledger (they
share the table's lock anyway). Primary keys are not enforced in Snowflake, so a ledger could
come to hold two rows for one window (a hand-made copy, an INSERT race); the guard compares
with the newest fence of the window (`MAX(fence)`), never with whichever row matches, so a
stale fence cannot pass because an older duplicate row exists, and the UPDATE moves every row
of the window.

An empty load (`SnowflakeTarget.clear_window`) is the same transaction without the COPY: the ledger
moves to the fence with 0 rows, the window's rows are deleted.

The audit reads the window's ids back (`window_ids_sql`) and hashes them in Python
(`core.checksum`): Snowflake's `MD5_NUMBER_UPPER64(doc_id)` is the same 64-bit hash and could
sum them in the warehouse, but fakesnow cannot run it, so nothing here depends on it untested.

Why UPDATE then INSERT-if-absent rather than one MERGE: Snowflake holds the lock an UPDATE,
DELETE or MERGE takes on a table until the transaction ends, so the ledger UPDATE, which
every load runs first, serialises two loads of one window either way: the later one waits,
then its statements see the earlier one's committed fence. fakesnow 0.12 runs a MERGE as a
temporary table plus several statements, which DuckDB refuses inside an explicit
transaction; these two statements behave the same on both.

Identifiers come from the config: each must be a plain Snowflake name (letters, digits, `_`,
`$`), which is upper-cased and quoted, so it means what the same name unquoted means in
Snowflake and nothing else can reach the SQL. Values are bound (`?`, qmark paramstyle).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from core.errors import TerminalError

MAX_FILES_PER_COPY = 1000
"""Snowflake accepts at most 1,000 names in one `COPY ... FILES=(...)`."""

COLUMNS = (
    "doc_id",
    "doc",
    "window_start",
    "window_end",
    "pipeline",
    "loaded_at",
    "source_file",
    "file_row",
)
"""The target table's columns, in the order `insert_window_sql` fills them."""

LEDGER_SUFFIX = "_WINDOWPIPE_LEDGER"
"""A target table's ledger is the table's name with this suffix, in its schema: per window,
the newest fence that loaded it."""

BEGIN = "BEGIN"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"

LOCK_TIMEOUT_SECONDS = 60
"""The session's `LOCK_TIMEOUT` (Snowflake's default is 43,200 s): how long a load waits on a
table lock before its statement fails and it looks who holds the lock."""

LOCK_WAIT_ERRNO = 625
"""Snowflake's error number for a statement that gave up waiting on another transaction's
table lock (its message names the holding statement and transaction)."""

LOAD_TAG = "windowpipe-load"
"""First word of a load's `QUERY_TAG`: `windowpipe-load FENCE KEY`."""

PROBE_QUERY_TAG = f"ALTER SESSION SET QUERY_TAG = '{LOAD_TAG}'"
"""Sent once per session: a server that refuses it (fakesnow 0.12 implements no ALTER SESSION)
gets no per-load tags, and its loads wait out `LOCK_TIMEOUT` instead of taking over."""

ABORT_TRANSACTION = "SELECT SYSTEM$ABORT_TRANSACTION(?)"
"""End another session's transaction by id (a role may end its own user's transactions)."""

QUERY_TAG_OF = (
    "SELECT query_tag FROM TABLE(INFORMATION_SCHEMA.QUERY_HISTORY_BY_USER("
    "RESULT_LIMIT => 10000)) WHERE query_id = ?"
)
"""The tag a statement of this user ran with; binds (query_id)."""

_LOCK_HOLDER = re.compile(r"Statement '([0-9a-fA-F-]+)' has locked table .* in transaction (\d+)")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,254}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def quote_identifier(name: str, role: str = "identifier") -> str:
    """`name` upper-cased and double-quoted; TerminalError unless it is a plain name."""
    if not _IDENTIFIER.fullmatch(name):
        raise TerminalError(
            f"snowflake target: unsafe {role} {name!r} "
            "(letters, digits, '_' and '$' only, not starting with a digit)"
        )
    return f'"{name.upper()}"'


def check_path(path: str) -> str:
    """A stage-relative path fit for a location or a string literal: segments of letters,
    digits, `_`, `.`, `-` (no quotes, no `=`, no `..`)."""
    segments = path.split("/")
    if not all(_PATH_SEGMENT.fullmatch(segment) for segment in segments):
        raise TerminalError(f"snowflake target: unsafe staged path {path!r}")
    return path


@dataclass(frozen=True, slots=True)
class Names:
    """The quoted, fully qualified names of the target table, its ledger and the Snowflake
    stage."""

    table: str
    stage: str
    ledger: str

    @classmethod
    def of(cls, database: str, schema: str, table: str, stage: str) -> Names:
        prefix = f"{quote_identifier(database, 'database')}.{quote_identifier(schema, 'schema')}."
        return cls(
            table=prefix + quote_identifier(table, "table"),
            stage=prefix + quote_identifier(stage, "stage"),
            ledger=prefix + quote_identifier(table + LEDGER_SUFFIX, "ledger table"),
        )


def create_table_sql(table: str) -> str:
    """The target table, created if missing. Timestamps are TIMESTAMP_NTZ holding UTC."""
    return (
        f"CREATE TABLE IF NOT EXISTS {table} ("
        "doc_id STRING NOT NULL, "
        "doc VARIANT NOT NULL, "
        "window_start TIMESTAMP_NTZ NOT NULL, "
        "window_end TIMESTAMP_NTZ NOT NULL, "
        "pipeline STRING NOT NULL, "
        "loaded_at TIMESTAMP_NTZ NOT NULL, "
        "source_file STRING, "
        "file_row NUMBER)"
    )


def create_ledger_sql(ledger: str) -> str:
    """The ledger table, created if missing. `row_count`, since ROWS is reserved in Snowflake.
    The primary key is informational in Snowflake (not enforced): the ledger UPDATE's lock is
    what keeps one row per window."""
    return (
        f"CREATE TABLE IF NOT EXISTS {ledger} ("
        "pipeline STRING NOT NULL, "
        "window_start TIMESTAMP_NTZ NOT NULL, "
        "fence NUMBER NOT NULL, "
        "row_count NUMBER NOT NULL, "
        "loaded_at TIMESTAMP_NTZ NOT NULL, "
        "PRIMARY KEY (pipeline, window_start))"
    )


def advance_fence_sql(ledger: str) -> str:
    """Move the window's ledger row(s) to a newer fence; binds (fence, row_count, loaded_at,
    pipeline, window_start, fence, pipeline, window_start). Updates no row when the window's
    newest recorded fence is newer than this one, or when the window has no row yet."""
    return (
        f"UPDATE {ledger} SET fence = ?, row_count = ?, loaded_at = ? "
        "WHERE pipeline = ? AND window_start = ? "
        f"AND ? >= (SELECT MAX(fence) FROM {ledger} WHERE pipeline = ? AND window_start = ?)"
    )


def insert_fence_sql(ledger: str) -> str:
    """The window's first ledger row, only if it has none; binds (pipeline, window_start,
    fence, row_count, loaded_at, pipeline, window_start)."""
    return (
        f"INSERT INTO {ledger} (pipeline, window_start, fence, row_count, loaded_at) "
        "SELECT ?, ?, ?, ?, ? "
        f"WHERE NOT EXISTS (SELECT 1 FROM {ledger} WHERE pipeline = ? AND window_start = ?)"
    )


def recorded_fence_sql(ledger: str) -> str:
    """The fence that loaded a window last; binds (pipeline, window_start)."""
    return f"SELECT MAX(fence) FROM {ledger} WHERE pipeline = ? AND window_start = ?"


def create_landing_sql(landing: str) -> str:
    """A session's temporary landing table (unqualified: it lives in the session's schema)."""
    return (
        f"CREATE OR REPLACE TEMPORARY TABLE {landing} "
        "(v VARIANT, source_file STRING, file_row NUMBER)"
    )


def drop_landing_sql(landing: str) -> str:
    return f"DROP TABLE IF EXISTS {landing}"


def copy_sql(landing: str, stage: str, directory: str, files: Sequence[str]) -> str:
    """One `COPY INTO` of `files` (names relative to `directory`) into the landing table."""
    if not 0 < len(files) <= MAX_FILES_PER_COPY:
        raise ValueError(f"a COPY takes 1 to {MAX_FILES_PER_COPY} files, not {len(files)}")
    location = f"@{stage}/{check_path(directory)}/" if directory else f"@{stage}/"
    names = ", ".join(f"'{check_path(name)}'" for name in files)
    return (
        f"COPY INTO {landing} (v, source_file, file_row) "
        f"FROM (SELECT $1, METADATA$FILENAME, METADATA$FILE_ROW_NUMBER FROM {location}) "
        f"FILES = ({names}) "
        "FILE_FORMAT = (TYPE = JSON) "
        "ON_ERROR = ABORT_STATEMENT "
        "FORCE = TRUE"
    )


def copy_statements(landing: str, stage: str, paths: Sequence[str]) -> list[str]:
    """The COPY statements loading every stage-relative path in `paths`: grouped by
    directory (a COPY reads one location), at most `MAX_FILES_PER_COPY` files each."""
    by_directory: dict[str, list[str]] = {}
    for path in paths:
        directory, _, name = check_path(path).rpartition("/")
        by_directory.setdefault(directory, []).append(name)
    return [
        copy_sql(landing, stage, directory, chunk)
        for directory, names in by_directory.items()
        for chunk in _chunks(names, MAX_FILES_PER_COPY)
    ]


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def delete_window_sql(table: str) -> str:
    """Delete a window's rows; binds (pipeline, window_start)."""
    return f"DELETE FROM {table} WHERE pipeline = ? AND window_start = ?"


def insert_window_sql(table: str, landing: str) -> str:
    """Insert the landing table's rows as the window's; binds
    (window_start, window_end, pipeline, loaded_at)."""
    return (
        f"INSERT INTO {table} ({', '.join(COLUMNS)}) "
        "SELECT v:id::STRING, v:doc, ?, ?, ?, ?, source_file, file_row "
        f"FROM {landing}"
    )


def window_ids_sql(table: str) -> str:
    """A window's document ids, for its checksum; binds (pipeline, window_start)."""
    return f"SELECT doc_id FROM {table} WHERE pipeline = ? AND window_start = ?"


def ledger_row_sql(ledger: str) -> str:
    """A window's newest ledger row: (fence, row_count); binds (pipeline, window_start)."""
    return (
        f"SELECT fence, row_count FROM {ledger} WHERE pipeline = ? AND window_start = ? "
        "ORDER BY fence DESC LIMIT 1"
    )


def count_window_sql(table: str) -> str:
    """Count a window's rows; binds (pipeline, window_start)."""
    return f"SELECT COUNT(*) FROM {table} WHERE pipeline = ? AND window_start = ?"


def load_tag(key: str, fence: int) -> str:
    """A load's `QUERY_TAG`: only the tag word, digits and the window's hex key, so it is safe
    as a literal (ALTER SESSION takes no bound values)."""
    if not re.fullmatch(r"[0-9a-f]{1,32}", key):
        raise ValueError(f"not a window key: {key!r}")
    return f"{LOAD_TAG} {int(fence)} {key}"


def set_load_tag_sql(key: str, fence: int) -> str:
    """Tag the session's next statements with a load of window `key` at `fence`."""
    return f"ALTER SESSION SET QUERY_TAG = '{load_tag(key, fence)}'"


@dataclass(frozen=True)
class LockHolder:
    """Who holds the table lock a statement gave up waiting on (from Snowflake's message)."""

    statement: str
    transaction: int


def lock_holder(message: str) -> LockHolder | None:
    """The holding statement and transaction named by a lock-wait error (`LOCK_WAIT_ERRNO`),
    or None when the message does not name them."""
    found = _LOCK_HOLDER.search(message)
    return LockHolder(found.group(1), int(found.group(2))) if found else None


def is_older_load(query_tag: str | None, key: str, fence: int) -> bool:
    """True when `query_tag` is a load's tag for window `key` with a fence older than `fence`:
    the only transactions a load ever ends."""
    words = (query_tag or "").split()
    return (
        len(words) == 3
        and words[0] == LOAD_TAG
        and words[2] == key
        and words[1].isdigit()
        and int(words[1]) < fence
    )
