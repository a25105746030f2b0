"""End-to-end latency under a paced load, as a downstream consumer sees it.

A producer sends requests of the realistic mix (`bench.traffic`) at a fixed rate, one at a time
(linger 0, acks=all, not waiting for one to be acknowledged before the next is due); a consumer
reading with `isolation_level=read_committed` (what downstream consumers are told to use) takes
the outcomes off the response and dead-letter topics. A request's latency is the time from the
producer's `send()` to its outcome (matched by key = request id) reaching the consumer, on the
bench's clock: everything the gateway adds (fetch, claim, the call, the publish, the
transaction's commit) plus the broker's and the clients' share, the same for every mode.

Each response's own `timings` split that time in three (wall clocks of one machine, to the ms):
`to_gateway` (send to the gateway's `received_at`: produce, fetch, dispatch), `in_gateway`
(`received_at` to `completed_at`: turn, claim, the call) and `to_visible` (`completed_at` to
the read_committed consumer: the publish, its commit and the consumer's fetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.traffic import Traffic


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Latencies:
    sent: int
    rate: float
    ms: list[float] = field(default_factory=list)
    """One latency (ms) per answered request."""
    parts: dict[str, list[float]] = field(default_factory=dict)
    """The responses' latencies split by their own timings (ms): to_gateway, in_gateway, to_visible."""

    def add_parts(self, sent_wall: float, now_wall: float, value: bytes | None) -> None:
        try:
            timings = orjson.loads(value or b"{}").get("timings")
            received = datetime.fromisoformat(timings["received_at"]).timestamp()
            completed = datetime.fromisoformat(timings["completed_at"]).timestamp()
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return  # a dead letter: no timings
        for name, ms in (
            ("to_gateway", 1000 * (received - sent_wall)),
            ("in_gateway", 1000 * (completed - received)),
            ("to_visible", 1000 * (now_wall - completed)),
        ):
            self.parts.setdefault(name, []).append(ms)

    @property
    def answered(self) -> int:
        return len(self.ms)

    def summary(self) -> dict[str, Any]:
        v = self.ms
        return {
            "sent": self.sent,
            "answered": self.answered,
            "rate_per_s": self.rate,
            "p50_ms": round(percentile(v, 50), 1),
            "p90_ms": round(percentile(v, 90), 1),
            "p99_ms": round(percentile(v, 99), 1),
            "max_ms": round(max(v), 1) if v else float("nan"),
            "parts_ms": {
                k: {"p50": round(percentile(p, 50), 1), "p99": round(percentile(p, 99), 1)}
                for k, p in self.parts.items()
            },
        }


async def measure(
    bootstrap: str,
    topics: Sequence[str],
    out_topics: Sequence[str],
    *,
    out_partitions: int,
    partitions: int | None = None,
    rate: float,
    seconds: float,
    seed: int,
    prefix: str,
    timeout_s: float = 60.0,
) -> Latencies:
    """Send `rate` requests per second for `seconds` to `topics` (request i to topic
    i % len(topics), and with `partitions` to partition i // len(topics) % partitions, so that
    every partition gets its share); wait (at most `timeout_s` after the last) for their
    outcomes on `out_topics`, read committed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_wait_ms=20,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_request_size=2 * 1024 * 1024
    )
    sent_at: dict[bytes, tuple[float, float]] = {}
    result = Latencies(sent=0, rate=rate)
    all_sent = asyncio.Event()
    await consumer.start()
    await producer.start()
    try:
        tps = [TopicPartition(t, p) for t in out_topics for p in range(out_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)

        async def consume() -> None:
            while True:
                batches = await consumer.getmany(timeout_ms=50)
                now, now_wall = time.perf_counter(), time.time()
                for records in batches.values():
                    for rec in records:
                        began = sent_at.pop(rec.key, None) if rec.key is not None else None
                        if began is not None:
                            result.ms.append(1000 * (now - began[0]))
                            result.add_parts(began[1], now_wall, rec.value)
                if all_sent.is_set() and not sent_at:
                    return

        reader = asyncio.create_task(consume())
        traffic = Traffic(seed)
        n = int(rate * seconds)
        t0 = time.perf_counter()
        acks = []
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rid, value, _ = traffic.next(prefix)
            key = rid.encode()
            sent_at[key] = (time.perf_counter(), time.time())
            topic = topics[i % len(topics)]
            part = None if partitions is None else (i // len(topics)) % partitions
            acks.append(await producer.send(topic, value, key=key, partition=part))
        result.sent = n
        all_sent.set()
        await asyncio.gather(*acks)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), timeout_s)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    finally:
        await producer.stop()
        await consumer.stop()
    return result
