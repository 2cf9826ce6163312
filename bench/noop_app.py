"""The orchestration baseline: a bare Celery chain of four no-op tasks on the stage queues.

`celery -A bench.noop_app worker -Q <stage>` with the same broker, result backend and task
settings as windowpipe's app (`workers.celery_app.celery_settings` of the same config file),
so the only difference measured is windowpipe's work around each task.

The tasks are `bench.noop_tasks.register_noop_tasks`: the last one records when it finished
in Redis, which is how the bench knows a chain completed without polling a result per chain.
"""

from __future__ import annotations

from celery import Celery

from bench.noop_tasks import register_noop_tasks
from core.config import load_config
from workers.celery_app import celery_settings

config = load_config()
settings = config.settings
windowpipe_settings = celery_settings(config)

SHARED_SETTINGS = (
    "broker_url",
    "result_backend",
    "broker_transport_options",
    "result_backend_transport_options",
    "broker_connection_retry_on_startup",
    "task_serializer",
    "result_serializer",
    "accept_content",
    "task_acks_late",
    "task_reject_on_worker_lost",
    "worker_prefetch_multiplier",
    "task_track_started",
    "task_send_sent_event",
    "worker_send_task_events",
    "result_expires",
    "result_extended",
    "worker_hijack_root_logger",
)
"""windowpipe's app settings that shape how a task message travels; the baseline uses them."""


app = Celery("bench-noop")
app.conf.update({name: windowpipe_settings[name] for name in SHARED_SETTINGS})
app.conf.task_default_queue = "control"
register_noop_tasks(app, settings.redis_url)
