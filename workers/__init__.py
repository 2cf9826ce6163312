"""Celery workers: `celery -A workers worker -Q <precheck|extract|load|audit|control|recheck>`,
`celery -A workers beat`, `celery -A workers flower`.

`import workers` reads no config: the `windowpipe` command imports worker modules with the
config it already loaded (and builds the app from it, `workers.celery_app.create_app`). Celery
asks for `workers.app`; only then is the config loaded, once, and the app built with every task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.celery_app import QUEUES, process_app

if TYPE_CHECKING:
    from celery import Celery

    app: Celery

__all__ = ["QUEUES", "app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        return process_app()
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
