"""The pods' security context: hardened, and with no fixed id, so they run under any uid.

OpenShift's restricted-v2 SCC (the default for every authenticated user) assigns
each pod a uid and an fsGroup from its namespace's range and refuses a pod that
asks for other ids, privileges, capabilities or host access. `scc_violations`
is that policy written out for what the chart renders; the image side (uid
10001 in group 0, files readable by all, HOME in /tmp) is checked in
test_deploy_dockerfile.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# restricted-v2: the volume types it allows, and the one capability a pod may add.
SCC_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SCC_ADDABLE = {"NET_BIND_SERVICE"}
IDS = ("runAsUser", "runAsGroup", "fsGroup")


def scc_violations(pod: dict[str, Any], where: str) -> list[str]:
    """Why restricted-v2 would refuse this pod spec (empty: it admits it with any uid range)."""
    out = []
    pod_sc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{where}: {key}")
    for key in IDS:
        if key in pod_sc and not (key == "runAsGroup" and pod_sc[key] == 0):
            out.append(f"{where}: pod {key} {pod_sc[key]} is fixed (the SCC assigns it from a range)")
    if pod_sc.get("seccompProfile") not in (None, {"type": "RuntimeDefault"}):
        out.append(f"{where}: pod seccompProfile {pod_sc['seccompProfile']}")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= SCC_VOLUMES:
            out.append(f"{where}: volume {volume['name']} is {sorted(kinds)}")
    for container in pod.get("initContainers", []) + pod["containers"]:
        name = f"{where}/{container['name']}"
        sc = container.get("securityContext", {})
        for key in ("runAsUser", "runAsGroup"):
            if key in sc and not (key == "runAsGroup" and sc[key] == 0):
                out.append(f"{name}: {key} {sc[key]} is fixed")
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = sc.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            out.append(f"{name}: capabilities are not all dropped")
        if not set(capabilities.get("add", [])) <= SCC_ADDABLE:
            out.append(f"{name}: adds capabilities {capabilities['add']}")
        if sc.get("seccompProfile", pod_sc.get("seccompProfile")) != {"type": "RuntimeDefault"}:
            out.append(f"{name}: no RuntimeDefault seccomp profile")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            out.append(f"{name}: hostPort")
    return out


def _pods(rendered: Any) -> dict[str, dict[str, Any]]:
    return {
        "Deployment": rendered.one("Deployment")["spec"]["template"]["spec"],
        "test pod": rendered.one("Pod")["spec"],
    }


@pytest.fixture(scope="module")
def render(
    helm: Any, all_flags_values: Callable[..., dict[str, Any]], production_values: Path
) -> Callable[[str], Any]:
    def render(variant: str) -> Any:
        if variant == "default":
            return helm.template().ok()
        if variant == "all-flags":
            return helm.template(all_flags_values()).ok()
        return helm.template(files=(production_values,)).ok()

    return render


@pytest.mark.parametrize("variant", ["default", "all-flags", "production"])
def test_restricted_scc_admits_every_pod_with_any_uid(render: Callable[[str], Any], variant: str) -> None:
    for where, pod in _pods(render(variant)).items():
        assert not scc_violations(pod, where)


@pytest.mark.parametrize(
    ("values", "violation"),
    [
        ({"securityIds": {"runAsUser": 10001}}, "pod runAsUser 10001 is fixed"),
        ({"securityIds": {"runAsGroup": 10001, "fsGroup": 10001}}, "pod fsGroup 10001 is fixed"),
        (
            {
                "extraVolumes": [{"name": "host", "hostPath": {"path": "/var/log"}}],
                "extraVolumeMounts": [{"name": "host", "mountPath": "/host-logs", "readOnly": True}],
            },
            "volume host is ['hostPath']",
        ),
    ],
)
def test_the_scc_check_catches_what_restricted_v2_refuses(
    helm: Any, values: dict[str, Any], violation: str
) -> None:
    pod = helm.template(values).ok().one("Deployment")["spec"]["template"]["spec"]
    assert any(violation in v for v in scc_violations(pod, "Deployment")), scc_violations(pod, "Deployment")
    container = pod["containers"][0]
    container["securityContext"]["allowPrivilegeEscalation"] = True
    container["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    problems = scc_violations(pod, "Deployment")
    assert "Deployment/gateway: allowPrivilegeEscalation is not false" in problems
    assert "Deployment/gateway: capabilities are not all dropped" in problems
    assert "Deployment/gateway: adds capabilities ['NET_ADMIN']" in problems


@pytest.mark.parametrize("variant", ["default", "all-flags"])
def test_home_and_tmpdir_are_the_writable_tmp(render: Callable[[str], Any], variant: str) -> None:
    pod = render(variant).one("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert volumes[tmp["name"]]["emptyDir"]["sizeLimit"] == "64Mi"
    # an emptyDir is writable by any uid; every Secret is readable by its group (0 or fsGroup)
    for volume in volumes.values():
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o440


def test_the_test_pod_runs_the_gateway_image_hardened(render: Callable[[str], Any]) -> None:
    rendered = render("all-flags")
    pod = rendered.one("Pod")["spec"]
    (container,) = pod["containers"]
    assert (
        container["image"] == rendered.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    assert container["command"][:2] == ["python", "-c"]
    assert "/healthz" in container["command"][2]
    assert "/readyz" in container["command"][2]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("uid", [10001, 1000680000])
def test_ids_can_still_be_fixed(helm: Any, uid: int) -> None:
    ids = {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid}
    rendered = helm.template({"securityIds": ids}).ok()
    for where, pod in _pods(rendered).items():
        assert {k: pod["securityContext"].get(k) for k in IDS} == ids, where
    # group 0 needs no fsGroup: the Secrets are root's group's
    only_user = helm.template({"securityIds": {"runAsUser": uid, "runAsGroup": 0}}).ok()
    pod_sc = only_user.one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert (pod_sc["runAsUser"], pod_sc["runAsGroup"], "fsGroup" in pod_sc) == (uid, 0, False)


def test_a_group_other_than_0_needs_an_fs_group(helm: Any) -> None:
    result = helm.template({"securityIds": {"runAsUser": 10001, "runAsGroup": 10001}})
    assert result.returncode != 0
    assert "securityIds.fsGroup is required with securityIds.runAsGroup 10001" in result.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("securityIds.runAsUser=0",), "at '/securityIds/runAsUser': minimum"),
        (("securityIds.fsGroup=-1",), "at '/securityIds/fsGroup': minimum"),
        (("securityIds.runAsUser=root",), "at '/securityIds/runAsUser'"),
    ],
)
def test_schema_refuses_root_and_bad_ids(helm: Any, sets: tuple[str, ...], message: str) -> None:
    result = helm.template(sets=sets)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
