"""3. Memory: peak RSS of a process that runs the extract stage of one window, for a small
(100k documents) and a large (1M) window. Extract streams page by page, so the peak should not
grow with the window: the target is large <= 1.2x small.

The parent runs precheck in-process; a fresh child (`python -m bench.memory CONFIG INDEX`)
imports what a worker imports, runs extract, and prints its `ru_maxrss` as JSON.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench import bulk
from bench.common import REPO, Row, log
from core.records import Stage

TARGET_RATIO = 1.2


def _extract_peak(data: bulk.BulkData, index: int) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of a child process extracting window `index`."""
    rt = bulk.runtime(data.config_path)
    try:
        target = bulk.queue_window(rt, index)
        bulk.run_stages(rt, target, [Stage.PRECHECK])
    finally:
        bulk.close(rt)
    output = subprocess.run(
        [sys.executable, "-m", "bench.memory", str(data.config_path), str(index)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    report = json.loads(output.strip().splitlines()[-1])
    return report["maxrss_mib"], report["seconds"]


def run(quick: bool, data: bulk.BulkData, small: int, large: int) -> list[Row]:
    peaks = {}
    for documents in (small, large):
        peak, seconds = _extract_peak(data, data.index_of(documents))
        peaks[documents] = peak
        log(f"memory: extract of {documents:,} documents peaked at {peak:.1f} MiB ({seconds:.1f}s)")
    ratio = peaks[large] / peaks[small]
    return [
        Row(
            "3. memory",
            f"extract peak RSS MiB, {large:,} vs {small:,} docs",
            peaks[large],
            peaks[small],
            ratio,
            f"<= {TARGET_RATIO}x",
            ratio <= TARGET_RATIO,
            note="ru_maxrss of a fresh process running extract for one window (one run each)",
        )
    ]


def _child(config_path: str, index: int) -> None:
    from core.logs import configure_logging

    configure_logging("WARNING")
    rt = bulk.runtime(Path(config_path))
    began = time.perf_counter()
    bulk.run_stages(rt, bulk.window(index), [Stage.EXTRACT])
    seconds = time.perf_counter() - began
    bulk.close(rt)
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"maxrss_mib": maxrss_kib / 1024, "seconds": seconds}))


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
