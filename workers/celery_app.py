"""The Celery app: one queue per stage plus `control` and `recheck`, built from a config that
was loaded once.

celery -A workers worker -Q precheck -c 4      (and extract, load, audit, control, recheck)
celery -A workers beat
celery -A workers flower

Like celery-redbeat's settings, the config is resolved once per process and the app is built
from that object: `create_app(config)` is called by whoever owns the process, with the config
it already holds (the `windowpipe` command passes the one it loaded for `--config`); a process
started as `celery -A workers` has nobody to pass one, so `process_app()` loads it once, from
`$WINDOWPIPE_CONFIG` or `./windowpipe.toml`, the first time `workers.app` is asked for. Nothing
reads the config file at import.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import Celery, signals

from beat_schedule import build_schedule
from core.config import Config, load_config
from core.errors import ConfigError
from core.keys import REDBEAT_KEY_PREFIX, REDBEAT_LOCK_KEY
from core.logs import configure_logging
from core.queues import CONTROL_QUEUE, RECHECK_QUEUE
from core.queues import QUEUES as QUEUES  # workers.QUEUES, read by the exporter and tests
from core.records import STAGE_ORDER
from core.retry import CONTROL_TIME_LIMIT, STAGE_POLICIES
from workers.heartbeat import install
from workers.liveness import LivenessSettings

TASK_MODULES = (
    "workers.precheck",
    "workers.extract",
    "workers.load",
    "workers.audit",
    "workers.control",
    "workers.recheck",
)
"""The modules whose tasks (`shared_task`) every app built here registers."""

_app: Celery | None = None
_config: Config | None = None


def celery_settings(config: Config) -> dict[str, Any]:
    """The Celery settings of a windowpipe app for `config` (broker, routes, time limits, beat)."""
    settings = config.settings
    visibility = int(settings.visibility_timeout.total_seconds())
    return {
        "broker_url": settings.broker_url or settings.redis_url,
        "result_backend": settings.result_backend_url or settings.redis_url,
        "broker_transport_options": {"visibility_timeout": visibility},
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # At-least-once: a task is acked after it ran, and re-queued if its worker process dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # The window record is the truth: no task stores its result or a STARTED state in the
        # result backend (two Redis writes fewer per stage task). Flower follows task events,
        # which carry each task's state and result all the same.
        "task_ignore_result": True,
        "task_track_started": False,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "result_expires": 24 * 3600,
        "result_extended": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": CONTROL_QUEUE,
        "task_routes": {
            **{f"windowpipe.{stage.value}": {"queue": stage.value} for stage in STAGE_ORDER},
            "windowpipe.generate": {"queue": CONTROL_QUEUE},
            "windowpipe.generate_batch": {"queue": CONTROL_QUEUE},
            "windowpipe.dispatch": {"queue": CONTROL_QUEUE},
            "windowpipe.cleanup": {"queue": CONTROL_QUEUE},
            "windowpipe.recheck": {"queue": RECHECK_QUEUE},
        },
        "task_annotations": {
            **{
                f"windowpipe.{stage.value}": {
                    "soft_time_limit": STAGE_POLICIES[stage].soft_time_limit,
                    "time_limit": STAGE_POLICIES[stage].time_limit,
                }
                for stage in STAGE_ORDER
            },
            **{
                f"windowpipe.{name}": {"time_limit": CONTROL_TIME_LIMIT}
                for name in ("generate", "generate_batch", "dispatch", "cleanup", "recheck")
            },
        },
        # Beat: celery-redbeat keeps the schedule in Redis and holds a Redis lock, so a second
        # beat started by mistake waits instead of scheduling every job twice.
        "beat_scheduler": "redbeat.RedBeatScheduler",
        "redbeat_redis_url": settings.redis_url,
        "redbeat_key_prefix": REDBEAT_KEY_PREFIX,
        "redbeat_lock_key": REDBEAT_LOCK_KEY,
        "redbeat_lock_timeout": 60,
        "beat_max_loop_interval": 5,
        "beat_schedule": build_schedule(config),
    }


def create_app(config: Config) -> Celery:
    """The windowpipe Celery app for `config`, with every task; this process's app from now on
    (the tasks, `send_chain` and the runtime use it and its config).

    A bad liveness variable (`WINDOWPIPE_HEARTBEAT_*`, `..._TIMEOUT`) ends the process in one
    line, exit 2, as a bad config does.
    """
    global _app, _config
    app = Celery("windowpipe")
    app.conf.update(celery_settings(config))
    # A heartbeat file per worker for liveness probes, and watchdogs that end a worker which
    # lost its broker or cannot finish shutting down (workers/heartbeat.py).
    install(app, _liveness())
    for module in TASK_MODULES:
        importlib.import_module(module)
    _app, _config = app, config
    return app


def process_app() -> Celery:
    """This process's app: the one `create_app` built, else one built now from the config file
    (`$WINDOWPIPE_CONFIG`, else ./windowpipe.toml), loaded once; a bad one exits 2."""
    return _app if _app is not None else create_app(_load())


def process_config() -> Config:
    """The config this process's app was built from."""
    process_app()
    assert _config is not None
    return _config


SECRETLESS_COMMANDS = frozenset({"beat", "flower"})
"""Celery commands that run no task, so reach no connector: they load the config without
requiring the connectors' secrets (least privilege: beat and Flower are given none)."""

CELERY_COMMANDS = frozenset(
    {"worker", "beat", "flower", "events", "inspect", "control", "status", "shell", "call"}
    | {"purge", "result", "migrate", "multi", "graph", "list", "logtool", "amqp", "report"}
)
"""The subcommands of the `celery` program: the first of them on its command line says what
this process is."""


def celery_command(argv: Sequence[str]) -> str | None:
    """The `celery` subcommand on the command line `argv` (`celery -A workers beat` -> beat);
    None when this process is not the `celery` program."""
    program = Path(argv[0]) if argv else Path()
    if program.name != "celery" and program.parts[-2:] != ("celery", "__main__.py"):
        return None
    return next((arg for arg in argv[1:] if arg in CELERY_COMMANDS), None)


def _load() -> Config:
    # A worker, or anything that is not beat or Flower, requires every secret its config
    # names: it refuses to start without one, as `check` and `enqueue` do.
    require_secrets = celery_command(sys.argv) not in SECRETLESS_COMMANDS
    try:
        return load_config(require_secrets=require_secrets)
    except ConfigError as error:
        # Workers, beat and Flower build the app first: fail in one line, exit 2.
        print(f"windowpipe: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _liveness() -> LivenessSettings:
    try:
        return LivenessSettings.from_env()
    except ValueError as error:
        print(f"windowpipe: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    settings = process_config().settings
    configure_logging(settings.log_level, json=settings.log_json)
