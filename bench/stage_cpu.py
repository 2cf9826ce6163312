"""`python -m bench.stage_cpu [--rounds R] [--batch B]`: the CPU of windowpipe's four stage
bodies for one tiny window (one document), in one process, without Celery: what bench 1's
stage workers spend beyond the bare chain, measured without its noise.

Bench 1's pipeline (a SQL source table on PostgreSQL, a local staging, a SQL target table, the
state store on PostgreSQL, the window locks in Redis): each round queues B windows and runs
`core.runner.run_stage` for each stage of each window in turn, as the stage workers would.
Per stage, the client's CPU (`time.process_time`) and the CPU of the bench database's
PostgreSQL backends (from /proc), divided by B; medians over R rounds after a warm-up round.
Redis's CPU is not counted. The baseline is bench 1's bare chain, whose four no-op tasks do
none of this work: compare with bench 1's "by worker" split.

For a before/after, run this file by its path with `PYTHONPATH` set to an older checkout
(`PYTHONPATH=../old python bench/stage_cpu.py`): everything it imports, the stages too, is then
the older checkout's, timed the same way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import bulk
from bench.common import (
    cpu_seconds,
    log,
    pg_database,
    redis_db,
    schema_url,
    sql_pipeline,
    write_config,
)
from bench.orchestration import ORIGIN, PIPELINE, SIZE, _seed
from core.instants import format_instant
from core.logs import configure_logging
from core.records import STAGE_ORDER, WindowKind, WindowStatus
from core.runner import run_stage
from core.windows import Window


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds")
    parser.add_argument("--batch", type=int, default=200, help="windows per round")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="windowpipe-stage-cpu-"))
    total = (args.rounds + 1) * args.batch
    with pg_database() as database_url, redis_db() as redis_url:
        database = database_url.rsplit("/", 1)[1]
        data_url = schema_url(database_url, "orchestration")
        state_url = schema_url(database_url, "orchestration_state")
        _seed(data_url, total)
        config_path = write_config(
            workdir / "stage-cpu.toml",
            {"redis_url": redis_url, "state_url": state_url, "log_level": "INFO"},
            {
                PIPELINE: sql_pipeline(
                    data_url, workdir / "stage", "events_loaded", format_instant(ORIGIN)
                )
            },
        )
        # The stage log lines are written as a worker writes them, to a file nobody reads.
        sink = (workdir / "stages.log").open("w")
        sys.stderr, real_stderr = sink, sys.stderr
        try:
            configure_logging("INFO")
        finally:
            sys.stderr = real_stderr
        rt = bulk.runtime(config_path)
        store = rt.store
        windows = [Window(ORIGIN + i * SIZE, ORIGIN + (i + 1) * SIZE) for i in range(total)]
        store.create_windows(PIPELINE, windows, kind=WindowKind.MANUAL)
        for window in windows:
            store.queue(PIPELINE, window.start, expect=[WindowStatus.PENDING])
        client_ms: dict[str, list[float]] = {stage.value: [] for stage in STAGE_ORDER}
        server_ms: dict[str, list[float]] = {stage.value: [] for stage in STAGE_ORDER}
        for round_number in range(args.rounds + 1):
            batch = windows[round_number * args.batch : (round_number + 1) * args.batch]
            for stage in STAGE_ORDER:
                began, backends = time.process_time(), cpu_seconds([], database)
                for window in batch:
                    result = run_stage(rt, stage, PIPELINE, window.start)
                    if not result.continues_chain and result.status != WindowStatus.SUCCEEDED:
                        raise RuntimeError(f"{stage.value} stopped: {result.summary()}")
                if round_number == 0:
                    continue  # warm-up: every statement prepared, every file path made once
                spent = (time.process_time() - began) * 1000 / len(batch)
                client_ms[stage.value].append(spent)
                spent = (cpu_seconds([], database) - backends) * 1000 / len(batch)
                server_ms[stage.value].append(spent)
        bulk.close(rt)
        sink.close()
    log(f"CPU ms per window, medians of {args.rounds} rounds of {args.batch} windows:")
    log("stage        client   PostgreSQL")
    for stage in STAGE_ORDER:
        name = stage.value
        log(
            f"{name:10s} {statistics.median(client_ms[name]):8.2f} "
            f"{statistics.median(server_ms[name]):10.2f}"
        )
    client_total = sum(statistics.median(v) for v in client_ms.values())
    server_total = sum(statistics.median(v) for v in server_ms.values())
    log(f"{'all four':10s} {client_total:8.2f} {server_total:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
