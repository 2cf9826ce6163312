"""The durable state store: one record per (pipeline, window) in SQLite or PostgreSQL.

Every change of a record is ONE guarded statement, `UPDATE windows SET ... WHERE pipeline = ?
AND window_start = ? AND status IN (...) [AND fence = ?] RETURNING ...`, so when two processes
race for the same window exactly one statement matches and the other learns why it lost
(wrong state, a newer fencing token, no such record). Nothing is cached: the database is the
truth, and a worker, beat and the CLI may all hold a `StateStore` on the same database.

Instants are stored as UTC and always come back timezone-aware UTC, on both backends.

The package, by idea: `schema` (the `windows` table), `engine` (engines, SQLite tuning, pool
sizes, connections), `moves` (transitions' moves compiled to guarded UPDATEs, new records'
INSERT), `queries` (the reads), `tallies` (the metrics' reads), `overview` (the web view's
reads), `direct` (the per-window statements on psycopg directly, PostgreSQL only),
`repository` (`StateStore`). Only this package and the migrations import `schema`
(`make lint` checks it); tests and benchmarks that seed or inspect rows directly import the
table from `core.store.schema` (`WINDOWS`, `METADATA`).
"""

from core.store.engine import STORE_POOL_OVERFLOW, STORE_POOL_SIZE
from core.store.moves import first_fence
from core.store.queries import PipelineSummary, UnfinishedGroup, recheck_due
from core.store.repository import RebuildCounts, RecordNotFoundError, StateStore
from core.store.schema import MIGRATIONS_DIR

__all__ = [
    "MIGRATIONS_DIR",
    "STORE_POOL_OVERFLOW",
    "STORE_POOL_SIZE",
    "PipelineSummary",
    "RebuildCounts",
    "RecordNotFoundError",
    "StateStore",
    "UnfinishedGroup",
    "first_fence",
    "recheck_due",
]
