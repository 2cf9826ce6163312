"""docker-compose.yml checked against the app (no Docker engine runs here): a worker service per
queue, commands Celery accepts, one mounted config, Flower behind auth, scalable workers, a
liveness healthcheck on every worker (run against real workers in tests/test_liveness.py),
autoheal, two control consumers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deployment import REPO

COMPOSE = REPO / "docker-compose.yml"
QUEUES = ("precheck", "extract", "load", "audit", "control", "recheck")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def windowpipe_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: body
        for name, body in compose["services"].items()
        if body.get("command") and body["command"][:3] == ["celery", "-A", "workers"]
    }


def test_every_queue_has_its_own_worker_service(compose: dict[str, Any]) -> None:
    served: dict[str, str] = {}
    for name, body in windowpipe_services(compose).items():
        command = body["command"]
        if command[3] == "worker":
            queue = command[command.index("-Q") + 1]
            assert queue not in served, f"{queue} served by {served.get(queue)} and {name}"
            served[queue] = name
            assert name == f"worker-{queue}"
    assert sorted(served) == sorted(QUEUES)


def test_the_app_declares_the_same_queues() -> None:
    env = {
        **os.environ,
        "WINDOWPIPE_CONFIG": str(REPO / "windowpipe.example.toml"),
        "SF_PASSWORD": "x",
        "S3_ACCESS_KEY_ID": "x",
        "S3_SECRET_ACCESS_KEY": "x",
    }
    out = subprocess.run(
        [sys.executable, "-c", "import workers; print(' '.join(workers.QUEUES))"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(out) == sorted(QUEUES)


def test_all_windowpipe_services_mount_one_config(compose: dict[str, Any]) -> None:
    services = windowpipe_services(compose)
    assert {"beat", "flower"} <= set(services)
    for name, body in services.items():
        assert body["volumes"] == ["./windowpipe.toml:/etc/windowpipe/windowpipe.toml:ro"], name
        assert body["environment"]["WINDOWPIPE_CONFIG"] == "/etc/windowpipe/windowpipe.toml"


def test_flower_requires_basic_auth_and_its_password_is_not_on_its_command_line(
    compose: dict[str, Any],
) -> None:
    flower = compose["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "${FLOWER_USER}:${FLOWER_PASSWORD}"
    assert not any("PASSWORD" in part or "basic" in part for part in flower["command"])
    example = (REPO / ".env.example").read_text()
    assert "FLOWER_USER=" in example and "FLOWER_PASSWORD=" in example


CONNECTOR_SECRETS = {"SF_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"}


def test_only_the_workers_get_the_connectors_secrets(compose: dict[str, Any]) -> None:
    for name, body in compose["services"].items():
        assert "env_file" not in body, name  # .env holds every secret: each service names its own
        if not name.startswith(("worker-", "beat", "flower", "metrics")):
            continue
        given = set(body["environment"])
        if name.startswith("worker-"):
            assert given >= CONNECTOR_SECRETS, name
        else:
            assert not given & CONNECTOR_SECRETS, name


def test_redis_persists_never_evicts_and_asks_for_a_password(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options == {
        "--appendonly": "yes",
        "--maxmemory-policy": "noeviction",
        "--requirepass": "${REDIS_PASSWORD}",
    }
    for name, body in windowpipe_services(compose).items():
        assert body["environment"]["WINDOWPIPE_REDIS_URL"].startswith(
            "redis://:${REDIS_PASSWORD}@redis:"
        ), name
    assert "REDIS_PASSWORD=" in (REPO / ".env.example").read_text()


def seconds(duration: str) -> float:
    """A compose duration (`90s`, `1m30s`, `1h`) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, duration
    hours, minutes, secs = (int(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + secs


def test_each_worker_is_given_longer_to_stop_than_its_longest_task(
    compose: dict[str, Any],
) -> None:
    """`docker compose stop` sends SIGTERM (a warm shutdown: the running task finishes), then
    SIGKILL after stop_grace_period (Docker's default: 10 s). The task runs at most its hard
    time limit; the worker's own shutdown watchdog fires after that, Docker's SIGKILL later."""
    from core.records import Stage
    from core.retry import CONTROL_TIME_LIMIT, STAGE_POLICIES

    for name, body in worker_services(compose).items():
        queue = body["command"][body["command"].index("-Q") + 1]
        limit = (
            CONTROL_TIME_LIMIT
            if queue in ("control", "recheck")
            else STAGE_POLICIES[Stage(queue)].time_limit
        )
        shutdown = float(body["environment"]["WINDOWPIPE_SHUTDOWN_TIMEOUT"])
        assert limit < shutdown < seconds(body["stop_grace_period"]), name


def test_the_image_installs_the_locked_dependencies_of_every_declared_one() -> None:
    """requirements.lock pins (with hashes) every dependency pyproject.toml declares for the
    image (the base ones and the `all` extra's connectors)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"]]
    for extra in ("elasticsearch", "opensearch", "s3", "snowflake"):
        declared += project["optional-dependencies"][extra]
    lock = (REPO / "requirements.lock").read_text()
    pinned = {
        re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
        for line in lock.splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert lock.count("--hash=sha256:") == len(pinned)
    for requirement in declared:
        name = re.split(r"[\[<>=~! ;]", requirement, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in pinned, requirement
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in dockerfile
    assert "--no-deps" in dockerfile


def test_worker_services_can_be_scaled(compose: dict[str, Any]) -> None:
    for name, body in windowpipe_services(compose).items():
        if name.startswith("worker-"):
            assert "container_name" not in body and "ports" not in body, name


@pytest.mark.integration  # starts another program
@pytest.mark.parametrize(
    "service",
    [
        "worker-precheck",
        "worker-extract",
        "worker-load",
        "worker-audit",
        "worker-control",
        "beat",
        "flower",
    ],
)
def test_celery_accepts_each_service_command(compose: dict[str, Any], service: str) -> None:
    command = [
        part.replace("${FLOWER_USER}", "u").replace("${FLOWER_PASSWORD}", "p")
        for part in compose["services"][service]["command"]
    ]
    env = {
        **os.environ,
        "WINDOWPIPE_CONFIG": str(REPO / "windowpipe.example.toml"),
        "SF_PASSWORD": "x",
        "S3_ACCESS_KEY_ID": "x",
        "S3_SECRET_ACCESS_KEY": "x",
    }
    # click parses every option before it acts on --help: an unknown option fails here.
    result = subprocess.run(
        [sys.executable, "-m", *command, "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Usage:" in result.stdout


def test_example_config_is_valid() -> None:
    from core.config import load_config

    env = {"SF_PASSWORD": "x", "S3_ACCESS_KEY_ID": "x", "S3_SECRET_ACCESS_KEY": "x"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = load_config(Path(REPO / "windowpipe.example.toml"))
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert set(config.pipelines) == {"orders"}


# --- liveness ----------------------------------------------------------------------------------


def worker_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: body
        for name, body in windowpipe_services(compose).items()
        if body["command"][3] == "worker"
    }


def test_every_worker_service_has_the_liveness_healthcheck(compose: dict[str, Any]) -> None:
    for name, body in worker_services(compose).items():
        check = body["healthcheck"]
        assert check["test"][:4] == ["CMD", "python", "-m", "workers.liveness"], name
        max_age = float(check["test"][check["test"].index("--max-age") + 1])
        # The probe reads the file the worker touches: the same variable, no FILE argument.
        assert len(check["test"]) == 6, check["test"]
        assert body["environment"]["WINDOWPIPE_HEARTBEAT_FILE"].startswith("/tmp/"), name
        # Ten heartbeats (2 s apart) before a worker counts as hung; a start period longer
        # than a worker takes to connect.
        assert max_age >= 10, name
        assert check["retries"] >= 1 and check["start_period"] == "60s", name
        assert body["restart"] == "unless-stopped", name


def test_autoheal_restarts_the_workers_whose_healthcheck_fails(compose: dict[str, Any]) -> None:
    autoheal = compose["services"]["autoheal"]
    label = autoheal["environment"]["AUTOHEAL_CONTAINER_LABEL"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in autoheal["volumes"]
    for name, body in worker_services(compose).items():
        assert body["labels"][label] == "true", name


def test_the_control_queue_has_two_consumers(compose: dict[str, Any]) -> None:
    assert compose["services"]["worker-control"]["deploy"]["replicas"] >= 2


@pytest.mark.integration  # starts another program
def test_the_healthcheck_command_runs(compose: dict[str, Any], tmp_path: Path) -> None:
    command = compose["services"]["worker-control"]["healthcheck"]["test"][1:]
    env = {**os.environ, "WINDOWPIPE_HEARTBEAT_FILE": str(tmp_path / "heartbeat")}
    run = [sys.executable, *command[1:]]
    missing = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stdout.startswith("unhealthy: no heartbeat")
    (tmp_path / "heartbeat").touch()
    fresh = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert fresh.returncode == 0 and fresh.stdout.startswith("ok: "), fresh.stdout
    assert fresh.stdout.count("\n") == 1
