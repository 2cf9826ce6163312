"""The demo's processes: each started in its own session (its own process group) with its log
in the work dir, watched while the demo runs, and stopped group by group: SIGTERM, then SIGKILL
after a grace period; Celery processes before the services they use.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STOP_GRACE_SECONDS = 10.0
"""How long a process group has after SIGTERM before it gets SIGKILL."""

STARTUP_TIMEOUT_SECONDS = 90.0
"""How long a service or worker may take to come up (workers boot together on few cores)."""


class DemoError(Exception):
    """A demo step that cannot go on; the message is one line for the user."""


@dataclass
class Child:
    """A process the demo started, leading its own process group."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    tier: int
    """Stopped in descending order: Celery processes (1) before the services they use (0)."""

    def group_alive(self) -> bool:
        """Whether any process of the group is left (the leader is reaped if it exited)."""
        self.process.poll()
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Processes:
    """Every process of the demo: started in new sessions, stopped group by group."""

    workdir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        tier: int,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """Start `argv` as `name`; `env` adds to the shared environment for this child only
        (a secret no other process needs)."""
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with _interrupts_deferred(), log.open("wb") as out:
            process = subprocess.Popen(
                list(argv),
                cwd=self.workdir,
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own session: a terminal's Ctrl-C reaches the demo only, which then stops
                # every group in order, and killpg reaches a worker's pool children too.
                start_new_session=True,
            )
            child = Child(name, process, log, tier)
            # Recorded before a Ctrl-C can land, so that it is stopped with the rest.
            self.children.append(child)
        return child

    def exited(self) -> Child | None:
        """A child that has exited although nobody stopped it."""
        for child in self.children:
            if child.process.poll() is not None:
                return child
        return None

    def stop(self, child: Child) -> None:
        self._stop([child])
        self.children.remove(child)

    def stop_all(self) -> None:
        """SIGTERM every group (Celery first, then the services), SIGKILL what is left."""
        for tier in sorted({child.tier for child in self.children}, reverse=True):
            self._stop([child for child in self.children if child.tier == tier])
        self.children.clear()

    @staticmethod
    def _stop(children: list[Child]) -> None:
        for child in children:
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and any(c.group_alive() for c in children):
            time.sleep(0.1)
        for child in children:
            if child.group_alive():
                _signal_group(child, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then act on them."""
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            raise KeyboardInterrupt


def _signal_group(child: Child, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, sig)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    what: str,
    ready: Callable[[], bool],
    child: Child | None = None,
    timeout: float = STARTUP_TIMEOUT_SECONDS,
) -> None:
    """Poll `ready` until it holds; DemoError if `child` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and child.process.poll() is not None:
            raise DemoError(
                f"{what} exited with status {child.process.returncode}; see {child.log}:\n"
                f"{child.tail()}"
            )
        with contextlib.suppress(Exception):  # not up yet: connection refused, no file...
            if ready():
                return
        if time.monotonic() > deadline:
            where = f"; see {child.log}" if child else ""
            raise DemoError(f"{what} not ready after {timeout:.0f}s{where}")
        time.sleep(0.1)


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
