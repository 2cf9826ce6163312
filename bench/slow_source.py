"""A SQL source with a fixed latency added to every page, as a remote search engine has.

`celery -A bench.slow_app worker -Q extract` runs windowpipe's own tasks with this source in
place of `sql`; the latency comes from `WINDOWPIPE_BENCH_PAGE_LATENCY_MS`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from connectors.base import Batch
from connectors.sql import SqlSource
from core.windows import Window

PAGE_LATENCY_ENV = "WINDOWPIPE_BENCH_PAGE_LATENCY_MS"
"""Milliseconds added before each page (and each count) the source returns."""


def page_latency() -> float:
    return float(os.environ.get(PAGE_LATENCY_ENV, "0")) / 1000


class SlowSqlSource(SqlSource):
    """`SqlSource` that waits `page_latency()` per request, releasing the GIL like I/O does."""

    def count(self, window: Window) -> int:
        time.sleep(page_latency())
        return super().count(window)

    def iter_batches(self, window: Window) -> Iterator[Batch]:
        delay = page_latency()
        for batch in super().iter_batches(window):
            time.sleep(delay)
            yield batch
