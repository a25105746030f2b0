"""The Helm chart: lint, render, Kubernetes schemas, CRDs, and what the Deployment guarantees."""

from __future__ import annotations

import copy
import posixpath
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "claude-gateway"
KUBE_VERSIONS = ("1.27.0", "1.37.0")
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
FULLNAME = "gw-claude-gateway"
VARIANTS = ("default", "all-flags", "all-flags-hpa", "production")


@pytest.fixture(scope="module")
def render_variant(
    helm: Any, all_flags_values: Callable[..., dict[str, Any]], production_values: Path
) -> Any:
    def render(name: str, kube_version: str = KUBE_VERSIONS[0]) -> Any:
        if name == "default":
            return helm.template(kube_version=kube_version).ok()
        if name == "all-flags":
            return helm.template(all_flags_values(), kube_version=kube_version).ok()
        if name == "all-flags-hpa":
            values = all_flags_values()
            values["autoscaling"]["kind"] = "cpu"
            return helm.template(values, kube_version=kube_version).ok()
        if name == "production":
            return helm.template(files=(production_values,), kube_version=kube_version).ok()
        raise AssertionError(name)

    return render


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# --- lint and render -------------------------------------------------------------------------


@pytest.mark.parametrize("with_values", ["default", "all-flags", "production"])
def test_helm_lint_passes_strict(
    helm: Any, with_values: str, all_flags_values: Callable[..., dict[str, Any]], production_values: Path
) -> None:
    args = ["lint", str(CHART), "--strict", "--kube-version", KUBE_VERSIONS[0]]
    if with_values == "all-flags":
        args += ["-f", str(helm.values_file(all_flags_values()))]
    elif with_values == "production":
        args += ["-f", str(production_values)]
    proc = helm.run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_default_render_has_the_core_resources_only(render_variant: Any) -> None:
    kinds = sorted(render_variant("default").kinds())
    assert kinds == ["ConfigMap", "Deployment", "Pod", "Service", "ServiceAccount"]


def test_every_flag_renders_its_resource(render_variant: Any) -> None:
    kinds = set(render_variant("all-flags").kinds())
    assert {
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds
    assert "HorizontalPodAutoscaler" not in kinds
    hpa_kinds = set(render_variant("all-flags-hpa").kinds())
    assert "HorizontalPodAutoscaler" in hpa_kinds
    assert not hpa_kinds & {"ScaledObject", "TriggerAuthentication"}


def test_one_resource_per_template() -> None:
    for template in (CHART / "templates").rglob("*.yaml"):
        text = template.read_text()
        assert text.count("\nkind:") + text.startswith("kind:") <= 1, f"{template} renders several resources"


# --- Kubernetes schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_match_kubernetes_schemas(
    render_variant: Any, variant: str, kube_version: str
) -> None:
    rendered = render_variant(variant, kube_version)
    problems = []
    validated = set()
    for doc in rendered.docs:
        if doc["kind"] in CRD_KINDS:
            continue  # no schema in kubernetes-validate: checked structurally below
        # SchemaNotFoundError (a kind that is neither built in nor an expected CRD) fails the test.
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
            validated.add(doc["kind"])
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
    assert not problems, "\n".join(problems)
    assert {"Deployment", "Service", "ConfigMap"} <= validated


def test_kubernetes_validation_catches_a_broken_deployment(render_variant: Any) -> None:
    deployment = copy.deepcopy(render_variant("default").one("Deployment"))
    _container(deployment)["securityContext"]["readOnlyRootFileSystem"] = True  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


# --- CRDs, checked by structure ------------------------------------------------------------


def test_keda_scaled_object_targets_the_deployment_and_the_group(render_variant: Any) -> None:
    rendered = render_variant("all-flags")
    scaled = rendered.one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", FULLNAME)
    assert rendered.one("Deployment")["metadata"]["name"] == FULLNAME
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 8)
    assert isinstance(spec["pollingInterval"], int)
    assert isinstance(spec["cooldownPeriod"], int)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata must be strings"
    assert meta["bootstrapServers"] == "kafka-0.kafka:9093,kafka-1.kafka:9093"
    assert meta["consumerGroup"] == "claude-gateway-prod"
    assert meta["lagThreshold"] == "150"
    assert meta["allowIdleConsumers"] == "false"
    assert meta["sasl"] == "scram_sha512"
    assert meta["tls"] == "enable"
    assert "topic" not in meta  # empty: every topic of the group
    assert trigger["authenticationRef"]["name"] == rendered.one("TriggerAuthentication")["metadata"]["name"]


