"""Prometheus alert rules: promtool accepts them, they fire when they should, and
each points at its section of docs/operations.md (an absolute URL into the project's
repository) and at metrics the service exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RUNBOOK = ROOT / "docs" / "operations.md"
CHART_YAML = ROOT / "deploy" / "helm" / "claude-gateway" / "Chart.yaml"


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors() -> set[str]:
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)}


def _repository() -> str:
    """The project's repository: Chart.yaml `home`, where every runbook_url starts."""
    home = yaml.safe_load(CHART_YAML.read_text())["home"]
    assert isinstance(home, str)
    return home.rstrip("/")


def runbook_url_problems(name: str, url: str, anchors: set[str]) -> list[str]:
    """What is wrong with an alert's runbook_url: it must be an absolute https URL into the
    project's repository, ending in docs/operations.md#<alert name>, an existing section."""
    problems = []
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.netloc:
        problems.append(f"{name}: runbook_url {url!r} is not an absolute https URL")
    if not url.startswith(_repository() + "/"):
        problems.append(
            f"{name}: runbook_url {url!r} is not in the repository {_repository()} (Chart.yaml home)"
        )
    if not parts.path.endswith("/docs/operations.md") or parts.fragment != name.lower():
        problems.append(f"{name}: runbook_url {url!r} does not end in docs/operations.md#{name.lower()}")
    if parts.fragment not in anchors:
        problems.append(f"{name}: no section '### {name}' in docs/operations.md for #{parts.fragment}")
    return problems


