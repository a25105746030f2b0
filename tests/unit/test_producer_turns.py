"""A partition writer's producers taking turns (service/ingest/turns.py), against recording
producers that share one group coordinator which, as Kafka's, keeps the offset commit that is
the later record whatever order the commits end in:

- the next tick is sent on the other producer while a transaction commits, and commits only
  once that one has;
- when the committing transaction fails, the tick sent meanwhile is not committed: every
  producer is initialised again, the committed state read, and both ticks' outcomes go again
  (published once each, the offsets never moving back);
- a transaction is begun ahead on the other producer only when a tick is to come: after a
  claim (its outcome will follow), or when the partition's ticks come often (whichever
  producer sent them), not after the last outcome of a quiet partition;
- the ids: the writer's id of one producer, then `.1`; a takeover initialises them together."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from service.config import txn_sender
from service.config.settings import KafkaSettings
from service.ingest import transactions
from service.ingest.partition import PartitionWriter
from service.ingest.sending import Item, OutMessage
from service.ingest.turns import Turns, producer_ids

TP = TopicPartition("claude.requests.p", 0)
OUT = TopicPartition("claude.responses.p", 2)
STEP_S = 0.01


class _Group:
    """The group coordinator and the output partition, shared by the producers."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.records = 0
        self.committed: tuple[int | None, str] = (None, "")
        self._committed_at = -1
        self.published: list[bytes] = []
        self.fail_next_commit_of: str | None = None
        self.commit_s = STEP_S
        self.begun: list[str] = []
        """The producers that began a transaction, in order."""

    async def fetch_committed(self, tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
        return self.committed


class _Producer:
    def __init__(self, group: _Group, name: str) -> None:
        self.group, self.name = group, name
        self._offsets: tuple[int, tuple[int, str]] | None = None
        self._sent: list[bytes] = []
        self._txn_manager = None  # aiokafka's transaction state: none here, so never failed

    def _log(self, what: str) -> None:
        self.group.log.append(f"{self.name} {what}")

    async def start(self) -> None:
        self._log("init")  # bumps the epoch: its open transaction is aborted
        self._offsets, self._sent = None, []

    async def stop(self) -> None:
        pass

    async def begin_transaction(self) -> None:
        self.group.begun.append(self.name)
        self._offsets, self._sent = None, []

    async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[None]:
        self._log("send")
        self._sent.append(value)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(STEP_S, fut.set_result, None)
        return fut

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        await asyncio.sleep(STEP_S)
        self.group.records += 1  # the TxnOffsetCommit record's place in __consumer_offsets
        self._offsets = (self.group.records, offsets[TP])
        self._log("offsets")

    async def commit_transaction(self) -> None:
        self._log("commit")
        await asyncio.sleep(self.group.commit_s)
        if self.group.fail_next_commit_of == self.name:
            self.group.fail_next_commit_of = None
            self._log("commit failed")
            raise KafkaError("the coordinator went away")
        if self._offsets is not None and self._offsets[0] > self.group._committed_at:
            self.group._committed_at, self.group.committed = self._offsets
        self.group.published += self._sent
        self._offsets, self._sent = None, []
        self._log("committed")

    async def abort_transaction(self) -> None:
        self._log("abort")
        self._offsets, self._sent = None, []


@pytest.fixture(autouse=True)
def _coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    async def route(producer: _Producer, items: Sequence[Item]) -> dict[int, TopicPartition]:
        return {id(m): OUT for item in items for m in item.messages}

    def prepare(producer: _Producer, partitions: Iterable[TopicPartition], group_id: str) -> None:
        pass

    async def ready(producer: _Producer, partitions: Iterable[TopicPartition], group_id: str) -> None:
        pass

    monkeypatch.setattr(transactions, "route", route)
    monkeypatch.setattr(txn_sender, "prepare", prepare)
    monkeypatch.setattr(txn_sender, "ready", ready)


async def _writer(group: _Group, **kafka: Any) -> PartitionWriter:
    settings = KafkaSettings.model_validate(
        {"eos_tick_ms": 1, "eos_handoff_max_s": 0, "eos_producers": 2, **kafka}
    )
    names = iter(["a", "b"] * 10)
    writer = PartitionWriter(
        TP, settings, "me", group.fetch_committed, producer_factory=lambda _id: _Producer(group, next(names))
    )
    await writer.start()
    return writer


def _hit(writer: PartitionWriter, offset: int) -> Any:
    assert writer.ledger is not None
    writer.ledger.start(offset)
    value = f"r{offset}".encode()
    return asyncio.ensure_future(writer.publish(offset, [OutMessage(OUT.topic, b"k", value)], linger=False))


def test_the_ids_keep_the_writer_s_id_of_one_producer_first() -> None:
    assert producer_ids("g.t.3", 1) == ["g.t.3"]
    assert producer_ids("g.t.3", 2) == ["g.t.3", "g.t.3.1"]


async def test_a_takeover_initialises_the_producers_together() -> None:
    """One round of InitProducerId, not one per producer: each start here returns only once
    both have begun (one after the other, the first would wait for good)."""
    begun: list[str] = []
    both = asyncio.Event()

    class _Starting:
        def __init__(self, txn_id: str) -> None:
            self.txn_id = txn_id

        async def start(self) -> None:
            begun.append(self.txn_id)
            if len(begun) == 2:
                both.set()
            await both.wait()

        async def stop(self) -> None:
            pass

    turns = Turns("g", "g.t.0", 2, 1.0, _Starting)  # type: ignore[arg-type]
    await asyncio.wait_for(turns.open(), 2)
    assert sorted(begun) == ["g.t.0", "g.t.0.1"]


async def test_the_next_tick_is_sent_while_one_commits_and_commits_after_it() -> None:
    group = _Group()
    group.commit_s = 5 * STEP_S  # a slow EndTxn: the markers of a loaded broker
    writer = await _writer(group)
    try:
        first = _hit(writer, 0)
        await asyncio.sleep(3.5 * STEP_S)  # sent and acked, its offsets too: committing
        assert group.log[-1] == "a commit"
        second = _hit(writer, 1)
        await asyncio.wait_for(asyncio.gather(first, second), 2)
    finally:
        await writer.close()
    log = [e for e in group.log if not e.endswith("init")]
    # b's tick went out while a's commit was in flight, and b committed after a had
    assert log[:8] == [
        "a send", "a offsets", "a commit", "b send", "b offsets", "a committed", "b commit", "b committed",
    ]  # fmt: skip
    assert group.committed[0] == 2  # both finished: the commit point past them
    assert group.published == [b"r0", b"r1"]


async def test_a_failed_commit_sends_the_tick_sent_meanwhile_again_and_nothing_twice() -> None:
    group = _Group()
    group.commit_s = 5 * STEP_S
    writer = await _writer(group)
    try:
        await asyncio.wait_for(_hit(writer, 0), 2)
        group.log.clear()
        group.fail_next_commit_of = "b"  # the writer alternates: its next tick is b's
        first = _hit(writer, 1)
        await asyncio.sleep(3.5 * STEP_S)
        assert group.log[-1] == "b commit"
        second = _hit(writer, 2)  # sent on a while b's commit is in flight, then b fails
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert writer.failure is None
    finally:
        await writer.close()
    failed = group.log.index("b commit failed")
    # a's tick was not committed before the failure was verified: both producers initialised
    # again (which aborts a's transaction), then the outcomes sent again and committed
    assert "a committed" not in group.log[:failed]
    assert group.log[failed + 1 : failed + 3] == ["a init", "b init"]
    assert sorted(group.published) == [b"r0", b"r1", b"r2"]  # each once
    assert group.committed[0] == 3


async def test_only_a_tick_to_come_begins_a_transaction_ahead_on_the_other_producer() -> None:
    """A quiet partition: one call. Its claim's tick begins the other producer's transaction
    ahead (the outcome will come); the outcome's tick, which leaves no claim in flight, begins
    none (it would wait `eos_prepared_idle_ms` for nothing and then be committed empty)."""
    group = _Group()
    writer = await _writer(group)
    assert writer.ledger is not None
    try:
        writer.ledger.start(0)
        await asyncio.wait_for(writer.claim(0, 1), 2)
        await asyncio.sleep(STEP_S)
        assert group.begun == ["a", "b"]  # the claim's own transaction, then b's ahead
        await asyncio.wait_for(writer.publish(0, [OutMessage(OUT.topic, b"k", b"r0")], linger=False), 2)
        await asyncio.sleep(5 * STEP_S)  # the outcome's commit and anything after it
        assert group.begun == ["a", "b"]  # the outcome went in b's; nothing begun on a
        assert group.published == [b"r0"]
    finally:
        await writer.close()


async def test_ticks_that_come_often_begin_the_next_transaction_ahead_whichever_producer_sent_them() -> None:
    """Three ticks within `eos_prepared_idle_ms`, on a, b, a: the partition's ticks come often,
    so b's next transaction is begun ahead, though b itself sent only one of them."""
    group = _Group()
    writer = await _writer(group, eos_prepared_idle_ms=400)
    try:
        for offset in range(3):
            await asyncio.wait_for(_hit(writer, offset), 2)
            await asyncio.sleep(2 * STEP_S)
        assert group.begun == ["a", "b", "a", "b"]  # each tick its own, then b's ahead
    finally:
        await writer.close()