def test_keda_trigger_authentication_reads_the_existing_secrets(render_variant: Any) -> None:
    rendered = render_variant("all-flags")
    auth = rendered.one("TriggerAuthentication")
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "password": ("gw-kafka-sasl", "password"),
        "ca": ("gw-kafka-tls", "ca.crt"),
        "cert": ("gw-kafka-tls", "tls.crt"),
        "key": ("gw-kafka-tls", "tls.key"),
    }
    (env_ref,) = auth["spec"]["env"]
    container = _container(rendered.one("Deployment"))
    assert env_ref["parameter"] == "username"
    assert env_ref["containerName"] == container["name"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[env_ref["name"]] == "claude-gateway"


def test_keda_with_oauthbearer_needs_an_own_trigger_authentication(
    helm: Any, all_flags_values: Callable[..., dict[str, Any]]
) -> None:
    values = all_flags_values()
    values["kafka"]["sasl"] = {"mechanism": "OAUTHBEARER"}
    failed = helm.template(values)
    assert failed.returncode != 0
    assert "autoscaling.kafkaLag.authenticationRef is required" in failed.stderr
    values["autoscaling"]["kafkaLag"]["authenticationRef"] = "kafka-oidc"
    rendered = helm.template(values).ok()
    assert rendered.maybe("TriggerAuthentication") is None
    assert rendered.one("ScaledObject")["spec"]["triggers"][0]["authenticationRef"] == {"name": "kafka-oidc"}


def test_service_monitor_selects_the_service_port(render_variant: Any) -> None:
    rendered = render_variant("all-flags")
    monitor = rendered.one("ServiceMonitor")
    service = rendered.one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["claude-gateway"]}


