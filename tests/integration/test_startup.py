"""Issue 12, running it yourself: start-up on the real broker.

- Kafka unreachable at start: the gateway retries with backoff, one warning per attempt (no
  traceback), is not ready, and stops cleanly when asked;
- no topic matches the request pattern: a warning says so, naming the pattern; the usage topic
  (metering records) missing: a warning names it;
- a partner topic created while the gateway runs is consumed within seconds, although
  `kafka.metadata_max_age_ms` is 30 s (the first request used to wait for it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError

from service.app import Gateway
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, collect, produce, request
from tests.support.redis import free_port

pytestmark = pytest.mark.integration


async def test_kafka_unreachable_at_start_is_retried_then_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(f"127.0.0.1:{free_port()}", "tdown", ["acme"], {"acme": "k"}, tmp_path)
    (tmp_path / "acme.key").write_text("sk-ant-acme-key")
    gateway = Gateway(world.settings("http://127.0.0.1:1"))
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="service.lifecycle")
    task = asyncio.create_task(gateway.run(stop))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        retries = [r for r in caplog.records if r.getMessage() == "Kafka unreachable at start; retrying"]
        if len(retries) >= 3:
            break
        await asyncio.sleep(0.1)
    assert len(retries) >= 3
    assert [getattr(r, "attempt", None) for r in retries[:3]] == [1, 2, 3]
    assert [getattr(r, "retry_in_s", None) for r in retries[:3]] == [0.5, 1.0, 2.0]
    assert all(r.exc_info is None for r in retries)
    assert not task.done()
    assert gateway.readiness()[0] is False
    stop.set()
    await asyncio.wait_for(task, 10)  # returns, no exception


async def test_a_tls_client_on_a_plaintext_listener_is_told_why_not_only_unreachable(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`security_protocol: SSL` against a PLAINTEXT listener: the broker resets the handshake;
    the gateway says so and which setting to check, in its log and its readiness (before:
    "Kafka unreachable", `KafkaConnectionError`, no cause, as for a broker that is down)."""
    world = World(kafka_bootstrap, "ttls", ["acme"], {"acme": "k"}, tmp_path)
    (tmp_path / "acme.key").write_text("sk-ant-acme-key")
    gateway = Gateway(world.settings("http://127.0.0.1:1", kafka={"security_protocol": "SSL"}))
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="service.lifecycle")
    task = asyncio.create_task(gateway.run(stop))
    try:
        deadline = time.monotonic() + 20
        told: list[logging.LogRecord] = []
        while time.monotonic() < deadline and not told:
            told = [r for r in caplog.records if getattr(r, "hint", None)]
            await asyncio.sleep(0.1)
        assert told, [r.getMessage() for r in caplog.records]
        assert told[0].getMessage() == "Kafka unreachable at start; retrying"  # a reset may be a restart
        assert "check kafka.security_protocol" in str(getattr(told[0], "hint", ""))
        assert str(getattr(told[0], "cause", "")).startswith("ConnectionResetError")
        ready, reason = gateway.readiness()
        assert not ready
        assert reason.startswith("Kafka not reached yet: ")
        assert "kafka.security_protocol" in reason
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_no_matching_topic_is_said_and_a_new_topic_is_found_within_seconds(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(kafka_bootstrap, f"t{int(time.time() * 1000)}", ["acme"], {}, tmp_path, partitions=1)
    world.keys["acme"] = "sk-ant-acme-startup-key"
    (tmp_path / "acme.key").write_text(world.keys["acme"])
    caplog.set_level(logging.INFO, logger="service.lifecycle")
    caplog.set_level(logging.INFO, logger="service.app")
    sim = SimulatorServer(SimulatorConfig.model_validate({"api_keys": world.keys}))
    async with sim:
        cfg = world.settings(sim.url, kafka={"metadata_max_age_ms": 30_000})
        gateway = Gateway(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop))
        try:
            for _ in range(150):
                if any(r.getMessage().startswith("no topic matches") for r in caplog.records):
                    break
                await asyncio.sleep(0.2)
            [warning] = [r for r in caplog.records if r.getMessage().startswith("no topic matches")]
            assert getattr(warning, "pattern", None) == f"^{world.request_prefix}.+"

            # the gateway made the usage topic at start: auto-created inside the first outcome
            # transactions, it held them ~40 s (`watch_topics` warns while it is missing:
            # tests/unit/test_lifecycle.py)
            [made] = [r for r in caplog.records if r.getMessage() == "usage topic created"]
            assert getattr(made, "topic", None) == world.usage_topic
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
            await admin.start()
            assert len((await admin.describe_topics([world.usage_topic]))[0]["partitions"]) == 3
            await admin.create_topics(
                [NewTopic(t, 1, 1) for t in world.all_topics() if t != world.usage_topic]
            )
            await admin.close()
            created = time.monotonic()
            await produce(kafka_bootstrap, [(world.request_topic("acme"), None, request("first"))])
            out = await collect(world, expected=1, timeout_s=25)
            took = time.monotonic() - created
            assert [d["request_id"] for d in out.responses] == ["first"]
            assert took < 20, f"the first request to a new topic took {took:.1f}s"
            assert any(r.getMessage() == "request topics found" for r in caplog.records)
        finally:
            stop.set()
            await task


@pytest.mark.parametrize("part", ["publisher", "ingest"])
async def test_a_client_whose_start_fails_is_closed(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    """Kafka answered the first contact, then a client's start fails after it connected (the
    broker went away meanwhile): the run raises, and what that start opened is closed."""
    world = World(kafka_bootstrap, f"t{int(time.time() * 1000)}", ["acme"], {}, tmp_path, partitions=1)
    world.keys["acme"] = "sk-ant-acme-startup-key"
    (tmp_path / "acme.key").write_text(world.keys["acme"])
    gateway = Gateway(world.settings("http://127.0.0.1:1"))
    target = gateway.publisher if part == "publisher" else gateway.ingest
    real_start = type(target).start

    clients: list[Any] = []

    async def start_then_fail(self: Any) -> None:
        await real_start(self)
        clients.append(self.producer.client if part == "publisher" else self.consumer._client)
        raise KafkaConnectionError("the broker went away")

    monkeypatch.setattr(type(target), "start", start_then_fail)
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(gateway.run(asyncio.Event()), 30)
    [client] = clients
    assert [c for c in client._conns.values() if c.connected()] == [], "a connection left open"
    assert client._sync_task is None, "the metadata task left running"
