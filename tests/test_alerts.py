"""deploy/alerts.yml: `promtool test rules` runs tests/alerts/alerts_test.yml, which fires every
alert on series labelled as a real scrape labels them (job, namespace) and compares the labels
and summaries in full: labels kept through the comparisons, the absent-series case, dead versus
retrying. Every alert has a severity the ecosystem routes on and a runbook in the README."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deployment import REPO

ALERTS = REPO / "deploy" / "alerts.yml"
UNIT_TESTS = REPO / "tests" / "alerts" / "alerts_test.yml"
README = REPO / "README.md"


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def readme_anchors() -> set[str]:
    """GitHub's anchors of the README's headings (lower case, punctuation dropped, spaces to -)."""
    anchors = set()
    for line in README.read_text().splitlines():
        heading = re.match(r"^#+\s+(.*)$", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_alert_has_a_routable_severity_and_a_runbook_in_the_readme() -> None:
    anchors = readme_anchors()
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("README.md#"), rule["alert"]
        assert url.split("#", 1)[1] in anchors, (rule["alert"], url)


def test_every_alert_fires_in_a_promtool_unit_test() -> None:
    tested: set[str] = set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            if check["exp_alerts"]:
                tested.add(check["alertname"])
    assert {rule["alert"] for rule in alert_rules()} == tested


@pytest.mark.integration  # starts another program (promtool, which .ci/run installs)
def test_promtool_unit_tests_of_the_alerts_pass(tmp_path: Path) -> None:
    assert shutil.which("promtool"), "promtool missing: .ci/run installs Debian's prometheus"
    checked = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The rules as they are, but for their fixed texts (the description and runbook_url, which
    # promtool would otherwise have each expected alert repeat word for word).
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["annotations"] = {"summary": rule["annotations"]["summary"]}
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(UNIT_TESTS, tmp_path / "alerts_test.yml")
    result = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


DASHBOARD = REPO / "deploy" / "dashboards" / "windowpipe.json"


def test_the_dashboard_has_thresholds_topk_and_the_control_recheck_and_drift_panels() -> None:
    import json

    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = {panel["title"]: [t["expr"] for t in panel.get("targets", [])] for panel in panels}
    for panel in panels:
        if panel["type"] == "stat":
            # Green, then amber or red: a number alone does not say whether it is bad.
            steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            assert len(steps) >= 2 and steps[0]["value"] is None, panel["title"]
            assert panel["fieldConfig"]["defaults"]["color"] == {"mode": "thresholds"}
            # One number for every pipeline: an aggregation, not a series per pipeline.
            for expr in exprs[panel["title"]]:
                assert (
                    expr.startswith(("max(", "min(", "sum(", "time() -")) or "pipeline" not in expr
                )
        elif panel["type"] == "timeseries":
            # A series per pipeline is bounded: hundreds of pipelines draw only the worst ten.
            for expr in exprs[panel["title"]]:
                per_pipeline = "pipeline" in expr and "by (status)" not in expr
                per_pipeline = per_pipeline and "by (stage)" not in expr
                assert not per_pipeline or expr.startswith("topk("), (panel["title"], expr)
    every = " ".join(e for found in exprs.values() for e in found)
    for name in (
        'windowpipe_control_last_run_timestamp_seconds{task="generate"',
        'windowpipe_control_last_run_timestamp_seconds{task="cleanup"',
        "windowpipe_rechecks_pending",
        "windowpipe_drift_windows_total",
    ):
        assert name in every, name
