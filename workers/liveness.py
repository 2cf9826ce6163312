"""Worker liveness: a heartbeat file, the probe that reads it, and watchdogs that end a worker
which stopped being able to work.

A worker can stop doing work while its process stays alive. What catches each case:

- **Frozen** (SIGSTOP, a deadlock, a stuck syscall): the heartbeat file is touched from the
  worker's own event loop (its timer), so it stops with the loop. The probe
  (`python -m workers.liveness`) fails once the file is older than `--max-age`; the
  orchestrator (Kubernetes `livenessProbe`, compose healthcheck + autoheal) kills the worker.
- **Lost its broker and does not get it back**: the heartbeat stops when the consumer loses its
  connection (the step is stopped before the consumer reconnects), so the probe fails too; and
  the reconnect watchdog ends the process when the consumer is not consuming again within
  `reconnect_timeout`, so a restart-on-exit supervisor restarts it even without a probe.
- **Shutting down and never finishing** (SIGTERM, or "Unrecoverable error" after a broker
  loss, then a warm shutdown that waits on something that never comes): the shutdown watchdog
  ends the process `shutdown_timeout` after the shutdown began.

Ending the process is safe: tasks are acked late and every stage is fenced and idempotent, so
a task cut short is run again (by redelivery or by the cleanup) with the same result.

Bounds, with the defaults:
    heartbeat every `heartbeat_interval` (2 s) while the consumer consumes;
    the probe fails at most `--max-age` (20 s) after the worker froze or lost its broker;
    the worker exits at most `reconnect_timeout` (60 s) after it lost its broker connection,
    and at most `shutdown_timeout` (60 s) after it began to shut down.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps, signals
from celery.utils.nodenames import node_format

HEARTBEAT_FILE_ENV = "WINDOWPIPE_HEARTBEAT_FILE"
"""Environment variable: the worker's heartbeat file; `%n` (node name before the @), `%h`
(host) and `%p` (the whole node name) are replaced as in Celery's `--logfile`."""

DEFAULT_HEARTBEAT_FILE = os.path.join(tempfile.gettempdir(), "windowpipe-%n@%h.heartbeat")
"""The heartbeat file when the environment names none: one per worker node."""

HEARTBEAT_INTERVAL = 2.0
"""Seconds between two touches of the heartbeat file (`WINDOWPIPE_HEARTBEAT_INTERVAL`)."""

PROBE_MAX_AGE = 20.0
"""The probe's default `--max-age`: ten heartbeats, so a busy event loop is never mistaken for
a hung one."""

SHUTDOWN_TIMEOUT = 60.0
"""Seconds a worker may take to shut down before the watchdog ends it
(`WINDOWPIPE_SHUTDOWN_TIMEOUT`)."""

RECONNECT_TIMEOUT = 60.0
"""Seconds a worker may go without consuming after it lost its broker connection before the
watchdog ends it (`WINDOWPIPE_RECONNECT_TIMEOUT`)."""

log = logging.getLogger("windowpipe.liveness")


