"""The Prometheus exporter behind `windowpipe metrics`: one process that reads the state store
and the broker's queues (a custom prometheus_client Collector), so its numbers are right
whatever the number of worker hosts. It reads them every `--refresh` seconds in the background
and answers scrapes from memory with their age (`ScrapeCache`), or at each scrape
(`--refresh 0`).

It never writes: a state store without the newest schema is reported as a source that is down
(`windowpipe_exporter_source_up{source="state_store"} 0`) until something migrates it, and the
exporter keeps serving. What each window metric measures is in `core/metrics.py`. The queues
whose depth it reports are `workers.QUEUES` (reading them builds no Celery app and reads no
config).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import redis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from core.config import Config
from core.control_runs import read_last_runs
from core.instants import utc_now
from core.logs import get_logger
from core.metrics import CHAIN_STAGE, HighWater, WindowMetrics, read_window_metrics
from core.store import StateStore
from workers.celery_app import QUEUES

BROKER_TIMEOUT_SECONDS = 5.0
"""How long a scrape waits for the Redis broker before reporting it down."""

log = get_logger("windowpipe.exporter")


def queue_list_names(queue: str) -> list[str]:
    """The Redis lists holding a Celery queue's waiting messages on kombu's Redis transport.

    kombu keeps one list per priority step: the queue's own name for priority 0, and
    `name + "\\x06\\x16" + step` for the others (3, 6, 9 by default). A message a worker has
    taken but not acked (acks_late) is in kombu's `unacked` hash, not in these lists.
    """
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]


def queue_depths(client: redis.Redis, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each queue: the sum of LLEN over its priority lists, one round
    trip."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for name in queue_list_names(queue):
            pipe.llen(name)
    lengths = iter(pipe.execute())
    return {queue: sum(int(next(lengths)) for _ in queue_list_names(queue)) for queue in queues}


def _broker_client(config: Config) -> redis.Redis | None:
    """A client of the broker when it is Redis; None for another broker (RabbitMQ has its own
    exporter for queue depths)."""
    url = config.settings.broker_url or config.settings.redis_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return redis.Redis.from_url(
        url, socket_timeout=BROKER_TIMEOUT_SECONDS, socket_connect_timeout=BROKER_TIMEOUT_SECONDS
    )


class WindowpipeCollector(Collector):
    """Reads the state store and the broker on every scrape and yields the metric families."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        *,
        broker: redis.Redis | None = None,
        queues: Sequence[str] = QUEUES,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        self.store = store
        self.broker = broker if broker is not None else _broker_client(config)
        self.queues = tuple(queues)
        self.clock = clock
        self._store_problem: str | None = None
        # The counters, held at their highest value so a re-run window never lowers them.
        self._counters = HighWater()

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "windowpipe_exporter_source_up",
            "1 when the exporter could read the source at this scrape (state_store, broker).",
            labels=["source"],
        )
        windows = self._read_windows()
        up.add_metric(["state_store"], 1 if windows is not None else 0)
        if windows is not None:
            yield from self._window_families(windows)
            yield from self._recheck_families(windows)
        yield from self._config_families()
        yield from self._control_families()
        if self.broker is not None:
            depths = self._read_depths()
            up.add_metric(["broker"], 1 if depths is not None else 0)
            if depths is not None:
                depth = GaugeMetricFamily(
                    "windowpipe_queue_depth",
                    "Messages waiting in the Celery queue (LLEN of its Redis lists, every "
                    "priority); messages taken by a worker are not counted.",
                    labels=["queue"],
                )
                for queue, count in depths.items():
                    depth.add_metric([queue], count)
                yield depth
        yield up

    # --- reading -------------------------------------------------------------------------------

    def _read_windows(self) -> WindowMetrics | None:
        try:
            current, head = self.store.schema_revision()
            if current != head:
                self._store_down(
                    f"state store schema is at {current or 'nothing'}, this windowpipe reads "
                    f"{head}; run `windowpipe migrate` (the exporter never migrates)"
                )
                return None
            pipelines = self.config.pipelines
            metrics = read_window_metrics(
                self.store,
                {name: p.start for name, p in pipelines.items()},
                self.clock(),
                recheck={name: p.recheck for name, p in pipelines.items()},
            )
        except Exception as error:
            self._store_down(f"cannot read the state store: {type(error).__name__}: {error}")
            return None
        if self._store_problem is not None:
            log.info("state store readable again")
            self._store_problem = None
        return metrics

    def _store_down(self, problem: str) -> None:
        # Said once per change, not at every scrape.
        if problem != self._store_problem:
            log.warning("state store not reported", problem=problem.splitlines()[0])
        self._store_problem = problem

    def _read_depths(self) -> dict[str, int] | None:
        assert self.broker is not None
        try:
            return queue_depths(self.broker, self.queues)
        except redis.RedisError as error:
            log.warning("broker queue depths not reported", error=str(error))
            return None

    # --- families ------------------------------------------------------------------------------

    def _recheck_families(self, metrics: WindowMetrics) -> Iterable[Metric]:
        """Rechecks of closed windows (core/recheck.py), for pipelines with `recheck` horizons
        (drifted windows for every pipeline: reconcile finds drift too)."""
        drifted = CounterMetricFamily(
            "windowpipe_drift_windows",
            "Windows whose source no longer matched what was loaded (found by a recheck or "
            "reconcile) and were re-run.",
            labels=["pipeline"],
        )
        done = CounterMetricFamily(
            "windowpipe_rechecks",
            "Recheck horizons passed by finished windows (one source count each).",
            labels=["pipeline"],
        )
        pending = GaugeMetricFamily(
            "windowpipe_rechecks_pending",
            "Finished windows that reached a recheck horizon and wait for their recheck.",
            labels=["pipeline"],
        )
        hold = self._counters.hold
        for name, item in metrics.pipelines.items():
            drifted.add_metric([name], hold(("drift", name), item.drifted))
            done.add_metric([name], hold(("rechecks", name), item.rechecks_passed))
            pending.add_metric([name], item.rechecks_pending)
        yield from (drifted, done, pending)

    def _control_families(self) -> Iterable[Metric]:
        """When generation (per pipeline) and cleanup last completed (core/control_runs.py), read
        from Redis: a timestamp that stops moving means nobody consumes the control queue."""
        try:
            client = redis.Redis.from_url(
                self.config.settings.redis_url,
                socket_timeout=BROKER_TIMEOUT_SECONDS,
                socket_connect_timeout=BROKER_TIMEOUT_SECONDS,
            )
            try:
                activity = read_last_runs(client, sorted(self.config.pipelines))
            finally:
                client.close()
        except redis.RedisError as error:
            log.warning("control activity not reported", error=str(error))
            return
        last = GaugeMetricFamily(
            "windowpipe_control_last_run_timestamp_seconds",
            "Unix time the control task last completed: generation per pipeline, cleanup "
            '(pipeline="").',
            labels=["task", "pipeline"],
        )
        if activity.cleanup is not None:
            last.add_metric(["cleanup", ""], activity.cleanup.at.timestamp())
        for name, run in sorted(activity.generation.items()):
            if run is not None:
                last.add_metric(["generate", name], run.at.timestamp())
        yield last

    def _config_families(self) -> Iterable[Metric]:
        settings = (
            ("window", "The pipeline's window size (config `window`)."),
            ("lag", "How long after a window's end it is due (config `lag`)."),
            ("every", "How often generation runs (config `every`)."),
        )
        for key, text in settings:
            family = GaugeMetricFamily(
                f"windowpipe_pipeline_{key}_seconds", text + " In seconds.", labels=["pipeline"]
            )
            for name, pipeline in sorted(self.config.pipelines.items()):
                family.add_metric([name], getattr(pipeline, key).total_seconds())
            yield family

    def _window_families(self, metrics: WindowMetrics) -> Iterable[Metric]:
        freshness = GaugeMetricFamily(
            "windowpipe_freshness_seconds",
            "Now minus the end of the newest window such that it and every window before it "
            "succeeded or were skipped (now minus the pipeline's start when none is).",
            labels=["pipeline"],
        )
        windows = GaugeMetricFamily(
            "windowpipe_windows", "Window records by status.", labels=["pipeline", "status"]
        )
        attempts = GaugeMetricFamily(
            "windowpipe_window_attempts",
            "The most attempts used by any window still being retried (pending, queued, "
            "running or failed; dead windows are windowpipe_dead_windows); 0 when there is none.",
            labels=["pipeline"],
        )
        dead = GaugeMetricFamily(
            "windowpipe_dead_windows",
            "Windows dead after max_attempts attempts.",
            labels=["pipeline"],
        )
        audit = GaugeMetricFamily(
            "windowpipe_audit_failures",
            "Windows failed or dead because their last attempt's audit found source, staged "
            "and target counts disagreeing (or documents rejected).",
            labels=["pipeline"],
        )
        waiting = GaugeMetricFamily(
            "windowpipe_windows_waiting",
            "Windows queued at a stage, waiting for a worker of that stage (from the records).",
            labels=["pipeline", "stage"],
        )
        running = GaugeMetricFamily(
            "windowpipe_windows_running",
            "Windows running at a stage (from the records).",
            labels=["pipeline", "stage"],
        )
        seconds = HistogramMetricFamily(
            "windowpipe_stage_seconds",
            "Seconds of a succeeded window's latest attempt, from its first claim (precheck) to "
            'its audit commit, waits between stages included (stage="chain": the records hold '
            "no time per stage). Never decreases: held at its highest while a window re-runs.",
            labels=["pipeline", "stage"],
        )
        rows = CounterMetricFamily(
            "windowpipe_rows",
            "Documents of succeeded windows: counted in the source by precheck, written to the "
            "stage by extract, in the target after load. Never decreases: held at its highest "
            "while a window re-runs.",
            labels=["pipeline", "stage"],
        )
        for name, item in metrics.pipelines.items():
            freshness.add_metric([name], item.freshness.seconds)
            for status, count in item.windows.items():
                windows.add_metric([name, status], count)
            attempts.add_metric([name], item.max_attempts_unfinished)
            dead.add_metric([name], item.dead)
            audit.add_metric([name], item.audit_failures)
            for stage, count in item.waiting.items():
                waiting.add_metric([name, stage], count)
            for stage, count in item.running.items():
                running.add_metric([name, stage], count)
            # Counters: held at their high-water mark (core/metrics.py HighWater).
            histogram = self._counters.histogram(("chain_seconds", name), item.chain_seconds)
            buckets: list[tuple[str, float]] = [
                (_bound(bound), count)
                for bound, count in zip(histogram.bounds, histogram.cumulative, strict=True)
            ]
            buckets.append(("+Inf", histogram.count))
            seconds.add_metric([name, CHAIN_STAGE], buckets, histogram.total)
            for stage, count in item.rows.items():
                rows.add_metric([name, stage], self._counters.hold(("rows", name, stage), count))
        yield from (freshness, windows, attempts, dead, audit, waiting, running, seconds, rows)


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def registry_for(collector: Collector) -> CollectorRegistry:
    """A registry holding only `collector` (no process or platform metrics of the exporter)."""
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def render(collector: Collector) -> str:
    """The Prometheus text exposition of one scrape."""
    return generate_latest(registry_for(collector)).decode()


