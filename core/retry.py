"""Retry policy as data, and the one pure function that computes backoff.

Two levels, on purpose:
- inside a step, tenacity retries a connector call a few times quickly (a dropped connection);
- across task runs, a stage that still fails transiently is re-sent with a growing countdown;
  after `task_retries` the window is marked failed, and generation re-queues it while the
  window has attempts left (then it is dead).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from core.errors import TransientError
from core.logs import get_logger
from core.records import Stage

T = TypeVar("T")


@dataclass(frozen=True)
class StagePolicy:
    """How one stage runs: its time limits and its retries."""

    soft_time_limit: float
    """Seconds before the task is asked to stop (SoftTimeLimitExceeded: a transient failure)."""
    time_limit: float
    """Seconds before the worker kills the task's process."""
    step_attempts: int = 3
    """Tries of one connector call inside the task (tenacity)."""
    step_wait_max: float = 2.0
    task_retries: int = 4
    """Re-sends of the stage after transient failures before the window is marked failed."""
    backoff_base: float = 2.0
    backoff_cap: float = 120.0


STAGE_POLICIES: dict[Stage, StagePolicy] = {
    Stage.PRECHECK: StagePolicy(soft_time_limit=300, time_limit=330),
    Stage.EXTRACT: StagePolicy(soft_time_limit=3600, time_limit=3660),
    Stage.LOAD: StagePolicy(soft_time_limit=3600, time_limit=3660),
    Stage.AUDIT: StagePolicy(soft_time_limit=600, time_limit=630),
}
"""Per-stage policy. The Redis visibility timeout must exceed the largest time limit plus the
largest backoff, or Redis redelivers tasks that are still running (celery/celery#5935)."""

CONTROL_TIME_LIMIT = 300.0
"""Hard time limit of generation, dispatch and cleanup tasks."""


def longest_task_seconds() -> float:
    """The longest a stage task can take, including its largest retry countdown."""
    return max(p.time_limit + p.backoff_cap for p in STAGE_POLICIES.values())


def backoff_seconds(
    retry_number: int,
    *,
    base: float = 2.0,
    cap: float = 120.0,
    jitter: Callable[[float, float], float] = random.uniform,
) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, capped.

    retry 0 -> [0.5, 1] * base, retry 1 -> [0.5, 1] * 2 base, ... never above cap.
    """
    if retry_number < 0:
        raise ValueError("retry_number must not be negative")
    ceiling = min(cap, base * (2**retry_number))
    return ceiling / 2 + jitter(0, ceiling / 2)


def call_with_retries(policy: StagePolicy, function: Callable[[], T]) -> T:
    """Call `function`, retrying TransientError a few times with short jittered waits; each
    retry is logged (a window that succeeds in the end shows no error on its record)."""
    retrying = retry(
        retry=retry_if_exception_type(TransientError),
        stop=stop_after_attempt(policy.step_attempts),
        wait=wait_exponential_jitter(initial=0.2, max=policy.step_wait_max),
        before_sleep=_log_retry,
        reraise=True,
    )
    return retrying(function)()


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else None
    get_logger("windowpipe.retry").warning(
        "transient error, retrying",
        attempt=state.attempt_number,
        wait=round(wait, 2) if wait is not None else None,
        error=str(error),
    )
