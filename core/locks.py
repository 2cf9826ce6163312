"""Every Redis lock windowpipe takes: window locks and the per-pipeline dispatch and recheck
locks.

Window locks: one owner per (pipeline, window) at a time, with a TTL and renewal.

Built on redis-py's `Lock` (a token-owned key released only by its owner, via Lua). A taken
lock means "someone else has this window": callers skip, they never wait.

Why a fencing token too: a lock can expire under a holder that is paused (GC, SIGSTOP, a slow
disk). Timeline:
    t0  worker A takes the lock, fence 7, starts extracting
    t1  A is paused; its lock expires at t0 + ttl
    t2  B takes the lock, fence 8, extracts, commits stage results guarded by fence 8
    t3  A resumes and tries to commit: the record's fence is 8, not 7 -> refused
The token is a counter on the window record (`StateStore.claim_stage` takes the next one), so
it survives a Redis restart, unlike anything kept in Redis.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from core.instants import parse_instant
from core.keys import WINDOW_LOCK_PREFIX, dispatch_lock_key, recheck_lock_key, window_lock_key
from core.retry import CONTROL_TIME_LIMIT

DISPATCH_LOCK_SECONDS = 20
"""TTL of the per-pipeline dispatch lock. Dispatch takes milliseconds to a second; the lock
only keeps two dispatchers from overrunning the caps together (each window's enqueue is
guarded anyway), so a control worker frozen while holding it stalls the pipeline's dispatch
for at most this long."""

DISPATCH_LOCK_WAIT_SECONDS = 5
"""How long a dispatcher waits for another one of the same pipeline to finish."""


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
        self.key = window_lock_key(pipeline, window_start)
        self.ttl_seconds = ttl_seconds
        self.renew_every = max(ttl_seconds / 3, 0.05)
        self.token = owner_token()
        self._lock = client.lock(self.key, timeout=ttl_seconds, blocking=False, thread_local=False)
        self._lost = threading.Event()
        # Serializes renew() and release(): a renewal racing a release must not take the
        # key back after it was given up.
        self._guard = threading.Lock()
        self._held = False

    def acquire(self) -> bool:
        """Take the lock if it is free; never wait."""
        with self._guard:
            self._held = bool(self._lock.acquire(blocking=False, token=self.token))
            return self._held

    @property
    def lost(self) -> bool:
        """True once a renewal found the lock no longer this process's (expired, taken by
        another owner, or wiped with Redis)."""
        return self._lost.is_set()

    def renew(self) -> bool:
        """Extend the TTL only if this process still holds the lock (compare-and-extend);
        otherwise mark it lost and return False. False too once released.

        The extension is redis-py's `Lock.reacquire`: one Lua script (KEYS[1] the lock key,
        ARGV[1] this owner's token, ARGV[2] the TTL in ms) that sets the TTL only while the key
        still holds the token. A lost lock is never taken back, even when the key is gone:
            t0  A holds the lock (fence 7) and freezes; the lock expires
            t1  B takes it (fence 8), runs the stage, releases it: the key is gone
            t2  A wakes; its renewal finds no key. Taking it again (SET NX) would make every
                later message of the window find it "locked by another worker" and stop,
                leaving the window to cleanup's `stale_after`. So A's lock is lost, and A's
                stage stops at its next check (`core.runner`).
        A Redis restart looks the same from here (the key is gone): the stage stops and puts
        its window back in the queue (fenced), rather than hold a key nobody can vouch for.
        """
        with self._guard:
            if not self._held:
                return False
            try:
                self._lock.reacquire()
                return True
            except LockNotOwnedError:
                self._lost.set()
                return False
            except redis.RedisError:
                # Redis briefly away: keep trying; fencing protects the commit meanwhile.
                return True

    @contextmanager
    def renewing(self) -> Iterator[WindowLock]:
        """Renew the lock every third of its TTL while the block runs."""
        renewer = _process_renewer()
        renewer.add(self)
        try:
            yield self
        finally:
            renewer.discard(self)

    def release(self) -> None:
        """Release the lock if this process still owns it; a no-op otherwise."""
        with self._guard:
            if not self._held:
                return
            self._held = False
            with suppress(LockError, redis.RedisError):
                self._lock.release()


class _Renewer:
    """One daemon thread per process that renews every lock inside a `renewing()` block.

    A thread per stage would cost more than a small window's whole stage; one thread that
    sleeps until the next renewal is due costs nothing while no lock needs it.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._due: dict[WindowLock, float] = {}
        self._wake_at = float("inf")
        """When the thread wakes next on its own (it is woken early only for a lock due
        before that, so a stage does not hand the GIL to this thread at every start)."""
        self._changed = threading.Condition()
        thread = threading.Thread(target=self._run, name="windowpipe lock renewer", daemon=True)
        thread.start()

    def add(self, lock: WindowLock) -> None:
        with self._changed:
            due = time.monotonic() + lock.renew_every
            self._due[lock] = due
            if due < self._wake_at:
                self._changed.notify()

    def discard(self, lock: WindowLock) -> None:
        with self._changed:
            self._due.pop(lock, None)

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                ready = [lock for lock, at in self._due.items() if at <= now]
                for lock in ready:
                    self._due[lock] = now + lock.renew_every
                if not ready:
                    self._wake_at = min(self._due.values(), default=now + 3600)
                    self._changed.wait(self._wake_at - now)
                    # Awake: it reads every due time again before it waits, so no add notifies.
                    self._wake_at = float("-inf")
                    continue
            for lock in ready:  # outside the condition: a renewal is a Redis round trip
                if not lock.renew():
                    self.discard(lock)


_renewer: _Renewer | None = None
_renewer_guard = threading.Lock()


