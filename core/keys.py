"""Every Redis key windowpipe uses, spelled once.

Deployments, dashboards and tests rely on these exact strings: change one and a running
deployment's locks, requests and records are orphaned (and `windowpipe locks` no longer sees
old locks). Celery's own keys (queues, results) are Celery's and not listed here.
"""

from __future__ import annotations

from datetime import datetime

from core.instants import format_instant

WINDOW_LOCK_PREFIX = "windowpipe:lock:"
"""Window locks (`core.locks.WindowLock`): `windowpipe:lock:<pipeline>:<window start>`."""

DISPATCH_LOCK = "windowpipe:dispatch:{pipeline}"
"""The per-pipeline dispatch lock (`core.locks.DispatchLock`)."""

DISPATCH_REQUESTED = "windowpipe:dispatch-requested:{pipeline}"
"""Flag: a dispatch of the pipeline is queued and has not started yet (workers/runtime.py)."""

DISPATCH_RECENT = "windowpipe:dispatch-recent:{pipeline}"
"""Lives a short spacing after a dispatch of the pipeline started (workers/runtime.py)."""

RECHECK_LOCK = "windowpipe:recheck:{pipeline}"
"""The per-pipeline recheck lock (`core.locks.RecheckLock`): one recheck run at a time."""

CLEANUP_RAN_KEY = "windowpipe:ran:cleanup"
"""Hash: the last completed stale-lock cleanup (`at`: ISO instant, `worker`: node name)."""

GENERATE_RAN_KEY = "windowpipe:ran:generate:{pipeline}"
"""Hash: the last completed generation tick of a pipeline (`at`, `worker`)."""

REDBEAT_KEY_PREFIX = "windowpipe:redbeat:"
"""celery-redbeat's schedule entries."""

REDBEAT_LOCK_KEY = "windowpipe:redbeat:lock"
"""celery-redbeat's lock: one beat schedules at a time."""


def window_lock_key(pipeline: str, window_start: datetime) -> str:
    """The key of a window's lock."""
    return f"{WINDOW_LOCK_PREFIX}{pipeline}:{format_instant(window_start)}"


def dispatch_lock_key(pipeline: str) -> str:
    return DISPATCH_LOCK.format(pipeline=pipeline)


def dispatch_requested_key(pipeline: str) -> str:
    return DISPATCH_REQUESTED.format(pipeline=pipeline)


def dispatch_recent_key(pipeline: str) -> str:
    return DISPATCH_RECENT.format(pipeline=pipeline)


def recheck_lock_key(pipeline: str) -> str:
    return RECHECK_LOCK.format(pipeline=pipeline)


def generate_ran_key(pipeline: str) -> str:
    """The key of a pipeline's last generation run."""
    return GENERATE_RAN_KEY.format(pipeline=pipeline)
