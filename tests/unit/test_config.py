"""The config file: errors that name the setting, `config check`, and the Kafka client arguments."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from service.cli import main
from service.config.kafka import client_kwargs
from service.config.loader import ConfigError, load_config, parse_config
from service.config.settings import KafkaSettings

PARTNER = {"id": "acme", "api_key": {"env": "ACME_KEY"}}


def _error(cfg: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(cfg)
    return str(caught.value)


def _with(**partner: Any) -> dict[str, Any]:
    return {"partners": [{**PARTNER, **partner}]}


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"partners": [{"id": "acme"}]}, "partners[acme].api_key: Field required"),
        (
            _with(api_key={"env": "A", "file": "/a"}),
            "partners[acme].api_key: a secret reference needs exactly one",
        ),
        (_with(id="Acme"), "partners[Acme].id: partner id 'Acme' must match"),
        (_with(weight=0), "partners[acme].weight: Input should be greater than 0 (got 0)"),
        (_with(enabled="maybe"), "partners[acme].enabled: Input should be a valid boolean"),
        (_with(limits={"rpm": -5}), "partners[acme].limits.rpm: Input should be greater than 0 (got -5)"),
        (
            _with(budget={"usd_per_day": -1}),
            "partners[acme].budget.usd_per_day: Input should be greater than 0",
        ),
        (_with(budget={"on_exhausted": "panic"}), "partners[acme].budget.on_exhausted: Input should be"),
        (
            _with(max_tokens_policy="trim"),
            "partners[acme].max_tokens_policy: Input should be 'reject' or 'clamp'",
        ),
        (_with(max_request_bytes=0), "partners[acme].max_request_bytes: Input should be greater than 0"),
        (
            _with(allowed_models=["gpt-5"]),
            "partners[acme].allowed_models: 'gpt-5' is not in the models price table",
        ),
        (
            _with(signing={"required": True}),
            "partners[acme].signing: signing.required is true but signing.keys",
        ),
        (
            _with(signing={"keys": {"bad id": {"env": "S"}}}),
            "partners[acme].signing.keys: signing key id 'bad id'",
        ),
        (
            _with(signing={"keys": {"k1": {}}}),
            "partners[acme].signing.keys.k1: a secret reference needs exactly one",
        ),
        (
            _with(signing={"max_skew_s": 0}),
            "partners[acme].signing.max_skew_s: Input should be greater than 0",
        ),
        (
            _with(signing={"required": True, "keys": {"k1": {"env": "S"}}}, replay_window_s=60),
            "partners[acme]: replay_window_s (60) must be at least 2 x signing.max_skew_s (600)",
        ),
        (_with(sigining={}), "partners[acme].sigining: is not a known setting; did you mean 'signing'?"),
        ({"partners": [PARTNER, PARTNER]}, "partners: duplicate partner id 'acme'"),
        (
            {"partners": [PARTNER, {**PARTNER, "id": "b", "request_topic": "claude.requests.acme"}]},
            "partners[b].request_topic: 'claude.requests.acme' is used twice",
        ),
        ({"partners": [{"api_key": {"env": "X"}}]}, "partners[0].id: Field required"),
        ({"partners": []} | {"kafka": {"security_protocol": "SASL_SSL"}}, "kafka.sasl_mechanism is required"),
        (
            {"partners": [], "kafka": {"sasl_mechanism": "PLAIN"}},
            "kafka.sasl_mechanism is set but kafka.security_protocol is PLAINTEXT",
        ),
        (
            {"partners": [], "kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"}},
            "kafka.sasl_username and kafka.sasl_password are required with SCRAM-SHA-512",
        ),
        (
            {"partners": [], "kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"}},
            "kafka.sasl_oauth_token is required with OAUTHBEARER",
        ),
        (
            {"partners": [], "kafka": {"ssl_cafile": "/ca.pem"}},
            "kafka.ssl_cafile is set but kafka.security_protocol",
        ),
        (
            {"partners": [], "kafka": {"security_protocol": "SSL", "ssl_certfile": "/c.pem"}},
            "kafka.ssl_certfile and kafka.ssl_keyfile go together",
        ),
        (
            {"partners": [], "limiter_backend": "redis"},
            "limiter_backend is 'redis' but the redis section is missing",
        ),
        (
            {"partners": [], "runtime": {"http_port": 70000}},
            "runtime.http_port: Input should be less than or equal",
        ),
        (
            {"partners": [], "models": {"m": {"input_per_mtok_usd": -1, "output_per_mtok_usd": 1}}},
            "models.m.input_per",
        ),
        ({}, "partners: Field required"),
    ],
)
def test_errors_name_the_setting(cfg: dict[str, Any], expected: str) -> None:
    message = _error(cfg)
    assert expected in message, message


def test_every_problem_is_listed_at_once() -> None:
    message = _error(
        {"partners": [{**PARTNER, "weight": -1, "max_queue": 0}], "runtime": {"max_in_flight": 0}}
    )
    for setting in ("partners[acme].weight", "partners[acme].max_queue", "runtime.max_in_flight"):
        assert setting in message


def test_yaml_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("partners: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


# -- python -m service config check ------------------------------------------------------------


def _write(tmp: Path, cfg: dict[str, Any]) -> str:
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _full_config(tmp: Path) -> dict[str, Any]:
    (tmp / "acme.key").write_text("sk-ant-acme-VERYSECRET\n")
    (tmp / "acme.k1").write_text("signing-VERYSECRET")
    return {
        "kafka": {"bootstrap_servers": "kafka:9092", "audit_topic": "claude.audit"},
        "partners": [
            {
                "id": "acme",
                "api_key": {"file": str(tmp / "acme.key")},
                "signing": {"required": True, "keys": {"k1": {"file": str(tmp / "acme.k1")}}},
                "budget": {"usd_per_day": 50, "on_exhausted": "defer"},
            },
            {"id": "globex", "enabled": False, "api_key": {"env": "GLOBEX_TEST_KEY"}},
        ],
    }


def test_config_check_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLOBEX_TEST_KEY", "sk-ant-globex-VERYSECRET")
    path = _write(tmp_path, _full_config(tmp_path))
    assert main(["config", "check", path]) == 0
    out = capsys.readouterr()
    assert "ok (2 partners, 1 disabled, 1 with required signatures)" in out.out
    assert "VERYSECRET" not in out.out + out.err


def test_config_check_names_unreadable_secrets_without_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GLOBEX_TEST_KEY", raising=False)
    cfg = _full_config(tmp_path)
    (tmp_path / "acme.k1").unlink()
    path = _write(tmp_path, cfg)
    assert main(["config", "check", path]) == 1
    err = capsys.readouterr().err
    assert "partners[acme].signing.keys.k1 (file:" in err
    assert "cannot read secret file" in err
    assert (
        "partners[globex].api_key (env:GLOBEX_TEST_KEY): environment variable GLOBEX_TEST_KEY is not set"
        in err
    )
    assert "VERYSECRET" not in err
    assert main(["config", "check", "--no-secrets", path]) == 0
    assert "secrets not checked" in capsys.readouterr().out


def test_config_check_service_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {
        "kafka": {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "gw",
            "sasl_password": {"file": str(tmp_path / "nope")},
        },
        "redis": {"password": {"env": "NO_SUCH_REDIS_PASSWORD_VAR"}},
        "partners": [],
    }
    assert main(["config", "check", _write(tmp_path, cfg)]) == 1
    err = capsys.readouterr().err
    assert "kafka.sasl_password (file:" in err
    assert "redis.password (env:NO_SUCH_REDIS_PASSWORD_VAR)" in err


def test_config_check_loads_the_tls_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing CA file, or one that holds no certificate, fails the check (it said `ok`, and
    the gateway then stopped at start with a traceback)."""
    not_a_cert = tmp_path / "ca.pem"
    not_a_cert.write_text("not a certificate\n")
    for cafile in ("/nonexistent/kafka-ca.pem", str(not_a_cert)):
        cfg = {"kafka": {"security_protocol": "SSL", "ssl_cafile": cafile}, "partners": []}
        assert main(["config", "check", _write(tmp_path, cfg)]) == 1
        err = capsys.readouterr().err
        assert f"cannot load the Kafka TLS files (kafka.ssl_cafile={cafile})" in err
    redis = {"url": "rediss://127.0.0.1:6380/0?ssl_ca_certs=/nonexistent/redis-ca.pem"}
    assert main(["config", "check", _write(tmp_path, {"redis": redis, "partners": []})]) == 1
    err = capsys.readouterr().err
    assert "cannot load the Redis TLS files (ssl_ca_certs=/nonexistent/redis-ca.pem)" in err


