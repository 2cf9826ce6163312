"""The retry budget: which layer retries what, as data, and the pure functions over it.

A failing call is retried by exactly these layers, innermost first, and by nothing else:

- client SDKs: nothing (`SDK_RETRIES`; elasticsearch-py, opensearch-py and botocore are
  built with their retries off);
- step: tenacity tries a connector call that raised `TransientError` `step_attempts` times
  (default 3), with short jittered waits;
- task: a stage whose step gave up, or that reached its soft time limit, is re-sent
  `task_retries` times (default 4) with a growing countdown, then the window is failed;
- window: a failed window is queued again, from its recorded stage, after
  `failed_retry_delay`, until it has had `max_attempts` attempts (default 5); then it is dead.

Every wait grows by the one formula `backoff_ceiling` (base, 2 base, 4 base, ... up to a cap):
the task countdown and the step waits with jitter (`backoff_seconds`), the failed-window delay
without.

So a window whose source always fails transiently makes exactly
`max_attempts * (task_retries + 1) * step_attempts` calls before it is dead (`worst_case`).
The SDKs' own retries are off because they multiplied that (by 3), and because, inside a
request, they take a soft time limit for a connection error and retry it. What the Snowflake
connector still retries on its own (a failing HTTP request, until `network_timeout`) is
bounded in time, not count: see the README's "Retries".

A soft time limit (`StageTimeLimitError`, or a raw `TIME_LIMIT_ERRORS` exception) is never
retried inside the step: the hard limit is near, so the attempt ends and the task is re-sent
like any transient failure.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Protocol, TypeVar

from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
)

from core.errors import TIME_LIMIT_ERRORS, StageTimeLimitError, TransientError
from core.records import Stage

T = TypeVar("T")

SDK_RETRIES = 0
"""Retries inside a client SDK for one request: none. Every retry happens in the layers above,
where it is counted, logged and bounded; connectors pass this to their SDK."""


@dataclass(frozen=True)
class StagePolicy:
    """How one stage runs: its time limits and its retries."""

    soft_time_limit: float
    """Seconds before the task is asked to stop (SoftTimeLimitExceeded: a transient failure)."""
    time_limit: float
    """Seconds before the worker kills the task's process."""
    step_attempts: int = 3
    """Tries of one connector call inside the task (tenacity)."""
    step_backoff: float = 0.5
    """Longest wait before the second try of a call; doubles per try, up to `step_wait_max`."""
    step_wait_max: float = 2.0
    """Longest wait between two tries of a call."""
    task_retries: int = 4
    """Re-sends of the stage after transient failures before the window is marked failed."""
    backoff_base: float = 2.0
    """Longest countdown of the first re-send; doubles per re-send, up to `backoff_cap`."""
    backoff_cap: float = 120.0
    """Longest countdown of a re-send (bounded: the Redis visibility timeout must exceed it)."""


STAGE_POLICIES: dict[Stage, StagePolicy] = {
    Stage.PRECHECK: StagePolicy(soft_time_limit=300, time_limit=330),
    Stage.EXTRACT: StagePolicy(soft_time_limit=3600, time_limit=3660),
    Stage.LOAD: StagePolicy(soft_time_limit=3600, time_limit=3660),
    Stage.AUDIT: StagePolicy(soft_time_limit=600, time_limit=630),
}
"""Per-stage defaults. The Redis visibility timeout must exceed the largest time limit plus the
largest backoff, or Redis redelivers tasks that are still running (celery/celery#5935)."""

CONTROL_TIME_LIMIT = 300.0
"""Hard time limit of generation, dispatch and cleanup tasks."""

FAILED_RETRY_BASE = timedelta(seconds=30)
"""How long a window failed once waits before dispatch queues it again (the default of the
`failed_retry_base` setting); doubles per attempt."""

FAILED_RETRY_CAP = timedelta(hours=1)
"""The longest a failed window waits for its next attempt."""


