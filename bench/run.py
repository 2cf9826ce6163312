"""`python -m bench.run [--quick] [--only N ...]`: run the benchmarks, print the table and write
docs/BENCHMARKS.md. Needs Redis and PostgreSQL (`make services`); takes its own Redis DB and
PostgreSQL database and removes both at the end.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    backfill,
    bulk,
    exporter_scrape,
    extract_search,
    generation,
    many_pipelines,
    memory,
    orchestration,
    scaling,
    throughput,
    web,
)
from bench.common import REPO, Row, log, pg_database, redis_db, run_lines, table_lines
from core.logs import configure_logging

LARGE = 1_000_000
SMALL = 100_000
QUICK_LARGE = 200_000
QUICK_SMALL = 20_000


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = f", {int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
    except OSError:
        pass
    import os

    return (
        f"{os.cpu_count()} cores ({cpu}){memory_gib}; {platform.platform()}; "
        f"Python {platform.python_version()}"
    )


def _report(rows: list[Row], args: argparse.Namespace, seconds: float) -> str:
    command = "python -m bench.run" + (" --quick" if args.quick else "")
    if args.only:
        command += " --only " + " ".join(str(n) for n in args.only)
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench.run`); `--quick` for a short run. Machines",
        "here are shared and noisy, so each number is a median of several runs and is read as a",
        "ratio against a baseline measured by the same script at the same time.",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {_machine()}",
        f"- command: `{command}` ({'quick' if args.quick else 'full'} run, {seconds / 60:.1f} min)",
        "- services: Redis 127.0.0.1:6379 (a private DB number), PostgreSQL 127.0.0.1:5432",
        "  (a private database), `celery worker` subprocesses",
        "",
        "## Results",
        "",
        *table_lines(rows),
        "",
        "Ratio is windowpipe / baseline (for latency, memory, generation time and the web view's",
        "server time lower is better; for the rest higher is better).",
        "",
        "## Runs and setup",
        "",
        *run_lines(rows),
        "",
        (Path(__file__).with_name("FINDINGS.md")).read_text().strip(),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs (~3 min)")
    parser.add_argument(
        "--only", type=int, nargs="+", choices=range(1, 11), help="run only these benchmarks"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "docs" / "BENCHMARKS.md",
        help="where to write the report (default docs/BENCHMARKS.md)",
    )
    args = parser.parse_args(argv)
    selected = set(args.only or range(1, 11))
    large, small = (QUICK_LARGE, QUICK_SMALL) if args.quick else (LARGE, SMALL)
    configure_logging("WARNING")
    began = time.monotonic()
    rows: list[Row] = []
    workdir = Path(tempfile.mkdtemp(prefix="windowpipe-bench-"))
    try:
        with pg_database() as database_url, redis_db() as redis_url:
            if 5 in selected:
                rows += generation.run(args.quick, database_url, workdir)
            if 1 in selected:
                rows += orchestration.run(args.quick, database_url, redis_url, workdir)
            if 4 in selected:
                rows += scaling.run(args.quick, database_url, redis_url, workdir)
            if selected & {2, 3}:
                log(f"seeding windows of {large:,} and {small:,} documents")
                data = bulk.seed(database_url, redis_url, workdir, [large, small])
                if 2 in selected:
                    rows += throughput.run(args.quick, data, large)
                if 3 in selected:
                    rows += memory.run(args.quick, data, small, large)
            if 6 in selected:
                rows += backfill.run(args.quick, database_url, redis_url, workdir)
            if 7 in selected:
                rows += extract_search.run(args.quick)
            if 8 in selected:
                rows += many_pipelines.run(args.quick, database_url, redis_url, workdir)
            if 9 in selected:
                rows += web.run(args.quick, database_url, redis_url)
            if 10 in selected:
                rows += exporter_scrape.run(args.quick, database_url, redis_url, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows.sort(key=lambda row: row.benchmark)
    seconds = time.monotonic() - began
    print("\n".join(table_lines(rows)))
    print(f"\n{seconds / 60:.1f} min; report written to {args.output}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(_report(rows, args, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
