"""The partition writer's tick (service/ingest/partition.py) against a recording producer:
the offsets join the transaction only after its messages are acked, and an item that finds
the writer idle does not wait for `kafka.eos_tick_ms`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import TopicPartition

from service.config.settings import KafkaSettings
from service.ingest.partition import PartitionWriter
from service.ingest.sending import OutMessage

TP = TopicPartition("claude.requests.p", 0)
ACK_S = 0.02


class _Producer:
    """Records the transaction's steps; a message is acked `ACK_S` after it is sent."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.commits = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def begin_transaction(self) -> None:
        self.events.append("begin")

    async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[None]:
        self.events.append("send")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def ack() -> None:
            self.events.append("acked")
            fut.set_result(None)

        asyncio.get_running_loop().call_later(ACK_S, ack)
        return fut

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        self.events.append("offsets")

    async def commit_transaction(self) -> None:
        self.events.append("commit")
        self.commits += 1

    async def abort_transaction(self) -> None:
        self.events.append("abort")


async def _fetch_committed(tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
    return None, ""


async def _writer(tick_ms: int) -> tuple[PartitionWriter, _Producer]:
    producer = _Producer()
    settings = KafkaSettings.model_validate({"eos_tick_ms": tick_ms, "eos_handoff_max_s": 0})
    writer = PartitionWriter(
        TP,
        settings,
        "me",
        _fetch_committed,
        producer_factory=lambda _id: producer,
    )
    await writer.start()
    return writer, producer


def _outcome(writer: PartitionWriter, offset: int) -> Any:
    assert writer.ledger is not None
    writer.ledger.start(offset)
    return writer.publish(offset, [OutMessage("claude.responses.p", b"k", b"v")])


async def test_the_offsets_follow_the_acked_messages() -> None:
    writer, producer = await _writer(tick_ms=1)
    try:
        await _outcome(writer, 0)
    finally:
        await writer.close()
    # sent together, the broker's partition check (KIP-890) can meet the coordinator busy
    # with the offsets and refuse the send (retried after 100 ms)
    assert producer.events[:5] == ["begin", "send", "acked", "offsets", "commit"]


async def test_an_item_finding_the_writer_idle_skips_the_linger() -> None:
    writer, producer = await _writer(tick_ms=2_000)
    try:
        await _outcome(writer, 0)  # the first tick
        await asyncio.sleep(0.05)
        began = time.monotonic()
        await _outcome(writer, 1)  # just after the previous tick ended, the writer idle
        assert time.monotonic() - began < 1.0  # without the skip: the 2 s tick
        assert producer.commits == 2
    finally:
        await writer.close()


async def test_items_arriving_during_a_tick_are_gathered_into_the_next() -> None:
    writer, producer = await _writer(tick_ms=150)
    try:
        first = asyncio.ensure_future(_outcome(writer, 0))
        await asyncio.sleep(ACK_S / 2)  # its tick is in flight
        rest = [asyncio.ensure_future(_outcome(writer, o)) for o in (1, 2, 3)]
        await first
        began = time.monotonic()
        await asyncio.gather(*rest)
        assert time.monotonic() - began >= 0.1  # they waited for the linger, then went together
        assert producer.commits == 2
    finally:
        await writer.close()
