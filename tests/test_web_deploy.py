"""Where the web view runs: its Kubernetes Deployment and Service (deploy/kubernetes/web.yaml),
its docker-compose service, and the package data a non-editable install needs."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from windowpipe.cli import app as cli_app

REPO = Path(__file__).resolve().parent.parent
WEB_YAML = REPO / "deploy" / "kubernetes" / "web.yaml"
CONNECTOR_SECRETS = {"SF_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"}
"""The variables windowpipe.toml's connectors name (config map and windowpipe.example.toml)."""


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(WEB_YAML.read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    item: dict[str, Any] = container
    return item


def test_web_deployment_runs_under_the_restricted_pod_security_standard(
    manifests: dict[str, dict[str, Any]],
) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["enableServiceLinks"] is False
    security = _container(manifests["Deployment"])["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_web_deployment_gets_credentials_from_the_secret_and_no_connector_secret(
    manifests: dict[str, dict[str, Any]],
) -> None:
    env = {item["name"]: item for item in _container(manifests["Deployment"])["env"]}
    assert not CONNECTOR_SECRETS & set(env)
    for name in ("WINDOWPIPE_WEB_USER", "WINDOWPIPE_WEB_PASSWORD", "WINDOWPIPE_STATE_URL"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "windowpipe-secrets", name
    secret = yaml.safe_load((WEB_YAML.parent / "secret.example.yaml").read_text())
    assert {"web-user", "web-password"} <= set(secret["stringData"])
    assert manifests["Deployment"]["spec"]["replicas"] == 1  # CSRF keys are per process


def test_web_deployment_probes_the_open_health_routes_and_its_service_reaches_it(
    manifests: dict[str, dict[str, Any]],
) -> None:
    from windowpipe.web.security import OPEN_PATHS

    container = _container(manifests["Deployment"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"/healthz", "/readyz"} <= OPEN_PATHS
    (port,) = container["ports"]
    command = container["command"]
    assert command[:2] == ["windowpipe", "web"]
    assert command[command.index("--port") + 1] == str(port["containerPort"])
    service = manifests["Service"]
    assert service["spec"]["selector"] == manifests["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_the_web_command_accepts_the_deployed_options(manifests: dict[str, dict[str, Any]]) -> None:
    command = _container(manifests["Deployment"])["command"]
    result = CliRunner().invoke(cli_app, [*command[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert "--read-only" in result.output


def test_compose_web_service_is_local_only_and_gets_no_connector_secret() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    web = compose["services"]["web"]
    assert "env_file" not in web
    assert web["command"][:2] == ["windowpipe", "web"]
    assert all(port.startswith("127.0.0.1:") for port in web["ports"])
    assert not CONNECTOR_SECRETS & set(web["environment"])
    assert web["environment"]["WINDOWPIPE_WEB_PASSWORD"] == "${WEB_PASSWORD}"
    example = (REPO / ".env.example").read_text()
    assert "WEB_USER=" in example and "WEB_PASSWORD=" in example
    result = CliRunner().invoke(cli_app, [*web["command"][1:], "--help"])
    assert result.exit_code == 0, result.output


def test_every_template_and_static_file_is_package_data() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["windowpipe.web"]
    package = REPO / "windowpipe" / "web"
    files = [
        path.relative_to(package).as_posix()
        for folder in ("templates", "static")
        for path in (package / folder).rglob("*")
        if path.is_file()
    ]
    assert files
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
