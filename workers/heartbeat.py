"""The worker side of liveness (workers/liveness.py has the probe and the settings): a Celery
consumer step that touches the heartbeat file while the worker consumes, and the watchdogs that
end a worker which lost its broker or cannot finish shutting down. The bounds are in
workers/liveness.py's docstring."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

from celery import Celery, bootsteps, signals

from workers.liveness import LivenessSettings

log = logging.getLogger("windowpipe.liveness")


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
