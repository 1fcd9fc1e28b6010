"""deploy/prometheusrule.yaml and deploy/monitoring/: the alerts pass
`promtool check rules` and behave as their unit tests in
deploy/monitoring/rules-test.yaml say (`promtool test rules`: Prometheus's own
PromQL engine); the dashboard is well-formed. That every dashboard query and
alert expression finds svcproxy's real series is tests/host/test_monitoring.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
RULE_FILE = DEPLOY / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "monitoring" / "grafana-dashboard.json"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: scripts/install-deps.sh installs Debian's prometheus "
                    "package, which has it")
    return path


def rule_groups() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(RULE_FILE.read_text())["spec"]
    return spec


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_groups()["groups"] for r in g["rules"]]


def write_rules(directory: Path) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump(rule_groups()))
    return path


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    proc = subprocess.run([promtool(), "check", "rules", str(write_rules(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout


def test_promtool_unit_tests_pass_and_cover_every_alert(tmp_path: Path) -> None:
    write_rules(tmp_path)
    cases = DEPLOY / "monitoring" / "rules-test.yaml"
    shutil.copy(cases, tmp_path / cases.name)
    proc = subprocess.run([promtool(), "test", "rules", str(tmp_path / cases.name)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = yaml.safe_load(cases.read_text())["tests"]
    fired = {t["alertname"] for case in tested for t in case["alert_rule_test"]
             if t.get("exp_alerts")}
    quiet = {t["alertname"] for case in tested for t in case["alert_rule_test"]
             if not t.get("exp_alerts")}
    names = {a["alert"] for a in alerts()}
    # every alert is shown to fire, and shown to stay quiet when it should
    assert fired == names and quiet == names


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The cases really constrain the rules: a threshold moved breaks them."""
    groups = rule_groups()
    for rule in groups["groups"][0]["rules"]:
        rule["expr"] = rule["expr"].replace("> 30", "> 90")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    shutil.copy(DEPLOY / "monitoring" / "rules-test.yaml", tmp_path / "t.yaml")
    proc = subprocess.run([promtool(), "test", "rules", str(tmp_path / "t.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "SvcProxyNetworkProgrammingSlow" in proc.stdout + proc.stderr


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dash["templating"]["list"]}
    assert names == {"datasource", "instance"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # every query follows the node picker
            assert 'instance=~"$instance"' in target["expr"], target["expr"]
    metrics = {m for q in dashboard_queries()
               for m in re.findall(r"\b((?:kubeproxy|svcproxy)_[a-z_]+)", q)}
    # svcproxy's own metrics and kube-proxy's names, both
    assert any(m.startswith("kubeproxy_") for m in metrics)
    assert any(m.startswith("svcproxy_") for m in metrics)
