"""Helpers for end-to-end tests: a unique gateway world per test on the real broker.

Each world has its own topic prefixes (so a gateway's subscription pattern
never sees another test's topics), its own consumer group, and one API key
file per partner (so the simulator's stats show which key each call used).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import traffic
from bench.chaos import traffic as chaos_traffic
from bench.chaos.verify import trace_id_of
from service.config.loader import parse_config
from service.config.settings import GatewaySettings
from service.telemetry.tracecontext import trace_context

MODEL = "claude-haiku-4-5"
Headers = tuple[tuple[str, bytes | None], ...]


@dataclass
class World:
    bootstrap: str
    tag: str
    partners: list[str]
    keys: dict[str, str]
    key_dir: Path
    partitions: int = 3
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def request_prefix(self) -> str:
        return f"{self.tag}.requests."

    def request_topic(self, partner: str) -> str:
        return f"{self.tag}.requests.{partner}"

    def response_topic(self, partner: str) -> str:
        return f"{self.tag}.responses.{partner}"

    def deadletter_topic(self, partner: str) -> str:
        return f"{self.tag}.deadletter.{partner}"

    @property
    def usage_topic(self) -> str:
        return f"{self.tag}.usage"

    def all_topics(self) -> list[str]:
        return [
            *(
                t
                for p in self.partners
                for t in (self.request_topic(p), self.response_topic(p), self.deadletter_topic(p))
            ),
            self.usage_topic,
        ]

    def settings_dict(self, sim_url: str, **overrides: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "group_id": f"{self.tag}-gateway",
                "request_topic_prefix": self.request_prefix,
                "response_topic_prefix": f"{self.tag}.responses.",
                "deadletter_topic_prefix": f"{self.tag}.deadletter.",
                "usage_topic": self.usage_topic,
                "metadata_max_age_ms": 2_000,
                # Kafka's least by default (group.min.session.timeout.ms): a replica a test
                # kills leaves the group, and its partitions move on, 6 s later
                "session_timeout_ms": 6_000,
                "heartbeat_interval_ms": 1_500,
            },
            "anthropic": {"base_url": sim_url, "timeout_s": 30},
            "retry": {"base_delay_s": 0.05, "max_delay_s": 0.5, "max_attempts": 6},
            "runtime": {
                "http_port": 0,
                "http_host": "127.0.0.1",
                "drain_timeout_s": 10,
                "commit_interval_s": 0.2,
            },
            "partners": [
                {"id": p, "api_key": {"file": str(self.key_dir / f"{p}.key")}} for p in self.partners
            ],
        }
        _merge(cfg, overrides)
        return cfg

    def settings(self, sim_url: str, **overrides: Any) -> GatewaySettings:
        return parse_config(self.settings_dict(sim_url, **overrides))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


async def make_world(
    bootstrap: str,
    tmp: Path,
    partners: list[str],
    partitions: int = 3,
    deadletter_configs: dict[str, str] | None = None,
    request_configs: dict[str, str] | None = None,
) -> World:
    tag = f"t{uuid.uuid4().hex[:10]}"
    keys = {p: f"sk-ant-{p}-{uuid.uuid4().hex}" for p in partners}
    for p, k in keys.items():
        (tmp / f"{p}.key").write_text(k)
    world = World(bootstrap, tag, partners, keys, tmp, partitions)
    configs = {".deadletter.": deadletter_configs, ".requests.": request_configs}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    t,
                    num_partitions=partitions,
                    replication_factor=1,
                    topic_configs=next((c for part, c in configs.items() if part in t), None),
                )
                for t in world.all_topics()
            ]
        )
    finally:
        await admin.close()
    return world


def request(request_id: str, model: str = MODEL, max_tokens: int = 32, **extra: Any) -> bytes:
    doc: dict[str, Any] = {
        "request_id": request_id,
        "params": {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Hello"}],
        },
    }
    doc.update(extra)
    return orjson.dumps(doc)


Message = tuple[str, bytes | None, bytes | None] | tuple[str, bytes | None, bytes | None, Headers]
"""(topic, key, value) or (topic, key, value, headers)."""


def spread(world: World, n: int, prefix: str, **fields: Any) -> list[Message]:
    """`n` valid requests with ids `{prefix}-{i}`, round-robin over the world's partners, as
    partners send them: prompts of 40 B to 40 KB, three models, max_tokens 64-4096, system
    prompts and conversations (`bench.traffic.draw`), a third with images, a PDF or tools, and
    mixed record headers: a W3C trace context on 60%, application headers of 0 B to 16 KiB,
    binary, null, not UTF-8, repeated or 80 of them (`bench.chaos.traffic`). Seeded by `prefix`.
    `fields` go in every request beside its params (`service_class="batch"`)."""
    partners = world.partners
    rng = random.Random(f"spread-{prefix}")
    out: list[Message] = []
    for i in range(n):
        _, params = traffic.draw(rng)
        last = params["messages"][-1]
        _, last["content"], extra = chaos_traffic.content(rng, last["content"])
        params.update(extra)
        value = traffic.request_value(f"{prefix}-{i}", params)
        if fields:
            value = orjson.dumps({**orjson.loads(value), **fields})
        topic = world.request_topic(partners[i % len(partners)])
        out.append((topic, None, value, chaos_traffic.headers(rng)))
    return out


async def produce(bootstrap: str, messages: Sequence[Message], compression: str | None = None) -> None:
    """Send (topic, key, value[, headers]) messages and wait until all are acknowledged, in
    record batches compressed with `compression` (gzip, snappy, lz4, zstd) if given."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=5,
        acks="all",
        max_request_size=8 * 1024 * 1024,
        compression_type=compression,
    )
    await producer.start()
    try:
        futures = [
            await producer.send(m[0], m[2], key=m[1], headers=list(m[3]) if len(m) > 3 else None)
            for m in messages
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


@dataclass
class Outcomes:
    responses: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    headers: list[list[tuple[str, bytes]]] = field(default_factory=list)
    trace_ids: dict[str, list[str | None]] = field(default_factory=dict)
    """By request id: the trace id of each outcome's `traceparent` header (None: none)."""

    @property
    def total(self) -> int:
        return len(self.responses) + len(self.dead_letters)

    def request_ids(self) -> Counter[str | None]:
        return Counter([d.get("request_id") for d in self.responses + self.dead_letters])

    def reasons(self) -> Counter[str]:
        return Counter(d["reason"] for d in self.dead_letters)


async def _read_committed(
    world: World,
    tps: list[TopicPartition],
    take: Callable[[TopicPartition, ConsumerRecord[bytes, bytes]], None],
    enough: Callable[[], bool],
    timeout_s: float,
    settle_s: float,
) -> None:
    """Read `tps` `read_committed` from the start, giving each record to `take`, until
    `enough()` (then `settle_s` longer, to catch duplicates) or the timeout passed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=world.bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        settle_deadline: float | None = None
        while time.monotonic() < deadline:
            if settle_deadline is None and enough():
                settle_deadline = time.monotonic() + settle_s
            if settle_deadline is not None and time.monotonic() >= settle_deadline:
                break
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for r in records:
                    take(tp, r)
    finally:
        await consumer.stop()


async def collect(world: World, expected: int, timeout_s: float = 120.0, settle_s: float = 0.0) -> Outcomes:
    """Read response and dead-letter topics from the start until `expected` outcomes
    arrived (then `settle_s` longer, to catch duplicates) or the timeout passed. Reads as
    downstream consumers must: `read_committed` (aborted transactions are not outcomes)."""
    out = Outcomes()

    def take(tp: TopicPartition, r: ConsumerRecord[bytes, bytes]) -> None:
        doc = orjson.loads(r.value)
        (out.dead_letters if ".deadletter." in tp.topic else out.responses).append(doc)
        out.headers.append(list(r.headers))
        out.trace_ids.setdefault(str(doc.get("request_id")), []).append(trace_id_of(r.headers))

    tps = [
        TopicPartition(t, i)
        for p in world.partners
        for t in (world.response_topic(p), world.deadletter_topic(p))
        for i in range(world.partitions)
    ]
    await _read_committed(world, tps, take, lambda: out.total >= expected, timeout_s, settle_s)
    return out


def trace_context_lost(messages: Sequence[Message], out: Outcomes) -> list[str]:
    """Request ids among `messages` that carried a valid W3C `traceparent` (as the gateway
    judges one) and have an outcome without its trace id (docs/operations.md, tracing)."""
    lost = []
    for m in messages:
        want = trace_id_of(trace_context(m[3])) if len(m) > 3 else None
        if want is None:
            continue
        rid = str(orjson.loads(m[2] or b"{}").get("request_id"))
        if any(t != want for t in out.trace_ids.get(rid, [])):
            lost.append(rid)
    return lost


async def group_lag(
    world: World, group: str | None = None, prefix: str | None = None
) -> dict[TopicPartition, int]:
    """End offset minus `group`'s committed offset (the gateway's by default), per partition
    of the topics named from `prefix` (the request topics by default)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=world.bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=world.bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group or f"{world.tag}-gateway")
        tps = [tp for tp in committed if tp.topic.startswith(prefix or world.request_prefix)]
        ends = await consumer.end_offsets(tps)
        return {tp: ends[tp] - committed[tp].offset for tp in tps}
    finally:
        await consumer.stop()
        await admin.close()


