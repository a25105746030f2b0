"""Issue 12, config safety and the command line: each mistake gets a message that says what to
do, and no message ever repeats a secret; one JSON line for every start-up failure of `run`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from service.cli import main
from service.config import advice
from service.config.loader import ConfigError, env_overrides, load_config, parse_config
from service.version import version
from tests.support.redis import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-ant-api03-Zq8vR2mN4pL6kT9wX1yB3cD5fG7hJ0"
PARTNER = {"id": "acme", "api_key": {"env": "ACME_KEY"}}


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


# -- secrets are never echoed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"partners": [{"id": "acme", "api_key": SECRET}]},
        {"partners": [{**PARTNER, "apikey": SECRET}]},
        {"partners": [PARTNER], "redis": {"password": SECRET}},
        {"partners": [PARTNER], "kafka": {"sasl_password": SECRET}},
        {"partners": [{**PARTNER, "signing": {"keys": {"k1": SECRET}}}]},
        {"partners": [PARTNER], "admin": {"token": SECRET}},
        {"partners": [PARTNER], "kafka": {"group_id": {"x": SECRET}}},
        {"partners": [PARTNER], "runtime": {"log_level": SECRET}},
        {"partners": [PARTNER], "anthropic": {"timeout_s": SECRET}},
    ],
)
def test_an_inline_secret_is_never_echoed(data: dict[str, Any]) -> None:
    message = _error(data)
    assert SECRET not in message
    assert SECRET[:12] not in message


def test_an_inline_key_is_told_to_be_a_reference() -> None:
    message = _error({"partners": [{"id": "acme", "api_key": SECRET}]})
    assert "partners[acme].api_key: must be a secret reference, {env: VARIABLE} or {file: /path}" in message


def test_a_yaml_syntax_error_gives_the_place_not_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, f"partners:\n  - id: acme\n    api_key: {SECRET}: oops\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "is not valid YAML at line 3, column" in str(info.value)
    assert SECRET not in str(info.value)


# -- duplicate keys, enums, typos --------------------------------------------------------------


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "runtime:\n  http_port: 1\n  log_level: INFO\n  http_port: 2\npartners: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 4: duplicate key 'http_port' (first given on line 2)" in str(info.value)


def test_enums_match_whatever_their_case() -> None:
    s = parse_config(
        {
            "partners": [{**PARTNER, "on_unknown": "Retry", "budget": {"on_exhausted": "DEFER"}}],
            "runtime": {"log_level": "debug"},
            "kafka": {
                "security_protocol": "sasl_ssl",
                "sasl_mechanism": "scram-sha-512",
                "sasl_username": "u",
            }
            | {"sasl_password": {"env": "P"}},
        }
    )
    assert s.runtime.log_level == "DEBUG"
    assert s.kafka.security_protocol == "SASL_SSL"
    assert s.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert s.partners[0].on_unknown == "retry"
    assert s.partners[0].budget.on_exhausted == "defer"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"partners": [PARTNER], "runtime": {"log_levle": "info"}}, "runtime.log_levle: is not a known "),
        ({"partners": [PARTNER], "runtime": {"log_levle": "info"}}, "did you mean 'log_level'?"),
        (
            {"partners": [PARTNER], "kafka": {"bootstrap_server": "b:9092"}},
            "did you mean 'bootstrap_servers'?",
        ),
        (
            {"partners": [{**PARTNER, "wieght": 2}]},
            "partners[acme].wieght: is not a known setting; did you mean",
        ),
        ({"partners": [PARTNER], "limiter_backend": "reddis"}, "(got 'reddis'); did you mean 'redis'?"),
        ({"partners": [PARTNER], "runtime": {"log_level": "warn"}}, "did you mean 'WARNING'?"),
        ({"partners": [PARTNER], "redsi": {}}, "redsi: is not a known setting; did you mean 'redis'?"),
    ],
)
def test_typos_get_a_did_you_mean(data: dict[str, Any], expected: str) -> None:
    message = _error(data)
    assert expected in message, message


# -- warnings ----------------------------------------------------------------------------------


def test_budgets_and_replay_protection_without_redis_are_warned_about() -> None:
    s = parse_config(
        {
            "partners": [
                {**PARTNER, "budget": {"usd_per_day": 5}},
                {"id": "b", "api_key": {"env": "B"}, "dedupe": True},
            ]
        }
    )
    found = advice.warnings(s)
    assert len(found) == 2
    assert "budgets are set for acme but there is no redis section" in found[0]
    assert "starts from zero at every restart" in found[0]
    assert "replay protection is on for b but there is no redis section" in found[1]
    with_redis = parse_config({"partners": [{**PARTNER, "budget": {"usd_per_day": 5}}], "redis": {}})
    assert advice.warnings(with_redis) == []


# -- environment overrides ---------------------------------------------------------------------


def test_gateway_environment_variables_override_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, yaml.safe_dump({"partners": [PARTNER], "kafka": {"group_id": "g"}}))
    env = {
        "GATEWAY_KAFKA__BOOTSTRAP_SERVERS": "broker-1:9092,broker-2:9092",
        "GATEWAY_RUNTIME__LOG_LEVEL": "debug",
        "GATEWAY_RUNTIME__HTTP_PORT": "9999",
        "GATEWAY_REDIS__URL": "redis://r:6379/1",
        "GATEWAY_CONFIG": "/elsewhere.yaml",
        "GATEWAY_TEST_KAFKA": "local",
    }
    s = load_config(path, env)
    assert s.kafka.bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert s.kafka.group_id == "g"
    assert s.runtime.log_level == "DEBUG"
    assert s.runtime.http_port == 9999
    assert s.redis is not None
    assert s.redis.url == "redis://r:6379/1"


def test_an_override_that_matches_nothing_is_warned_about() -> None:
    _, warnings = env_overrides({"GATEWAY_KAKFA__BOOTSTRAP_SERVERS": "b", "GATEWAY_TEST_KAFKA": "local"})
    assert warnings == ["GATEWAY_KAKFA__BOOTSTRAP_SERVERS overrides nothing; did you mean 'kafka'?"]


def test_a_bad_override_names_the_setting() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"partners": [PARTNER]}, environ={"GATEWAY_RUNTIME__HTTP_PORT": "many"})
    assert "runtime.http_port: Input should be a valid integer" in str(info.value)


# -- the command line --------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"claude-gateway {version()}"


def test_help_describes_the_product_and_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Claude Partner Gateway: partners produce Claude requests to Kafka" in out
    for command in ("run", "config", "dlq", "simulator", "GATEWAY_CONFIG", "GATEWAY_<SECTION>__<SETTING>"):
        assert command in out
    assert "The environment is read here" not in out  # not the module's docstring


def test_config_check_takes_config_or_gateway_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, yaml.safe_dump({"partners": [PARTNER]}))
    assert main(["config", "check", "--config", str(path), "--no-secrets"]) == 0
    assert main(["config", "check", str(path), "--no-secrets"]) == 0  # the old positional form
    monkeypatch.setenv("GATEWAY_CONFIG", str(path))
    assert main(["config", "check", "--no-secrets"]) == 0
    monkeypatch.delenv("GATEWAY_CONFIG")
    assert main(["config", "check", "--no-secrets"]) == 2


def test_config_check_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, yaml.safe_dump({"partners": [{**PARTNER, "budget": {"usd_per_day": 1}}]}))
    assert main(["config", "check", "--config", str(path), "--no-secrets"]) == 0
    assert "warning: budgets are set for acme but there is no redis section" in capsys.readouterr().err


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (f"partners:\n  - id: acme\n    api_key: {SECRET}\n", "must be a secret reference"),
        ("partners: [\n", "is not valid YAML at line"),
        ("runtime: {http_port: 1, http_port: 2}\npartners: []\n", "duplicate key 'http_port'"),
        ("partners:\n  - id: acme\n    api_key: {env: ACME_KEY_NOT_SET}\n", "ACME_KEY_NOT_SET is not set"),
        (  # Python's FileNotFoundError names no file: a traceback ending in it, before
            "kafka: {security_protocol: SSL, ssl_cafile: /nonexistent/kafka-ca.pem}\npartners: []\n",
            "cannot load the Kafka TLS files (kafka.ssl_cafile=/nonexistent/kafka-ca.pem)",
        ),
        (  # it ran on local state, Redis declared down, each failure naming no file
            "redis: {url: 'rediss://127.0.0.1:1/0?ssl_ca_certs=/nonexistent/redis-ca.pem'}\npartners: []\n",
            "cannot load the Redis TLS files (ssl_ca_certs=/nonexistent/redis-ca.pem)",
        ),
    ],
)
def test_run_reports_every_start_up_failure_as_one_json_line(tmp_path: Path, text: str, error: str) -> None:
    path = _write(tmp_path, text)
    done = _run(["run", "--config", str(path)])
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    event = orjson.loads(lines[0])
    assert event["level"] == "error"
    assert event["event"] == "cannot start"
    assert error in event["error"]
    assert SECRET not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [["dlq", "show"], ["topics", "ensure"]], ids=["dlq show", "topics ensure"])
def test_commands_that_cannot_reach_kafka_say_so_in_one_line(tmp_path: Path, args: list[str]) -> None:
    """`dlq show` printed a traceback when no broker answered (`topics ensure` did not)."""
    kafka = f"kafka: {{bootstrap_servers: '127.0.0.1:{free_port()}'}}\n"
    text = kafka + "partners:\n  - id: acme\n    api_key: {env: K}\n"
    done = _run([*args, "--config", str(_write(tmp_path, text))], env={"K": SECRET})
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith('{"error"')]
    assert len(errors) == 1, done.stderr
    assert errors[0]["error"] == "KafkaConnectionError"
    assert errors[0]["cause"].startswith("ConnectionRefusedError")
    assert SECRET not in done.stderr


def test_the_simulator_is_a_subcommand() -> None:
    done = _run(["simulator", "--help"])
    assert done.returncode == 0
    assert "--rpm" in done.stdout
