"""The `windowpipe` console script run as a user runs it, and what it may leave behind.

`run_windowpipe` starts the installed console script in a subprocess (no CliRunner, no
in-process shortcuts), with no `WINDOWPIPE_*` variable inherited from the test run.
`StateWorld` is a state store and a Redis database whose contents can be snapshotted before and
after a command, to prove a refused command changed nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

CONSOLE_SCRIPT = Path(sys.executable).with_name("windowpipe")
"""The console script beside the interpreter running the tests (`.venv/bin/windowpipe`)."""

ERROR_PREFIX = "windowpipe: error: "
"""How every error line of the CLI starts."""


@dataclass(frozen=True)
class Run:
    """One finished `windowpipe` process."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return (
            f"windowpipe {' '.join(self.args)} -> {self.returncode} in {self.seconds:.1f}s\n"
            f"stdout: {self.stdout!r}\nstderr: {self.stderr!r}"
        )


def run_windowpipe(
    *args: str,
    cwd: Path,
    config: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> Run:
    """Run `windowpipe ARGS` in `cwd`; `config` is passed as $WINDOWPIPE_CONFIG."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WINDOWPIPE_")}
    if config is not None:
        environment["WINDOWPIPE_CONFIG"] = str(config)
    environment.update(env or {})
    started = time.monotonic()
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Run(
        tuple(args), result.returncode, result.stdout, result.stderr, time.monotonic() - started
    )


def assert_one_error_line(run: Run, status: int, fragment: str = "") -> str:
    """The run exited with `status`, printed exactly one line on stderr (the error, containing
    `fragment`), nothing on stdout, and no traceback anywhere; returns the line."""
    assert run.returncode == status, run.describe()
    assert "Traceback" not in run.stderr + run.stdout, run.describe()
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and run.stderr.endswith("\n"), run.describe()
    assert lines[0].startswith(ERROR_PREFIX), run.describe()
    assert fragment in lines[0], f"{fragment!r} not in the error line\n{run.describe()}"
    assert run.stdout == "", run.describe()
    return lines[0]


@dataclass
class StateWorld:
    """A state store (SQLite file or PostgreSQL schema) and a dedicated Redis database."""

    state_url: str
    redis_url: str
    sqlite_file: Path | None = None
    pg_schema: str | None = None
    _engines: dict[str, sa.Engine] = field(default_factory=dict, repr=False, compare=False)

    def snapshot(self) -> dict[str, Any]:
        """Everything a command could have changed: the SQLite file's existence (and tables and
        rows), the PostgreSQL schema's tables and rows, and every Redis key with its value."""
        state: dict[str, Any] = {"redis": self.redis_contents()}
        if self.sqlite_file is not None:
            siblings = sorted(p.name for p in self.sqlite_file.parent.iterdir())
            state["sqlite_dir"] = siblings
            if self.sqlite_file.exists():
                state["tables"] = self._tables(f"sqlite:///{self.sqlite_file}")
        else:
            state["tables"] = self._tables(self.state_url)
        return state

    def redis_contents(self) -> dict[Any, Any]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return {key: client.dump(key) for key in sorted(client.keys("*"))}
        finally:
            client.close()

    def _tables(self, url: str) -> dict[str, list[tuple[Any, ...]]]:
        if url not in self._engines:
            self._engines[url] = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with self._engines[url].connect() as conn:
            names = sorted(sa.inspect(conn).get_table_names(schema=self.pg_schema))
            prefix = f'"{self.pg_schema}".' if self.pg_schema else ""
            return {
                name: sorted(
                    (tuple(row) for row in conn.exec_driver_sql(f'SELECT * FROM {prefix}"{name}"')),
                    key=repr,
                )
                for name in names
            }

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()