def _process_renewer() -> _Renewer:
    """This process's renewer, started on first use (again in a forked child: threads do not
    survive a fork)."""
    global _renewer
    with _renewer_guard:
        if _renewer is None or _renewer.pid != os.getpid():
            _renewer = _Renewer()
        return _renewer


def held_locks(client: redis.Redis) -> list[HeldLock]:
    """Every window lock currently in Redis, sorted by pipeline and window."""
    found = []
    for raw_key in client.scan_iter(match=f"{WINDOW_LOCK_PREFIX}*", count=500):
        key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
        value = client.get(key)
        if value is None:
            continue
        owner = value.decode() if isinstance(value, bytes) else str(value)
        ttl_ms = client.pttl(key)
        pipeline, _, start = key[len(WINDOW_LOCK_PREFIX) :].partition(":")
        try:
            window_start = parse_instant(start)
        except ValueError:
            continue
        found.append(HeldLock(pipeline, window_start, owner, max(ttl_ms, 0) / 1000))
    return sorted(found, key=lambda lock: (lock.pipeline, lock.window_start))


class _PipelineLock:
    """A per-pipeline lock that guards only repeated or excess work, never correctness: not
    renewed, not fenced; released only by its owner, a no-op once it expired."""

    def __init__(self, client: redis.Redis, key: str, **options: Any) -> None:
        self.key = key
        self._lock = client.lock(key, thread_local=False, **options)

    def acquire(self) -> bool:
        """Take the lock (waiting as the subclass says); False if another holder has it."""
        return bool(self._lock.acquire())

    def release(self) -> None:
        """Release the lock; a no-op when it expired (or was taken over) meanwhile."""
        with suppress(LockError):
            self._lock.release()


class DispatchLock(_PipelineLock):
    """The dispatch lock of one pipeline: one dispatcher at a time, so two do not overrun the
    pipeline's caps together.

    Not renewed and not fenced, because what it guards is only the caps, not correctness:
        t0  dispatcher A takes the lock, counts 3 free slots, freezes
        t1  the lock expires (`DISPATCH_LOCK_SECONDS`); B takes it, queues 3 windows
        t2  A wakes and queues its 3: the cap is exceeded once, by A's batch
    No window is queued twice: each enqueue is one guarded UPDATE (`StateStore.queue`, ENQUEUE
    from the status the dispatcher read), and only one dispatcher's UPDATE matches.
    """

    def __init__(self, client: redis.Redis, pipeline: str) -> None:
        # `acquire` waits up to `DISPATCH_LOCK_WAIT_SECONDS`, then gives up.
        super().__init__(
            client,
            dispatch_lock_key(pipeline),
            timeout=DISPATCH_LOCK_SECONDS,
            blocking_timeout=DISPATCH_LOCK_WAIT_SECONDS,
        )


_RELEASE_IF_OWNED = Lock.LUA_RELEASE_SCRIPT
"""redis-py's release script (KEYS[1] the lock key, ARGV[1] the owner's token): deletes the key
only while it holds the token, as `DispatchLock.release` does."""


def acquire_dispatch_locks(client: redis.Redis, pipelines: Sequence[str]) -> dict[str, str]:
    """Take the dispatch locks of many pipelines in one round trip, without waiting: the same
    key, TTL and token-owned `SET NX PX` as `DispatchLock.acquire`; returns the pipelines taken
    and each one's token (for `release_dispatch_locks`). A pipeline whose lock is held is left
    out: its caller dispatches it through `DispatchLock`, which waits for the holder."""
    names = list(dict.fromkeys(pipelines))
    tokens = [uuid.uuid4().hex for _ in names]
    pipe = client.pipeline(transaction=False)
    for name, token in zip(names, tokens, strict=True):
        pipe.set(dispatch_lock_key(name), token, nx=True, px=DISPATCH_LOCK_SECONDS * 1000)
    taken = pipe.execute()
    return {name: token for name, token, ok in zip(names, tokens, taken, strict=True) if ok}


def release_dispatch_locks(client: redis.Redis, held: Mapping[str, str]) -> None:
    """Release dispatch locks `acquire_dispatch_locks` took, in one round trip (plus the
    script's load check): each only while it still holds its token, a no-op for one that
    expired or was taken over meanwhile (as `DispatchLock.release`)."""
    if not held:
        return
    release = client.register_script(_RELEASE_IF_OWNED)
    pipe = client.pipeline(transaction=False)
    for name, token in held.items():
        release(keys=[dispatch_lock_key(name)], args=[token], client=pipe)
    pipe.execute()


class RecheckLock(_PipelineLock):
    """The recheck lock of one pipeline: one recheck run at a time.

    Beat sends a recheck every `every`; a run over a large backlog can take longer than that,
    and a second run would check the same due windows again. The lock skips that run instead.
    It guards no correctness, only repeated work (each check is one guarded UPDATE, so two
    overlapping runs write the same values or refuse), so it is neither renewed nor fenced.
    Its TTL is the recheck task's hard time limit: a run killed there frees it when it could
    no longer be running.
    """

    def __init__(self, client: redis.Redis, pipeline: str) -> None:
        # `acquire` does not wait: a run that finds the lock held is skipped.
        super().__init__(
            client, recheck_lock_key(pipeline), timeout=CONTROL_TIME_LIMIT, blocking=False
        )


def force_release(client: redis.Redis, held: HeldLock) -> bool:
    """Release a lock whose owner is dead, only if the same owner still holds it."""
    lock = client.lock(window_lock_key(held.pipeline, held.window_start), thread_local=False)
    lock.local.token = held.owner.encode()
    try:
        lock.release()
        return True
    except LockError:
        return False
