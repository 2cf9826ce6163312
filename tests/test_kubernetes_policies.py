"""What a real cluster enforces on deploy/kubernetes/, checked on what `kubectl kustomize` builds
(the base, and the base with the Prometheus Operator component): every object validates
(kubernetes-validate --strict for the built-in kinds, the CRD schemas of KEDA and of the
Prometheus Operator for theirs),
every pod template passes Pod Security "restricted", disruptions and rollouts are handled
(budgets, anti-affinity, safe-to-evict, a config change rolls the pods, migrations before new
workers, a pinned image), and beat and Flower get no connector secrets and start without them.

kubectl and promtool come with .ci/run; these tests fail, never skip, without them."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import sqlalchemy as sa
import yaml

from core.records import Stage
from core.store import StateStore
from tests.support import free_port, wait_until
from tests.support.deployment import REPO
from tests.test_kubernetes import BASE, KUBERNETES_VERSION, documents

COMPONENT = BASE / "components" / "prometheus-operator"
SCHEMAS = REPO / "tests" / "schemas"
CONNECTOR_SECRETS = ("SF_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY")
POD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod")

pytestmark = pytest.mark.integration  # starts another program (kubectl, celery, validators)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    assert shutil.which("kubectl"), "kubectl missing: .ci/run installs Debian's kubectl"
    built = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    """The base as `kubectl apply -k deploy/kubernetes` would apply it."""
    return kustomize(BASE)


@pytest.fixture(scope="module")
def with_operator(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """An overlay of the base with the Prometheus Operator component, as README shows."""
    overlay = tmp_path_factory.mktemp("overlay")
    base = os.path.relpath(BASE, overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [base],
                "components": [os.path.relpath(COMPONENT, overlay)],
            }
        )
    )
    return kustomize(overlay)


def named(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in objects if doc["kind"] == kind}


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every object that makes pods."""
    for doc in objects:
        if doc["kind"] not in POD_KINDS:
            continue
        spec = doc["spec"]
        if doc["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if doc["kind"] != "Pod":
            spec = spec["template"]["spec"]
        yield f"{doc['kind']}/{doc['metadata']['name']}", spec


def worker_deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: doc
        for name, doc in named(objects, "Deployment").items()
        if doc["spec"]["template"]["spec"]["containers"][0]["command"][:4]
        == ["celery", "-A", "workers", "worker"]
    }


# --- schemas -------------------------------------------------------------------------------------


def validate_built_in(objects: list[dict[str, Any]], tmp_path: Path) -> str:
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_every_built_in_object_validates_strictly(
    with_operator: list[dict[str, Any]], tmp_path: Path
) -> None:
    output = validate_built_in(with_operator, tmp_path)
    passed = [line for line in output.splitlines() if line.startswith("INFO") and "passed" in line]
    # The custom resources have no schema in kubernetes-validate: their CRDs' are used below.
    custom = {"keda.sh/v1alpha1", "monitoring.coreos.com/v1"}
    assert {doc["apiVersion"] for doc in with_operator} >= custom
    built_in = [doc for doc in with_operator if doc["apiVersion"] not in custom]
    assert len(passed) == len(built_in), output


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema refusing unknown fields, as `kubectl apply --validate=strict` does: every
    object with `properties` and no `additionalProperties` gets `additionalProperties: false`."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


CRD_SCHEMAS = {
    "ScaledObject": "keda-scaledobject.json",
    "TriggerAuthentication": "keda-triggerauthentication.json",
    "ServiceMonitor": "prometheus-operator-servicemonitor.json",
    "PrometheusRule": "prometheus-operator-prometheusrule.json",
}
"""The custom resources' schemas, vendored from their projects' CRDs (each file's $comment says
which version and commit)."""


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """A validator of the custom resource `kind` from its CRD's schema."""
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[kind]).read_text())
    return jsonschema.Draft7Validator(strict(schema))


