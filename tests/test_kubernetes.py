"""deploy/kubernetes/ checked offline and against the app (no cluster runs here): every manifest
validates against the Kubernetes 1.31 schemas, a Deployment per Celery queue runs commands
Celery accepts with the config where WINDOWPIPE_CONFIG points, secrets come by reference, grace
periods cover the stages' time limits; and the KEDA trigger's query, run against PostgreSQL the
way KEDA runs it, counts exactly the windows waiting for (or running at) each stage."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import yaml

from core.instants import format_instant
from core.records import Stage, WindowStatus
from core.retry import CONTROL_TIME_LIMIT, STAGE_POLICIES
from tests.conftest import PG_ADMIN_URL
from tests.support import free_port
from tests.support.deployment import REPO, Deployment, write_config
from tests.test_compose import QUEUES as COMPOSE_QUEUES

# Fixtures: the parsed compose file, a Redis DB of our own, deployments stopped after the test.
from tests.test_compose import compose as compose

BASE = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31"
SECRET_NAME = "windowpipe-secrets"
CONFIG_MOUNT = "/etc/windowpipe"
EXAMPLE_ENV = {
    "WINDOWPIPE_CONFIG": str(REPO / "windowpipe.example.toml"),
    "SF_PASSWORD": "x",
    "S3_ACCESS_KEY_ID": "x",
    "S3_SECRET_ACCESS_KEY": "x",
}


# --- reading the manifests ------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    """The files the kustomization applies, in its order."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [BASE / name for name in kustomization["resources"]]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in documents(path)]


def of_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in resources if doc["kind"] == kind}


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    item: dict[str, Any] = containers[0]
    return item


def env_of(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container(deployment).get("env", [])}


def queue_of(deployment: dict[str, Any]) -> str | None:
    command = container(deployment)["command"]
    if command[:4] != ["celery", "-A", "workers", "worker"]:
        return None
    queue: str = command[command.index("-Q") + 1]
    return queue


def concurrency_of(command: list[str]) -> int:
    return int(command[command.index("-c") + 1])


