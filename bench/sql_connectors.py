"""11. The SQL connectors' CPU per window, in-process: main's connectors against this tree's.

Each window runs what the stages call on the SQL source and target: `fingerprint` (precheck),
`iter_batches` into a local staging (extract), `load_window` (load), `audit_window` and
`fingerprint` again (audit). Pipelines are laid out as bench 8 lays them out: `src_<i>` /
`dst_<i>` tables in one PostgreSQL database, two documents a window, one `SqlSource` and one
`SqlTarget` per pipeline, sharing the process's engines (`connectors.shared`).

Two layouts: every window on one table, and windows spread over `--tables` (1,000) tables, a
round visiting the next `--per-round` of them, so each table comes back only after all the
others did (what a worker serving 1,000 pipelines sees). Both variants run in this process,
interleaved round by round: "old" is `git show REF:connectors/{shared,sql,sql_target}.py`
loaded as a package of its own (its own engines), "new" is the working tree's. Reported, in ms a
window, medians over rounds: this process's CPU, the CPU of the database's PostgreSQL backends
(from /proc), and the wall time; and new/old; then the round trips a window on one table
(libpq's trace of 20 windows: the `Query` and `Sync` requests sent), and how many statements
were compiled a window while timed (compiled-cache misses).

`python -m bench.sql_connectors [--ref main] [--tables 1000] [--rounds 7] [--per-round 200]`
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine.default import CACHE_MISS

from bench.common import cpu_seconds, file_at, log, median, pg_database
from bench.many_pipelines import seed
from connectors.base import Batch
from connectors.local import LocalStaging
from core.config import LocalStagingConfig, SqlSourceConfig, SqlTargetConfig
from core.windows import Window

WINDOW = timedelta(minutes=5)
SEEDED_WINDOWS = 4
OLD_PACKAGE = "wp_bench_old_connectors"


def old_modules(ref: str, into: Path) -> tuple[ModuleType, ModuleType]:
    """`connectors.sql` and `connectors.sql_target` as of `ref`, as a package of their own
    (with their own `shared`, so their own engines)."""
    package = into / OLD_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("shared", "sql", "sql_target"):
        text = file_at(ref, f"connectors/{name}.py")
        for inner in ("shared", "sql"):
            text = text.replace(
                f"from connectors.{inner} import", f"from {OLD_PACKAGE}.{inner} import"
            )
        (package / f"{name}.py").write_text(text)
    sys.path.insert(0, str(into))
    return (
        importlib.import_module(f"{OLD_PACKAGE}.sql"),
        importlib.import_module(f"{OLD_PACKAGE}.sql_target"),
    )


class Variant:
    """One version of the connectors: a source and a target per table, built on first use."""

    def __init__(self, name: str, sql: ModuleType, target: ModuleType, url: str, staging: Path):
        self.name = name
        self.sql, self.target, self.url = sql, target, url
        self.sources: dict[int, Any] = {}
        self.targets: dict[int, Any] = {}
        self.staging = LocalStaging(LocalStagingConfig(type="local", path=str(staging)))
        self.fence = 0
        self.compiled = 0
        """Statements compiled anew (a miss of the compiled cache) while counting."""

    def count_compilations(self) -> None:
        """Count compiled-cache misses on the engines this variant's connectors lease."""
        source, target = self.pair(0)
        for engine in {source._connect()[0], target._connect()[0]}:
            sa.event.listen(engine, "after_cursor_execute", self._executed)

    def _executed(
        self, _conn: Any, _cursor: Any, _sql: str, _params: Any, context: Any, _many: bool
    ) -> None:
        if context is not None and context.cache_hit is CACHE_MISS:
            self.compiled += 1

    def pair(self, index: int) -> tuple[Any, Any]:
        if index not in self.sources:
            self.sources[index] = self.sql.SqlSource(
                SqlSourceConfig(type="sql", url=self.url, table=f"src_{index}")
            )
            self.targets[index] = self.target.SqlTarget(
                SqlTargetConfig(type="sql", url=self.url, table=f"dst_{index}_{self.name}")
            )
        return self.sources[index], self.targets[index]

    def window(self, index: int, window: Window) -> None:
        """What the four stages call on the connectors for one window."""
        source, target = self.pair(index)
        pipeline = f"{self.name}{index:04}"
        self.fence += 1
        found = source.fingerprint(window)
        batches: list[Batch] = list(source.iter_batches(window))
        manifest = self.staging.write_window(pipeline, window, f"f{self.fence:08d}", batches)
        loaded = target.load_window(pipeline, manifest, self.staging, fence=self.fence)
        audit = target.audit_window(pipeline, window)
        again = source.fingerprint(window)
        assert found.count == loaded == audit.rows == again.count == 2, (found, loaded, audit)


