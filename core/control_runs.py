"""When the control work last ran: generation per pipeline and the stale-lock cleanup.

The control tasks record each completed run in Redis (`core.keys.CLEANUP_RAN_KEY` and
`core.keys.generate_ran_key`); `windowpipe status` reads the records back and says how long ago
each one ran, so "nothing consumes the control queue" shows as an age that keeps growing
instead of as silence. A Redis restart or wipe removes the records:
they read as "never" until the next run writes them again.

Reading and printing are pure functions of the records and `now`; `read_last_runs` is the one
Redis round trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import redis

from core.instants import format_instant, parse_instant
from core.keys import CLEANUP_RAN_KEY, generate_ran_key

STATUS_REDIS_TIMEOUT = 2.0
"""Seconds `status` waits for Redis before it prints the records without the control lines."""


@dataclass(frozen=True)
class LastRun:
    """One completed run of a control task: when, and on which worker node."""

    at: datetime
    worker: str


@dataclass(frozen=True)
class ControlActivity:
    """The last runs of the control work: cleanup, and generation by pipeline."""

    cleanup: LastRun | None
    generation: Mapping[str, LastRun | None]


def record_run(client: redis.Redis, key: str, at: datetime, worker: str) -> None:
    """Record that a control task completed at `at` on `worker` (no expiry: a record that
    stops moving is the signal)."""
    record_runs(client, [key], at, worker)


def record_runs(client: redis.Redis, keys: Iterable[str], at: datetime, worker: str) -> None:
    """`record_run` for many keys in one round trip (a generation task over many pipelines)."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hset(key, mapping={"at": format_instant(at), "worker": worker})
    pipe.execute()


def parse_last_run(fields: Mapping[bytes | str, bytes | str]) -> LastRun | None:
    """A stored record back into a LastRun; None when absent or unreadable."""
    values = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    try:
        return LastRun(parse_instant(values["at"]), values.get("worker", ""))
    except (KeyError, ValueError):
        return None


def read_last_runs(client: redis.Redis, pipelines: Iterable[str]) -> ControlActivity:
    """The control records of `pipelines` (and the cleanup's), in one round trip."""
    names = list(pipelines)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(CLEANUP_RAN_KEY)
    for name in names:
        pipe.hgetall(generate_ran_key(name))
    cleanup, *generation = pipe.execute()
    runs = {name: parse_last_run(fields) for name, fields in zip(names, generation, strict=True)}
    return ControlActivity(cleanup=parse_last_run(cleanup), generation=runs)


def format_age(seconds: float) -> str:
    """A short age: `4s`, `3m 5s`, `2h 10m`, `3d 4h` (negative ages, a clock skew, are `0s`)."""
    whole = max(int(seconds), 0)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def _ran(label: str, run: LastRun | None, now: datetime) -> str:
    if run is None:
        return f"{label} never ran (since Redis was last emptied)"
    where = f" on {run.worker}" if run.worker else ""
    return f"{label} last ran {format_age((now - run.at).total_seconds())} ago{where}"


def describe_activity(activity: ControlActivity, now: datetime) -> list[str]:
    """One line per pipeline: `orders: generation last ran 12s ago on control@a; cleanup last
    ran 3s ago on control@b`."""
    cleanup = _ran("cleanup", activity.cleanup, now)
    return [
        f"{name}: {_ran('generation', run, now)}; {cleanup}"
        for name, run in sorted(activity.generation.items())
    ]


def read_control_activity(redis_url: str, pipelines: Iterable[str]) -> ControlActivity | str:
    """The control records of `pipelines` for `status`, with a short timeout; when Redis cannot
    be read, one line saying so instead (status still shows the window records)."""
    client = redis.Redis.from_url(
        redis_url, socket_timeout=STATUS_REDIS_TIMEOUT, socket_connect_timeout=STATUS_REDIS_TIMEOUT
    )
    try:
        return read_last_runs(client, pipelines)
    except redis.RedisError as error:
        return f"control activity unknown: Redis: {type(error).__name__}: {error}"
    finally:
        client.close()


def control_activity_lines(redis_url: str, pipelines: Iterable[str], now: datetime) -> list[str]:
    """`describe_activity` for `status` (`read_control_activity`)."""
    activity = read_control_activity(redis_url, pipelines)
    return [activity] if isinstance(activity, str) else describe_activity(activity, now)


def generation_age(activity: ControlActivity, pipeline: str, now: datetime) -> str:
    """`generation last ran 12s ago on control@a` (or that it never ran) for one pipeline."""
    return _ran("generation", activity.generation.get(pipeline), now)


def cleanup_age(activity: ControlActivity, now: datetime) -> str:
    """`cleanup last ran 3s ago on control@b` (or that it never ran)."""
    return _ran("cleanup", activity.cleanup, now)
