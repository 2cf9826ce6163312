"""What several test modules share that is not a fixture (fixtures are in conftest.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago (for a server of the
    test's own, or for a connection that must be refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """Call `predicate` every `every` seconds until it returns something true, and return that;
    fail the test, naming `what`, if it has not after `timeout` seconds.

    Tests wait for what they need to happen, never for a fixed time: on a loaded machine a
    fixed sleep is sometimes too short (a flaky failure) and otherwise too long (a slow test).
    `timeout` only bounds a failure: it is no claim about how fast anything should be.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}")
        time.sleep(every)