@dataclass(frozen=True)
class LivenessSettings:
    """The liveness knobs of a worker process, resolved once from the environment."""

    heartbeat_file: str = DEFAULT_HEARTBEAT_FILE
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    shutdown_timeout: float = SHUTDOWN_TIMEOUT
    reconnect_timeout: float = RECONNECT_TIMEOUT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> LivenessSettings:
        """Read `WINDOWPIPE_HEARTBEAT_FILE`, `_HEARTBEAT_INTERVAL`, `_SHUTDOWN_TIMEOUT` and
        `_RECONNECT_TIMEOUT`; a ValueError names the variable that is wrong."""

        def seconds(name: str, default: float) -> float:
            text = environ.get(name)
            if text is None or not text.strip():
                return default
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{name}: expected seconds (a number), got {text!r}") from None
            if not value > 0:
                raise ValueError(f"{name}: must be more than zero seconds, got {text!r}")
            return value

        return cls(
            heartbeat_file=environ.get(HEARTBEAT_FILE_ENV) or DEFAULT_HEARTBEAT_FILE,
            heartbeat_interval=seconds("WINDOWPIPE_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL),
            shutdown_timeout=seconds("WINDOWPIPE_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT),
            reconnect_timeout=seconds("WINDOWPIPE_RECONNECT_TIMEOUT", RECONNECT_TIMEOUT),
        )

    def heartbeat_path(self, nodename: str) -> Path:
        """The heartbeat file of the worker node `nodename` (`name@host`)."""
        return Path(node_format(self.heartbeat_file, nodename))


# --- the probe ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What the probe found: healthy or not, and the one line it prints."""

    healthy: bool
    line: str


def check_heartbeat(path: Path, max_age: float, now: float) -> Verdict:
    """Healthy when `path` was touched at most `max_age` seconds before `now` (epoch seconds).

    A file from the future (clock skew) counts as fresh.
    """
    try:
        touched = path.stat().st_mtime
    except FileNotFoundError:
        return Verdict(
            False, f"unhealthy: no heartbeat file {path} (the worker never consumed, or is gone)"
        )
    except OSError as error:
        return Verdict(False, f"unhealthy: cannot read {path}: {error.strerror or error}")
    age = now - touched
    if age > max_age:
        return Verdict(
            False,
            f"unhealthy: {path} last touched {age:.1f}s ago (max {max_age:g}s): "
            "the worker is not consuming",
        )
    return Verdict(True, f"ok: {path} touched {max(age, 0.0):.1f}s ago (max {max_age:g}s)")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m workers.liveness [--max-age S] [FILE]`: exit 0 healthy, 1 unhealthy, 2 usage.

    FILE defaults to `$WINDOWPIPE_HEARTBEAT_FILE` (the same variable the worker reads). Prints
    one line. Reads one file's mtime: no broker, no config, no Celery app.
    """
    parser = argparse.ArgumentParser(
        prog="python -m workers.liveness",
        description="Liveness probe of a windowpipe worker: is its heartbeat file fresh?",
    )
    parser.add_argument("file", nargs="?", help=f"heartbeat file (default: ${HEARTBEAT_FILE_ENV})")
    parser.add_argument(
        "--max-age",
        type=float,
        default=PROBE_MAX_AGE,
        help=f"seconds since the last heartbeat before the worker counts as hung "
        f"(default {PROBE_MAX_AGE:g})",
    )
    args = parser.parse_args(argv)
    path = args.file or os.environ.get(HEARTBEAT_FILE_ENV)
    if not path:
        print(f"usage error: name the heartbeat file or set {HEARTBEAT_FILE_ENV}", file=sys.stderr)
        return 2
    if "%" in path:
        print(f"usage error: {path}: name the file itself, not a %n/%h pattern", file=sys.stderr)
        return 2
    if args.max_age <= 0:
        print("usage error: --max-age must be more than zero seconds", file=sys.stderr)
        return 2
    verdict = check_heartbeat(Path(path), args.max_age, time.time())
    print(verdict.line)
    return 0 if verdict.healthy else 1


# --- watchdogs ---------------------------------------------------------------------------------


def end_process(reason: str) -> None:
    """Log `reason`, SIGKILL the pool's child processes, and exit with status 1 at once.

    The log line is written from a helper thread given 2 s: a main thread hung while holding
    the logging lock (say, writing to a full pipe) must not keep the process alive.
    """
    writer = threading.Thread(target=log.critical, args=(reason,), daemon=True)
    writer.start()
    writer.join(2)
    try:
        from billiard.process import active_children

        children = active_children()
    except Exception:  # ending the process matters more than its children
        children = []
    for child in children:
        if child.pid:
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGKILL)
    os._exit(1)


class Watchdog:
    """Ends the process `seconds` after `arm()` unless `disarm()` comes first.

    A daemon thread per arming; arming an armed watchdog changes nothing (the first deadline
    holds), so repeated signals cannot postpone the exit.
    """

    def __init__(self, seconds: float, reason: str) -> None:
        self.seconds = seconds
        self.reason = reason
        self._guard = threading.Lock()
        self._cancel: threading.Event | None = None

    @property
    def armed(self) -> bool:
        return self._cancel is not None

    def arm(self) -> None:
        with self._guard:
            if self._cancel is not None:
                return
            cancel = self._cancel = threading.Event()
        threading.Thread(
            target=self._wait, args=(cancel,), name="windowpipe watchdog", daemon=True
        ).start()

    def disarm(self) -> None:
        with self._guard:
            if self._cancel is not None:
                self._cancel.set()
                self._cancel = None

    def _wait(self, cancel: threading.Event) -> None:
        if not cancel.wait(self.seconds):
            end_process(f"{self.reason} after {self.seconds:g}s: exiting (status 1)")


_shutdown_watchdogs: dict[int, Watchdog] = {}


def shutdown_watchdog(settings: LivenessSettings) -> Watchdog:
    """This process's shutdown watchdog (one per process: a forked child gets its own)."""
    pid = os.getpid()
    if pid not in _shutdown_watchdogs:
        _shutdown_watchdogs[pid] = Watchdog(
            settings.shutdown_timeout, "worker shutdown did not finish"
        )
    return _shutdown_watchdogs[pid]


def _settings(app: Celery) -> LivenessSettings:
    settings = app.conf.get("windowpipe_liveness")
    return settings if isinstance(settings, LivenessSettings) else LivenessSettings()


# --- bootsteps ---------------------------------------------------------------------------------


class ShutdownWatchdog(bootsteps.StartStopStep):
    """Worker step: arms the shutdown watchdog when the worker begins to stop.

    The worker blueprint calls every step's `close()` first when it stops, before any step
    stops (and before the consumer's stop, where a dead broker can hang it), whatever started
    the stop: a signal or an unrecoverable error.
    """

    label = "windowpipe shutdown watchdog"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.watchdog = shutdown_watchdog(_settings(parent.app))

    def start(self, parent: Any) -> None:
        return None

    def close(self, parent: Any) -> None:
        self.watchdog.arm()

    def stop(self, parent: Any) -> None:
        self.watchdog.arm()

    def terminate(self, parent: Any) -> None:
        self.watchdog.arm()


class Heartbeat(bootsteps.StartStopStep):
    """Consumer step: touches the heartbeat file every `heartbeat_interval` while it consumes.

    Started after the task consumer (so only once the broker connection is up and tasks are
    being consumed), from the worker's timer: with the prefork pool and a Redis or AMQP broker
    that timer is driven by the worker's event loop, so a loop that stops turning stops the
    heartbeat. Stopped when the consumer loses its connection (the consumer blueprint restarts
    its steps) or shuts down. A stop while the consumer still runs is a reconnect: the
    reconnect watchdog ends the process unless the consumer starts consuming again in time.
    """

    label = "windowpipe heartbeat"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        settings = _settings(parent.app)
        self.path = settings.heartbeat_path(parent.hostname)
        self.interval = settings.heartbeat_interval
        self.reconnect = Watchdog(
            settings.reconnect_timeout, "worker lost its broker and is not consuming again"
        )
        self._entry: Any = None
        self._failing = False

    def start(self, parent: Any) -> None:
        self.reconnect.disarm()
        self.beat()
        self._entry = parent.timer.call_repeatedly(self.interval, self.beat, priority=10)

    def beat(self) -> None:
        """Touch the file (create it, and its directory, if it is gone)."""
        try:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(f"{os.getpid()}\n")
            self._failing = False
        except OSError as error:
            # The probe fails on a stale file, which is the right outcome; say why once.
            if not self._failing:
                log.error("cannot touch the heartbeat file %s: %s", self.path, error)
            self._failing = True

    def _cancel(self, parent: Any) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            # Possibly already cancelled with the failed connection's timer entries.
            with contextlib.suppress(Exception):
                parent.timer.cancel(entry)

    def stop(self, parent: Any) -> None:
        self._cancel(parent)
        if parent.blueprint.state == bootsteps.RUN:
            self.reconnect.arm()

    def shutdown(self, parent: Any) -> None:
        # The worker finished shutting down: no heartbeat file left behind for the next one.
        self._cancel(parent)
        with contextlib.suppress(OSError):
            self.path.unlink()

    def terminate(self, parent: Any) -> None:
        self._cancel(parent)


def install(app: Celery, settings: LivenessSettings) -> None:
    """Add the heartbeat and the watchdogs to `app`'s workers."""
    app.conf.windowpipe_liveness = settings
    app.steps["worker"].add(ShutdownWatchdog)
    app.steps["consumer"].add(Heartbeat)

    def _on_shutting_down(**_: Any) -> None:
        # Sent from the signal handler of SIGTERM/SIGINT/SIGQUIT, before the blueprint stops.
        shutdown_watchdog(settings).arm()

    signals.worker_shutting_down.connect(_on_shutting_down, weak=False)


if __name__ == "__main__":
    raise SystemExit(main())
