"""Publish outcomes with an idempotent producer and wait for the broker's ack.

An outcome counts only once the broker has acknowledged it; only then may the
request's offset be committed. A failed publish is retried (with backoff)
until it succeeds or the service stops: dropping it would lose the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from service.config.kafka import client_kwargs
from service.config.settings import KafkaSettings

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]


class Publisher:
    """One producer for all outcomes, with a lifecycle."""

    def __init__(self, settings: KafkaSettings, producer: AIOKafkaProducer | None = None) -> None:
        self._settings = settings
        self._producer = producer
        self._started = False
        self._stopped = False

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("Publisher.start() called twice")
        self._started = True
        if self._producer is None:
            self._producer = AIOKafkaProducer(
                **client_kwargs(self._settings),
                acks="all",
                enable_idempotence=True,
                linger_ms=self._settings.producer_linger_ms,
                compression_type=self._settings.producer_compression,
                max_request_size=self._settings.producer_max_request_bytes,
                # aiokafka's 16 KiB default fills with ~15 responses and then spins
                # re-checking the full batch for every further message
                max_batch_size=self._settings.producer_max_batch_bytes,
            )
        await self._producer.start()

    @property
    def producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "Publisher.start() was not awaited"
        return self._producer

    async def stop(self) -> None:
        if self._stopped or self._producer is None:
            return
        self._stopped = True
        await self._producer.stop()

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Headers = ()) -> None:
        """Send and wait for the ack, retrying broker errors until it lands."""
        assert self._producer is not None, "Publisher.start() was not awaited"
        delay = 0.1
        while True:
            try:
                await self._producer.send_and_wait(topic, value, key=key, headers=list(headers))
                return
            except KafkaError as exc:
                if not exc.retriable and not _is_transient(exc):
                    raise
                log.warning(
                    "publish failed, retrying",
                    extra={"topic": topic, "error": type(exc).__name__, "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _is_transient(exc: KafkaError) -> bool:
    # aiokafka marks some broker/timeouts as non-retriable although a later
    # attempt can succeed (e.g. KafkaTimeoutError while the leader moves).
    return type(exc).__name__ in {"KafkaTimeoutError", "KafkaConnectionError", "NodeNotReadyError"}
