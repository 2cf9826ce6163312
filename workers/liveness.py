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

This module is the probe's and the settings': standard library only (no Celery, no config), so
a probe run every 10 s costs a bare interpreter start, and importing it touches no file (the
default heartbeat file is found only when a worker asks for it: a read-only root with no `/tmp`
must not break an import). The heartbeat step and the watchdogs, which need Celery, are in
`workers/heartbeat.py`.

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
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_FILE_ENV = "WINDOWPIPE_HEARTBEAT_FILE"
"""Environment variable: the worker's heartbeat file; `%n` (node name before the @), `%h`
(host) and `%p` (the whole node name) are replaced as in Celery's `--logfile`."""

DEFAULT_HEARTBEAT_NAME = "windowpipe-%n@%h.heartbeat"
"""The heartbeat file's name, in the temporary directory, when the environment names none: one
per worker node."""


def default_heartbeat_file() -> str:
    """The heartbeat file when the environment names none, in the temporary directory.

    Looked up when a worker starts, never at import: `tempfile.gettempdir()` raises when no
    directory is writable (a read-only root without a `/tmp` volume), and the exporter and the
    probe, which import this module, write nothing.
    """
    import tempfile

    return os.path.join(tempfile.gettempdir(), DEFAULT_HEARTBEAT_NAME)


def __getattr__(name: str) -> str:
    # `DEFAULT_HEARTBEAT_FILE`, computed when asked for (see default_heartbeat_file).
    if name == "DEFAULT_HEARTBEAT_FILE":
        return default_heartbeat_file()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


@dataclass(frozen=True)
class LivenessSettings:
    """The liveness knobs of a worker process, resolved once from the environment."""

    heartbeat_file: str | None = None
    """None: `default_heartbeat_file()`, looked up when a worker asks for its path."""
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
            heartbeat_file=environ.get(HEARTBEAT_FILE_ENV) or None,
            heartbeat_interval=seconds("WINDOWPIPE_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL),
            shutdown_timeout=seconds("WINDOWPIPE_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT),
            reconnect_timeout=seconds("WINDOWPIPE_RECONNECT_TIMEOUT", RECONNECT_TIMEOUT),
        )

    def heartbeat_path(self, nodename: str) -> Path:
        """The heartbeat file of the worker node `nodename` (`name@host`)."""
        from celery.utils.nodenames import node_format

        pattern = self.heartbeat_file or default_heartbeat_file()
        return Path(node_format(pattern, nodename))


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
    one line. Reads one file's mtime: no broker, no config, no Celery (standard library only).
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


if __name__ == "__main__":
    raise SystemExit(main())
