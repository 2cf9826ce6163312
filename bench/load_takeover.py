"""What the frozen-loader takeover costs a PostgreSQL load that nobody blocks.

`SqlTarget.load_window` takes the window's ledger row through `take_ledger_row` (a savepoint
under `lock_timeout`, then its release and the `lock_timeout` reset in one simple query: two
round trips more than calling `record_fence` directly). This loads the same 1,000-document
window again and again, one load through the shipped path and one with `take_ledger_row`
replaced by a direct `record_fence`, alternating in one process, and reports the medians and
their ratio.

    python -m bench.load_takeover [--loads N] [--documents N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from bench.common import median, pg_database
from connectors import sql_target
from connectors.base import Batch, Document
from connectors.local import LocalStaging
from connectors.sql_target import SqlTarget, record_fence
from core.config import LocalStagingConfig, SqlTargetConfig
from core.windows import Window


def _direct(conn: sa.Connection, ledger: sa.Table, tag: object, **record: Any) -> int | None:
    """The ledger write without the takeover (what a load did before it)."""
    return record_fence(conn, ledger, **record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=100, help="loads of each kind")
    parser.add_argument("--documents", type=int, default=1000, help="documents in the window")
    args = parser.parse_args()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    window = Window(start, start + timedelta(minutes=15))
    docs = [
        Document(id=str(n), timestamp=start, body={"n": n, "text": "x" * 200})
        for n in range(args.documents)
    ]
    shipped = sql_target.take_ledger_row
    times: dict[str, list[float]] = {"takeover": [], "direct": []}
    with pg_database() as url, tempfile.TemporaryDirectory() as staging_dir:
        staging = LocalStaging(LocalStagingConfig(type="local", path=staging_dir))
        manifest = staging.write_window("bench", window, "f00000001", [Batch(documents=docs)])
        target = SqlTarget(SqlTargetConfig(type="sql", url=url, table="loaded"))
        fence = 1
        try:
            for _ in range(args.loads + 10):  # the first 10 of each warm up
                for name, ledger_write in (("takeover", shipped), ("direct", _direct)):
                    sql_target.take_ledger_row = ledger_write  # type: ignore[assignment]
                    fence += 1
                    began = time.perf_counter()
                    target.load_window("bench", manifest, staging, fence=fence)
                    times[name].append(time.perf_counter() - began)
        finally:
            sql_target.take_ledger_row = shipped
            target.close()
    takeover, direct = median(times["takeover"][10:]), median(times["direct"][10:])
    print(
        f"load of {args.documents} documents, median of {args.loads}: "
        f"with takeover {takeover * 1000:.2f} ms, direct {direct * 1000:.2f} ms, "
        f"ratio {takeover / direct:.3f}"
    )


if __name__ == "__main__":
    main()
