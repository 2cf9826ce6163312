"""A real windowpipe deployment for integration tests: a config file, Celery worker processes
(one per stage queue, plus control) on the real Redis, and the `windowpipe` CLI.

Each deployment takes its own Redis DB number, flushed before and after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from core.config import Config, config_toml, load_config
from core.records import FINISHED, WindowRecord, WindowStatus
from core.store import StateStore

REPO = Path(__file__).resolve().parents[2]
STAGE_QUEUES = ("precheck", "extract", "load", "audit")


def free_redis_db(base_url: str) -> int:
    """A Redis DB number no other test run holds (claimed with a key that expires)."""
    client = redis.Redis.from_url(f"{base_url}/0")
    for number in range(2, 16):
        if client.set(f"windowpipe-test:db:{number}", os.getpid(), nx=True, ex=1800):
            return number
    raise RuntimeError("no free Redis DB between 2 and 15 for the test run")


def release_redis_db(base_url: str, number: int) -> None:
    redis.Redis.from_url(f"{base_url}/0").delete(f"windowpipe-test:db:{number}")


def write_config(
    path: Path, settings: dict[str, Any], pipelines: dict[str, dict[str, Any]]
) -> Path:
    """Write a windowpipe.toml from plain dicts (`source`/`staging`/`target` as sub-tables)."""
    path.write_text(config_toml(settings, pipelines))
    return path


@dataclass
class Deployment:
    """Worker processes and CLI calls sharing one config file."""

    config_path: Path
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["WINDOWPIPE_CONFIG"] = str(self.config_path)
        env["PYTHONPATH"] = str(REPO)
        env.setdefault("WINDOWPIPE_LOG_JSON", "true")
        return env

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    def store(self) -> StateStore:
        store = StateStore(self.config.settings.state_url)
        store.migrate()
        return store

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.config.settings.redis_url)

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start_worker(
        self, queue: str, concurrency: int = 2, name: str | None = None, pool: str = "prefork"
    ) -> subprocess.Popen[bytes]:
        """Start `celery -A workers worker -Q queue` and wait until it is ready."""
        name = name or f"{queue}-{len(self.processes)}"
        log = self.log_path(name)
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers",
            "worker",
            "-Q",
            queue,
            "-c",
            str(concurrency),
            "-P",
            pool,
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ]
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=self.env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((name, process))
        self._wait_ready(name, process)
        return process

    def spawn_worker(
        self, queue: str, concurrency: int = 2, name: str | None = None, pool: str = "prefork"
    ) -> subprocess.Popen[bytes]:
        """Start `celery -A workers worker -Q queue` without waiting until it is ready."""
        name = name or f"{queue}-{len(self.processes)}"
        command = [
            *(sys.executable, "-m", "celery", "-A", "workers", "worker"),
            *("-Q", queue, "-c", str(concurrency), "-P", pool, "-n", f"{name}@%h"),
            *("--without-gossip", "--without-mingle", "--loglevel", "INFO"),
        ]
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=self.env,
            stdout=self.log_path(name).open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((name, process))
        return process

    def start_workers(
        self, queues: Iterable[str], concurrency: int = 2
    ) -> dict[str, subprocess.Popen[bytes]]:
        """Start one worker per queue, all at once (faster on few cores), and wait until every
        one is ready; returns them by queue."""
        started = {queue: self.spawn_worker(queue, concurrency) for queue in queues}
        names = {process.pid: name for name, process in self.processes}
        for process in started.values():
            self._wait_ready(names[process.pid], process)
        return started

    def name_of(self, process: subprocess.Popen[bytes]) -> str:
        """The name (and log file stem) a worker process was started with."""
        return next(name for name, started in self.processes if started is process)

    def start_stage_workers(self, concurrency: int = 2, control: bool = True) -> None:
        for queue in STAGE_QUEUES:
            self.start_worker(queue, concurrency)
        if control:
            self.start_worker("control", 1)

    def start_beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        log = self.log_path(name)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers",
                "beat",
                "--loglevel",
                "INFO",
                "-s",
                str(self.workdir / f"{name}-schedule"),
            ],
            cwd=REPO,
            env=self.env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((name, process))
        return process

    def _wait_ready(self, name: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        log = self.log_path(name)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker {name} exited: {log.read_text()[-3000:]}")
            if log.exists() and "ready." in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker {name} not ready after {timeout}s: {log.read_text()[-3000:]}")

    def stop(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if process.poll() is None:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def stop_all(self) -> None:
        for _, process in reversed(self.processes):
            self.stop(process)
        self.processes.clear()

    def cli(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "windowpipe", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"windowpipe {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result

    def send(self, task: str, *args: Any) -> None:
        """Send a control task the way beat does."""
        from celery import Celery

        settings = self.config.settings
        app = Celery(broker=settings.broker_url or settings.redis_url)
        app.send_task(task, args, queue="control")
        app.close()

    def send_chain(self, pipeline: str, window_start: str) -> None:
        """Send a window's whole chain straight to the stage queues, as a duplicate would."""
        from celery import Celery, chain

        settings = self.config.settings
        app = Celery(broker=settings.broker_url or settings.redis_url)
        chain(
            *(
                app.signature(
                    f"windowpipe.{q}",
                    (pipeline, window_start),
                    immutable=True,
                    options={"queue": q},
                )
                for q in STAGE_QUEUES
            )
        ).apply_async()
        app.close()

    def wait_finished(
        self, pipeline: str, expected: int, timeout: float = 240, kick_cleanup: bool = False
    ) -> list[WindowRecord]:
        """Wait until `expected` windows of the pipeline are finished (succeeded/skipped/dead)."""
        store = self.store()
        deadline = time.monotonic() + timeout
        last_kick = 0.0
        try:
            while True:
                records = store.list_records(pipeline)
                done = [r for r in records if r.status in FINISHED or r.status == WindowStatus.DEAD]
                if len(records) >= expected and len(done) == len(records):
                    return records
                if time.monotonic() > deadline:
                    states: dict[str, int] = {}
                    for r in records:
                        states[r.status.value] = states.get(r.status.value, 0) + 1
                    raise AssertionError(f"{pipeline}: not finished after {timeout}s: {states}")
                if kick_cleanup and time.monotonic() - last_kick > 3:
                    self.send("windowpipe.cleanup")
                    self.send("windowpipe.dispatch", pipeline)
                    last_kick = time.monotonic()
                time.sleep(0.3)
        finally:
            store.dispose()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log")))


def statuses(records: Iterable[WindowRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.status.value] = counts.get(record.status.value, 0) + 1
    return counts
