"""`python -m bench.store_hot_path [--batch B] [--rounds R]`: the client CPU of the state store's
per-window statements on PostgreSQL, through psycopg directly (`core.store.direct`, the
default) and through SQLAlchemy's `Connection` (`StateStore(url, direct=False)`, as before).

Each round claims and commits B queued windows on each path (a stage's claim, then precheck's
commit: back to queued at extract with its count), then reads B records (`get`, what a refused
claim reads) and B waiting sets (`waiting([pipeline])`, what a finishing window reads). The
paths take turns, the first one alternating between rounds, so the machine's noise falls on
both. `time.process_time()` of each batch divided by B; medians over R rounds after one
warm-up round, and the ratio direct / SQLAlchemy. In-process, one thread: no workers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from bench.common import log, pg_database, schema_url
from core.records import Stage, WindowStatus
from core.store import StateStore
from core.store.schema import WINDOWS
from core.windows import Window

ORIGIN = datetime(2026, 11, 1, tzinfo=UTC)
SIZE = timedelta(minutes=15)
PATHS = ("sqlalchemy", "direct")


def seed(store: StateStore, pipeline: str, count: int) -> list[datetime]:
    """`count` windows of `pipeline`, queued at precheck as dispatch leaves them."""
    windows = [Window(ORIGIN + i * SIZE, ORIGIN + (i + 1) * SIZE) for i in range(count)]
    store.create_windows(pipeline, windows)
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(WINDOWS)
            .where(WINDOWS.c.pipeline == pipeline)
            .values(status=WindowStatus.QUEUED.value, stage=Stage.PRECHECK.value, attempts=1)
        )
        conn.execute(sa.text("ANALYZE windows"))
    return [window.start for window in windows]


def claim_and_commit(store: StateStore, pipeline: str, start: datetime) -> None:
    record = store.claim_stage(pipeline, start, Stage.PRECHECK)
    assert record is not None, "a seeded window was not claimable"
    store.transition(
        pipeline,
        start,
        WindowStatus.QUEUED,
        expect=[WindowStatus.RUNNING],
        fence=record.fence,
        stage=Stage.EXTRACT,
        source_count=100,
        source_version=None,
    )


def cpu_per_call(action: Callable[[datetime], object], starts: list[datetime]) -> float:
    """Process CPU seconds of `action` over `starts`, per start."""
    began = time.process_time()
    for start in starts:
        action(start)
    return (time.process_time() - began) / len(starts)


def measure(url: str, batch: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """{statement: {path: CPU seconds per call, one per round}}."""
    stores = {"sqlalchemy": StateStore(url, direct=False), "direct": StateStore(url)}
    stores["direct"].migrate()
    starts = {path: seed(stores[path], path, batch * (rounds + 1)) for path in PATHS}
    found: dict[str, dict[str, list[float]]] = {
        what: {path: [] for path in PATHS} for what in ("claim+commit", "get", "waiting")
    }
    try:
        for round_ in range(rounds + 1):  # round 0 warms up: connections, compiled statements
            order = PATHS if round_ % 2 else PATHS[::-1]
            for path in order:
                store = stores[path]
                mine = starts[path][round_ * batch : (round_ + 1) * batch]
                figures = {
                    "claim+commit": cpu_per_call(
                        lambda s, st=store, p=path: claim_and_commit(st, p, s), mine
                    ),
                    "get": cpu_per_call(lambda s, st=store, p=path: st.get(p, s), mine),
                    "waiting": cpu_per_call(lambda s, st=store, p=path: st.waiting([p]), mine),
                }
                if round_:
                    for what, seconds in figures.items():
                        found[what][path].append(seconds)
    finally:
        for store in stores.values():
            store.dispose()
    return found


def report(found: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = [f"{'statement':<14}{'sqlalchemy µs':>15}{'direct µs':>12}{'ratio':>8}"]
    for what, paths in found.items():
        before = statistics.median(paths["sqlalchemy"]) * 1e6
        after = statistics.median(paths["direct"]) * 1e6
        lines.append(f"{what:<14}{before:>15.0f}{after:>12.0f}{after / before:>8.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=50, help="windows per path and round")
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds per path")
    args = parser.parse_args()
    with pg_database() as database:
        found = measure(schema_url(database, "store_hot_path"), args.batch, args.rounds)
    log(f"CPU per call (time.process_time), medians of {args.rounds} rounds of {args.batch}:")
    for line in report(found):
        log(line)


if __name__ == "__main__":
    main()
