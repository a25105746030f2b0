"""Fixtures for the deployment checks: tool paths, Helm rendering, value sets.

The tools are installed by `make deploy-check` (and `make test`); a missing tool
fails the test with that instruction instead of skipping it, so CI cannot pass
without having checked anything.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "claude-gateway"
HELM = ROOT / ".tools" / "bin" / "helm"
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"
HELM_DOCS = ROOT / ".tools" / "bin" / "helm-docs"
RELEASE = "gw"
NAMESPACE = "claude-gateway"
# The chart's minimum (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
FULLNAME = f"{RELEASE}-claude-gateway"

INSTALL_HINT = "run `make deploy-check` (or `make test`), which installs it"


def _require(path: Path | None, what: str) -> Path:
    if path is None or not path.exists():
        pytest.fail(f"{what} not found at {path or 'PATH'}: {INSTALL_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return _require(HELM, "helm")


@pytest.fixture(scope="session")
def hadolint_bin() -> Path:
    return _require(HADOLINT, "hadolint")


@pytest.fixture(scope="session")
def helm_docs_bin() -> Path:
    return _require(HELM_DOCS, "helm-docs")


@pytest.fixture(scope="session")
def promtool_bin() -> Path:
    found = shutil.which("promtool")
    return _require(Path(found) if found else None, "promtool")


@dataclass
class Rendered:
    """One `helm template` run: its exit code, output and parsed manifests."""

    returncode: int
    stdout: str
    stderr: str
    docs: list[dict[str, Any]] = field(default_factory=list)

    def ok(self) -> Rendered:
        assert self.returncode == 0, f"helm template failed:\n{self.stderr}"
        return self

    def kinds(self) -> list[str]:
        return [d["kind"] for d in self.docs]

    def one(self, kind: str) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, got {self.kinds()}"
        return found[0]

    def maybe(self, kind: str) -> dict[str, Any] | None:
        found = [d for d in self.docs if d["kind"] == kind]
        return found[0] if found else None

    def config_map(self) -> dict[str, Any]:
        """The gateway's own ConfigMap (config.yaml), not the dashboard's."""
        found = [d for d in self.docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
        assert len(found) == 1, f"expected one config.yaml ConfigMap, got {len(found)}"
        return found[0]

    def config(self) -> dict[str, Any]:
        text = self.config_map()["data"]["config.yaml"]
        data = yaml.safe_load(text)
        assert isinstance(data, dict)
        return data


class Helm:
    """Runs the pinned helm with throw-away home directories."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        self._workdir = home
        self._cache: dict[str, Rendered] = {}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=60, check=False
        )

    def values_file(self, values: dict[str, Any]) -> Path:
        text = json.dumps(values, sort_keys=True)
        path = self._workdir / f"values-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    def template(
        self,
        values: dict[str, Any] | None = None,
        *,
        files: tuple[Path, ...] = (),
        sets: tuple[str, ...] = (),
        kube_version: str = KUBE_VERSIONS[0],
    ) -> Rendered:
        key = json.dumps([values, [str(f) for f in files], sets, kube_version], sort_keys=True)
        if key not in self._cache:
            args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version]
            for f in files:
                args += ["-f", str(f)]
            if values is not None:
                args += ["-f", str(self.values_file(values))]
            for s in sets:
                args += ["--set", s]
            proc = self.run(*args)
            docs: list[dict[str, Any]] = []
            if proc.returncode == 0:
                docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
            self._cache[key] = Rendered(proc.returncode, proc.stdout, proc.stderr, docs)
        return self._cache[key]


@pytest.fixture(scope="session")
def helm(helm_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_bin, tmp_path_factory.mktemp("helm"))