def workers_by_queue(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for name, deployment in of_kind(resources, "Deployment").items():
        queue = queue_of(deployment)
        if queue is not None:
            assert queue not in found, (
                f"{queue} served by {found[queue]['metadata']['name']}, {name}"
            )
            found[queue] = deployment
    return found


def app_queues() -> list[str]:
    """workers.QUEUES, from the Celery app itself (importing it reads a config)."""
    out = subprocess.run(
        [sys.executable, "-c", "import workers; print(' '.join(workers.QUEUES))"],
        cwd=REPO,
        env={**os.environ, **EXAMPLE_ENV},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out


def config_toml() -> str:
    """The config every pod mounts (kustomization.yaml's configMapGenerator makes it the
    ConfigMap windowpipe-config-<hash>)."""
    return (BASE / "windowpipe.toml").read_text()


def secret_keys() -> set[str]:
    (secret,) = documents(BASE / "secret.example.yaml")
    return set(secret["stringData"])


# --- offline validation --------------------------------------------------------------------------


def validate_files(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration  # starts another program
def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    files = [*manifest_files(), BASE / "secret.example.yaml"]
    result = validate_files(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    built_in = [
        doc
        for path in files
        for doc in documents(path)
        if not doc["apiVersion"].startswith("keda.sh/")
    ]
    passed = [
        line for line in result.stdout.splitlines() if line.startswith("INFO") and "passed" in line
    ]
    assert len(passed) == len(built_in), result.stdout
    # Only KEDA's custom resources have no schema here; their fields are checked below.
    warned = [line for line in result.stdout.splitlines() if line.startswith("WARN")]
    assert all("keda.sh/v1alpha1" in line for line in warned), warned


@pytest.mark.integration  # starts another program
def test_the_validator_refuses_an_unknown_field(tmp_path: Path) -> None:
    (deployment,) = documents(BASE / "beat.yaml")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30  # the name is ...Seconds
    broken = tmp_path / "beat.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    result = validate_files(broken)
    assert result.returncode != 0
    assert "terminationGracePeriod" in result.stdout + result.stderr


def test_the_kustomization_applies_every_manifest_and_never_the_example_secret() -> None:
    listed = {path.name for path in manifest_files()}
    on_disk = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk - listed == {"secret.example.yaml"}
    assert listed <= on_disk


# --- the workers match the app -------------------------------------------------------------------


@pytest.mark.integration  # starts another program
def test_every_queue_of_the_app_has_its_own_worker_deployment(
    resources: list[dict[str, Any]],
) -> None:
    served = workers_by_queue(resources)
    assert sorted(served) == sorted(app_queues())
    for queue, deployment in served.items():
        assert deployment["metadata"]["name"] == f"worker-{queue}"
        command = container(deployment)["command"]
        assert command[command.index("-n") + 1] == f"{queue}@%h"


def test_each_pool_has_the_concurrency_of_its_compose_service(
    resources: list[dict[str, Any]], compose: dict[str, Any]
) -> None:
    served = workers_by_queue(resources)
    assert sorted(served) == sorted(COMPOSE_QUEUES)
    for queue, deployment in served.items():
        in_compose = compose["services"][f"worker-{queue}"]["command"]
        assert concurrency_of(container(deployment)["command"]) == concurrency_of(in_compose)
        requests = container(deployment)["resources"]["requests"]
        assert requests["cpu"] and requests["memory"], queue
        assert container(deployment)["resources"]["limits"]["memory"], queue


def celery_commands(resources: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {
        name: container(deployment)["command"]
        for name, deployment in of_kind(resources, "Deployment").items()
        if container(deployment)["command"][:3] == ["celery", "-A", "workers"]
    }


@pytest.mark.integration  # starts another program
def test_celery_accepts_every_celery_command(resources: list[dict[str, Any]]) -> None:
    commands = celery_commands(resources)
    assert {"beat", "flower", *(f"worker-{q}" for q in COMPOSE_QUEUES)} <= set(commands)
    for name, command in commands.items():
        # click parses every option before it acts on --help: an unknown option fails here.
        result = subprocess.run(
            [sys.executable, "-m", *command, "--help"],
            cwd=REPO,
            env={**os.environ, **EXAMPLE_ENV},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (name, result.stderr[-2000:])
        assert "Usage:" in result.stdout, name


@pytest.mark.integration  # starts another program
def test_the_exporter_command_is_windowpipe_metrics(resources: list[dict[str, Any]]) -> None:
    deployment = of_kind(resources, "Deployment")["metrics"]
    command = container(deployment)["command"]
    assert command[:2] == ["windowpipe", "metrics"]
    result = subprocess.run(
        [sys.executable, "-m", "windowpipe", *command[1:], "--help"],
        cwd=REPO,
        env={**os.environ, **EXAMPLE_ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    port = int(command[command.index("--port") + 1])
    (declared,) = container(deployment)["ports"]
    assert declared["containerPort"] == port
    service = of_kind(resources, "Service")["windowpipe-metrics"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == declared["name"]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    # The exporter reads; it needs the URLs but none of the connectors' secrets.
    assert set(env_of(deployment)) == {
        "WINDOWPIPE_CONFIG",
        "WINDOWPIPE_REDIS_URL",
        "WINDOWPIPE_STATE_URL",
    }


def test_every_pod_mounts_the_config_where_windowpipe_config_points(
    resources: list[dict[str, Any]],
) -> None:
    for name, deployment in of_kind(resources, "Deployment").items():
        env = env_of(deployment)
        assert env["WINDOWPIPE_CONFIG"]["value"] == f"{CONFIG_MOUNT}/windowpipe.toml", name
        mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        (config_volume,) = [
            v for v in volumes.values() if v.get("configMap", {}).get("name") == "windowpipe-config"
        ]
        mount = mounts[config_volume["name"]]
        assert mount["mountPath"] == CONFIG_MOUNT and mount["readOnly"] is True, name
    generated = yaml.safe_load((BASE / "kustomization.yaml").read_text())["configMapGenerator"]
    assert generated == [
        {
            "name": "windowpipe-config",
            "files": ["windowpipe.toml"],
            "options": {"labels": {"app.kubernetes.io/name": "windowpipe"}},
        }
    ]


def test_the_config_is_valid_and_only_the_workers_get_the_connectors_secrets(
    resources: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import load_config

    text = config_toml()
    named = sorted(_secret_env_names(tomllib.loads(text)))
    assert named == ["S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "SF_PASSWORD"]
    for name in named:
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("WINDOWPIPE_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("WINDOWPIPE_STATE_URL", "postgresql+psycopg://u:p@postgres:5432/windowpipe")
    path = tmp_path / "windowpipe.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.settings.state_url.startswith("postgresql+psycopg://")
    assert set(config.pipelines) == {"orders"}
    # Workers reach the connectors and get their secrets; beat, Flower and the exporter run no
    # task and get none (least privilege), only the URLs.
    for name, deployment in of_kind(resources, "Deployment").items():
        env = env_of(deployment)
        for variable in ("WINDOWPIPE_REDIS_URL", "WINDOWPIPE_STATE_URL"):
            assert "secretKeyRef" in env[variable]["valueFrom"], (name, variable)
        if queue_of(deployment) is not None:
            for variable in named:
                assert "secretKeyRef" in env[variable]["valueFrom"], (name, variable)
        else:
            assert not set(named) & set(env), name


def _secret_env_names(table: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for key, value in table.items():
        if isinstance(value, dict):
            names |= _secret_env_names(value)
        elif key.endswith("_env"):
            names.add(value)
    return names


def test_secrets_come_by_reference_from_keys_the_example_secret_documents(
    resources: list[dict[str, Any]],
) -> None:
    keys = secret_keys()
    used: set[str] = set()
    for name, deployment in of_kind(resources, "Deployment").items():
        for variable, item in env_of(deployment).items():
            if "value" in item:
                # Plain values are paths and numbers, never a URL (which may hold a password).
                assert "://" not in item["value"] and "PASSWORD" not in variable, (name, variable)
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET_NAME, (name, variable)
            used.add(ref["key"])
    for auth in of_kind(resources, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == SECRET_NAME
            used.add(ref["key"])
    assert used == keys
    assert "Secret" not in {doc["kind"] for doc in resources}


def test_no_pod_gets_service_links(resources: list[dict[str, Any]]) -> None:
    # A Service named flower would inject FLOWER_PORT=tcp://..., which Flower reads as --port.
    for name, deployment in of_kind(resources, "Deployment").items():
        assert pod_spec(deployment)["enableServiceLinks"] is False, name


# --- stopping and liveness ----------------------------------------------------------------------


def time_limit(queue: str) -> float:
    if queue in ("control", "recheck"):
        return CONTROL_TIME_LIMIT
    return STAGE_POLICIES[Stage(queue)].time_limit


def test_workers_get_longer_to_stop_than_their_longest_task(
    resources: list[dict[str, Any]],
) -> None:
    longest_soft = max(policy.soft_time_limit for policy in STAGE_POLICIES.values())
    for queue, deployment in workers_by_queue(resources).items():
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        shutdown = float(env_of(deployment)["WINDOWPIPE_SHUTDOWN_TIMEOUT"]["value"])
        # The warm shutdown waits for the running task (at most its hard time limit); the
        # worker's own shutdown watchdog fires after that, and Kubernetes' SIGKILL after both.
        assert time_limit(queue) < shutdown < grace, queue
        if queue in (Stage.EXTRACT.value, Stage.LOAD.value):
            assert grace >= longest_soft, queue


@pytest.mark.integration  # starts another program
def test_the_app_acks_late_so_an_interrupted_task_is_delivered_again() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import workers; c = workers.app.conf; "
            "print(c.task_acks_late, c.task_reject_on_worker_lost, c.worker_prefetch_multiplier, "
            "c.beat_scheduler, c.redbeat_lock_key)",
        ],
        cwd=REPO,
        env={**os.environ, **EXAMPLE_ENV},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["True", "True", "1", "redbeat.RedBeatScheduler", "windowpipe:redbeat:lock"]


def test_beat_runs_as_one_replica_replaced_never_doubled(resources: list[dict[str, Any]]) -> None:
    beat = of_kind(resources, "Deployment")["beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    assert container(beat)["command"] == ["celery", "-A", "workers", "beat"]


def test_control_runs_two_replicas_and_the_stage_pools_leave_replicas_to_keda(
    resources: list[dict[str, Any]],
) -> None:
    for queue, deployment in workers_by_queue(resources).items():
        if queue == "control":
            assert deployment["spec"]["replicas"] == 2
        elif queue == "recheck":
            assert deployment["spec"]["replicas"] == 1  # not a stage: no ScaledObject
        else:
            assert "replicas" not in deployment["spec"], queue


def probe_command(deployment: dict[str, Any], probe: str) -> list[str]:
    command: list[str] = container(deployment)[probe]["exec"]["command"]
    return command


@pytest.mark.integration  # starts another program
def test_the_liveness_probe_is_the_heartbeat_check_and_fails_on_a_stale_heartbeat(
    resources: list[dict[str, Any]], tmp_path: Path
) -> None:
    for queue, deployment in workers_by_queue(resources).items():
        command = probe_command(deployment, "livenessProbe")
        assert command == probe_command(deployment, "startupProbe"), queue
        assert command[:3] == ["python", "-m", "workers.liveness"], queue
        # A worker killed for hanging is not given its stage-sized grace period.
        assert container(deployment)["livenessProbe"]["terminationGracePeriodSeconds"] <= 30
        heartbeat = env_of(deployment)["WINDOWPIPE_HEARTBEAT_FILE"]["value"]
        # The heartbeat lives on a writable volume (the root filesystem is read-only).
        mounts = [m["mountPath"] for m in container(deployment)["volumeMounts"]]
        assert any(heartbeat.startswith(path.rstrip("/") + "/") for path in mounts), queue
        assert container(deployment)["securityContext"]["readOnlyRootFilesystem"] is True
    # Run the probe as the kubelet would, on a heartbeat file of ours.
    command = probe_command(workers_by_queue(resources)["extract"], "livenessProbe")
    heartbeat = tmp_path / "heartbeat"

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *command[1:]],
            cwd=REPO,
            env={**os.environ, "WINDOWPIPE_HEARTBEAT_FILE": str(heartbeat)},
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert probe().returncode == 1  # no heartbeat yet
    heartbeat.touch()
    fresh = probe()
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    old = time.time() - 3600
    os.utime(heartbeat, (old, old))
    stale = probe()
    assert stale.returncode == 1 and "unhealthy" in stale.stdout


# --- Flower behind auth ---------------------------------------------------------------------------


@pytest.mark.integration
def test_flower_takes_its_basic_auth_from_the_secret_and_refuses_without_it(
    resources: list[dict[str, Any]], redis_url_for_flower: str
) -> None:
    flower = of_kind(resources, "Deployment")["flower"]
    auth = env_of(flower)["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert (auth["name"], auth["key"]) == (SECRET_NAME, "flower-basic-auth")
    command = container(flower)["command"]
    assert not any("basic" in part for part in command)  # not on the command line
    port = free_port()
    command = [part.replace("--port=5555", f"--port={port}") for part in command]
    process = subprocess.Popen(
        [sys.executable, "-m", *command, "--address=127.0.0.1"],
        cwd=REPO,
        env={
            **os.environ,
            **EXAMPLE_ENV,
            "WINDOWPIPE_REDIS_URL": redis_url_for_flower,
            "FLOWER_BASIC_AUTH": "admin:s3cret",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/workers"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                raise AssertionError("Flower answered without credentials")
            except urllib.error.HTTPError as error:
                assert error.code == 401
                break
            except OSError:
                assert process.poll() is None, "Flower exited"
                assert time.monotonic() < deadline, "Flower did not start"
                time.sleep(0.3)
        token = b64encode(b"admin:s3cret").decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)


@pytest.fixture
def redis_url_for_flower() -> Iterator[str]:
    from tests.conftest import REDIS_TEST_URL
    from tests.support.deployment import free_redis_db, release_redis_db

    number = free_redis_db(REDIS_TEST_URL)
    yield f"{REDIS_TEST_URL}/{number}"
    release_redis_db(REDIS_TEST_URL, number)


# --- KEDA -----------------------------------------------------------------------------------------

SCALED_OBJECT_SPEC = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
"""The fields of a KEDA 2.x ScaledObject's spec (keda.sh/v1alpha1)."""

TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
POSTGRESQL_METADATA = {
    "query",
    "targetQueryValue",
    "activationTargetQueryValue",
    "connectionFromEnv",
    "host",
    "port",
    "userName",
    "dbName",
    "sslmode",
    "passwordFromEnv",
}
"""What KEDA's postgresql scaler reads from a trigger's metadata."""
POSTGRESQL_AUTH_PARAMETERS = {
    "connection",
    "password",
    "host",
    "port",
    "userName",
    "dbName",
    "sslmode",
}


def scaled_objects(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ScaledObjects by the queue of the Deployment they scale."""
    deployments = of_kind(resources, "Deployment")
    found = {}
    for name, scaled in of_kind(resources, "ScaledObject").items():
        target = scaled["spec"]["scaleTargetRef"]["name"]
        queue = queue_of(deployments[target])
        assert queue is not None, name
        found[queue] = scaled
    return found


def test_each_stage_queue_has_a_scaled_object_with_fields_keda_knows(
    resources: list[dict[str, Any]],
) -> None:
    from kubernetes_validate import validate

    found = scaled_objects(resources)
    assert sorted(found) == sorted(stage.value for stage in Stage)
    auths = of_kind(resources, "TriggerAuthentication")
    deployments = workers_by_queue(resources)
    for queue, scaled in found.items():
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
        assert set(spec["scaleTargetRef"]) == {"name"}
        for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
            assert isinstance(spec[key], int), (queue, key)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        # `advanced.horizontalPodAutoscalerConfig.behavior` is the HPA's own field: the
        # HorizontalPodAutoscaler schema checks it.
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        validate(_hpa_with(behavior), KUBERNETES_VERSION, strict=True)
        (trigger,) = spec["triggers"]
        assert set(trigger) <= TRIGGER_FIELDS
        assert trigger["type"] == "postgresql"
        metadata = trigger["metadata"]
        assert set(metadata) <= POSTGRESQL_METADATA, set(metadata) - POSTGRESQL_METADATA
        assert all(isinstance(value, str) for value in metadata.values()), queue
        # One replica takes `-c` windows at a time.
        command = container(deployments[queue])["command"]
        assert float(metadata["targetQueryValue"]) == concurrency_of(command)
        assert float(metadata["activationTargetQueryValue"]) == 0
        auth = auths[trigger["authenticationRef"]["name"]]
        params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
        assert params <= POSTGRESQL_AUTH_PARAMETERS and "connection" in params


def _hpa_with(behavior: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "check"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "maxReplicas": 2,
            "behavior": behavior,
        },
    }


def test_the_example_keda_connection_is_a_libpq_connection_string() -> None:
    (secret,) = documents(BASE / "secret.example.yaml")
    parsed = psycopg.conninfo.conninfo_to_dict(secret["stringData"]["keda-postgresql-connection"])
    assert {"host", "port", "user", "password", "dbname", "sslmode"} <= set(parsed)


@pytest.fixture
def keda_database() -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL database, as (SQLAlchemy URL, libpq connection string): KEDA reads
    the windows table through the connection string with the server's default search_path."""
    name = f"wp_keda_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(PG_ADMIN_URL).set(database=name)
    conninfo = psycopg.conninfo.make_conninfo(
        host=url.host or "127.0.0.1",
        port=str(url.port or 5432),
        user=url.username or "postgres",
        dbname=name,
        sslmode="disable",
    )
    try:
        yield url.render_as_string(hide_password=False), conninfo
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def keda_reads(conninfo: str, query: str) -> float:
    """What KEDA's postgresql scaler gets: the query's one value, scanned as a float."""
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return float(row[0])


@pytest.mark.integration
def test_the_keda_query_counts_the_windows_waiting_for_or_running_at_each_stage(
    resources: list[dict[str, Any]],
    keda_database: tuple[str, str],
    tmp_path: Path,
    redis_db: str,
    stop_all: list[Deployment],
) -> None:
    from tests.test_faults import pipeline, seed_events, sql_source, sql_target

    url, conninfo = keda_database
    queries = {
        queue: scaled["spec"]["triggers"][0]["metadata"]["query"]
        for queue, scaled in scaled_objects(resources).items()
    }
    windows = 6
    seed_events(url, [2] * windows)
    config = write_config(
        tmp_path / "windowpipe.toml",
        {"redis_url": redis_db, "state_url": url},
        {
            "events": pipeline(
                sql_source(url),
                {"type": "local", "path": str(tmp_path / "staging")},
                sql_target(url),
                windows,
                max_backfill_windows=4,
            )
        },
    )
    dep = Deployment(config_path=config, workdir=tmp_path)
    stop_all.append(dep)
    origin = datetime(2026, 1, 1, tzinfo=UTC)
    end = origin + windows * timedelta(minutes=15)

    def backlog() -> dict[str, float]:
        return {queue: keda_reads(conninfo, query) for queue, query in queries.items()}

    # 1. Enqueued with no worker running: the backfill cap queues 4 of the 6 windows at
    # precheck; their messages wait in the precheck list.
    dep.cli("enqueue", "events", "--start", format_instant(origin), "--end", format_instant(end))
    assert backlog() == {"precheck": 4, "extract": 0, "load": 0, "audit": 0}
    broker = dep.redis()
    assert broker.llen("precheck") == 4
    assert exporter_backlog(dep) == backlog()

    # 2. A precheck worker alone: the 4 windows move on and wait for extract (nothing consumes
    # the control queue, so the 2 pending windows stay pending).
    dep.start_worker("precheck", concurrency=2)
    store = dep.store()
    deadline = time.monotonic() + 90
    while not (
        len(store.list_records("events", statuses=[WindowStatus.QUEUED])) == 4
        and all(
            r.stage == Stage.EXTRACT
            for r in store.list_records("events", statuses=[WindowStatus.QUEUED])
        )
    ):
        assert time.monotonic() < deadline, [r.to_json() for r in store.list_records("events")]
        time.sleep(0.2)
    assert backlog() == {"precheck": 0, "extract": 4, "load": 0, "audit": 0}
    assert broker.llen("extract") == 4 and broker.llen("precheck") == 0

    # 3. A window an extract worker has claimed still counts: it is running at extract.
    first = store.list_records("events", statuses=[WindowStatus.QUEUED])[0]
    assert store.claim_stage("events", first.window_start, Stage.EXTRACT) is not None
    assert backlog() == {"precheck": 0, "extract": 4, "load": 0, "audit": 0}
    assert exporter_backlog(dep) == backlog()
    store.dispose()


def exporter_backlog(dep: Deployment) -> dict[str, float]:
    """windowpipe_windows_waiting + windowpipe_windows_running per stage, from `metrics --once`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = dep.cli("metrics", "--once").stdout
    totals: dict[str, float] = {stage.value: 0.0 for stage in Stage}
    for family in text_string_to_metric_families(text):
        if family.name in ("windowpipe_windows_waiting", "windowpipe_windows_running"):
            for sample in family.samples:
                totals[sample.labels["stage"]] += sample.value
    return totals