def test_config_check_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path, {"partners": [{"id": "acme", "api_key": {"env": "X"}, "budget": {"usd_per_day": 0}}]}
    )
    assert main(["config", "check", path]) == 1
    err = capsys.readouterr().err
    assert "config check failed" in err
    assert "partners[acme].budget.usd_per_day: Input should be greater than 0 (got 0)" in err


def test_config_check_runs_as_a_module(tmp_path: Path) -> None:
    path = _write(tmp_path, {"partners": [{"id": "acme", "api_key": {"env": "X"}, "weight": -1}]})
    proc = subprocess.run(
        [sys.executable, "-m", "service", "config", "check", "--no-secrets", path],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert proc.returncode == 1
    assert "partners[acme].weight" in proc.stderr


OPERATOR_COMMANDS = [["config", "check", "--no-secrets"], ["dlq", "--help"], ["topics", "--help"]]


@pytest.mark.parametrize("command", OPERATOR_COMMANDS)
def test_operator_commands_start_without_the_anthropic_sdk(tmp_path: Path, command: list[str]) -> None:
    """Only `run` calls Claude: the tools an operator runs by hand do not wait 1-2 s for the SDK's
    imports (`python -m service dlq --help` took 2.2-2.3 s with them, 0.5 s without)."""
    if command[0] == "config":
        command = [*command, _write(tmp_path, {"partners": [{"id": "acme", "api_key": {"env": "X"}}]})]
    script = (
        "import sys\n"
        "from service.cli import main\n"
        "try:\n"
        f"    code = main({command!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('exit', code, 'anthropic' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert proc.stdout.strip().splitlines()[-1] == "exit 0 False", (proc.stdout, proc.stderr)


# -- the service's own Kafka connection ------------------------------------------------------------


def _kafka(**kw: Any) -> KafkaSettings:
    return KafkaSettings.model_validate({"bootstrap_servers": "b:9093", **kw})


async def _accepted_by_aiokafka(kwargs: dict[str, Any]) -> None:
    # the constructors validate security arguments (they raise on a bad combination)
    consumer = AIOKafkaConsumer(**kwargs)
    producer = AIOKafkaProducer(**kwargs)
    await consumer.stop()
    await producer.stop()


async def test_plaintext() -> None:
    kwargs = client_kwargs(_kafka())
    assert kwargs["security_protocol"] == "PLAINTEXT"
    assert "ssl_context" not in kwargs
    assert "sasl_mechanism" not in kwargs
    await _accepted_by_aiokafka(kwargs)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp / "client.pem", tmp / "client.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=gateway",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_with_ca_and_client_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    kwargs = client_kwargs(
        _kafka(
            security_protocol="SSL",
            ssl_cafile=str(cert),
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
            ssl_check_hostname=False,
        )
    )
    ctx = kwargs["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.check_hostname is False
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert len(ctx.get_ca_certs()) == 1
    await _accepted_by_aiokafka(kwargs)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_password_mechanisms(mechanism: str, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("kafka-PASSWORD\n")
    kwargs = client_kwargs(
        _kafka(
            security_protocol="SASL_SSL",
            sasl_mechanism=mechanism,
            sasl_username="gateway",
            sasl_password={"file": str(tmp_path / "pw")},
        )
    )
    assert kwargs["sasl_mechanism"] == mechanism
    assert kwargs["sasl_plain_username"] == "gateway"
    assert kwargs["sasl_plain_password"] == "kafka-PASSWORD"
    assert kwargs["ssl_context"].check_hostname is True
    await _accepted_by_aiokafka(kwargs)


async def test_sasl_plaintext_has_no_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_PW_TEST", "pw")
    kwargs = client_kwargs(
        _kafka(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="SCRAM-SHA-256",
            sasl_username="gw",
            sasl_password={"env": "KAFKA_PW_TEST"},
        )
    )
    assert "ssl_context" not in kwargs
    await _accepted_by_aiokafka(kwargs)


async def test_oauthbearer_token_is_read_at_every_authentication(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("token-1\n")
    kwargs = client_kwargs(
        _kafka(
            security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER", sasl_oauth_token={"file": str(token)}
        )
    )
    provider = kwargs["sasl_oauth_token_provider"]
    assert "sasl_plain_password" not in kwargs
    assert await provider.token() == "token-1"
    token.write_text("token-2\n")
    assert await provider.token() == "token-2"
    await _accepted_by_aiokafka(kwargs)


def test_settings_never_show_secret_values(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("kafka-PASSWORD")
    k = _kafka(
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="gw",
        sasl_password={"file": str(tmp_path / "pw")},
    )
    assert "kafka-PASSWORD" not in repr(k) + k.model_dump_json()


def _yaml_blocks(doc: str) -> list[str]:
    blocks, inside, lines = [], False, []
    for line in doc.splitlines():
        if line.startswith("```yaml"):
            inside, lines = True, []
        elif line.startswith("```") and inside:
            inside = False
            blocks.append("\n".join(lines))
        elif inside:
            lines.append(line)
    return blocks


def test_the_documented_configuration_is_valid() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    full, *snippets = _yaml_blocks(docs.read_text())
    settings = parse_config(yaml.safe_load(full))
    assert [p.id for p in settings.partners] == ["search", "support-bot", "legacy-batch"]
    assert set(type(settings).model_fields) <= set(yaml.safe_load(full)), "the example covers every section"
    for snippet in snippets:  # the Kafka security examples
        parse_config({**yaml.safe_load(snippet), "partners": []})