# A value set that turns every optional part of the chart on, with realistic
# Secret NAMES (never values).
ALL_FLAGS: dict[str, Any] = {
    "replicaCount": 3,
    "image": {
        "repository": "registry.example.internal/platform/claude-gateway",
        "digest": "sha256:" + "ab" * 32,
    },
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "podAnnotations": {"example.com/owner": "platform"},
    "podLabels": {"team": "platform"},
    "priorityClassName": "gateway-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gateway", "effect": "NoSchedule"}],
    "shutdown": {"drainTimeoutSeconds": 40, "terminationMarginSeconds": 7},
    "extraEnv": [
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.observability:4318"},
        {
            "name": "OTEL_EXPORTER_OTLP_HEADERS_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "otel-credentials", "key": "token"}},
        },
    ],
    "envFrom": [
        {"configMapRef": {"name": "otel-settings"}},
        {"secretRef": {"name": "otel-headers", "optional": True}, "prefix": "OTEL_"},
    ],
    "extraVolumes": [
        {"name": "otel-ca", "configMap": {"name": "otel-ca-bundle"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "16Mi"}},
    ],
    "extraVolumeMounts": [
        {"name": "otel-ca", "mountPath": "/etc/otel-ca", "readOnly": True},
        {"name": "scratch", "mountPath": "/var/scratch"},
    ],
    "secrets": {
        "anthropic": {"existingSecret": "gw-anthropic-keys"},
        "signing": {"existingSecret": "gw-signing-keys"},
        "kafkaSasl": {"existingSecret": "gw-kafka-sasl", "passwordKey": "password"},
        "kafkaTls": {
            "existingSecret": "gw-kafka-tls",
            "caKey": "ca.crt",
            "certKey": "tls.crt",
            "keyKey": "tls.key",
        },
        "redis": {"existingSecret": "gw-redis", "passwordKey": "redis-password"},
    },
    "kafka": {
        "bootstrapServers": "kafka-0.kafka:9093,kafka-1.kafka:9093",
        "groupId": "claude-gateway-prod",
        "securityProtocol": "SASL_SSL",
        "sasl": {"mechanism": "SCRAM-SHA-512", "username": "claude-gateway"},
        "tls": {"checkHostname": True},
        "settings": {
            "max_poll_records": 200,
            "producer_compression": "zstd",
            "exactly_once": True,
            "eos_window": 4096,
            "eos_handoff_max_s": 20,
        },
    },
    "redis": {
        "enabled": True,
        "url": "rediss://redis-ha.redis:6380/0",
        "degradedShare": 0.25,
        "maxConnections": 64,
        "poolTimeoutSeconds": 1.5,
    },
    "config": {
        "retry": {"max_attempts": 5},
        "runtime": {"max_in_flight": 512, "log_level": "WARNING"},
        "org_limits": {"rpm": 4000, "itpm": 2000000, "otpm": 400000},
        "batches": {"enabled": True, "max_age_s": 30, "expected_turnaround_s": 1800},
        "models": {
            "claude-sonnet-4-5": {"input_per_mtok_usd": 3, "output_per_mtok_usd": 15},
            "claude-haiku-4-5": {
                "input_per_mtok_usd": 1,
                "output_per_mtok_usd": 5,
                "max_output_tokens": 64000,
                "fast_multiplier": 6,
                "web_search_per_1k_usd": 10,
            },
        },
    },
    "partners": [
        {
            "id": "acme",
            "weight": 2,
            "max_concurrency": 64,
            "limits": {"rpm": 500, "itpm": 400000, "otpm": 80000},
            "allowed_models": ["claude-sonnet-4-5"],
            "max_tokens_cap": 4096,
            "max_tokens_policy": "clamp",
            "signing": {"required": True, "key_ids": ["k2025a", "k2025b"], "max_skew_s": 120},
            "budget": {"usd_per_day": 200, "on_exhausted": "defer"},
            "on_unknown": "retry",
            "policy": {"speed": ["standard"], "server_tools": ["web_search"], "workspace_id": []},
        },
        {"id": "batch_jobs", "api_key": {"secret_key": "shared-key"}, "budget": {"tokens_per_day": 5000000}},
    ],
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {
        "enabled": True,
        "labels": {"release": "kube-prometheus-stack"},
        "namespace": "monitoring",
        "runbookBaseUrl": "https://git.example.internal/platform/claude-gateway/-/blob/v0.1.0",
    },
    "grafanaDashboard": {
        "enabled": True,
        "labels": {"grafana_dashboard": "1", "team": "platform"},
        "folder": "Claude Gateway",
        "namespace": "monitoring",
    },
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    "autoscaling": {
        "enabled": True,
        "kind": "kafka-lag",
        "minReplicas": 2,
        "maxReplicas": 8,
        "kafkaLag": {"lagThreshold": 150, "topic": ""},
    },
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    },
}


def all_flags(**overrides: Any) -> dict[str, Any]:
    """ALL_FLAGS with top-level keys replaced (deep copies, safe to mutate)."""
    values = copy.deepcopy(ALL_FLAGS)
    values.update(copy.deepcopy(overrides))
    return values


@pytest.fixture(scope="session")
def all_flags_values() -> Callable[..., dict[str, Any]]:
    return all_flags


@pytest.fixture(scope="session")
def production_values() -> Path:
    return CHART / "values-production.yaml"


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


@pytest.fixture(scope="session")
def walk() -> Callable[[Any], Iterator[tuple[str, Any]]]:
    """Every (dotted path, leaf) of a parsed YAML/JSON document."""
    return _walk
