"""The Dockerfile, checked without a Docker engine: hadolint, and its structure.

What matters and what a build would only show late: locked dependencies in a
layer before the source, a runtime stage without build tools, a non-root
user, and a build context (.dockerignore) that holds what the COPY lines need
and nothing secret.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in _instructions():
        if word == "FROM":
            name = rest.split()[-1] if " AS " in rest.upper() else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((word, rest))
    return stages


def test_hadolint_passes(hadolint_bin: Path) -> None:
    proc = subprocess.run(
        [str(hadolint_bin), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_dockerfile(hadolint_bin: Path) -> None:
    bad = "FROM python:latest\nRUN apt-get install curl\nUSER root\n"
    proc = subprocess.run(
        [str(hadolint_bin), "--no-color", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # latest tag


def test_locked_dependencies_come_in_their_own_layer_before_the_source() -> None:
    builder = _stages()["builder"]
    runs = [(i, rest) for i, (word, rest) in enumerate(builder) if word == "RUN"]
    deps = [i for i, rest in runs if "uv sync --frozen --no-install-project --no-dev" in rest]
    project = [
        i for i, rest in runs if "uv sync --frozen --no-dev" in rest and "--no-install-project" not in rest
    ]
    source_copies = [
        i for i, (word, rest) in enumerate(builder) if word == "COPY" and re.search(r"\bservice\b", rest)
    ]
    assert deps
    assert project
    assert source_copies
    assert deps[0] < source_copies[0] < project[0]
    # the dependency layer sees only the lock and the project metadata
    assert "--mount=type=bind,source=uv.lock" in builder[deps[0]][1]
    assert "--mount=type=bind,source=pyproject.toml" in builder[deps[0]][1]
    assert "--no-editable" in builder[project[0]][1], "the runtime stage has no source tree"


def test_runtime_stage_is_slim_and_non_root() -> None:
    stages = _stages()
    runtime = stages[list(stages)[-1]]
    words = [w for w, _ in runtime]
    base = runtime[0][1].split()[0]
    args = dict(rest.split("=", 1) for word, rest in _instructions() if word == "ARG" and "=" in rest)
    base = args.get(base.strip("${}"), base)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), f"runtime base {base} is not a slim Python 3.11"
    text = " ".join(rest for _, rest in runtime)
    for tool in ("uv sync", "apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in text, f"runtime stage installs {tool}"
    copies = [rest for w, rest in runtime if w == "COPY"]
    assert copies
    assert all("--from=builder" in c for c in copies), "runtime copies only the built environment"
    user = [rest for w, rest in runtime if w == "USER"]
    assert user, "no USER in the runtime stage"
    uid = user[-1].split(":")[0]
    assert uid not in {"0", "root"}
    assert "${UID}" in uid or uid.isdigit()
    assert words.index("USER") < words.index("ENTRYPOINT")
    entry = [rest for w, rest in runtime if w == "ENTRYPOINT"]
    assert entry == ['["claude-gateway"]']
    assert ("EXPOSE", "9464") in runtime


def test_runtime_works_under_any_uid_in_group_0() -> None:
    """OpenShift's restricted SCC runs the image under an assigned uid, in group 0, with no
    passwd entry: the files must be readable without being the owner, and HOME writable."""
    stages = _stages()
    runtime = stages[list(stages)[-1]]
    user = [rest for w, rest in runtime if w == "USER"][-1]
    assert user.split(":")[1:] == ["0"], f"USER {user}: the image's group must be 0"
    env = " ".join(rest for w, rest in runtime if w == "ENV")
    assert re.search(r"\bHOME=/tmp\b", env), "HOME must be the writable /tmp (no passwd entry for the uid)"
    assert not any(w == "RUN" and "chown" in rest for w, rest in runtime), "no file may belong to one uid"
    builder = " ".join(rest for w, rest in stages["builder"] if w == "RUN")
    # readable and traversable by every uid, writable by none but root
    assert "chmod -R a+rX,go-w /opt/claude-gateway" in builder
    useradd = [rest for w, rest in runtime if w == "RUN" and "useradd" in rest]
    assert useradd
    assert "--gid 0" in useradd[0]
    assert "--home-dir /tmp" in useradd[0]


def test_entrypoint_is_the_projects_console_script() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["claude-gateway"] == "service.cli:main"
    assert (
        pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]["schemas"]
        == "service/schemas"
    )


def _ignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for this file: last matching rule wins."""
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        pattern = pattern.rstrip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates) or any(
            fnmatch.fnmatchcase(part, pattern.removeprefix("**/"))
            for part in parts
            if pattern.startswith("**/")
        ):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def ignore_rules() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_build_context_holds_what_copy_needs(ignore_rules: list[str]) -> None:
    sources: list[str] = []
    for word, rest in _instructions():
        if word == "COPY" and "--from=" not in rest:
            args = [a for a in rest.split() if not a.startswith("--")]
            sources += args[:-1]
        if word == "RUN":
            sources += re.findall(r"--mount=type=bind,source=([^,\s]+)", rest)
    assert {"pyproject.toml", "uv.lock", "README.md", "schemas", "service"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src, ignore_rules), f"COPY {src}: excluded by .dockerignore"
    assert not _ignored("service/cli.py", ignore_rules)
    assert not _ignored("schemas/request.v1.json", ignore_rules)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/config",
        ".tools/bin/helm",
        "tests/deploy/conftest.py",
        ".env",
        "service/__pycache__/cli.cpython-311.pyc",
        "deploy/helm/claude-gateway/values.yaml",
        "service/local.env",
        "secrets/partner.pem",
    ],
)
def test_build_context_leaves_out_environments_and_secrets(ignore_rules: list[str], path: str) -> None:
    assert _ignored(path, ignore_rules), f"{path} would be sent to the Docker build context"
