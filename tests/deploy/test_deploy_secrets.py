"""No secret value ever reaches a values file or a rendered manifest.

The chart takes only the NAMES of existing Secrets and of keys inside them.
These tests put secret-looking sentinel values where a name is expected and
check that the chart refuses them (so they cannot be rendered), and scan every
rendered manifest and the shipped values files for secret material.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "claude-gateway"

SENTINELS = {
    "anthropic-key": "sk-ant-api03-SeNtInEl_" + "x7Q9" * 20 + "-AAAA",
    "private-key": (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANSENTINELkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
    ),
    "password": "S3ntinel!Kafka#Passw0rd",
    "base64-secret": "c2VudGluZWwtc2lnbmluZy1rZXktdmFsdWUtMTIzNDU2Nzg5MA+/==",
    "hmac-hex": "SENTINEL" + "deadbeef" * 8,
}

# Where the chart expects a name. Each is a path into the values and the
# schema pointer the refusal must name.
NAME_FIELDS = {
    "secrets.anthropic.existingSecret": "/secrets/anthropic/existingSecret",
    "secrets.signing.existingSecret": "/secrets/signing/existingSecret",
    "secrets.kafkaSasl.existingSecret": "/secrets/kafkaSasl/existingSecret",
    "secrets.kafkaSasl.passwordKey": "/secrets/kafkaSasl/passwordKey",
    "secrets.kafkaTls.existingSecret": "/secrets/kafkaTls/existingSecret",
    "secrets.kafkaTls.caKey": "/secrets/kafkaTls/caKey",
    "secrets.redis.existingSecret": "/secrets/redis/existingSecret",
    "secrets.redis.passwordKey": "/secrets/redis/passwordKey",
    "kafka.sasl.username": "/kafka/sasl/username",
    "partners.0.api_key.secret_key": "/partners/0/api_key/secret_key",
    "partners.0.signing.key_ids.0": "/partners/0/signing/key_ids/0",
    "autoscaling.kafkaLag.authenticationRef": "/autoscaling/kafkaLag/authenticationRef",
}

# Where a secret would be pasted by mistake instead of a reference.
MISPLACED = {
    "secrets.anthropic.value": "/secrets/anthropic",
    "partners.0.api_key": "/partners/0/api_key",
    "redis.password": "/redis",
    "kafka.sasl.password": "/kafka/sasl",
    "config.anthropic.api_key": "/config/anthropic",
}

PATTERNS = [
    re.compile(r"sk-ant-[A-Za-z0-9_-]{8,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"SENTINEL", re.IGNORECASE),
]


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = values
    parts = dotted.split(".")
    for part, nxt in itertools.pairwise(parts):
        key: Any = int(part) if part.isdigit() else part
        if isinstance(node, list):
            while len(node) <= key:
                node.append({} if not nxt.isdigit() else [])
            node = node[key]
        else:
            node = node.setdefault(key, [] if nxt.isdigit() else {})
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def _base_values(all_flags_values: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    values = all_flags_values()
    values["partners"] = [{"id": "acme", "signing": {"required": True, "key_ids": ["k1"]}}]
    return values


def _scan(text: str) -> list[str]:
    found = [p.pattern for p in PATTERNS if p.search(text)]
    found += [name for name, value in SENTINELS.items() if value.strip() in text]
    return found


@pytest.mark.parametrize("sentinel", sorted(SENTINELS))
@pytest.mark.parametrize("field", sorted(NAME_FIELDS))
def test_a_secret_value_where_a_name_is_expected_is_refused(
    helm: Any, all_flags_values: Callable[..., dict[str, Any]], field: str, sentinel: str
) -> None:
    values = _base_values(all_flags_values)
    _set(values, field, SENTINELS[sentinel])
    result = helm.template(values)
    assert result.returncode != 0, f"helm rendered the {sentinel} sentinel given as {field}"
    assert f"at '{NAME_FIELDS[field]}'" in result.stderr, result.stderr
    assert not _scan(result.stdout)


@pytest.mark.parametrize("field", sorted(MISPLACED))
def test_a_secret_pasted_instead_of_a_reference_is_refused(
    helm: Any, all_flags_values: Callable[..., dict[str, Any]], field: str
) -> None:
    values = _base_values(all_flags_values)
    _set(values, field, SENTINELS["anthropic-key"])
    result = helm.template(values)
    assert result.returncode != 0, f"helm accepted a secret at {field}"
    assert f"at '{MISPLACED[field]}'" in result.stderr, result.stderr
    assert not _scan(result.stdout)


def test_a_literal_value_for_a_secret_looking_env_var_is_refused(
    helm: Any, all_flags_values: Callable[..., dict[str, Any]]
) -> None:
    values = _base_values(all_flags_values)
    values["extraEnv"] = [{"name": "ANTHROPIC_API_KEY", "value": SENTINELS["anthropic-key"]}]
    result = helm.template(values)
    assert result.returncode != 0
    assert "at '/extraEnv/0" in result.stderr, result.stderr


# The settings of config.yaml that are SecretRefs (service/config/settings.py).
SECRET_SETTING = re.compile(r"(^|\.)(sasl_password|sasl_oauth_token|password|api_key)(\.|$)")


@pytest.mark.parametrize("variant", ["default", "all-flags", "production"])
def test_rendered_manifests_hold_no_secret_material(
    helm: Any,
    all_flags_values: Callable[..., dict[str, Any]],
    production_values: Path,
    walk: Callable[[Any], Any],
    variant: str,
) -> None:
    if variant == "default":
        rendered = helm.template().ok()
    elif variant == "all-flags":
        rendered = helm.template(all_flags_values()).ok()
    else:
        rendered = helm.template(files=(production_values,)).ok()
    assert not _scan(rendered.stdout)
    assert "Secret" not in rendered.kinds(), "the chart must reference existing Secrets, never create one"
    for doc in rendered.docs:
        assert "stringData" not in doc
        if doc["kind"] != "ConfigMap":
            assert "data" not in doc, f"{doc['kind']} carries data"
    # in config.yaml every secret is a reference: {file: ...} or {env: ...}
    config = rendered.config()
    for path, value in walk(config):
        leaf = path.rsplit(".", 1)[-1]
        if SECRET_SETTING.search(path) or ".signing.keys." in path:
            assert leaf in {"file", "env"}, f"config.yaml {path} is a literal, not a reference"
            assert isinstance(value, str), path
            assert value.startswith("/var/run/secrets/claude-gateway/"), path


SECRETISH_KEY = re.compile(r"(password|passwd|token(?!s)|secret|api_?key|credential|private)", re.IGNORECASE)
NAME_LIKE = re.compile(r"^[-._a-zA-Z0-9]{0,63}$")


@pytest.mark.parametrize("name", ["values.yaml", "values-production.yaml"])
def test_values_files_hold_no_secret_material(name: str, walk: Callable[[Any], Any]) -> None:
    text = (CHART / name).read_text()
    assert not _scan(text), f"{name} contains secret-looking text"
    # No long base64/hex blobs: keys and passwords look like that, names do not.
    blob = re.search(r"[A-Za-z0-9+/]{40,}={0,2}", text)
    assert blob is None, f"{name}: {blob.group(0)[:12]}... looks like key material"
    for path, value in walk(yaml.safe_load(text)):
        leaf = path.rsplit(".", 1)[-1]
        if SECRETISH_KEY.search(leaf) and isinstance(value, str) and value:
            # only references are allowed under secret-looking keys: Secret and key NAMES
            assert leaf in {"existingSecret", "passwordKey", "oauthTokenKey", "secret_key"}, path
            assert NAME_LIKE.match(value), f"{name}: {path} is not a name"


def test_the_scan_finds_what_it_looks_for() -> None:
    for name, value in SENTINELS.items():
        assert _scan(f"data:\n  x: {value}\n"), name
