"""Window locks in Redis: one owner per (pipeline, window) at a time, with a TTL and renewal.

Built on redis-py's `Lock` (a token-owned key released only by its owner, via Lua). A taken
lock means "someone else has this window": callers skip, they never wait.

Why a fencing token too: a lock can expire under a holder that is paused (GC, SIGSTOP, a slow
disk). Timeline:
    t0  worker A takes the lock, fence 7, starts extracting
    t1  A is paused; its lock expires at t0 + ttl
    t2  B takes the lock, fence 8, extracts, commits stage results guarded by fence 8
    t3  A resumes and tries to commit: the record's fence is 8, not 7 -> refused
The token is a counter on the window record (`StateStore.bump_fence`), so it survives a Redis
restart, unlike anything kept in Redis.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime

import redis
from redis.exceptions import LockError, LockNotOwnedError

from core.instants import format_instant, parse_instant

LOCK_PREFIX = "windowpipe:lock:"
"""Redis key prefix of window locks: `windowpipe:lock:<pipeline>:<window start>`."""


def lock_key(pipeline: str, window_start: datetime) -> str:
    """The Redis key of a window's lock."""
    return f"{LOCK_PREFIX}{pipeline}:{format_instant(window_start)}"


def owner_token() -> str:
    """A unique token that also says who holds the lock (host and pid), for `locks`."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class HeldLock:
    """A window lock as seen in Redis, for `windowpipe locks`."""

    pipeline: str
    window_start: datetime
    owner: str
    ttl_seconds: float

    @property
    def host(self) -> str:
        return self.owner.split(":", 1)[0]

    @property
    def pid(self) -> int | None:
        parts = self.owner.split(":")
        return int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None

    def owner_is_dead_here(self) -> bool:
        """True when the owner ran on this host and its process is gone."""
        if self.host != socket.gethostname() or self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class WindowLock:
    """The lock of one window, held by this process; renew it while work runs."""

    def __init__(
        self, client: redis.Redis, pipeline: str, window_start: datetime, ttl_seconds: float
    ) -> None:
        self.key = lock_key(pipeline, window_start)
        self.ttl_seconds = ttl_seconds
        self.token = owner_token()
        self._client = client
        self._lock = client.lock(self.key, timeout=ttl_seconds, blocking=False, thread_local=False)
        self._lost = threading.Event()

    def acquire(self) -> bool:
        """Take the lock if it is free; never wait."""
        return bool(self._lock.acquire(blocking=False, token=self.token))

    @property
    def lost(self) -> bool:
        """True once a renewal found the lock owned by someone else."""
        return self._lost.is_set()

    def renew(self) -> bool:
        """Reset the TTL. If Redis lost the key (a restart) take it back; if another owner has
        it, mark the lock lost and return False."""
        try:
            self._lock.reacquire()
            return True
        except LockNotOwnedError:
            if self._client.set(self.key, self.token, nx=True, px=int(self.ttl_seconds * 1000)):
                return True
            self._lost.set()
            return False
        except redis.RedisError:
            # Redis briefly away: keep trying; fencing protects the commit meanwhile.
            return True

    @contextmanager
    def renewing(self) -> Iterator[WindowLock]:
        """Renew the lock every third of its TTL in a background thread while the block runs."""
        stop = threading.Event()
        interval = max(self.ttl_seconds / 3, 0.05)

        def loop() -> None:
            while not stop.wait(interval):
                if not self.renew():
                    return

        thread = threading.Thread(target=loop, name=f"renew {self.key}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)

    def release(self) -> None:
        """Release the lock if this process still owns it; a no-op otherwise."""
        with suppress(LockError, redis.RedisError):
            self._lock.release()


def held_locks(client: redis.Redis) -> list[HeldLock]:
    """Every window lock currently in Redis, sorted by pipeline and window."""
    found = []
    for raw_key in client.scan_iter(match=f"{LOCK_PREFIX}*", count=500):
        key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
        value = client.get(key)
        if value is None:
            continue
        owner = value.decode() if isinstance(value, bytes) else str(value)
        ttl_ms = client.pttl(key)
        pipeline, _, start = key[len(LOCK_PREFIX) :].partition(":")
        try:
            window_start = parse_instant(start)
        except ValueError:
            continue
        found.append(HeldLock(pipeline, window_start, owner, max(ttl_ms, 0) / 1000))
    return sorted(found, key=lambda lock: (lock.pipeline, lock.window_start))


def force_release(client: redis.Redis, held: HeldLock) -> bool:
    """Release a lock whose owner is dead, only if the same owner still holds it."""
    lock = client.lock(lock_key(held.pipeline, held.window_start), thread_local=False)
    lock.local.token = held.owner.encode()
    try:
        lock.release()
        return True
    except LockError:
        return False
