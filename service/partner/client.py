"""A small partner client: sign, produce, and (optionally) await the correlated outcome.

    async with PartnerClient("kafka:9092", "acme", key_id="k2025a", secret=secret) as client:
        response = await client.request({"model": "claude-haiku-4-5", "max_tokens": 256,
                                         "messages": [{"role": "user", "content": "Hello"}]})

`request` returns the response document (`schemas/response.v1.json`) or
raises `DeadLettered` carrying the dead letter (`schemas/deadletter.v1.json`).
`send` only produces and returns the request id. Outcomes are matched by
request id on the partner's response and dead-letter topics, read from the
moment the client started.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.partner.signing import sign


class DeadLettered(Exception):
    """The gateway dead-lettered the request; `document` says why (`reason`, `detail`)."""

    def __init__(self, document: dict[str, Any]) -> None:
        super().__init__(f"{document.get('reason')}: {document.get('detail')}")
        self.document = document
        self.reason = str(document.get("reason"))


class PartnerClient:
    def __init__(
        self,
        bootstrap_servers: str,
        partner_id: str,
        *,
        key_id: str | None = None,
        secret: str | None = None,
        await_outcomes: bool = True,
        topic_prefix: str = "claude.",
        **kafka: Any,
    ) -> None:
        """`key_id`/`secret`: sign every request (both or neither). `kafka`: extra aiokafka
        arguments for both clients (security settings, say)."""
        if (key_id is None) != (secret is None):
            raise ValueError("key_id and secret go together")
        self.partner_id = partner_id
        self.request_topic = f"{topic_prefix}requests.{partner_id}"
        self.outcome_topics = (
            f"{topic_prefix}responses.{partner_id}",
            f"{topic_prefix}deadletter.{partner_id}",
        )
        self._key_id, self._secret = key_id, secret
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", **kafka)
        self._consumer = (
            AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False, **kafka)
            if await_outcomes
            else None
        )
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._producer.start()
        if self._consumer is not None:
            consumer = self._consumer
            await consumer.start()
            tps = [
                TopicPartition(t, p)
                for t in self.outcome_topics
                for p in await self._producer.partitions_for(t)
            ]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)  # positions fixed before anything is sent: no outcome missed
            self._reader = asyncio.create_task(self._read(consumer))

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._consumer is not None:
            await self._consumer.stop()
        await self._producer.stop()

    async def __aenter__(self) -> PartnerClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def send(
        self,
        params: Mapping[str, Any],
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Sign (if configured) and produce one request; returns its request id once acknowledged."""
        rid = request_id or uuid.uuid4().hex
        doc: dict[str, Any] = {"request_id": rid, "params": dict(params)}
        if metadata:
            doc["metadata"] = dict(metadata)
        value, key = orjson.dumps(doc), rid.encode()
        headers: list[tuple[str, bytes]] = []
        if self._key_id is not None and self._secret is not None:
            headers = sign(self.request_topic, key, value, rid, self._key_id, self._secret)
        await self._producer.send_and_wait(self.request_topic, value, key=key, headers=headers)
        return rid

    async def request(
        self, params: Mapping[str, Any], request_id: str | None = None, timeout_s: float = 600.0
    ) -> dict[str, Any]:
        """Send and wait for the outcome: the response document, or `DeadLettered`."""
        if self._consumer is None:
            raise RuntimeError("PartnerClient(await_outcomes=False) cannot await outcomes")
        rid = request_id or uuid.uuid4().hex
        future = self._waiting[rid] = asyncio.get_running_loop().create_future()
        try:
            await self.send(params, rid)
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop(rid, None)

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                for rec in records:
                    try:
                        doc = orjson.loads(rec.value)
                    except orjson.JSONDecodeError:
                        continue
                    future = self._waiting.get(str(doc.get("request_id")))
                    if future is None or future.done():
                        continue
                    if tp.topic == self.outcome_topics[0]:
                        future.set_result(doc)
                    else:
                        future.set_exception(DeadLettered(doc))
