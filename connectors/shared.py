"""Clients shared by every connector of a process that connects to the same place.

A worker process serves every pipeline. With a client per pipeline (an engine and its pool,
an SDK client, a Snowflake session), connections grow as processes x pipelines: a thousand
pipelines on one database exhaust its connection slots within seconds. Connectors instead
*lease* a client keyed by what it connects to (URL and credentials; hosts and auth; endpoint
and keys; account, user, role, warehouse): the first lease builds it, later ones share it,
the last release closes it. Connector objects stay per pipeline (they hold a table's shape,
an index name); only the client under them is shared.

Leases are taken on first use, in the process that runs tasks (after the prefork pool forked).
After a fork `forget_all` drops the parent's clients without closing them (their sockets are
the parent's); at worker shutdown `close_all` closes every client still leased.

Keys hold credentials (two pipelines with different passwords must not share a client): they
live in this process's memory only and are never logged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Entry:
    client: Any
    close: Callable[[Any], None]
    leases: int = 0
    current: bool = True
    """False once closed by `close_all` or dropped by `forget_all`: a later release of an old
    lease must neither count nor close it again."""


_entries: dict[Hashable, _Entry] = {}
_lock = threading.Lock()


class Lease(Generic[T]):
    """One connector's share of a process-wide client; `release()` once done (idempotent)."""

    def __init__(self, key: Hashable, entry: _Entry) -> None:
        self._key = key
        self._entry = entry
        self._released = False

    @property
    def client(self) -> T:
        """The shared client."""
        client: T = self._entry.client
        return client

    def release(self) -> None:
        """Give the client back; the last lease of a client closes it."""
        entry = self._entry
        with _lock:
            if self._released:
                return
            self._released = True
            entry.leases -= 1
            if entry.leases > 0 or not entry.current:
                return
            entry.current = False
            if _entries.get(self._key) is entry:
                del _entries[self._key]
        _close_quietly(entry)


def lease(key: Hashable, build: Callable[[], T], close: Callable[[T], None]) -> Lease[T]:
    """A lease of the process's client for `key`, built with `build` if there is none yet.

    `build` runs under this module's lock, so two threads never build two clients for one key:
    it must be quick and must not connect (engines and SDK clients connect on first request).
    An exception from `build` propagates and leaves nothing behind.
    """
    with _lock:
        entry = _entries.get(key)
        if entry is None:
            entry = _Entry(build(), close)
            _entries[key] = entry
        entry.leases += 1
        return Lease(key, entry)


def shared_count() -> int:
    """How many clients this process holds (tests, `status`-like diagnostics)."""
    with _lock:
        return len(_entries)


def close_all() -> None:
    """Close every client of this process (worker shutdown, tests); leases still held become
    no-ops, and their connectors lease a new client on next use."""
    with _lock:
        entries = list(_entries.values())
        _entries.clear()
        for entry in entries:
            entry.current = False
    for entry in entries:
        _close_quietly(entry)


def forget_all() -> None:
    """Drop every client without closing it: after a fork, the parent's sockets are not ours
    to close."""
    with _lock:
        for entry in _entries.values():
            entry.current = False
        _entries.clear()


def _close_quietly(entry: _Entry) -> None:
    with contextlib.suppress(Exception):  # closing is best effort: the client is dropped anyway
        entry.close(entry.client)