def _promtool(promtool: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def test_promtool_check_rules_passes(promtool_bin: Path) -> None:
    proc = _promtool(promtool_bin, "check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in proc.stdout


def test_promtool_would_catch_a_broken_rule(promtool_bin: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: sum(rate(x[5m])\n"
    )
    assert _promtool(promtool_bin, "check", "rules", str(broken)).returncode != 0


def test_every_alert_is_documented_and_labelled() -> None:
    anchors = _anchors()
    names = [rule["alert"] for rule in _rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in _rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        assert not runbook_url_problems(name, annotations["runbook_url"], anchors)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("docs/operations.md#claudegatewaynoreadyreplicas", "not an absolute https URL"),
        ("https://example.com/docs/operations.md#claudegatewaynoreadyreplicas", "not in the repository"),
        ("{repo}/blob/main/docs/operations.md#claudegatewayredisdegraded", "does not end in"),
        ("{repo}/blob/main/docs/scaling.md#claudegatewaynoreadyreplicas", "does not end in"),
    ],
)
def test_a_wrong_runbook_url_is_caught(url: str, problem: str) -> None:
    problems = runbook_url_problems(
        "ClaudeGatewayNoReadyReplicas", url.format(repo=_repository()), _anchors()
    )
    assert any(problem in p for p in problems), problems


def test_a_runbook_url_to_a_missing_section_is_caught() -> None:
    url = f"{_repository()}/blob/main/docs/operations.md#claudegatewaynosuchalert"
    problems = runbook_url_problems("ClaudeGatewayNoSuchAlert", url, _anchors())
    (problem,) = problems
    assert problem.startswith("ClaudeGatewayNoSuchAlert: no section '### ClaudeGatewayNoSuchAlert'")
    assert problem.endswith("for #claudegatewaynosuchalert")


def test_runbook_links_resolve() -> None:
    anchors = _anchors()
    links = re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text())
    assert links
    missing = sorted(set(links) - anchors)
    assert not missing, f"docs/operations.md links to missing sections: {missing}"


def test_the_alerts_the_runbook_promises_exist() -> None:
    names = {rule["alert"] for rule in _rules()}
    assert {
        "ClaudeGatewayNoReadyReplicas",
        "ClaudeGatewayDeadLetterRateHigh",
        "ClaudeGatewayUpstream429Sustained",
        "ClaudeGatewayConsumerLagGrowing",
        "ClaudeGatewayPartitionsPausedLong",
        "ClaudeGatewayRedisDegraded",
        "ClaudeGatewayBudgetNearlyExhausted",
        "ClaudeGatewayEndToEndLatencyHigh",
    } <= names


def _exported_metric_names() -> set[str]:
    from service.telemetry.metrics import Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_alerts_use_only_metrics_the_service_exports() -> None:
    exported = _exported_metric_names()
    used = {m for rule in _rules() for m in re.findall(r"\bgateway_[a-z0-9_]+", rule["expr"])}
    assert used, "no gateway metric in the rules"
    unknown = sorted(used - exported)
    assert not unknown, f"alert rules use metrics the service does not export: {unknown}"


# --- promtool unit tests: the rules fire on the situations they describe ------------------------

UNIT_TESTS: list[dict[str, Any]] = [
    {
        "interval": "1m",
        "input_series": [{"series": 'gateway_ready{pod="gw-0"}', "values": "0x20"}],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "ClaudeGatewayNoReadyReplicas",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [{"series": 'gateway_ready{pod="gw-0"}', "values": "1x20"}],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "ClaudeGatewayNoReadyReplicas", "exp_alerts": []}
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {
                "series": 'gateway_requests_total{partner="acme",model="m",outcome="response"}',
                "values": "0+60x40",
            },
            {
                "series": 'gateway_requests_total{partner="acme",model="m",outcome="deadletter"}',
                "values": "0+30x40",
            },
            {
                "series": 'gateway_requests_total{partner="calm",model="m",outcome="response"}',
                "values": "0+60x40",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "25m",
                "alertname": "ClaudeGatewayDeadLetterRateHigh",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "partner": "acme"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": 'gateway_upstream_calls_total{status="4xx",code="429"}', "values": "0+6x40"},
            {"series": 'gateway_upstream_calls_total{status="2xx",code="200"}', "values": "0+600x40"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "25m",
                "alertname": "ClaudeGatewayUpstream429Sustained",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {
                "series": 'gateway_consumer_lag{topic="claude.requests.acme",partition="0"}',
                "values": "1000+100x60",
            },
            {"series": 'gateway_consumer_lag{topic="claude.requests.calm",partition="0"}', "values": "5x60"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "35m",
                "alertname": "ClaudeGatewayConsumerLagGrowing",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "topic": "claude.requests.acme"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": 'gateway_paused_partitions{partner="acme",pod="gw-0"}', "values": "1x30"},
            {"series": 'gateway_paused_partitions{partner="calm",pod="gw-0"}', "values": "0x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "ClaudeGatewayPartitionsPausedLong", "exp_alerts": []},
            {
                "eval_time": "20m",
                "alertname": "ClaudeGatewayPartitionsPausedLong",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "partner": "acme"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [{"series": 'gateway_redis_degraded{pod="gw-1"}', "values": "0 0 1x10"}],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "ClaudeGatewayRedisDegraded",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
        ],
    },
    {
        # Redis emptied at minute 6: both replicas find it; critical at once, quiet before.
        "interval": "1m",
        "input_series": [
            {"series": 'gateway_redis_data_lost_total{pod="gw-0"}', "values": "0x5 1x30"},
            {"series": 'gateway_redis_data_lost_total{pod="gw-1"}', "values": "0x5 1x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "ClaudeGatewayRedisDataLost", "exp_alerts": []},
            {
                "eval_time": "8m",
                "alertname": "ClaudeGatewayRedisDataLost",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            },
        ],
    },
    {
        # Redis set to evict at minute 3, evicting from minute 20 after it was set back at 10.
        "interval": "1m",
        "input_series": [
            {"series": 'gateway_redis_may_evict{pod="gw-0"}', "values": "0x2 1x7 0x40"},
            {"series": 'gateway_redis_evicted_keys_total{pod="gw-0"}', "values": "0x19 40x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "ClaudeGatewayRedisEvicts", "exp_alerts": []},
            {
                "eval_time": "9m",
                "alertname": "ClaudeGatewayRedisEvicts",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            },
            {"eval_time": "18m", "alertname": "ClaudeGatewayRedisEvicts", "exp_alerts": []},
            {
                "eval_time": "26m",
                "alertname": "ClaudeGatewayRedisEvicts",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            },
        ],
    },
    {
        # 100 USD left, spending 1 USD a minute: under an hour left from minute 41.
        "interval": "1m",
        "input_series": [
            {"series": 'gateway_budget_remaining_usd{partner="acme",period="day"}', "values": "100-1x90"},
            {"series": 'gateway_cost_usd_total{partner="acme",model="m"}', "values": "0+1x90"},
        ],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "ClaudeGatewayBudgetNearlyExhausted", "exp_alerts": []},
            {
                "eval_time": "60m",
                "alertname": "ClaudeGatewayBudgetNearlyExhausted",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "partner": "acme", "period": "day"}}],
            },
        ],
    },
    {
        # One record quarantined at minute 6: critical at once.
        "interval": "1m",
        "input_series": [
            {"series": 'gateway_quarantined_total{partner="acme",pod="gw-0"}', "values": "0x5 1x30"},
            {"series": 'gateway_quarantined_total{partner="calm",pod="gw-0"}', "values": "0x35"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "ClaudeGatewayRecordQuarantined", "exp_alerts": []},
            {
                "eval_time": "8m",
                "alertname": "ClaudeGatewayRecordQuarantined",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "partner": "acme"}}],
            },
        ],
    },
    {
        # One metering record lost at minute 6: critical at once.
        "interval": "1m",
        "input_series": [
            {"series": 'gateway_metering_lost_total{partner="acme",pod="gw-0"}', "values": "0x5 1x30"},
            {"series": 'gateway_metering_lost_total{partner="calm",pod="gw-0"}', "values": "0x35"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "ClaudeGatewayMeteringLost", "exp_alerts": []},
            {
                "eval_time": "8m",
                "alertname": "ClaudeGatewayMeteringLost",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "partner": "acme"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {
                "series": 'gateway_internal_errors_total{partner="acme",where="call",pod="gw-0"}',
                "values": "0x5 1x30",
            },
            {
                "series": 'gateway_internal_errors_total{partner="calm",where="call",pod="gw-0"}',
                "values": "0x35",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "ClaudeGatewayInternalErrors", "exp_alerts": []},
            {
                "eval_time": "13m",
                "alertname": "ClaudeGatewayInternalErrors",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "partner": "acme", "where": "call"}}],
            },
        ],
    },
    {
        # acme: 2 unknown outcomes a minute out of 60 requests (3%); quiet: one burst of 2
        # after a crash (a high ratio, but too few to page); calm: none.
        "interval": "1m",
        "input_series": [
            {
                "series": 'gateway_requests_total{partner="acme",model="m",outcome="response"}',
                "values": "0+60x40",
            },
            {
                "series": 'gateway_unknown_outcomes_total{partner="acme",cause="owner_lost"}',
                "values": "0+2x40",
            },
            {
                "series": 'gateway_requests_total{partner="quiet",model="m",outcome="response"}',
                "values": "0+1x40",
            },
            {
                "series": 'gateway_unknown_outcomes_total{partner="quiet",cause="owner_lost"}',
                "values": "0x10 2x30",
            },
            {
                "series": 'gateway_requests_total{partner="calm",model="m",outcome="response"}',
                "values": "0+60x40",
            },
            {"series": 'gateway_unknown_outcomes_total{partner="calm",cause="timeout"}', "values": "0x40"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "25m",
                "alertname": "ClaudeGatewayUnknownOutcomesHigh",
                "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "partner": "acme", "cause": "owner_lost"}}
                ],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": 'gateway_eos_window_offsets{partner="acme",pod="gw-0"}', "values": "8000x40"},
            {"series": 'gateway_eos_window_offsets{partner="calm",pod="gw-0"}', "values": "300x40"},
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "ClaudeGatewayWriterWindowNearLimit", "exp_alerts": []},
            {
                "eval_time": "25m",
                "alertname": "ClaudeGatewayWriterWindowNearLimit",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "partner": "acme"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": 'gateway_eos_stuck_partitions{pod="gw-0"}', "values": "0 0 1x20"},
            {"series": 'gateway_eos_stuck_partitions{pod="gw-1"}', "values": "0x22"},
        ],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "ClaudeGatewayTransactionLeftHanging", "exp_alerts": []},
            {
                "eval_time": "15m",
                "alertname": "ClaudeGatewayTransactionLeftHanging",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            },
        ],
    },
    {
        "interval": "1m",
        "input_series": [{"series": 'gateway_eos_stuck_partitions{pod="gw-0"}', "values": "1x5 0x15"}],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "ClaudeGatewayTransactionLeftHanging", "exp_alerts": []}
        ],
    },
]


def test_rules_fire_on_the_situations_they_describe(promtool_bin: Path, tmp_path: Path) -> None:
    # promtool compares annotations exactly; the unit tests are about when rules
    # fire and with which labels, so they run on a copy without annotations.
    data = yaml.safe_load(ALERTS.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = tmp_path / "tests.yaml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": UNIT_TESTS})
    )
    proc = _promtool(promtool_bin, "test", "rules", spec.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("alert", ["ClaudeGatewayRedisDegraded"])
def test_promtool_unit_tests_can_fail(promtool_bin: Path, tmp_path: Path, alert: str) -> None:
    data = yaml.safe_load(ALERTS.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(data))
    wrong = {
        "interval": "1m",
        "input_series": [{"series": 'gateway_redis_degraded{pod="gw-1"}', "values": "0x10"}],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": alert, "exp_alerts": [{"exp_labels": {"severity": "warning"}}]},
        ],
    }
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [wrong]})
    )
    assert _promtool(promtool_bin, "test", "rules", "tests.yaml", cwd=tmp_path).returncode != 0
