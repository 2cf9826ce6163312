"""Celery workers: `celery -A workers worker -Q <precheck|extract|load|audit|control|recheck>`,
`celery -A workers beat`, `celery -A workers flower`.

`import workers` imports no Celery and reads no config (the liveness probe, `python -m
workers.liveness`, runs on the standard library alone): the `windowpipe` command imports worker
modules with the config it already loaded (and builds the app from it,
`workers.celery_app.create_app`). Celery asks for `workers.app`; only then is the config
loaded, once, and the app built with every task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    from workers.celery_app import QUEUES

    app: Celery

__all__ = ["QUEUES", "app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from workers.celery_app import process_app

        return process_app()
    if name == "QUEUES":
        from workers.celery_app import QUEUES

        return QUEUES
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