def test_selectors_match_the_gateway_pods_and_not_the_test_pod(render_variant: Any) -> None:
    rendered = render_variant("all-flags")
    deployment = rendered.one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    test_pod_labels = rendered.one("Pod")["metadata"]["labels"]
    selectors = {
        "Service": rendered.one("Service")["spec"]["selector"],
        "PodDisruptionBudget": rendered.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": rendered.one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= pod_labels.items(), kind
        assert not selector.items() <= test_pod_labels.items(), f"{kind} would select the helm test pod"


# --- the Deployment's guarantees --------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_deployment_runs_non_root_read_only_and_without_privileges(render_variant: Any, variant: str) -> None:
    deployment = render_variant(variant).one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert sc["runAsNonRoot"] is True
    # No id is fixed by default: any uid in group 0 works (test_deploy_security.py).
    assert not {"runAsUser", "runAsGroup", "fsGroup"} & (pod_sc.keys() | sc.keys())
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # the read-only root filesystem leaves /tmp writable through an emptyDir
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert not mounts["/tmp"].get("readOnly", False)
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert pod["topologySpreadConstraints"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_and_entrypoint_follow_the_service_contract(render_variant: Any, variant: str) -> None:
    rendered = render_variant(variant)
    deployment = rendered.one("Deployment")
    container = _container(deployment)
    config = rendered.config()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config["runtime"]["http_port"] == 9464
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"] == ["run", "--config", "/etc/claude-gateway/config.yaml"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_mount = next(m for m in mounts.values() if m["mountPath"] == "/etc/claude-gateway")
    assert volumes[config_mount["name"]]["configMap"]["name"] == rendered.config_map()["metadata"]["name"]
    service = rendered.one("Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize(
    ("values", "drain", "grace"),
    [
        (None, 25, 35),
        ({"shutdown": {"drainTimeoutSeconds": 40, "terminationMarginSeconds": 7}}, 40, 47),
        ({"shutdown": {"drainTimeoutSeconds": 120, "terminationMarginSeconds": 15}}, 120, 135),
    ],
)
def test_termination_grace_is_the_drain_timeout_plus_a_margin(
    helm: Any, values: dict[str, Any] | None, drain: int, grace: int
) -> None:
    rendered = helm.template(values).ok()
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    assert rendered.config()["runtime"]["drain_timeout_s"] == drain
    assert pod["terminationGracePeriodSeconds"] == grace


def test_replicas_are_left_to_the_autoscaler(render_variant: Any) -> None:
    assert render_variant("default").one("Deployment")["spec"]["replicas"] == 1
    assert "replicas" not in render_variant("all-flags").one("Deployment")["spec"]
    assert "replicas" not in render_variant("all-flags-hpa").one("Deployment")["spec"]


def test_config_change_rolls_the_pods(helm: Any) -> None:
    def checksum(values: dict[str, Any] | None) -> str:
        deployment = helm.template(values).ok().one("Deployment")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum(None) != checksum({"config": {"runtime": {"log_level": "DEBUG"}}})


# --- the rendered config.yaml -----------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_config_loads_in_the_service(render_variant: Any, variant: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(render_variant(variant).config_map()["data"]["config.yaml"])
    settings = load_config(path)
    assert settings.runtime.http_port == 9464
    if variant != "default":
        assert settings.partners
        assert settings.kafka.security_protocol == "SASL_SSL"
        assert settings.limiter_backend == "redis"


def test_every_secret_reference_is_a_file_in_a_mounted_existing_secret(
    render_variant: Any, walk: Callable[[Any], Any]
) -> None:
    rendered = render_variant("all-flags")
    config = rendered.config()
    deployment = rendered.one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_mounts = {
        m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
        for m in _container(deployment)["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }
    refs = {path: value for path, value in walk(config) if path.endswith(".file")}
    expected = {
        "kafka.sasl_password.file": ("gw-kafka-sasl", "password"),
        "kafka.ssl_cafile": ("gw-kafka-tls", "ca.crt"),
        "kafka.ssl_certfile": ("gw-kafka-tls", "tls.crt"),
        "kafka.ssl_keyfile": ("gw-kafka-tls", "tls.key"),
        "redis.password.file": ("gw-redis", "redis-password"),
        "partners[0].api_key.file": ("gw-anthropic-keys", "acme"),
        "partners[0].signing.keys.k2025a.file": ("gw-signing-keys", "acme.k2025a"),
        "partners[0].signing.keys.k2025b.file": ("gw-signing-keys", "acme.k2025b"),
        "partners[1].api_key.file": ("gw-anthropic-keys", "shared-key"),
    }
    paths = dict(refs)
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        paths[f"kafka.{key}"] = config["kafka"][key]
    assert set(paths) == set(expected), "unexpected or missing secret references"
    for where, path in paths.items():
        secret_name = secret_mounts.get(posixpath.dirname(path))
        assert secret_name is not None, f"{where}: {path} is not in a mounted Secret"
        assert (secret_name, posixpath.basename(path)) == expected[where], where
    # no environment variable carries a secret literal either
    for env in _container(deployment)["env"]:
        assert "value" in env or "secretKeyRef" in env["valueFrom"]


def test_config_sections_reach_config_yaml(render_variant: Any) -> None:
    config = render_variant("all-flags").config()
    assert config["org_limits"] == {"rpm": 4000, "itpm": 2000000, "otpm": 400000}
    assert config["retry"] == {"max_attempts": 5}
    assert config["runtime"]["max_in_flight"] == 512
    assert config["kafka"]["group_id"] == "claude-gateway-prod"
    assert config["kafka"]["max_poll_records"] == 200
    assert config["kafka"]["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["kafka"]["eos_window"] == 4096
    assert config["partners"][0]["on_unknown"] == "retry"
    assert config["partners"][0]["policy"] == {
        "speed": ["standard"],
        "server_tools": ["web_search"],
        "workspace_id": [],
    }
    assert config["models"]["claude-haiku-4-5"]["max_output_tokens"] == 64000
    assert config["batches"] == {"enabled": True, "max_age_s": 30, "expected_turnaround_s": 1800}
    assert config["redis"]["expected_replicas"] == 8  # autoscaling.maxReplicas
    assert (config["redis"]["max_connections"], config["redis"]["pool_timeout_s"]) == (64, 1.5)
    assert config["partners"][0]["signing"]["required"] is True
    assert "key_ids" not in config["partners"][0]["signing"]


# --- the values schema refuses broken values ----------------------------------------------------

SCHEMA_ERROR = "values don't meet the specifications of the schema"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("replicaCount=-1",), "at '/replicaCount': minimum: got -1, want 0"),
        (("replicaCount=two",), "at '/replicaCount'"),
        (("secrets.anthropic.existingSecret=",), "at '/secrets/anthropic/existingSecret': minLength"),
        (
            ("secrets.anthropic.existingSecret=null",),
            "at '/secrets/anthropic': missing property 'existingSecret'",
        ),
        (
            ("kafka.securityProtocol=SASL_SSL", "kafka.sasl.mechanism=PLAIN", "kafka.sasl.username=gw"),
            "at '/secrets/kafkaSasl/existingSecret': minLength",
        ),
        (
            ("kafka.securityProtocol=SASL_SSL", "secrets.kafkaSasl.existingSecret=kafka"),
            "at '/kafka/sasl/mechanism'",
        ),
        (
            ("partners[0].id=acme", "partners[0].signing.key_ids[0]=k1"),
            "at '/secrets/signing/existingSecret': minLength",
        ),
        (("partners[0].id=Not_Valid",), "at '/partners/0/id'"),
        (
            ("config.runtime.drain_timeout_s=30",),
            "at '/config/runtime': additional properties 'drain_timeout_s'",
        ),
        (("replicas=3",), "additional properties 'replicas' not allowed"),
        (("service.port=80",), "at '/service/port': minimum"),
        (("securityIds.runAsUser=0",), "at '/securityIds/runAsUser': minimum"),
        (("shutdown.drainTimeoutSeconds=0",), "at '/shutdown/drainTimeoutSeconds': minimum"),
        (
            ("autoscaling.enabled=true", "autoscaling.kind=cpu", "autoscaling.minReplicas=0"),
            "at '/autoscaling/minReplicas': minimum",
        ),
        (("redis.url=redis://:hunter2@redis:6379/0",), "at '/redis/url'"),
        (("kafka.settings.eos_window=20000",), "at '/kafka/settings/eos_window': maximum"),
        (("kafka.settings.exactly_once=maybe",), "at '/kafka/settings/exactly_once'"),
        (("partners[0].id=acme", "partners[0].on_unknown=ignore"), "at '/partners/0/on_unknown'"),
        (("partners[0].id=acme", "partners[0].policy.speed[0]=turbo"), "at '/partners/0/policy/speed/0'"),
    ],
)
def test_schema_refuses_broken_values_with_a_clear_message(
    helm: Any, sets: tuple[str, ...], message: str
) -> None:
    result = helm.template(sets=sets)
    assert result.returncode != 0, f"helm accepted {sets}"
    assert SCHEMA_ERROR in result.stderr
    assert message in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=2"),
            "autoscaling.maxReplicas (2) must be >= autoscaling.minReplicas (5)",
        ),
        (
            ("rollingUpdate.maxSurge=0", "rollingUpdate.maxUnavailable=0"),
            "rollingUpdate.maxSurge and rollingUpdate.maxUnavailable cannot both be 0",
        ),
        (("partners[0].id=acme", "partners[1].id=acme"), 'duplicate partner id "acme"'),
    ],
)
def test_cross_field_checks_fail_with_the_value_to_change(
    helm: Any, sets: tuple[str, ...], message: str
) -> None:
    result = helm.template(sets=sets)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_values_yaml_is_complete_for_the_schema() -> None:
    """Every top-level key of values.yaml is described by the schema, and vice versa."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    described = set(schema["properties"]) - {"global"}
    assert set(values) == described


# --- NOTES.txt (rendered by `helm install` only: render a copy as a template) ---------------------


@pytest.fixture(scope="module")
def notes_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chart = tmp_path_factory.mktemp("notes") / "claude-gateway"
    shutil.copytree(CHART, chart)
    (chart / "files").mkdir(exist_ok=True)
    (chart / "templates" / "NOTES.txt").rename(chart / "files" / "NOTES.txt")
    (chart / "templates" / "notes.yaml").write_text(
        'notes: |\n{{ tpl (.Files.Get "files/NOTES.txt") . | indent 2 }}\n'
    )
    return chart


def _notes(helm: Any, chart: Path, *args: str) -> str:
    proc = helm.run("template", "gw", str(chart), "--show-only", "templates/notes.yaml", *args)
    assert proc.returncode == 0, proc.stderr
    return str(yaml.safe_load(proc.stdout)["notes"])


def test_notes_render_and_warn_about_risky_setups(
    helm: Any, notes_chart: Path, production_values: Path
) -> None:
    default = _notes(helm, notes_chart)
    assert "no partners are configured" in default
    assert "claude-gateway-anthropic" in default
    assert "terminationGracePeriodSeconds 35s" in default
    assert "each replica enforces" not in default
    assert "each replica enforces" in _notes(helm, notes_chart, "--set", "replicaCount=3")
    production = _notes(helm, notes_chart, "-f", str(production_values))
    assert "WARNING" not in production
    for name in (
        "claude-gateway-signing",
        "claude-gateway-kafka",
        "claude-gateway-kafka-ca",
        "claude-gateway-redis",
    ):
        assert name in production


def test_a_redis_url_may_carry_tls_options(helm: Any) -> None:
    """A private CA for a TLS Redis (Memorystore, ElastiCache in-transit encryption) is given in
    the URL's query (redis-py passes it to its TLS connection); the schema refused any query."""
    url = "rediss://gateway@redis:6380/0?ssl_ca_certs=/etc/redis-ca/ca.crt"
    rendered = helm.template(values={"redis": {"enabled": True, "url": url}}).ok()
    config = yaml.safe_load(rendered.config_map()["data"]["config.yaml"])
    assert config["redis"]["url"] == url
    assert helm.template(values={"redis": {"enabled": True, "url": url + " x"}}).returncode != 0