def test_custom_resources_validate_against_their_crd_schemas(
    with_operator: list[dict[str, Any]],
) -> None:
    checked: dict[str, int] = {}
    for kind in CRD_SCHEMAS:
        validator = crd_validator(kind)
        for name, doc in named(with_operator, kind).items():
            errors = [error.message for error in validator.iter_errors(doc)]
            assert errors == [], (kind, name, errors)
            checked[kind] = checked.get(kind, 0) + 1
    assert checked == {
        "ScaledObject": len(Stage),
        "TriggerAuthentication": 1,
        "ServiceMonitor": 2,
        "PrometheusRule": 1,
    }


def test_kedas_schema_refuses_a_misspelt_field(built: list[dict[str, Any]]) -> None:
    scaled = copy.deepcopy(next(iter(named(built, "ScaledObject").values())))
    scaled["spec"]["minReplicas"] = 1  # KEDA's name is minReplicaCount
    errors = list(crd_validator("ScaledObject").iter_errors(scaled))
    assert any("minReplicas" in error.message for error in errors)
    scaled = copy.deepcopy(next(iter(named(built, "ScaledObject").values())))
    scaled["spec"]["pollingInterval"] = "15"
    assert list(crd_validator("ScaledObject").iter_errors(scaled))


# --- Pod Security "restricted" -------------------------------------------------------------------

ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
"""Volume types the "restricted" level allows (kubernetes.io/docs/concepts/security/
pod-security-standards); hostPath and the others are refused."""


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """Where a pod spec breaks the Pod Security Standards' "restricted" level (baseline
    included): host namespaces, host ports, privileged, added capabilities, volume types, and
    restricted's runAsNonRoot, allowPrivilegeEscalation: false, capabilities drop ALL (add at
    most NET_BIND_SERVICE), seccompProfile RuntimeDefault or Localhost."""
    found = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(f"{key} is set")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds - ALLOWED_VOLUMES)}")
    pod = spec.get("securityContext", {})
    if pod.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    containers = [
        *spec.get("initContainers", []),
        *spec.get("containers", []),
        *spec.get("ephemeralContainers", []),
    ]
    for item in containers:
        name = item["name"]
        own = item.get("securityContext", {})
        if own.get("privileged"):
            found.append(f"{name}: privileged")
        if own.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if own.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if own.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        capabilities = own.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities added {capabilities['add']}")
        seccomp = own.get("seccompProfile", pod.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        for port in item.get("ports", []):
            if port.get("hostPort"):
                found.append(f"{name}: hostPort {port['hostPort']}")
    return found


def test_every_pod_template_passes_pod_security_restricted(
    with_operator: list[dict[str, Any]],
) -> None:
    templates = dict(pod_templates(with_operator))
    assert len(templates) == len(named(with_operator, "Deployment")) >= 9
    for where, spec in templates.items():
        assert restricted_violations(spec) == [], where
        # And no pod talks to the API: no service-account token mounted.
        assert spec["automountServiceAccountToken"] is False, where
        for item in [*spec.get("initContainers", []), *spec["containers"]]:
            assert item["securityContext"]["readOnlyRootFilesystem"] is True, (where, item["name"])


@pytest.mark.parametrize(
    ("change", "violation"),
    [
        (lambda s: s.update(hostNetwork=True), "hostNetwork"),
        (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda s: s["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda s: s["containers"][0]["securityContext"].pop("capabilities"), "drop ALL"),
        (lambda s: s["containers"][0]["ports"].append({"containerPort": 1, "hostPort": 1}), "host"),
        (
            lambda s: s["initContainers"][0]["securityContext"].update(
                allowPrivilegeEscalation=True
            ),
            "allowPrivilegeEscalation",
        ),
    ],
)
def test_the_restricted_check_finds_each_broken_rule(
    built: list[dict[str, Any]], change: Any, violation: str
) -> None:
    spec = copy.deepcopy(dict(pod_templates(built))["Deployment/worker-load"])
    spec["containers"][0].setdefault("ports", [])
    change(spec)
    assert any(violation in line for line in restricted_violations(spec))


# --- disruptions and rollouts --------------------------------------------------------------------


def test_every_worker_pool_has_a_disruption_budget_and_control_keeps_one_consumer(
    built: list[dict[str, Any]],
) -> None:
    budgets = named(built, "PodDisruptionBudget")
    for name, deployment in worker_deployments(built).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (budget,) = [
            b
            for b in budgets.values()
            if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        if name == "worker-control":
            assert budget["spec"]["minAvailable"] == 1 < deployment["spec"]["replicas"]
            affinity = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
            (term,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
            assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
            assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
        else:
            assert budget["spec"]["maxUnavailable"] == 1, name


def test_hour_long_stages_are_not_evicted_by_the_cluster_autoscaler(
    built: list[dict[str, Any]],
) -> None:
    for name, deployment in worker_deployments(built).items():
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        evict = annotations.get("cluster-autoscaler.kubernetes.io/safe-to-evict")
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        # The autoscaler caps graceful termination at 600 s: longer pools must opt out.
        assert (evict == "false") == (grace > 600) or name == "worker-audit", name
        if name in ("worker-extract", "worker-load"):
            assert evict == "false", name


def test_a_config_change_rolls_every_pod(built: list[dict[str, Any]], tmp_path: Path) -> None:
    (config_map,) = named(built, "ConfigMap").values()
    assert config_map["metadata"]["name"].startswith("windowpipe-config-")
    for where, spec in pod_templates(built):
        (volume,) = [v for v in spec["volumes"] if "configMap" in v]
        assert volume["configMap"]["name"] == config_map["metadata"]["name"], where
    # The same base with one line of the config changed: another name in every pod template.
    copy_of = tmp_path / "kubernetes"
    shutil.copytree(BASE, copy_of, ignore=shutil.ignore_patterns("components"))
    with (copy_of / "windowpipe.toml").open("a") as config:
        config.write("\n# changed\n")
    (changed,) = named(kustomize(copy_of), "ConfigMap")
    assert changed != config_map["metadata"]["name"]


def test_every_worker_migrates_the_schema_before_it_starts(built: list[dict[str, Any]]) -> None:
    for name, deployment in worker_deployments(built).items():
        spec = deployment["spec"]["template"]["spec"]
        (migrate,) = spec["initContainers"]
        (worker,) = spec["containers"]
        assert migrate["command"] == ["windowpipe", "migrate"], name
        assert migrate["image"] == worker["image"], name
        env = {item["name"]: item for item in migrate["env"]}
        assert env["WINDOWPIPE_STATE_URL"] == {
            "name": "WINDOWPIPE_STATE_URL",
            "valueFrom": {"secretKeyRef": {"name": "windowpipe-secrets", "key": "state-url"}},
        }
        assert not set(CONNECTOR_SECRETS) & set(env), name  # migrate reaches the store only


def test_the_image_is_a_released_version_never_latest(built: list[dict[str, Any]]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for where, spec in pod_templates(built):
        for item in [*spec.get("initContainers", []), *spec["containers"]]:
            assert item["image"] == f"windowpipe:{version}", (where, item["name"])
    dockerfile = (REPO / "Dockerfile").read_text()
    (base,) = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert base.count(".") >= 2 and "latest" not in base, base  # python:X.Y.Z-...


def test_the_migration_is_safe_to_race_as_every_pod_runs_it(
    tmp_path: Path, pg_schema_url: str
) -> None:
    """Every worker pod of a rollout runs `windowpipe migrate` at once: all of them succeed."""
    from tests.support.deployment import write_config
    from tests.test_migrate import PIPELINE

    config = write_config(
        tmp_path / "windowpipe.toml", {"state_url": pg_schema_url}, {"orders": PIPELINE}
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "windowpipe", "migrate", "--config", str(config)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(run.wait(timeout=120), run.stderr.read() if run.stderr else "") for run in runs]
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    store = StateStore(pg_schema_url)
    try:
        current, head = store.schema_revision()
    finally:
        store.dispose()
    assert current == head


def test_the_keda_query_can_use_the_partial_index(pg_schema_url: str) -> None:
    from tests.test_kubernetes import scaled_objects

    store = StateStore(pg_schema_url)
    store.migrate()
    store.dispose()
    engine = sa.create_engine(pg_schema_url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SET enable_seqscan = off"))
            resources = documents(BASE / "keda.yaml") + documents(BASE / "workers.yaml")
            for scaled in scaled_objects(resources).values():
                query = scaled["spec"]["triggers"][0]["metadata"]["query"]
                plan = "\n".join(conn.execute(sa.text("EXPLAIN " + query)).scalars())
                assert "ix_windows_active_stage" in plan, plan
    finally:
        engine.dispose()


# --- least privilege -----------------------------------------------------------------------------


def test_beat_and_flower_get_no_connector_secrets_and_workers_get_them(
    built: list[dict[str, Any]],
) -> None:
    for name, deployment in named(built, "Deployment").items():
        env = {
            item["name"]
            for item in deployment["spec"]["template"]["spec"]["containers"][0].get("env", [])
        }
        if name in worker_deployments(built):
            assert set(CONNECTOR_SECRETS) <= env, name
        else:
            assert not set(CONNECTOR_SECRETS) & env, name


def secretless_env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONNECTOR_SECRETS}
    env.update(
        WINDOWPIPE_CONFIG=str(REPO / "windowpipe.example.toml"),
        WINDOWPIPE_REDIS_URL=redis_url,
        WINDOWPIPE_STATE_URL=f"sqlite:///{tmp_path}/state.db",
        PYTHONPATH=str(REPO),
    )
    return env


def test_a_worker_without_its_connector_secrets_refuses_to_start(
    tmp_path: Path, redis_db: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "load", "-c", "1"],
        cwd=tmp_path,
        env=secretless_env(tmp_path, redis_db),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert "environment variable" in line and any(name in line for name in CONNECTOR_SECRETS)


@pytest.mark.parametrize("command", ["beat", "flower"])
def test_beat_and_flower_start_without_the_connector_secrets(
    tmp_path: Path, redis_db: str, command: str
) -> None:
    port = free_port()
    extra = (
        ["--loglevel", "INFO"] if command == "beat" else [f"--port={port}", "--address=127.0.0.1"]
    )
    log = tmp_path / f"{command}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", command, *extra],
            cwd=tmp_path,
            env=secretless_env(tmp_path, redis_db),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if command == "beat":
            wait_until(
                lambda: "beat: Starting" in log.read_text() or process.poll() is not None,
                120,
                "beat started",
            )
            assert "beat: Starting" in log.read_text(), log.read_text()[-2000:]
        else:

            def healthy() -> bool:
                if process.poll() is not None:
                    return True
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=5):
                        return True
                except OSError:
                    return False

            wait_until(healthy, 120, "Flower answering /healthcheck")
        assert process.poll() is None, log.read_text()[-2000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# --- the Prometheus Operator component -----------------------------------------------------------


def test_the_prometheus_rule_is_deploy_alerts_yml(with_operator: list[dict[str, Any]]) -> None:
    (rule,) = named(with_operator, "PrometheusRule").values()
    alerts = yaml.safe_load((REPO / "deploy" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    generated = subprocess.run(
        [
            sys.executable,
            "-c",
            "import prometheusrule; print(prometheusrule.prometheus_rule(), end='')",
        ],
        cwd=REPO / "deploy",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert generated == (COMPONENT / "prometheusrule.yaml").read_text(), (
        "run `python deploy/prometheusrule.py`"
    )


def test_the_service_monitors_select_the_exporter_and_flower_services(
    with_operator: list[dict[str, Any]],
) -> None:
    services = named(with_operator, "Service")
    monitors = named(with_operator, "ServiceMonitor")
    assert set(monitors) == {"windowpipe-metrics", "windowpipe-flower"}
    for name, monitor in monitors.items():
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [
            s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()
        ]
        ports = {port["name"] for port in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports, name
            assert endpoint["path"] == "/metrics"