async def until_no_lag(
    world: World, group: str | None = None, prefix: str | None = None, timeout_s: float = 15.0
) -> dict[TopicPartition, int]:
    """`group_lag` once it is 0 everywhere, or as it is at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        lag = await group_lag(world, group, prefix)
        if (lag and not any(lag.values())) or time.monotonic() > deadline:
            return lag
        await asyncio.sleep(0.5)


async def committed_offsets(world: World, group: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=world.bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        result: dict[TopicPartition, int] = {}
        for p in world.partners:
            for i in range(world.partitions):
                tp = TopicPartition(world.request_topic(p), i)
                result[tp] = await consumer.committed(tp) or 0
        return result
    finally:
        await consumer.stop()


async def usage_records(
    world: World, expected: int, timeout_s: float = 60.0, settle_s: float = 1.0
) -> list[dict[str, Any]]:
    """The metering records on the world's usage topic, read `read_committed` from the start
    until `expected` arrived (then `settle_s` longer, to catch duplicates) or the timeout."""
    records: list[dict[str, Any]] = []

    def take(_: TopicPartition, r: ConsumerRecord[bytes, bytes]) -> None:
        doc = orjson.loads(r.value)
        assert r.key == doc["partner"].encode(), "metering records are keyed by partner"
        records.append(doc)

    tps = [TopicPartition(world.usage_topic, i) for i in range(world.partitions)]
    await _read_committed(world, tps, take, lambda: len(records) >= expected, timeout_s, settle_s)
    return records
