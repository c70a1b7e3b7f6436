"""The monitoring component offline: promtool checks and unit-tests the alert rules, the dashboard is linted,
and the Prometheus Operator objects are validated against their CRD schemas.

promtool comes from Debian's `prometheus` package (scripts/host_packages.sh); the CRD validators are
npm packages (tests/support/crd, installed with `npm ci` there).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from support.crd_schemas import validate

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "components" / "monitoring"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool"
ALERTS = {
    "ServekitNoReadyWorker",
    "ServekitLatencyP99High",
    "ServekitErrorRatioHigh",
    "ServekitReloadFailed",
    "ServekitVersionDrift",
    "ServekitWatcherStalled",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"needs {name}: bash scripts/host_packages.sh installs it (Debian's prometheus, nodejs)"
    return path


def rule_groups() -> dict:
    (rule,) = [d for d in yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text()) if d]
    return rule["spec"]


def test_rules_pass_promtool_check_and_unit_tests(tmp_path):
    rules = tmp_path / "servekit-rules.yaml"
    rules.write_text(yaml.safe_dump(rule_groups()))
    check = subprocess.run([tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in check.stdout, check.stdout
    shutil.copy(PROMTOOL_TESTS / "servekit-rules-test.yaml", tmp_path)
    test = subprocess.run(
        [tool("promtool"), "test", "rules", "servekit-rules-test.yaml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert test.returncode == 0, test.stdout + test.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMTOOL_TESTS / "servekit-rules-test.yaml").read_text()))
    assert tested == ALERTS == {r["alert"] for g in rule_groups()["groups"] for r in g["rules"]}


def test_promtool_unit_tests_can_fail(tmp_path):
    """A rule with a wrong threshold makes the unit tests fail: they test something."""
    spec = rule_groups()
    for group in spec["groups"]:
        for r in group["rules"]:
            r["expr"] = r["expr"].replace("> 0.01", "> 0.5")
    (tmp_path / "servekit-rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(PROMTOOL_TESTS / "servekit-rules-test.yaml", tmp_path)
    test = subprocess.run(
        [tool("promtool"), "test", "rules", "servekit-rules-test.yaml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert test.returncode != 0 and "ServekitErrorRatioHigh" in test.stdout + test.stderr


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def test_dashboard_lints_clean():
    """Unique panel ids, no overlapping panels, every query on the datasource variable and the namespace."""
    d = dashboard()
    assert d["uid"] == "servekit" and d["schemaVersion"] >= 36
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "namespace"} <= names
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), ids
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"] and p["title"] and p.get("description")
        for t in p["targets"]:
            assert 'namespace=~"$namespace"' in t["expr"], (p["title"], t["expr"])
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def test_dashboard_and_rules_use_only_metrics_that_exist():
    """Every metric a query names is one servekit or TorchServe exposes (its own registry, metrics.yaml)."""
    known = set(re.findall(r'"(servekit_\w+)"', "".join(p.read_text() for p in [*(ROOT / "servekit").rglob("*.py")])))
    known |= set(re.findall(r"name: (\w+)", (ROOT / "servekit" / "metrics.yaml").read_text()))
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in rule_groups()["groups"] for r in g["rules"]]
    for expr in exprs:
        for name in re.findall(r"\b((?:servekit|ts)_[a-z_]+)\b", expr):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert name in known or base in known, f"{name} (in {expr!r}) is exposed by nothing"


def test_operator_objects_match_their_crd_schemas(tmp_path):
    proc = validate([MONITORING / "podmonitor.yaml", MONITORING / "prometheusrule.yaml"])
    assert proc.returncode == 0 and proc.stdout.count("VALID") == 2, proc.stdout + proc.stderr
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    doc["spec"]["podMetricsEndpoints"][0]["interval"] = 15  # a string in the schema
    bad.write_text(yaml.safe_dump(doc))
    proc = validate([bad])
    assert proc.returncode == 1 and "INVALID" in proc.stdout, proc.stdout


@pytest.mark.parametrize("path", ["/metrics", "/metrics/servekit", "/metrics/proxy"])
def test_podmonitor_scrapes_each_path_the_proxy_serves(path):
    doc = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert path in [e["path"] for e in doc["spec"]["podMetricsEndpoints"]]
    assert f"location = {path} " in (ROOT / "servekit" / "nginx.conf.template").read_text()