DATA_AGE_METRIC = "windowpipe_exporter_data_age_seconds"
"""Seconds since the numbers served were read (0 when they are read at each scrape)."""


class ScrapeCache:
    """The collector's exposition, rendered every `interval` seconds in the background and
    served from memory with its age: a scrape answers at once, whatever the number of pipelines
    (reading and rendering 1,000 pipelines' numbers takes about a second of CPU), and
    Prometheus's scrape timeout never cuts one short.

    A rendering that fails keeps the previous one, whose age then grows
    (`windowpipe_exporter_data_age_seconds`); the collector itself reports a source it cannot
    read as down.
    """

    def __init__(self, collector: Collector, clock: Callable[[], float] = time.monotonic) -> None:
        self.collector = collector
        self.clock = clock
        self._guard = threading.Lock()
        self._text = ""
        self._at = clock()

    def refresh(self) -> None:
        """Read and render now; the next scrapes serve this rendering."""
        text = render(self.collector)
        with self._guard:
            self._text, self._at = text, self.clock()

    def run(self, stop: threading.Event, interval: float) -> None:
        """Refresh every `interval` seconds until `stop` is set."""
        while not stop.wait(interval):
            try:
                self.refresh()
            except Exception as error:  # keep serving the last rendering; its age says so
                log.warning("metrics not refreshed", error=f"{type(error).__name__}: {error}")

    def exposition(self) -> bytes:
        """The last rendering, and its age in seconds."""
        with self._guard:
            text, at = self._text, self._at
        age = max(self.clock() - at, 0.0)
        return (
            f"{text}# HELP {DATA_AGE_METRIC} Seconds since the numbers served were read.\n"
            f"# TYPE {DATA_AGE_METRIC} gauge\n{DATA_AGE_METRIC} {age:.3f}\n"
        ).encode()

    def wsgi_app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """Every path answers the exposition (as prometheus_client's own server does)."""
        body = self.exposition()
        start_response(
            "200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))]
        )
        return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


def serve(
    collector: Collector,
    address: str,
    port: int,
    announce: Callable[[str], Any],
    *,
    refresh: float = 0.0,
) -> None:
    """Serve `/metrics` on `address:port` until SIGTERM or SIGINT; `announce` gets one line
    naming the URL (with the port bound, when `port` is 0). With `refresh` seconds, the numbers
    are read in the background that often and served from memory with their age
    (`ScrapeCache`); with 0, at each scrape."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    server: Any
    if refresh > 0:
        cache = ScrapeCache(collector)
        cache.refresh()
        server = make_server(
            address, port, cache.wsgi_app, ThreadingWSGIServer, handler_class=_QuietHandler
        )
        threads.append(threading.Thread(target=server.serve_forever, daemon=True))
        threads.append(threading.Thread(target=cache.run, args=(stop, refresh), daemon=True))
        for thread in threads:
            thread.start()
    else:
        server, thread = start_http_server(port, addr=address, registry=registry_for(collector))
        threads.append(thread)

    def _stop(*_: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        announce(f"serving http://{address}:{server.server_port}/metrics")
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.shutdown()
        server.server_close()
        for thread in threads:
            thread.join(5)
