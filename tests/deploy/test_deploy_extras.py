"""envFrom, extraVolumes and extraVolumeMounts: rendered into the gateway's pod as given,
beside the chart's own volumes, never over them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

OWN_VOLUMES = {"config", "tmp", "anthropic-keys", "signing-keys", "kafka-sasl", "kafka-tls", "redis"}


def _pod(rendered: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_extras_are_rendered_as_given(helm: Any, all_flags_values: Callable[..., dict[str, Any]]) -> None:
    values = all_flags_values()
    pod, container = _pod(helm.template(values).ok())
    assert container["envFrom"] == values["envFrom"]
    volumes = [v["name"] for v in pod["volumes"]]
    mounts = [m["name"] for m in container["volumeMounts"]]
    assert pod["volumes"][-2:] == values["extraVolumes"]
    assert container["volumeMounts"][-2:] == values["extraVolumeMounts"]
    assert set(volumes) >= OWN_VOLUMES, "the chart's own volumes are all still there"
    assert len(volumes) == len(set(volumes))
    assert set(mounts) <= set(volumes)
    # extraEnv is still there, next to envFrom
    assert {e["name"] for e in container["env"]} >= {"OTEL_EXPORTER_OTLP_ENDPOINT", "HOME", "TMPDIR"}


def test_no_extras_by_default(helm: Any) -> None:
    pod, container = _pod(helm.template().ok())
    assert "envFrom" not in container
    assert {v["name"] for v in pod["volumes"]} == {"config", "tmp", "anthropic-keys"}
    assert {m["name"] for m in container["volumeMounts"]} == {"config", "tmp", "anthropic-keys"}


def _extras(volumes: list[dict[str, Any]], mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"extraVolumes": volumes, "extraVolumeMounts": mounts}


CA = {"name": "ca", "configMap": {"name": "ca-bundle"}}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (_extras([{"name": "tmp", "emptyDir": {}}], []), "at '/extraVolumes/0/name'"),
        (_extras([{"name": "Not_A_Label", "emptyDir": {}}], []), "at '/extraVolumes/0/name'"),
        (_extras([{"configMap": {"name": "x"}}], []), "at '/extraVolumes/0': missing property 'name'"),
        (_extras([CA], [{"name": "ca"}]), "at '/extraVolumeMounts/0': missing property 'mountPath'"),
        (_extras([CA], [{"name": "ca", "mountPath": "relative"}]), "at '/extraVolumeMounts/0/mountPath'"),
        ({"envFrom": [{"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}]}, "at '/envFrom/0'"),
        ({"envFrom": [{"prefix": "X_"}]}, "at '/envFrom/0'"),
        ({"envFrom": [{"secretRef": {}}]}, "at '/envFrom/0/secretRef': missing property 'name'"),
    ],
)
def test_schema_refuses_broken_extras(helm: Any, values: dict[str, Any], message: str) -> None:
    result = helm.template(values)
    assert result.returncode != 0, f"helm accepted {values}"
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (_extras([CA, CA], []), 'extraVolumes: the volume name "ca" is taken'),
        (
            _extras([CA], [{"name": "certs", "mountPath": "/etc/certs"}]),
            'add a volume "certs" to extraVolumes',
        ),
        (_extras([CA], [{"name": "ca", "mountPath": "/tmp"}]), "/tmp overlaps /tmp"),
        (_extras([CA], [{"name": "ca", "mountPath": "/tmp/ca/"}]), "/tmp/ca overlaps /tmp"),
        (_extras([CA], [{"name": "ca", "mountPath": "/etc"}]), "/etc overlaps /etc/claude-gateway"),
        (
            _extras([CA], [{"name": "ca", "mountPath": "/var/run/secrets/claude-gateway/ca"}]),
            "overlaps /var/run/secrets/claude-gateway",
        ),
    ],
)
def test_extras_never_shadow_the_charts_own_volumes(helm: Any, values: dict[str, Any], message: str) -> None:
    result = helm.template(values)
    assert result.returncode != 0, f"helm accepted {values}"
    assert message in result.stderr, result.stderr


def test_a_mount_beside_the_charts_paths_is_fine(helm: Any) -> None:
    values = _extras([CA], [{"name": "ca", "mountPath": "/etc/claude-gateway-ca", "readOnly": True}])
    _, container = _pod(helm.template(values).ok())
    assert container["volumeMounts"][-1]["mountPath"] == "/etc/claude-gateway-ca"
