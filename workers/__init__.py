"""Celery workers: `celery -A workers worker -Q <precheck|extract|load|audit|control>`.

The Celery app and its tasks load on first use of `workers.app` (or `QUEUES`, or a task
module), not on `import workers`: the app reads the config when it is built, and
`workers.demo` must be importable before the demo has written its config.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers import audit, control, extract, load, precheck, recheck
    from workers.celery_app import QUEUES, app

__all__ = ["QUEUES", "app", "audit", "control", "extract", "load", "precheck", "recheck"]

_TASK_MODULES = ("audit", "control", "extract", "load", "precheck", "recheck")


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'workers' has no attribute {name!r}")
    # Importing the stage modules registers their tasks on the app.
    for module in _TASK_MODULES:
        importlib.import_module(f"workers.{module}")
    celery_app = importlib.import_module("workers.celery_app")
    globals().update(app=celery_app.app, QUEUES=celery_app.QUEUES)
    return globals()[name]