class RetryKeys(Protocol):
    """A pipeline's retry keys (`core.config.PipelineConfig`); None: the stage's default."""

    @property
    def step_attempts(self) -> int | None: ...

    @property
    def step_backoff(self) -> float | None: ...

    @property
    def task_retries(self) -> int | None: ...

    @property
    def task_backoff(self) -> float | None: ...


def stage_policy(stage: Stage, pipeline: RetryKeys | None = None) -> StagePolicy:
    """The policy `stage` runs under for `pipeline`: the stage's time limits and defaults, with
    the retry keys the pipeline sets (`step_attempts`, `step_backoff`, `task_retries`,
    `task_backoff`) in their place."""
    policy = STAGE_POLICIES[stage]
    if pipeline is None:
        return policy
    return replace(
        policy,
        step_attempts=_unless_none(pipeline.step_attempts, policy.step_attempts),
        step_backoff=_unless_none(pipeline.step_backoff, policy.step_backoff),
        task_retries=_unless_none(pipeline.task_retries, policy.task_retries),
        backoff_base=_unless_none(pipeline.task_backoff, policy.backoff_base),
    )


def _unless_none(value: T | None, default: T) -> T:
    return default if value is None else value


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
    ceiling = backoff_ceiling(retry_number, base, cap)
    return ceiling / 2 + jitter(0, ceiling / 2)


def backoff_ceiling(retry_number: int, base: float, cap: float) -> float:
    """The exponential backoff every retry follows: `base * 2**retry_number`, at most `cap`
    (the longest `backoff_seconds(retry_number)` can be)."""
    if retry_number < 0:
        raise ValueError("retry_number must not be negative")
    return min(cap, base * 2.0**retry_number)


def failed_retry_delay(attempts: int, base: timedelta) -> timedelta:
    """How long a failed window waits before its next attempt: base, 2 base, 4 base, ... 1 h
    (`FAILED_RETRY_CAP`), after its first, second, third... attempt; no wait when base is 0."""
    if base <= timedelta(0):
        return timedelta(0)
    seconds = backoff_ceiling(
        max(attempts - 1, 0), base.total_seconds(), FAILED_RETRY_CAP.total_seconds()
    )
    return timedelta(seconds=seconds)


def call_with_retries(policy: StagePolicy, function: Callable[[], T]) -> T:
    """Call `function`, retrying `TransientError` up to `policy.step_attempts` tries in all,
    with short jittered waits; each retry is logged (a window that succeeds in the end shows no
    error on its record).

    A soft time limit is never retried: `StageTimeLimitError` and the raw `TIME_LIMIT_ERRORS`
    (raised by the call or during a wait) propagate at once, unchanged.

    The first try is a plain call: tenacity's state is built only once it failed (building it
    for every call cost more than a tiny window's SQL statement). The failure is then replayed
    as tenacity's first attempt, so the tries, waits and log lines are tenacity's as before.
    """
    try:
        return function()
    except TransientError as error:
        first_failure: TransientError | None = error

    def replay_then_call() -> T:
        nonlocal first_failure
        if first_failure is not None:
            failure, first_failure = first_failure, None
            raise failure
        return function()

    return _retrying(policy)(replay_then_call)()


def _retrying(policy: StagePolicy) -> Callable[[Callable[[], T]], Callable[[], T]]:
    """The tenacity decorator of `call_with_retries` for `policy`."""

    def wait(state: RetryCallState) -> float:
        return backoff_seconds(
            state.attempt_number - 1, base=policy.step_backoff, cap=policy.step_wait_max
        )

    retrying = retry(
        retry=retry_if_exception_type(TransientError)
        & retry_if_not_exception_type(StageTimeLimitError),
        stop=stop_after_attempt(policy.step_attempts),
        wait=wait,
        before_sleep=_log_retry,
        reraise=True,
    )
    return retrying


