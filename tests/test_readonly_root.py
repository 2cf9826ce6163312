"""The exporter and the liveness probe run the way deploy/kubernetes/ runs them: a read-only root
filesystem and only the mounted volumes writable.

The sandbox is real: the command runs in a mount namespace of its own (`unshare --mount`, as
root) in which every filesystem is remounted read-only, with one tmpfs mounted where the pod
mounts a volume, and TMPDIR, TEMP and TMP unset; so `tempfile.gettempdir()` finds no writable
directory, exactly as in the `metrics` pod, which mounts no `/tmp`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.store import StateStore
from tests.support.deployment import REPO, write_config
from tests.test_migrate import PIPELINE

pytestmark = pytest.mark.integration  # starts other programs, reaches PostgreSQL and Redis

READ_ONLY = textwrap.dedent(
    """\
    set -e
    volume="$1"; shift
    # Every mount read-only, as a pod's readOnlyRootFilesystem (and read-only config volume).
    for target in $(awk '{print $2}' /proc/self/mounts | sort -u); do
      case "$target" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
      mount -o remount,bind,ro "$target"
    done
    # The one writable volume (an emptyDir).
    mount -t tmpfs -o size=1m volume "$volume"
    exec env -u TMPDIR -u TEMP -u TMP "$@"
    """
)


def read_only_run(
    volume: Path, command: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run `command` with every filesystem read-only but a tmpfs at `volume`, from a read-only
    working directory. Fails (not skips) where `unshare` or mount namespaces are missing."""
    volume.mkdir(parents=True, exist_ok=True)
    sandbox = ["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY, "sh"]
    return subprocess.run(
        [*sandbox, str(volume), *command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def python_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP", "TMP")}
    env.update(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def test_the_sandbox_leaves_no_temporary_directory(tmp_path: Path) -> None:
    # What crashed the metrics pod: with nothing writable, gettempdir() raises.
    result = read_only_run(
        tmp_path / "volume",
        [sys.executable, "-c", "import tempfile; tempfile.gettempdir()"],
        python_env(),
    )
    assert result.returncode == 1, result.stderr
    assert "No usable temporary directory found" in result.stderr
    written = read_only_run(
        tmp_path / "volume",
        ["sh", "-c", f"touch {tmp_path}/volume/ok && ! touch /tmp/windowpipe-ro-test"],
        python_env(),
    )
    assert written.returncode == 0, written.stderr


def test_the_probe_runs_under_a_read_only_root_and_imports_no_celery(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    heartbeat = volume / "windowpipe-heartbeat"
    # The worker's heartbeat, written on the volume inside the sandbox, then probed there.
    script = (
        "import sys, runpy; "
        f"open({str(heartbeat)!r}, 'w').close(); "
        "sys.argv = ['workers.liveness', '--max-age', '20']; "
        "code = 0\n"
        "try:\n"
        "    runpy.run_module('workers.liveness', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('celery', 'kombu', 'billiard', 'sqlalchemy', 'redis', 'pydantic'))\n"
        "print('imported:', heavy)\n"
        "raise SystemExit(code)"
    )
    result = read_only_run(
        volume, [sys.executable, "-c", script], python_env(WINDOWPIPE_HEARTBEAT_FILE=str(heartbeat))
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"ok: {heartbeat} touched"), result.stdout
    assert "imported: []" in result.stdout


def test_the_exporter_scrapes_under_a_read_only_root(
    tmp_path: Path, pg_schema_url: str, redis_db: str
) -> None:
    store = StateStore(pg_schema_url)
    store.migrate()
    store.dispose()
    config = write_config(
        tmp_path / "windowpipe.toml",
        {"redis_url": redis_db, "state_url": pg_schema_url},
        {"events": {**PIPELINE, "every": "10m"}},
    )
    result = read_only_run(
        tmp_path / "volume",
        [sys.executable, "-m", "windowpipe", "metrics", "--once", "--config", str(config)],
        python_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'windowpipe_exporter_source_up{source="state_store"} 1.0' in result.stdout
    assert 'windowpipe_exporter_source_up{source="broker"} 1.0' in result.stdout
    assert 'windowpipe_freshness_seconds{pipeline="events"}' in result.stdout
