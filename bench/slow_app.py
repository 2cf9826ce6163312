"""windowpipe's Celery app with the `sql` source type served by `bench.slow_source`.

`celery -A bench.slow_app worker -Q extract`: the same tasks, settings and runtime as
`celery -A workers`, only each source page takes `WINDOWPIPE_BENCH_PAGE_LATENCY_MS` longer.
"""

from __future__ import annotations

import workers
from connectors.registry import CONNECTORS

CONNECTORS["source"].classes["sql"] = "bench.slow_source:SlowSqlSource"

app = workers.app