def _log_retry(state: RetryCallState) -> None:
    # Imported here: core.config imports this module for its defaults, and needs no logging.
    from core.logs import get_logger

    error = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else None
    get_logger("windowpipe.retry").warning(
        "transient error, retrying",
        attempt=state.attempt_number,
        wait=round(wait, 2) if wait is not None else None,
        error=str(error),
    )


# --- soft time limits inside SDK errors ----------------------------------------------------------


def time_limit_cause(error: BaseException) -> BaseException | None:
    """The soft time limit `error` is, or was raised because of; None if none.

    Celery raises the soft time limit from a signal handler, wherever the task happens to be.
    Inside a request, the SDKs catch it and raise their own error from it: elasticsearch-py and
    opensearch-py a ConnectionError, botocore an HTTPClientError, SQLAlchemy an OperationalError
    (psycopg finds the connection busy when the pool rolls it back). The cause chain still holds
    it.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (*TIME_LIMIT_ERRORS, StageTimeLimitError)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def as_time_limit(error: BaseException, what: str) -> StageTimeLimitError | None:
    """`StageTimeLimitError` if `error` is (or wraps) a soft time limit, else None: what every
    connector's error translation checks first, so a time limit is never a terminal error."""
    cause = time_limit_cause(error)
    if cause is None:
        return None
    if isinstance(cause, StageTimeLimitError):
        return cause
    return StageTimeLimitError(f"{what}: interrupted by the stage's soft time limit")


# --- the worst case -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorstCase:
    """What one stage can cost a window before the window is dead, its source always failing."""

    calls: int
    """Tries of the failing connector call: attempts * runs per attempt * tries per run."""
    runs: int
    """Stage task runs: attempts * (task_retries + 1)."""
    waiting_seconds: float
    """The longest time spent waiting when every call fails at once (refused, HTTP 503): step
    waits, task countdowns, failed-window delays and dispatch ticks, all at their ceilings."""
    seconds: float
    """The longest time before the window is dead when every run lasts until its soft time
    limit (calls hanging), plus the same countdowns, delays and ticks."""


def worst_case(
    policy: StagePolicy,
    *,
    max_attempts: int,
    failed_retry_base: timedelta,
    dispatch_every: timedelta,
) -> WorstCase:
    """The calls and time one stage costs a window whose calls always fail transiently, until
    the window is dead. Time spent waiting for a free worker is not counted (it is not failing).

    - a run tries the call `step_attempts` times, waiting `backoff_seconds` between tries;
    - a window attempt runs the stage `task_retries + 1` times, with countdowns between runs;
    - a failed window is queued again after `failed_retry_delay`, by the
      first dispatch after that: at most one generation tick (`dispatch_every`) later, or at
      once when the delay is zero (a finishing window asks for a dispatch);
    - after `max_attempts` attempts it is dead.
    """
    runs_per_attempt = policy.task_retries + 1
    step_waits = sum(
        backoff_ceiling(n, policy.step_backoff, policy.step_wait_max)
        for n in range(policy.step_attempts - 1)
    )
    countdowns = sum(
        backoff_ceiling(r, policy.backoff_base, policy.backoff_cap)
        for r in range(policy.task_retries)
    )
    between_attempts = 0.0
    for attempt in range(1, max_attempts):
        delay = failed_retry_delay(attempt, failed_retry_base).total_seconds()
        between_attempts += delay + (dispatch_every.total_seconds() if delay > 0 else 0.0)
    fast_attempt = runs_per_attempt * step_waits + countdowns
    slow_attempt = runs_per_attempt * policy.soft_time_limit + countdowns
    return WorstCase(
        calls=max_attempts * runs_per_attempt * policy.step_attempts,
        runs=max_attempts * runs_per_attempt,
        waiting_seconds=max_attempts * fast_attempt + between_attempts,
        seconds=max_attempts * slow_attempt + between_attempts,
    )
