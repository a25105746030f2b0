"""The chart's README.md is generated from values.yaml by the pinned helm-docs, and its metadata
(Chart.yaml) is complete enough for Artifact Hub.

`make chart-generate` writes README.md; these tests run the same helm-docs with --dry-run and
fail while the committed file differs, like `scripts/gen_request_schema.py --check`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "claude-gateway"
README = CHART / "README.md"
MAKEFILE = ROOT / "mk" / "deploy.mk"
STALE_HINT = "deploy/helm/claude-gateway/README.md is stale: run `make chart-generate` and commit it"


def _helm_docs_args() -> list[str]:
    """The flags `make chart-generate` passes (mk/deploy.mk), so the check and the generator agree."""
    match = re.search(r"^DEPLOY_HELM_DOCS_ARGS := --chart-search-root \S+ (.*)$", MAKEFILE.read_text(), re.M)
    assert match, "DEPLOY_HELM_DOCS_ARGS not found in mk/deploy.mk"
    return match.group(1).split()


def generated_readme(helm_docs: Path, chart: Path) -> str:
    proc = subprocess.run(
        [str(helm_docs), "--chart-search-root", str(chart), *_helm_docs_args(), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=chart,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_helm_docs_is_the_pinned_version(helm_docs_bin: Path) -> None:
    pinned = re.search(r"^DEPLOY_HELM_DOCS_VERSION \?= v(\S+)$", MAKEFILE.read_text(), re.M)
    assert pinned
    proc = subprocess.run(
        [str(helm_docs_bin), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.stdout.strip() == f"helm-docs version {pinned.group(1)}", (
        f"{proc.stdout.strip()}: run `make tools-helm-docs` to install the pinned helm-docs"
    )


def test_readme_is_generated_from_the_current_values(helm_docs_bin: Path) -> None:
    assert README.exists(), STALE_HINT
    assert generated_readme(helm_docs_bin, CHART) == README.read_text(), STALE_HINT


def test_a_changed_values_comment_makes_the_readme_stale(helm_docs_bin: Path, tmp_path: Path) -> None:
    chart = tmp_path / "claude-gateway"
    shutil.copytree(CHART, chart)
    values = chart / "values.yaml"
    text = values.read_text()
    assert "# -- Gateway pods." in text
    values.write_text(text.replace("# -- Gateway pods.", "# -- Gateway pods (an edited comment)."))
    fresh = generated_readme(helm_docs_bin, chart)
    assert fresh != README.read_text()
    assert "| replicaCount | int | `1` | Gateway pods (an edited comment)." in fresh


def _value_rows(text: str) -> dict[str, list[str]]:
    section = text.split("## Values", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| Key ", "|-")):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def test_every_value_in_the_readme_is_described() -> None:
    rows = _value_rows(README.read_text())
    assert len(rows) > 80
    undocumented = sorted(key for key, cells in rows.items() if len(cells) < 4 or not cells[3])
    assert not undocumented, f"values without a `# --` comment in values.yaml: {undocumented}"
    broken = sorted(key for key, cells in rows.items() if len(cells) != 4)
    assert not broken, f"a description holds ' | ', which splits its table row: {broken}"


def _leaves(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{path}.{k}" if path else k)]
    return [path]


def test_every_value_is_in_the_readme() -> None:
    """Each leaf of values.yaml is a row, or inside a row documented as a whole (e.g. resources)."""
    rows = _value_rows(README.read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [
        leaf for leaf in _leaves(values) if not any(leaf == key or leaf.startswith(key + ".") for key in rows)
    ]
    assert not missing, f"values missing from README.md: {missing}"


def test_the_row_check_catches_an_undocumented_value() -> None:
    text = "## Values\n\n| Key | Type | Default | Description |\n|-----|------|---------|-------------|\n"
    rows = _value_rows(text + '| a.b | int | `1` |  |\n| c | string | `"x"` | A | B |\n')
    assert rows["a.b"][3] == ""
    assert len(rows["c"]) == 5


# --- Chart.yaml ----------------------------------------------------------------------------------

ARTIFACTHUB_CHANGE_KINDS = {"added", "changed", "deprecated", "removed", "fixed", "security"}


@pytest.fixture(scope="module")
def chart_yaml() -> dict[str, Any]:
    data = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _https(url: Any) -> bool:
    parts = urlsplit(str(url))
    return parts.scheme == "https" and bool(parts.netloc)


def test_chart_metadata_is_complete(chart_yaml: dict[str, Any]) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart_yaml["version"])
    assert _https(chart_yaml["home"])
    assert chart_yaml["sources"]
    assert all(_https(s) for s in chart_yaml["sources"])
    assert chart_yaml["home"] in chart_yaml["sources"]
    assert chart_yaml["maintainers"]
    for maintainer in chart_yaml["maintainers"]:
        assert maintainer["name"]
        assert maintainer.get("email") or _https(maintainer.get("url"))
    if "icon" in chart_yaml:
        assert _https(chart_yaml["icon"])


def test_artifacthub_annotations_parse(chart_yaml: dict[str, Any]) -> None:
    annotations = chart_yaml["annotations"]
    assert all(isinstance(v, str) for v in annotations.values()), "annotations must be strings"
    assert annotations["artifacthub.io/license"] == "Apache-2.0"
    links = yaml.safe_load(annotations["artifacthub.io/links"])
    assert links
    for link in links:
        assert link["name"]
        # a link into the repository names a file that exists in it
        path = link["url"].removeprefix(chart_yaml["home"] + "/blob/main/")
        assert path != link["url"], link
        assert (ROOT / path).is_file(), link
    changes = yaml.safe_load(annotations["artifacthub.io/changes"])
    assert changes
    for change in changes:
        assert change["kind"] in ARTIFACTHUB_CHANGE_KINDS, change
        assert change["description"], change
    assert annotations["artifacthub.io/prerelease"] in {"true", "false"}


# --- docs/operations.md names only values that exist ------------------------------------------

OPERATIONS = ROOT / "docs" / "operations.md"


def _value_paths(node: Any, path: str = "") -> set[str]:
    out = {path} if path else set()
    if isinstance(node, dict):
        for key, value in node.items():
            out |= _value_paths(value, f"{path}.{key}" if path else str(key))
    return out


def unknown_values_named(text: str, values: dict[str, Any]) -> list[str]:
    """Chart values named in `backticks` that values.yaml lacks. Chart values are camelCase
    (`securityIds.runAsUser`); config.yaml keys are snake_case (`kafka.eos_window`) and skipped."""
    paths = _value_paths(values)
    found = re.findall(r"`([a-z][A-Za-z0-9]*(?:\.[A-Za-z0-9_]+)*)(?:[:=][^`]*)?`", text)
    return sorted(
        {t for t in found if t.split(".")[0] in values and re.search(r"[A-Z]", t) and t not in paths}
    )


def test_operations_guide_names_only_existing_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert not unknown_values_named(OPERATIONS.read_text(), values)
    assert unknown_values_named("set `securityIds.runAsUsr` and `extraEnvs`", values) == [
        "securityIds.runAsUsr"
    ]
    assert unknown_values_named("`prometheusRule.runBookBaseUrl: x`", values) == [
        "prometheusRule.runBookBaseUrl"
    ]
