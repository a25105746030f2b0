"""A Kafka broker secured as production brokers are: SASL_SSL with SCRAM-SHA-512, TLS from a
private CA made for the run.

    with secure_kafka(tmp_path, {"gateway": "s3cret-..."}) as broker:
        broker.plaintext   # 127.0.0.1:P, no security: the test helpers (topics, produce, collect)
        broker.sasl_ssl    # 127.0.0.1:S, SASL_SSL, SCRAM-SHA-512 only: what the gateway is given
        broker.cafile      # the CA that signed the broker's certificate (SAN IP:127.0.0.1)

One KRaft node started by scripts/kafka_local.py (its jars, JVM flags, start-up check and stop;
the broker gets SIGTERM when the test process dies), with two listeners more and the users'
SCRAM credentials written at `kafka-storage format --add-scram`. No authorizer: every
authenticated (or PLAINTEXT) client may do anything, AlterUserScramCredentials included
(tests/support/scram.py changes a password at run time). `reauth_ms` is the SCRAM session
lifetime on the SASL_SSL listener (`connections.max.reauth.ms`): the broker closes a connection
used after it without re-authenticating, which aiokafka never does, so every client reconnects
(and authenticates again) that often. Certificates come from the `openssl` command
(`make_certificates`); nothing here needs Python's `cryptography`.
"""

from __future__ import annotations

import contextlib
import shutil
import ssl
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.kafka import kafka_local

HOST = "127.0.0.1"
STORE_PASSWORD = "broker-keystore"  # the broker's PKCS12 keystore, a file of the test's tmp dir
REAUTH_MS = 3_000


def missing_tools() -> list[str]:
    """The commands this broker needs that are not installed (java, openssl)."""
    return [tool for tool in ("java", "openssl") if shutil.which(tool) is None]


@dataclass(frozen=True)
class SecureKafka:
    plaintext: str
    sasl_ssl: str
    cafile: Path
    directory: Path

    def sasl_kwargs(self, user: str, password: str) -> dict[str, Any]:
        """aiokafka's security arguments for `user` on the SASL_SSL listener (SCRAM-SHA-512,
        the run's CA)."""
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": user,
            "sasl_plain_password": password,
            "ssl_context": ssl.create_default_context(cafile=str(self.cafile)),
        }


def _openssl(cwd: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")


def make_certificates(tls: Path) -> tuple[Path, Path]:
    """A private CA and a broker certificate for 127.0.0.1/localhost signed by it, made with the
    `openssl` command into `tls`; returns (the CA certificate, the broker's PKCS12 keystore).
    EC P-256 keys: made in milliseconds, and both Java and Python's ssl take them."""
    tls.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(tls, "req", "-x509", *ec, "-days", "2", "-keyout", "ca.key", "-out", "ca.crt",
             "-subj", "/CN=Gateway test private CA")  # fmt: skip
    _openssl(tls, "req", *ec, "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost")
    (tls / "broker.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(tls, "x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", "broker.crt", "-extfile", "broker.ext")  # fmt: skip
    _openssl(tls, "pkcs12", "-export", "-in", "broker.crt", "-inkey", "broker.key", "-certfile", "ca.crt",
             "-name", "broker", "-out", "broker.p12", "-passout", f"pass:{STORE_PASSWORD}")  # fmt: skip
    return tls / "ca.crt", tls / "broker.p12"


def server_properties(
    kl: Any, d: Path, plaintext: int, sasl_ssl: int, controller: int, keystore: Path, reauth_ms: int
) -> str:
    """kafka_local's properties with a SASL_SSL listener beside PLAINTEXT (which stays the
    inter-broker one) and the TLS and SCRAM settings of that listener."""
    listeners = {
        "listeners": f"PLAINTEXT://{HOST}:{plaintext},SASL_SSL://{HOST}:{sasl_ssl},"
        f"CONTROLLER://{HOST}:{controller}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{plaintext},SASL_SSL://{HOST}:{sasl_ssl}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
    }
    lines = []
    for line in kl._server_properties(d / "data", plaintext, controller).splitlines():
        key = line.partition("=")[0]
        lines.append(f"{key}={listeners[key]}" if key in listeners else line)
    prefix = "listener.name.sasl_ssl"
    lines += [
        "sasl.enabled.mechanisms=SCRAM-SHA-512",
        f"{prefix}.scram-sha-512.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        f"{prefix}.scram-sha-512.connections.max.reauth.ms={reauth_ms}",
        f"{prefix}.ssl.keystore.location={keystore}",
        f"{prefix}.ssl.keystore.type=PKCS12",
        f"{prefix}.ssl.keystore.password={STORE_PASSWORD}",
        f"{prefix}.ssl.key.password={STORE_PASSWORD}",
        f"{prefix}.ssl.client.auth=none",
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def secure_kafka(
    directory: Path, users: Mapping[str, str], reauth_ms: int = REAUTH_MS, timeout_s: float = 90.0
) -> Iterator[SecureKafka]:
    """Start the broker with its files in `directory` (certificates in `directory/tls`), with
    a SCRAM-SHA-512 credential for each of `users` ({name: password}); stop it on exit.

    Call it from the main thread: the broker's parent-death signal is sent when the thread
    that started it ends, not only the process."""
    if missing := missing_tools():
        pytest.skip(f"a secured Kafka needs {' and '.join(missing)}")
    kl = kafka_local()
    d = directory.resolve()
    cafile, keystore = make_certificates(d / "tls")
    scram = [a for u, p in users.items() for a in ("--add-scram", f"SCRAM-SHA-512=[name={u},password={p}]")]
    try:
        libs, java = kl.fetch(), kl._require("java")
        for attempt in range(3):  # a free port can be taken before the broker binds it
            plaintext, sasl_ssl, controller = _free_ports(kl, 3)
            properties = server_properties(kl, d, plaintext, sasl_ssl, controller, keystore, reauth_ms)
            try:
                kl._launch(d, java, libs, plaintext, controller, timeout_s, die_with_parent=True,
                           heap=kl.HEAP, properties=properties, format_args=scram)  # fmt: skip
                break
            except kl.KafkaLocalError as exc:
                if attempt == 2 or "Address already in use" not in str(exc):
                    raise
    except kl.KafkaLocalError as exc:
        pytest.fail(f"the secured Kafka broker did not start ({exc.exit_code}): {exc}", pytrace=False)
    try:
        yield SecureKafka(f"{HOST}:{plaintext}", f"{HOST}:{sasl_ssl}", cafile, d)
    finally:
        kl.stop(d)


def _free_ports(kl: Any, n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := kl._free_port()) not in ports:
            ports.append(port)
    return ports
