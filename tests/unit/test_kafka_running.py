"""`service.config.kafka.running`: a client is stopped whatever ends its block, its own start
failing or being cancelled included (aiokafka leaves its metadata task and connections open
after a failed start; the gateway's one-off clients all go through this)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from service.config.kafka import running

NOWHERE = "127.0.0.1:1"


def _watch(
    monkeypatch: pytest.MonkeyPatch, client: object, start_gate: asyncio.Event | None, fails: bool = True
) -> list[str]:
    """Record `client`'s start and stop (the real stop runs too); its start waits for
    `start_gate`, then fails unless `fails` is False."""
    calls: list[str] = []

    async def start() -> None:
        calls.append("start")
        if start_gate is not None:
            await start_gate.wait()
        if fails:
            raise KafkaConnectionError("the broker went away after the first answer")

    name = "close" if isinstance(client, AIOKafkaAdminClient) else "stop"
    real_stop = getattr(client, name)

    async def stop() -> None:
        calls.append("stop")
        await real_stop()

    monkeypatch.setattr(client, "start", start)
    monkeypatch.setattr(client, name, stop)
    return calls


@pytest.mark.parametrize("kind", [AIOKafkaProducer, AIOKafkaConsumer, AIOKafkaAdminClient])
async def test_a_failed_start_is_stopped(monkeypatch: pytest.MonkeyPatch, kind: type) -> None:
    client = kind(bootstrap_servers=NOWHERE)
    calls = _watch(monkeypatch, client, None)
    with pytest.raises(KafkaConnectionError):
        async with running(client):
            raise AssertionError("the block runs only once started")
    assert calls == ["start", "stop"]


async def test_a_start_cancelled_midway_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    client = AIOKafkaConsumer(bootstrap_servers=NOWHERE)
    calls = _watch(monkeypatch, client, asyncio.Event())

    async def use() -> None:
        async with running(client):
            raise AssertionError("never started")

    task = asyncio.create_task(use())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == ["start", "stop"]


async def test_the_block_s_error_still_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    client = AIOKafkaProducer(bootstrap_servers=NOWHERE)
    calls = _watch(monkeypatch, client, None, fails=False)
    seen: list[object] = []

    async def use() -> None:
        async with running(client) as same:
            seen.append(same)
            raise RuntimeError("in the block")

    with pytest.raises(RuntimeError, match="in the block"):
        await use()
    assert seen == [client]
    assert calls == ["start", "stop"]
