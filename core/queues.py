"""The Celery queues' names: one per stage, plus `control` and `recheck`.

Beat's schedule (beat_schedule.py) and the Celery app's routes (workers/celery_app.py) both
name them from here; the deploy manifests are checked against `QUEUES` (tests/test_compose.py,
tests/test_kubernetes.py).
"""

from __future__ import annotations

from core.records import STAGE_ORDER

CONTROL_QUEUE = "control"
"""Generation, dispatch and stale-lock cleanup run here."""

RECHECK_QUEUE = "recheck"
"""Rechecks of finished windows at their horizons: a pool of its own, so a backlog of rechecks
never holds up live windows."""

QUEUES = (*(stage.value for stage in STAGE_ORDER), CONTROL_QUEUE, RECHECK_QUEUE)
"""Every queue a windowpipe deployment needs a worker pool for; a stage's queue is its name."""
