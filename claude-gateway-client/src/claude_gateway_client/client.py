"""The asyncio partner client: sign, produce, and await the correlated outcome.

    async with PartnerClient("kafka:9092", "acme", key_id="k2025a", secret=secret) as client:
        response = await client.request({"model": "claude-haiku-4-5", "max_tokens": 256,
                                         "messages": [{"role": "user", "content": "Hello"}]})

`request` returns the response document (the gateway's `schemas/response.v1.json`) or
raises `DeadLettered` carrying the dead letter (`schemas/deadletter.v1.json`); `send`
only produces and returns the request id, `outcome` waits for the outcome of a request
this client sent.

Producing: an idempotent producer (`enable_idempotence`, `acks=all`): the Kafka
client's own retries never write a request twice. If `send` raises (or is cancelled)
the record may or may not have been written; send it again with the **same request id**.
The copy is signed again and, when the partner has replay protection, dead-lettered
`replay` by the gateway: this client never takes that for the request's outcome, and
keeps waiting for the outcome of the first record (`correlation.py` has the rules).

Outcomes are read `read_committed` from the partner's response and dead-letter topics,
from the moment the client started, and matched by request id and record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from claude_gateway_client.correlation import Correlation, RecordRef, original_of
from claude_gateway_client.errors import DeadLettered, OutcomeTimeout
from claude_gateway_client.signing import sign

log = logging.getLogger(__name__)
# schemas/request.v1.json: an id outside this is dead-lettered without a request_id
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
DEFAULT_TIMEOUT_S = 600.0
FORGET_AFTER_S = 3_600.0


class _Tracked:
    """One request id in flight: what is known, who waits, since when."""

    __slots__ = ("correlation", "done", "touched", "waiters")

    def __init__(self, request_id: str) -> None:
        self.correlation = Correlation(request_id)
        self.done = asyncio.Event()
        self.waiters = 0
        self.touched = time.monotonic()


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
        forget_after_s: float = FORGET_AFTER_S,
        producer_options: Mapping[str, Any] | None = None,
        consumer_options: Mapping[str, Any] | None = None,
        **kafka: Any,
    ) -> None:
        """`key_id`/`secret`: sign every request (both or neither). `await_outcomes`: read the
        outcome topics (False: `send` only). `forget_after_s`: how long a request id nobody
        waits for is remembered. `kafka`: extra aiokafka arguments for both the producer and
        the consumer (security settings, say); `acks` and `enable_idempotence` are fixed."""
        if (key_id is None) != (secret is None):
            raise ValueError("key_id and secret go together")
        for fixed in ("acks", "enable_idempotence", "isolation_level"):
            if fixed in kafka:
                raise ValueError(f"{fixed} is fixed by the client (acks=all, idempotent, read_committed)")
        self.partner_id = partner_id
        self.request_topic = f"{topic_prefix}requests.{partner_id}"
        self.response_topic = f"{topic_prefix}responses.{partner_id}"
        self.deadletter_topic = f"{topic_prefix}deadletter.{partner_id}"
        self._key_id, self._secret = key_id, secret
        self._bootstrap = bootstrap_servers
        self._kafka = kafka
        self._producer_options = dict(producer_options or {})
        self._consumer_options = dict(consumer_options or {})
        for fixed in ("acks", "enable_idempotence", "isolation_level"):
            if fixed in self._producer_options or fixed in self._consumer_options:
                raise ValueError(f"{fixed} is fixed by the client (acks=all, idempotent, read_committed)")
        self._by_record: dict[RecordRef, str] = {}  # acknowledged records -> request id
        self._reader_error: BaseException | None = None
        self._await_outcomes = await_outcomes
        self._forget_after_s = forget_after_s
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._reader: asyncio.Task[None] | None = None
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect; outcomes are read from now on. A second `start` is refused."""
        if self._started:
            raise RuntimeError("PartnerClient.start() called twice")
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.stop()  # nothing left open by a failed start
            raise

    async def _start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            acks="all",
            enable_idempotence=True,
            **{**self._kafka, **self._producer_options},
        )
        await self._producer.start()
        if not self._await_outcomes:
            return
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",  # the gateway publishes outcomes in transactions
            **{**self._kafka, **self._consumer_options},
        )
        await self._consumer.start()
        tps: list[TopicPartition] = []
        for topic in (self.response_topic, self.deadletter_topic):
            partitions = await self._producer.partitions_for(topic)
            if not partitions:
                raise RuntimeError(f"topic {topic!r} does not exist (check topic_prefix and partner_id)")
            tps += [TopicPartition(topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)  # positions fixed before anything is sent: no outcome missed
        for tp in tps:
            await self._consumer.position(tp)
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="partner-client-outcomes")

    async def stop(self) -> None:
        """Stop reading and close both clients; safe to call twice. Waiters get `OutcomeTimeout`
        when their time is up (or are cancelled with their task)."""
        try:
            if self._reader is not None:
                reader, self._reader = self._reader, None
                reader.cancel()
                # a reader that failed was reported to the waiters; it must not keep the clients open
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
        finally:
            consumer, self._consumer = self._consumer, None
            try:
                if consumer is not None:
                    await consumer.stop()
            finally:
                producer, self._producer = self._producer, None
                if producer is not None:
                    await producer.stop()

    async def __aenter__(self) -> PartnerClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- requests -----------------------------------------------------------------------

    async def send(
        self,
        params: Mapping[str, Any],
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Sign (if configured) and produce one request; its request id once the broker has it.

        Sending an id again (after an error here, say) is correlated with the first send:
        `outcome`/`request` return the outcome of whichever of its records came first."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("PartnerClient is not started")
        rid = request_id or uuid.uuid4().hex
        if not REQUEST_ID.fullmatch(rid):
            raise ValueError(f"request id {rid[:64]!r} does not match {REQUEST_ID.pattern} (request.v1)")
        doc: dict[str, Any] = {"request_id": rid, "params": dict(params)}
        if metadata:
            doc["metadata"] = dict(metadata)
        value, key = orjson.dumps(doc), rid.encode()
        headers: list[tuple[str, bytes]] = []
        if self._key_id is not None and self._secret is not None:
            headers = sign(self.request_topic, key, value, rid, self._key_id, self._secret)
        tracked = self._track(rid) if self._await_outcomes else None
        attempt = tracked.correlation.attempt() if tracked is not None else 0
        meta = await producer.send_and_wait(self.request_topic, value, key=key, headers=headers)
        if tracked is not None:
            tracked.touched = time.monotonic()
            where = RecordRef(self.request_topic, meta.partition, meta.offset)
            self._by_record[where] = rid
            if tracked.correlation.acknowledged(attempt, where):
                tracked.done.set()
        return rid

    async def outcome(self, request_id: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """The response to a request this client sent, or `DeadLettered`; `OutcomeTimeout` when
        none came within `timeout_s` (call again to keep waiting)."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            raise ValueError(f"request {request_id!r} was not sent by this client, or its outcome was taken")
        tracked.waiters += 1
        try:
            if self._reader_error is not None and not tracked.done.is_set():
                raise RuntimeError("the client stopped reading outcomes") from self._reader_error
            await asyncio.wait_for(tracked.done.wait(), timeout_s)
        except TimeoutError:
            raise OutcomeTimeout(request_id, timeout_s, tracked.correlation.ignored) from None
        finally:
            tracked.waiters -= 1
            tracked.touched = time.monotonic()
        c = tracked.correlation
        if c.outcome is None:  # woken by a failed reader
            raise RuntimeError("the client stopped reading outcomes") from self._reader_error
        if tracked.waiters == 0:
            self._tracked.pop(request_id, None)
        if c.dead_lettered:
            raise DeadLettered(c.outcome)
        return c.outcome

    async def request(
        self,
        params: Mapping[str, Any],
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> dict[str, Any]:
        """`send`, then `outcome`: the response document, or `DeadLettered`."""
        if not self._await_outcomes:
            raise RuntimeError("PartnerClient(await_outcomes=False) cannot await outcomes")
        rid = request_id or uuid.uuid4().hex
        await self.send(params, rid, metadata)
        return await self.outcome(rid, timeout_s)

    def pending(self) -> int:
        """Request ids sent whose outcome was not taken yet (and not forgotten)."""
        return len(self._tracked)

    # -- outcomes -----------------------------------------------------------------------

    def _track(self, request_id: str) -> _Tracked:
        """The id's entry; a new one once the previous outcome was taken (until then another
        send of it is a copy, and its outcome is the first record's)."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            tracked = self._tracked[request_id] = _Tracked(request_id)
        return tracked

    async def _read(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                for tp, records in batches.items():
                    for rec in records:
                        self._take(tp.topic, rec.value)
                self._forget()
        except Exception as exc:  # waiters must hear of it now, not at their timeout
            log.exception("partner client: reading outcomes failed")
            self._reader_error = exc
            for tracked in self._tracked.values():
                tracked.done.set()
            raise

    def _take(self, topic: str, value: bytes | None) -> None:
        try:
            doc = orjson.loads(value or b"")
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        tracked = self._tracked.get(str(doc.get("request_id")))
        if tracked is None and topic == self.deadletter_topic:
            # refused before its request id could be read (oversize, say): matched by its record
            where = original_of(doc)
            rid = self._by_record.get(where) if where is not None else None
            tracked = self._tracked.get(rid) if rid is not None else None
        if tracked is None:
            return
        c = tracked.correlation
        took = c.on_response(doc) if topic == self.response_topic else c.on_dead_letter(doc)
        if took:
            tracked.done.set()
        tracked.touched = time.monotonic()

    def _forget(self) -> None:
        """Drop request ids nobody waits for, untouched for `forget_after_s`."""
        horizon = time.monotonic() - self._forget_after_s
        stale = [rid for rid, t in self._tracked.items() if t.waiters == 0 and t.touched < horizon]
        for rid in stale:
            del self._tracked[rid]
        if stale or len(self._by_record) > 2 * len(self._tracked) + 1024:
            self._by_record = {w: r for w, r in self._by_record.items() if r in self._tracked}
