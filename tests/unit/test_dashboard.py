"""The Grafana dashboard and the alert rules use exactly the metrics the service declares."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "claude-gateway.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
NAME = re.compile(r"\bgateway_[a-z0-9_]+")
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
    "info": ("_info",),
}


def _declared() -> dict[str, tuple[str, ...]]:
    """Every series name the service exports -> the labels of its metric."""
    out: dict[str, tuple[str, ...]] = {}
    metrics = Metrics()
    for metric in [*vars(metrics).values(), *vars(metrics.batch).values()]:
        if isinstance(metric, MetricWrapperBase) and not metric._documentation.startswith("Deprecated"):
            for suffix in SUFFIXES[metric._type]:
                out[metric._name + suffix] = tuple(metric._labelnames)
    return out


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _dashboard()["panels"] for t in p.get("targets", [])]


def _alert_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_name_used_is_declared(source: str) -> None:
    declared = _declared()
    exprs = _exprs() if source == "dashboard" else _alert_exprs()
    assert exprs
    for where, expr in exprs:
        for name in NAME.findall(expr):
            assert name in declared, (
                f"{source}: {where!r} uses {name}, which service/telemetry/metrics.py lacks"
            )


def test_the_dashboard_shows_every_declared_metric() -> None:
    used = {name for _, expr in _exprs() for name in NAME.findall(expr)}
    families = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    missing = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in _declared()} - families
    assert not missing, f"declared but on no panel: {sorted(missing)}"


def test_partner_variable_filters_every_partner_metric() -> None:
    dashboard = _dashboard()
    (partner,) = [v for v in dashboard["templating"]["list"] if v["name"] == "partner"]
    assert partner["multi"]
    assert partner["includeAll"]
    assert "label_values(gateway_requests_total, partner)" in partner["definition"]
    declared = _declared()
    for title, expr in _exprs():
        for name in NAME.findall(expr):
            if "partner" in declared[name]:
                assert 'partner=~"$partner"' in expr, f"{title!r}: {name} is not filtered by $partner"


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for p in _dashboard()["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{p['title']!r} overlaps another panel"
        taken |= cells


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make tools-promtool)")
    rules = []
    for i, (_, expr) in enumerate(_exprs()):
        concrete = expr.replace("$__rate_interval", "5m").replace("$__range", "6h").replace("$partner", ".*")
        rules.append({"record": f"dashboard:query_{i}:expr", "expr": concrete})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
