"""Helpers for the trust and spend tests: signed requests, produced with headers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from claude_gateway_client.signing import sign

from tests.support.gateway import MODEL

Headers = list[tuple[str, bytes]]
Message = tuple[str, bytes | None, bytes | None, Headers]


def request_doc(
    request_id: str, model: str = MODEL, max_tokens: int = 32, content: str = "Hello"
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "params": {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        },
    }


def signed(
    topic: str, request_id: str, key_id: str, secret: str, *, timestamp_ms: int | None = None, **doc: Any
) -> Message:
    """A valid signed request message (key = request id)."""
    value = orjson.dumps(request_doc(request_id, **doc))
    key = request_id.encode()
    return topic, key, value, sign(topic, key, value, request_id, key_id, secret, timestamp_ms)


async def produce_messages(bootstrap: str, messages: Sequence[Message]) -> None:
    """Send (topic, key, value, headers) and wait until all are acknowledged."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, acks="all", max_request_size=8 * 1024 * 1024
    )
    await producer.start()
    try:
        futures = [await producer.send(t, v, key=k, headers=h) for t, k, v, h in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def metric(registry: Any, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of a metric's samples matching `labels` (0 when absent)."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total