def round_trips(variant: Variant, windows: list[Window], trace: Path) -> float:
    """Round trips to PostgreSQL a window on one table: the requests (`Query`, `Sync`) the
    frontend sends, from libpq's trace of the engines' pooled connections."""
    source, target = variant.pair(0)
    engines = {source._connect()[0], target._connect()[0]}
    with trace.open("w") as sink:
        for engine in engines:
            with engine.connect() as conn:
                conn.connection.driver_connection.pgconn.trace(sink.fileno())  # type: ignore[union-attr]
        for window in windows:
            variant.window(0, window)
        for engine in engines:
            with engine.connect() as conn:
                conn.connection.driver_connection.pgconn.untrace()  # type: ignore[union-attr]
    sent = [line.split("\t") for line in trace.read_text().splitlines()]
    return sum(1 for f in sent if len(f) > 3 and f[1] == "F" and f[3] in ("Query", "Sync")) / len(
        windows
    )


def _per_window(run: Callable[[], int], database: str) -> tuple[float, float, float]:
    """This process's CPU, the database's PostgreSQL backends' CPU and the wall time, in ms a
    window, of `run()` (which returns how many windows it ran)."""
    cpu, backends, wall = time.process_time(), cpu_seconds([], database), time.perf_counter()
    windows = run()
    return (
        (time.process_time() - cpu) * 1000 / windows,
        (cpu_seconds([], database) - backends) * 1000 / windows,
        (time.perf_counter() - wall) * 1000 / windows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="main")
    parser.add_argument("--tables", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args(argv)
    from connectors import sql as new_sql
    from connectors import sql_target as new_target

    origin = datetime(2026, 11, 1, tzinfo=UTC)
    windows = [
        Window(origin + n * WINDOW, origin + (n + 1) * WINDOW) for n in range(SEEDED_WINDOWS)
    ]
    with pg_database() as url, tempfile.TemporaryDirectory() as tmp:
        log(f"seeding {args.tables} source tables")
        seed(url, args.tables, origin, WINDOW, SEEDED_WINDOWS)
        old_sql, old_target = old_modules(args.ref, Path(tmp))
        variants = [
            Variant("old", old_sql, old_target, url, Path(tmp) / "old"),
            Variant("new", new_sql, new_target, url, Path(tmp) / "new"),
        ]
        log("first use of every table (reflection, target tables created)")
        for variant in variants:
            for index in range(args.tables):
                variant.window(index, windows[0])
            variant.count_compilations()
        database = sa.make_url(url).database or ""
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        cursor = 0
        for number in range(args.rounds):
            spread = [(cursor + k) % args.tables for k in range(args.per_round)]
            cursor = (cursor + args.per_round) % args.tables
            for layout, indexes in (("1 table", [0] * args.per_round), ("spread", spread)):
                order = variants if number % 2 == 0 else variants[::-1]
                for variant in order:

                    def run(variant: Variant = variant, indexes: list[int] = indexes) -> int:
                        for k, index in enumerate(indexes):
                            variant.window(index, windows[k % SEEDED_WINDOWS])
                        return len(indexes)

                    measured = _per_window(run, database)
                    results.setdefault((layout, variant.name), []).append(measured)
            log(f"round {number + 1}/{args.rounds} done")
        print(f"ms a window, median of {args.rounds} rounds of {args.per_round} windows")
        print(f"{'layout':<12} {'measure':<18} {'old':>7} {'new':>7} {'new/old':>8}")
        for layout, label in (("1 table", "1 table"), ("spread", f"{args.tables} tables")):
            for at, measure in enumerate(("worker CPU", "PostgreSQL CPU", "wall")):
                old = median([run[at] for run in results[(layout, "old")]])
                new = median([run[at] for run in results[(layout, "new")]])
                ratio = new / old if old else float("nan")
                print(f"{label:<12} {measure:<18} {old:7.2f} {new:7.2f} {ratio:8.2f}")
        measured = args.rounds * args.per_round * 2
        traced = [windows[k % SEEDED_WINDOWS] for k in range(20)]
        trips = [
            round_trips(variant, traced, Path(tmp) / f"{variant.name}.trace")
            for variant in variants
        ]
        print(f"{'1 table':<12} {'round trips':<18} {trips[0]:7.1f} {trips[1]:7.1f}", end=" ")
        print(f"{trips[1] / trips[0]:8.2f}")
        for variant in variants:
            print(f"{variant.name}: {variant.compiled / measured:.2f} statements compiled a window")
        for variant in variants:
            for item in (*variant.sources.values(), *variant.targets.values()):
                item.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
