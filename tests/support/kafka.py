"""Where the tests' Kafka broker comes from, in this order:

1. `KAFKA_BOOTSTRAP_SERVERS`, if set (a broker someone already runs);
2. testcontainers' Kafka module, where a Docker daemon answers;
3. the local Apache Kafka of `scripts/kafka_local.py` (this machine has no Docker).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _kafka_local():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("kafka_local", ROOT / "scripts" / "kafka_local.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def docker_answers() -> bool:
    """A cheap check that a Docker daemon answers, before testcontainers tries it."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return True  # a remote daemon: let testcontainers find out
    path = host.removeprefix("unix://")
    if not Path(path).exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b" 200 " in s.recv(64)
        except OSError:
            return False


@contextlib.contextmanager
def kafka_broker(workdir: Path) -> Iterator[str]:
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    kl = _kafka_local()
    bootstrap = kl.start(workdir)
    try:
        yield bootstrap
    finally:
        kl.stop(workdir)
