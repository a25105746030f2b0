"""The chart's optional PrometheusRule and Grafana dashboard ConfigMap.

deploy/prometheus/alerts.yaml and deploy/grafana/claude-gateway.json are the single source:
the chart carries byte-identical copies in files/ (Helm reads nothing outside the chart),
refreshed by `make chart-generate`. The PrometheusRule renders those rules unchanged but for
each runbook_url, which starts with prometheusRule.runbookBaseUrl.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "claude-gateway"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "claude-gateway.json"
COPIES = {
    ALERTS: CHART / "files" / "prometheus" / "alerts.yaml",
    DASHBOARD: CHART / "files" / "grafana" / "claude-gateway.json",
}
# The whole ConfigMap must stay under Kubernetes' 1 MiB object limit (etcd).
CONFIGMAP_LIMIT = 1024 * 1024


def _groups() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert isinstance(groups, list)
    return groups


def _rebased(groups: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    """The rules with each runbook_url moved to base, as the chart should render them."""
    for group in groups:
        for rule in group["rules"]:
            url = rule["annotations"]["runbook_url"]
            rule["annotations"]["runbook_url"] = base.rstrip("/") + "/docs/operations.md#" + url.split("#")[1]
    return groups


# --- one source ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", sorted(COPIES), ids=lambda p: p.name)
def test_the_charts_copy_is_identical_to_the_source(source: Path) -> None:
    copy = COPIES[source]
    assert copy.exists(), f"{copy.relative_to(ROOT)} is missing: run `make chart-generate`"
    assert copy.read_bytes() == source.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from {source.relative_to(ROOT)}: "
        "run `make chart-generate` and commit both"
    )


def test_the_default_runbook_base_is_the_one_in_alerts_yaml_and_chart_yaml() -> None:
    home = yaml.safe_load((CHART / "Chart.yaml").read_text())["home"]
    base = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["runbookBaseUrl"]
    assert base == f"{home}/blob/main/"
    for group in _groups():
        for rule in group["rules"]:
            assert rule["annotations"]["runbook_url"].startswith(base + "docs/operations.md#"), rule["alert"]


# --- PrometheusRule --------------------------------------------------------------------------


def _rule(rendered: Any) -> dict[str, Any]:
    rule = rendered.one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    return rule


def test_the_rules_are_alerts_yaml_unchanged_by_default(helm: Any) -> None:
    rule = _rule(helm.template({"prometheusRule": {"enabled": True}}).ok())
    assert rule["spec"]["groups"] == _groups()
    assert rule["metadata"]["namespace"] == "claude-gateway"
    empty_base = _rule(helm.template({"prometheusRule": {"enabled": True, "runbookBaseUrl": ""}}).ok())
    assert empty_base["spec"]["groups"] == _groups()


def test_the_rules_point_at_the_runbook_base(
    helm: Any, all_flags_values: Callable[..., dict[str, Any]]
) -> None:
    values = all_flags_values()
    rule = _rule(helm.template(values).ok())
    base = values["prometheusRule"]["runbookBaseUrl"]
    assert rule["spec"]["groups"] == _rebased(_groups(), base)
    first = rule["spec"]["groups"][0]["rules"][0]["annotations"]["runbook_url"]
    assert first == f"{base}/docs/operations.md#claudegatewaynoreadyreplicas"
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == "gw"
    # a trailing slash makes no double slash
    slashed = _rule(helm.template({"prometheusRule": {"enabled": True, "runbookBaseUrl": base + "/"}}).ok())
    assert slashed["spec"]["groups"] == rule["spec"]["groups"]


def test_the_rendered_rules_pass_promtool(
    helm: Any, all_flags_values: Callable[..., dict[str, Any]], promtool_bin: Path, tmp_path: Path
) -> None:
    rule = _rule(helm.template(all_flags_values()).ok())
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    proc = subprocess.run(
        [str(promtool_bin), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = sum(len(g["rules"]) for g in _groups())
    assert f"SUCCESS: {count} rules found" in proc.stdout


@pytest.fixture
def chart_copy(tmp_path: Path) -> Path:
    chart = tmp_path / "claude-gateway"
    shutil.copytree(CHART, chart)
    return chart


def test_a_runbook_url_the_chart_cannot_rebase_fails_the_render(helm: Any, chart_copy: Path) -> None:
    copy = chart_copy / "files" / "prometheus" / "alerts.yaml"
    copy.write_text(
        copy.read_text().replace("docs/operations.md#claudegatewaybatchstuck", "wiki/BatchStuck", 1)
    )
    proc = helm.run("template", "gw", str(chart_copy), "--set", "prometheusRule.enabled=true")
    assert proc.returncode != 0
    assert "alert ClaudeGatewayBatchStuck: runbook_url" in proc.stderr
    assert "does not end in docs/operations.md#<anchor>" in proc.stderr


@pytest.mark.parametrize(
    ("missing", "flag"),
    [
        ("prometheus/alerts.yaml", "prometheusRule.enabled"),
        ("grafana/claude-gateway.json", "grafanaDashboard.enabled"),
    ],
)
def test_a_missing_copy_fails_the_render_with_the_fix(
    helm: Any, chart_copy: Path, missing: str, flag: str
) -> None:
    (chart_copy / "files" / missing).unlink()
    proc = helm.run("template", "gw", str(chart_copy), "--set", f"{flag}=true")
    assert proc.returncode != 0
    assert f"files/{missing} is missing" in proc.stderr
    assert "make chart-generate" in proc.stderr


# --- Grafana dashboard ConfigMap ---------------------------------------------------------------


def _dashboard(rendered: Any) -> dict[str, Any]:
    found = [
        d for d in rendered.docs if d["kind"] == "ConfigMap" and "claude-gateway.json" in d.get("data", {})
    ]
    assert len(found) == 1, rendered.kinds()
    return found[0]


def test_the_dashboard_configmap_carries_the_dashboard_unchanged(
    helm: Any, all_flags_values: Callable[..., dict[str, Any]]
) -> None:
    rendered = helm.template(all_flags_values()).ok()
    cm = _dashboard(rendered)
    assert cm["data"]["claude-gateway.json"] == DASHBOARD.read_text()
    assert json.loads(cm["data"]["claude-gateway.json"])["uid"] == "claude-gateway"
    assert cm["metadata"]["name"] == "gw-claude-gateway-dashboard"
    assert cm["metadata"]["name"] != rendered.config_map()["metadata"]["name"]
    assert cm["metadata"]["namespace"] == "monitoring"
    labels = cm["metadata"]["labels"]
    assert (labels["grafana_dashboard"], labels["team"]) == ("1", "platform")
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Claude Gateway"}
    assert len(yaml.safe_dump(cm).encode()) < CONFIGMAP_LIMIT


def test_the_dashboard_labels_and_folder_annotation_are_values(helm: Any) -> None:
    plain = _dashboard(helm.template({"grafanaDashboard": {"enabled": True}}).ok())
    assert plain["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert plain["metadata"]["namespace"] == "claude-gateway"
    assert "annotations" not in plain["metadata"]  # no folder: the sidecar's default
    custom = _dashboard(
        helm.template(
            {
                "grafanaDashboard": {
                    "enabled": True,
                    "labels": {"dashboards": "gateway", "grafana_dashboard": None},
                    "folder": "Platform/Gateways",
                    "folderAnnotation": "k8s-sidecar-target-directory",
                }
            }
        ).ok()
    )
    assert custom["metadata"]["labels"]["dashboards"] == "gateway"
    assert "grafana_dashboard" not in custom["metadata"]["labels"]  # Helm merges maps; null drops a default
    assert custom["metadata"]["annotations"] == {"k8s-sidecar-target-directory": "Platform/Gateways"}


def test_monitoring_resources_are_off_by_default(helm: Any) -> None:
    rendered = helm.template().ok()
    assert rendered.maybe("PrometheusRule") is None
    assert [d for d in rendered.docs if d["kind"] == "ConfigMap"] == [rendered.config_map()]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("prometheusRule.runbookBaseUrl=docs/",), "at '/prometheusRule/runbookBaseUrl'"),
        (("prometheusRule.namespace=Monitoring",), "at '/prometheusRule/namespace'"),
        (("grafanaDashboard.folderAnnotation=",), "at '/grafanaDashboard/folderAnnotation'"),
        (("grafanaDashboard.labels.grafana_dashboard=1",), "at '/grafanaDashboard/labels/grafana_dashboard'"),
        (("grafanaDashboard.enable=true",), "additional properties 'enable' not allowed"),
    ],
)
def test_schema_refuses_broken_monitoring_values(helm: Any, sets: tuple[str, ...], message: str) -> None:
    result = helm.template(sets=sets)
    assert result.returncode != 0, f"helm accepted {sets}"
    assert message in result.stderr, result.stderr
