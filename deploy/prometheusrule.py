"""`python deploy/prometheusrule.py`: write deploy/alerts.yml's rule groups, unchanged, as the
PrometheusRule of the Prometheus Operator component
(deploy/kubernetes/components/prometheus-operator/prometheusrule.yaml). kustomize cannot read a
file outside the component's directory, so the rules are copied; tests/test_kubernetes.py
checks the copy equals deploy/alerts.yml."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
ALERTS = DEPLOY / "alerts.yml"
RULE = DEPLOY / "kubernetes" / "components" / "prometheus-operator" / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/alerts.yml by `python deploy/prometheusrule.py`: edit the alerts\n"
    "# there and run it again (tests/test_kubernetes.py checks the two are equal).\n"
)


def prometheus_rule() -> str:
    """The PrometheusRule holding deploy/alerts.yml's groups, as YAML text."""
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "windowpipe",
            "labels": {"app.kubernetes.io/name": "windowpipe"},
        },
        "spec": {"groups": yaml.safe_load(ALERTS.read_text())["groups"]},
    }
    return HEADER + yaml.dump(rule, Dumper=_BlockDumper, sort_keys=False, width=100)


class _BlockDumper(yaml.SafeDumper):
    """Writes a string of several lines (an `expr`) as a `|` block, as deploy/alerts.yml does."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _text)


if __name__ == "__main__":
    RULE.write_text(prometheus_rule())
