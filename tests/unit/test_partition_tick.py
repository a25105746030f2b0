"""The partition writer's tick (service/ingest/partition.py, transactions.py) against a
recording producer: nothing is sent before the transaction holds its partitions and group, the
offsets only after the messages are acked unless the transaction wrote the last ones again
ahead; the next transaction begins as soon as one commits and is committed with nothing new
when nothing comes for it, never before the tick whose offsets it repeats; an item that finds
the writer idle does not wait for `kafka.eos_tick_ms`, nor does an outcome that made no call
(`linger=False`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.producer.transaction_manager import TransactionManager

from service.config import txn_sender
from service.config.settings import KafkaSettings
from service.ingest import transactions
from service.ingest.ledger import decode
from service.ingest.ownership import RecordSink
from service.ingest.partition import Fenced, PartitionWriter, Revoked
from service.ingest.sending import Item, OutMessage
from tests.support.polling import until

TP = TopicPartition("claude.requests.p", 0)
OUT = TopicPartition("claude.responses.p", 2)
ACK_S = 0.02


class _Producer:
    """Records the transaction's steps; a message is acked `ACK_S` after it is sent."""

    def __init__(self, name: str = "p0", log: list[str] | None = None) -> None:
        self.name = name
        self.log = [] if log is None else log
        """Every producer's commits (shared), in order: `name` and the offset it committed."""
        self.events: list[str] = []
        self.commits = 0
        self._offsets: dict[TopicPartition, tuple[int, str]] = {}
        self.committed: tuple[int | None, str] = (None, "")
        """What the group's offsets show (its commits, once committed)."""
        self._txn_manager: TransactionManager | None = None
        """aiokafka's transaction state, read to tell a producer whose sender died."""

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
        self.events.append(f"offsets {offsets[TP][0]}")
        self._offsets = dict(offsets)

    async def commit_transaction(self) -> None:
        self.events.append("commit")
        self.commits += 1
        if TP in self._offsets:
            self.committed = self._offsets.pop(TP)
        self.log.append(f"{self.name} {self.committed[0]}")

    async def fetch_committed(self, tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
        return self.committed

    async def abort_transaction(self) -> None:
        self.events.append("abort")


@pytest.fixture(autouse=True)
def _coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator's side (txn_sender): every message goes to `OUT`; adding partitions and
    the group is recorded as an event of the producer (`ready` waits ADD_S for it)."""

    async def route(producer: _Producer, items: Sequence[Item]) -> dict[int, TopicPartition]:
        return {id(m): OUT for item in items for m in item.messages}

    def prepare(producer: _Producer, partitions: Iterable[TopicPartition], group_id: str) -> None:
        producer.events.append(f"prepare {sorted(p.partition for p in partitions)}")

    async def ready(producer: _Producer, partitions: Iterable[TopicPartition], group_id: str) -> None:
        producer.events.append(f"ready {sorted(p.partition for p in partitions)}")
        await asyncio.sleep(ACK_S)
        producer.events.append("added")

    monkeypatch.setattr(transactions, "route", route)
    monkeypatch.setattr(txn_sender, "prepare", prepare)
    monkeypatch.setattr(txn_sender, "ready", ready)


async def _writer(tick_ms: int, prepared_idle_ms: int = 1_000) -> tuple[PartitionWriter, _Producer]:
    producer = _Producer()
    settings = KafkaSettings.model_validate(
        {
            "eos_tick_ms": tick_ms,
            "eos_handoff_max_s": 0,
            "eos_prepared_idle_ms": prepared_idle_ms,
            "eos_producers": 1,
        }
    )
    writer = PartitionWriter(
        TP,
        settings,
        "me",
        producer.fetch_committed,
        producer_factory=lambda _id: producer,
    )
    await writer.start()
    return writer, producer


def _outcome(writer: PartitionWriter, offset: int, linger: bool = True) -> Any:
    assert writer.ledger is not None
    writer.ledger.start(offset)
    return writer.publish(offset, [OutMessage("claude.responses.p", b"k", b"v")], linger=linger)


async def test_nothing_is_sent_before_the_transaction_holds_it_and_the_offsets_follow_the_acks() -> None:
    writer, producer = await _writer(tick_ms=1)
    try:
        await _outcome(writer, 0)
    finally:
        await writer.close()
    # sent while the coordinator adds a partition or the group, or the messages and the
    # offsets together, the brokers' checks (KIP-890) refuse one (retried after 100 ms)
    assert producer.events[:7] == ["begin", "ready [2]", "added", "send", "acked", "offsets 1", "commit"]


async def test_the_next_transaction_begins_as_soon_as_one_commits() -> None:
    writer, producer = await _writer(tick_ms=1)
    try:
        await _outcome(writer, 0)
        await _outcome(writer, 1)
        assert producer.events[-1] == "commit"  # two ticks: nothing says another is coming
        await _outcome(writer, 2)  # the ticks come often
        await until(lambda: producer.events[-1].startswith("offsets"), timeout_s=5, interval_s=0.005)
        # the partition it wrote, ahead; once it is added, the last tick's offsets again
        assert producer.events[-5:] == ["begin", "prepare [2]", "ready [2]", "added", "offsets 3"]
        producer.events.clear()
        await _outcome(writer, 3)
        tick = producer.events[: producer.events.index("commit")]
        assert "begin" not in tick  # it was open
        # the group coordinator asks nothing of its second offset commit: the offsets go with
        # the records, before they are acked
        assert tick[:2] == ["ready [2]", "added"]
        assert sorted(tick[2:4]) == ["offsets 4", "send"]
        assert tick[4:] == ["acked"]
    finally:
        await writer.close()
    assert producer.events[-1] == "commit"  # closing begins nothing ahead


async def test_a_call_in_flight_begins_its_outcome_s_transaction_ahead() -> None:
    writer, producer = await _writer(tick_ms=1)
    try:
        assert writer.ledger is not None
        writer.ledger.start(0)
        await writer.claim(0, attempts=1)  # a lone request: its call is about to start
        after = producer.events[producer.events.index("commit") + 1 :]
        assert after[:2] == ["begin", "prepare []"]  # the group, for the outcome
    finally:
        await writer.close()


async def test_a_sparse_partition_begins_nothing_nobody_uses() -> None:
    """A request every so often: its claim's transaction begins its outcome's ahead, and
    nothing is begun after the outcome."""
    writer, producer = await _writer(tick_ms=1, prepared_idle_ms=100)
    try:
        assert writer.ledger is not None
        for offset in range(3):
            writer.ledger.start(offset)
            await writer.claim(offset, attempts=1)
            await writer.publish(offset, [OutMessage("claude.responses.p", b"k", b"v")])
            await asyncio.sleep(0.15)  # longer apart than eos_prepared_idle_ms
        assert "abort" not in producer.events
    finally:
        await writer.close()
    # each claim's own, the one it begins ahead for its outcome, and the closing tick's: none
    # was begun ahead and ended idle
    assert producer.events.count("begin") == producer.events.count("commit") == 2 * 3 + 1


async def test_a_transaction_begun_ahead_is_committed_empty_when_nothing_comes() -> None:
    """Committed, never aborted: an abort marker would drop the records of a transaction of
    the same producer id left hanging in a partition it added (service/ingest/hanging.py)."""
    writer, producer = await _writer(tick_ms=1, prepared_idle_ms=100)
    try:
        for offset in range(3):
            await _outcome(writer, offset)
        await asyncio.sleep(0.05)
        assert "abort" not in producer.events
        await asyncio.sleep(0.3)
        # holding the last tick's offsets again, which commits nothing new
        assert producer.events[-6:] == ["begin", "prepare [2]", "ready [2]", "added", "offsets 3", "commit"]
        assert producer.log[-2:] == ["p0 3", "p0 3"]
        producer.events.clear()
        await _outcome(writer, 3)
        assert producer.events[:2] == ["begin", "ready [2]"]  # a transaction of its own
    finally:
        await writer.close()


async def test_no_transaction_begins_ahead_when_it_is_turned_off() -> None:
    writer, producer = await _writer(tick_ms=1, prepared_idle_ms=0)
    try:
        await _outcome(writer, 0)
        await _outcome(writer, 1)
    finally:
        await writer.close()
    assert producer.events.count("begin") == 3  # two ticks and the closing one
    assert not [e for e in producer.events if e.startswith("prepare")]


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
        await asyncio.sleep(ACK_S * 1.5)  # its records are in flight (added: too late to join)
        rest = [asyncio.ensure_future(_outcome(writer, o)) for o in (1, 2, 3)]
        await first
        began = time.monotonic()
        await asyncio.gather(*rest)
        assert time.monotonic() - began >= 0.1  # they waited for the linger, then went together
        assert producer.commits == 2
    finally:
        await writer.close()


@pytest.mark.parametrize("during", ["the tick in flight", "the linger"])
async def test_an_outcome_that_may_not_wait_ends_the_linger(during: str) -> None:
    """A cache hit's outcome arriving while a tick is in flight, or while the next one lingers,
    goes as soon as the tick in flight ends, with what was gathered for the linger."""
    writer, producer = await _writer(tick_ms=2_000)
    try:
        first = asyncio.ensure_future(_outcome(writer, 0))
        await asyncio.sleep(ACK_S * 1.5)  # its records are in flight (added: too late to join)
        gathered = asyncio.ensure_future(_outcome(writer, 1))  # lingers for the 2 s tick
        if during == "the linger":
            await first
            await asyncio.sleep(0.05)
            assert not gathered.done()
        began = time.monotonic()
        await asyncio.wait_for(_outcome(writer, 2, linger=False), 1.0)  # without it: the 2 s tick
        await asyncio.wait_for(gathered, 0.1)  # it went in the same transaction
        assert time.monotonic() - began < 1.0
        assert producer.commits == 2
    finally:
        await writer.close()


async def test_outcomes_coming_while_the_partitions_are_added_ride_in_the_transaction() -> None:
    """Nothing is sent while the coordinator adds the transaction's partitions (`ready`): an
    outcome that comes meanwhile joins it, lingering or not; a claim waits for the next tick."""
    writer, producer = await _writer(tick_ms=2_000, prepared_idle_ms=0)
    try:
        first = asyncio.ensure_future(_outcome(writer, 0))
        await asyncio.sleep(ACK_S / 2)  # the coordinator adds its partition (`ready`: ACK_S)
        assert producer.events[-1].startswith("ready")
        joined = asyncio.ensure_future(_outcome(writer, 1))  # would linger for the 2 s tick
        claim = asyncio.ensure_future(writer.claim(2, 1))
        await asyncio.wait_for(asyncio.gather(first, joined), 1.0)
        assert producer.commits == 1
        assert producer.events.count("send") == 2
        assert not claim.done()
        assert writer.ledger is not None
        assert writer.ledger.low_watermark == 2  # both finished
    finally:
        await writer.close()
    with pytest.raises(Fenced):  # committed by the closing tick: no call starts after the close
        await asyncio.wait_for(claim, 0.1)


async def test_only_outcomes_of_calls_and_batch_handoffs_linger() -> None:
    """A record's sink: its outcome lingers once a call was claimed (the call's latency dwarfs the
    tick), or when asked to (a hand-off to the batch path); a cache hit's or rejection's not."""
    asked: list[bool] = []

    class _Writer:
        owner = "me"

        async def claim(self, offset: int, attempts: int) -> None:
            pass

        async def publish(self, offset: int, messages: Sequence[OutMessage], *, linger: bool) -> None:
            asked.append(linger)

    def sink() -> RecordSink:
        return RecordSink(cast(PartitionWriter, _Writer()), 7, None)

    await sink().publish([])  # a hit or a rejection
    await sink().publish([], linger=True)  # a hand-off to the batch path
    called = sink()
    await called.claim(1)
    await called.publish([])
    assert asked == [False, True, True]


def test_only_partitions_most_ticks_write_are_added_ahead() -> None:
    """The partner's usage partition (every tick) and, of a topic with three partitions, each;
    of one with a hundred, none."""
    txns = transactions.Transactions("g", 1.0)
    usage, small, large = "claude.usage", "claude.responses.small", "claude.responses.large"
    for i in range(transactions.RECENT_TICKS * 2):
        written = {TopicPartition(usage, 1), TopicPartition(small, i % 3), TopicPartition(large, i % 100)}
        txns._remember(written)
    likely = set(txns._likely())
    assert likely == {TopicPartition(usage, 1), *(TopicPartition(small, p) for p in range(3))}


async def test_a_failure_beginning_the_next_transaction_does_not_undo_the_commit_before_it() -> None:
    """One producer: the next transaction begins right after a commit, in the commit's task.
    If that fails, the commit stands: its items were settled once, the producer is not
    initialised again (which would read the commit and settle them a second time)."""
    writer, producer = await _writer(tick_ms=1)
    starts, begins = [], []

    async def start() -> None:
        starts.append(1)

    async def begin_transaction() -> None:
        begins.append(1)
        if len(begins) == 2:  # the one begun ahead after the claim's commit
            raise KafkaConnectionError("the coordinator went away")
        producer.events.append("begin")

    producer.start = start  # type: ignore[method-assign]
    producer.begin_transaction = begin_transaction  # type: ignore[method-assign]
    try:
        assert writer.ledger is not None
        writer.ledger.start(0)
        await asyncio.wait_for(writer.claim(0, attempts=1), 2)  # a call in flight: begins ahead
        await asyncio.sleep(0.05)
        assert len(begins) == 2
        await asyncio.wait_for(writer.publish(0, [OutMessage("claude.responses.p", b"k", b"v")]), 2)
        assert writer.failure is None
        assert starts == []  # never initialised again
        assert writer.ledger.claims == {}  # the claim applied once, then resolved by its outcome
        assert writer.ledger.in_flight == 0
    finally:
        await writer.close()


async def test_a_transaction_begun_ahead_ends_idle_only_after_the_tick_whose_offsets_it_repeats() -> None:
    """Two producers: the one begun ahead while a tick commits holds that tick's offsets. Were
    it ended (committed) first and that tick's commit then failed, the offsets would say the
    tick's requests were answered while its outcomes were aborted: lost. It waits."""
    log: list[str] = []
    made: dict[str, _Producer] = {}
    release = asyncio.Event()

    def factory(txn_id: str) -> _Producer:
        p = made[txn_id] = _Producer("p1" if txn_id.endswith(".1") else "p0", log)
        return p

    settings = KafkaSettings.model_validate(
        {"eos_tick_ms": 1, "eos_handoff_max_s": 0, "eos_prepared_idle_ms": 50, "eos_producers": 2}
    )

    async def fetch_committed(tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
        """What the group's offsets show: the last commit's."""
        last = [p for p in made.values() if log and p.name == log[-1].split()[0]]
        return last[0].committed if last else (None, "")

    writer = PartitionWriter(TP, settings, "me", fetch_committed, producer_factory=factory)
    await writer.start()
    try:
        assert writer.ledger is not None
        writer.ledger.start(0)
        await writer.claim(0, attempts=1)  # a call in flight: each tick begins the next ahead
        for offset in (1, 2):
            await _outcome(writer, offset)
        committing = next(p for p in made.values() if p.events[-1] != "commit")  # begun ahead
        other = next(p for p in made.values() if p is not committing)
        commit = committing.commit_transaction

        async def slow_commit() -> None:
            await release.wait()
            await commit()

        committing.commit_transaction = slow_commit  # type: ignore[method-assign]
        before = len(log)
        tick = asyncio.ensure_future(_outcome(writer, 3))
        await until(lambda: other.events[-1].startswith("offsets"), timeout_s=5, interval_s=0.005)
        await asyncio.sleep(0.3)  # six times eos_prepared_idle_ms: it would have ended by now
        assert not tick.done()
        sent = [e for e in committing.events if e.startswith("offsets")][-1]
        assert other.events[-1] == sent  # begun ahead, holding the committing tick's offsets
        assert log[before:] == []  # and not ended before that tick commits
        release.set()
        await asyncio.wait_for(tick, 1)
        await until(lambda: len(log) > before + 1, timeout_s=5, interval_s=0.01)
        assert log[before:] == [f"{committing.name} 0", f"{other.name} 0"]  # then ended idle
    finally:
        release.set()
        await writer.close()


def _committed_claims(producer: _Producer) -> set[int]:
    """The claims in the committed state: what the partition's next owner reads."""
    offset, metadata = producer.committed
    return set() if offset is None else {c.offset for c in decode(offset, metadata).claims}


async def _queued_claim(writer: PartitionWriter, offset: int) -> asyncio.Task[None]:
    """A claim submitted while the partition is owned and left in the queue: a tick is in flight
    (the fake coordinator takes ACK_S to add its partitions), so the claim waits for the next."""
    assert writer.ledger is not None
    writer.ledger.start(offset)
    claim = asyncio.get_running_loop().create_task(writer.claim(offset, attempts=1))
    await until(lambda: any(i.claim is not None for i in writer._queue), timeout_s=5, interval_s=0.001)
    return claim


@pytest.mark.parametrize("then", ["reown", "hand_off"])
async def test_a_claim_queued_before_a_revocation_is_held_then_sent_or_revoked(then: str) -> None:
    """Revoked with a claim queued: no tick commits it while the rebalance runs (the next owner
    may already be reading the committed state for a live owner's claims). Kept, it goes at
    once; handed off, it fails `Revoked` uncommitted, and its call is never made here."""
    writer, producer = await _writer(tick_ms=200)
    try:
        outcome = asyncio.ensure_future(_outcome(writer, 0))  # a tick in flight
        await until(lambda: "begin" in producer.events, timeout_s=5, interval_s=0.001)
        claim = await _queued_claim(writer, 1)
        writer.suspend()
        await outcome
        await asyncio.sleep(0.5)  # ticks would have come (a heartbeat, the claim's linger)
        assert not claim.done()
        assert _committed_claims(producer) == set(), "a claim committed while revoked"
        if then == "reown":
            writer.reown()
            await asyncio.wait_for(claim, 5)
            assert _committed_claims(producer) == {1}
        else:
            writer.hand_off()
            with pytest.raises(Revoked):
                await asyncio.wait_for(claim, 5)
            await asyncio.sleep(0.3)
            assert _committed_claims(producer) == set()
    finally:
        await writer.close()


async def test_a_revocation_returns_once_the_tick_carrying_claims_has_committed() -> None:
    """A claim taken into a tick before the revocation commits before the replica rejoins the
    group (`settle`): the next owner's handoff check then sees it, pending or committed. Had
    it committed after that check, the next owner would fence this writer once the call was
    made here: an unknown outcome in a graceful rebalance."""
    writer, producer = await _writer(tick_ms=1)
    try:
        assert writer.ledger is not None
        writer.ledger.start(1)
        claim = asyncio.ensure_future(writer.claim(1, attempts=1))
        await until(lambda: not writer._queue and writer._tick_lock.locked(), timeout_s=5, interval_s=0.001)
        writer.suspend()
        assert _committed_claims(producer) == set(), "sent, not committed yet"
        await writer.settle(5)
        assert _committed_claims(producer) == {1}, "the revocation returned before its claim committed"
        await asyncio.wait_for(claim, 5)
    finally:
        await writer.close()


class _RealTxnState(_Producer):
    """A producer whose transaction state is aiokafka's own `TransactionManager`: begin, commit
    and abort go through its state transitions, so a step its state forbids fails as in
    aiokafka (an AssertionError). `sender_dies`: the first send fails the way aiokafka's does
    when its sender task dies mid-batch (a broker went away): FATAL_ERROR, then a KafkaError."""

    def __init__(self, shared: dict[str, tuple[int | None, str]], sender_dies: bool) -> None:
        super().__init__()
        self._shared = shared
        self._sender_dies = sender_dies
        self._txn_manager = TransactionManager("t", 60_000)
        self._txn_manager.set_pid_and_epoch(1, 0)

    async def begin_transaction(self) -> None:
        self._txn_manager.begin_transaction()
        await super().begin_transaction()

    async def send(self, topic: str, value: bytes, **kw: Any) -> asyncio.Future[None]:
        if self._sender_dies:
            error = KafkaError("Unexpected error during batch delivery")
            self._txn_manager.fatal_error(error)  # as aiokafka's Sender._fail_all
            raise error
        return await super().send(topic, value, **kw)

    async def commit_transaction(self) -> None:
        self._txn_manager.committing_transaction()
        self._txn_manager.complete_transaction()
        await super().commit_transaction()
        self._shared["committed"] = self.committed

    async def abort_transaction(self) -> None:
        self._txn_manager.aborting_transaction()
        self._txn_manager.complete_transaction()
        await super().abort_transaction()


async def test_a_producer_whose_sender_died_is_replaced_and_the_tick_goes_again() -> None:
    """A broker restart can kill a producer's sender mid-tick (aiokafka: FATAL_ERROR). Its
    transaction cannot be aborted through it (aiokafka would fail an assertion), and the writer
    must not die of that: its calls in flight would lose their answers. New producers are
    initialised (which ends the transaction), the commit read, and the outcome sent again."""
    shared: dict[str, tuple[int | None, str]] = {"committed": (None, "")}
    made: list[_RealTxnState] = []

    def factory(_id: str) -> _RealTxnState:
        made.append(_RealTxnState(shared, sender_dies=len(made) == 1))  # the second: the first tick's
        return made[-1]

    async def fetch_committed(tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
        return shared["committed"]

    settings = KafkaSettings.model_validate(
        {"eos_tick_ms": 1, "eos_handoff_max_s": 0, "eos_prepared_idle_ms": 0, "eos_producers": 1}
    )
    writer = PartitionWriter(TP, settings, "me", fetch_committed, producer_factory=factory)
    await writer.start()  # made[0]: fencing at the start, replaced before the first tick
    await writer._open_producer()  # made[1]: the producer whose sender dies
    try:
        await asyncio.wait_for(_outcome(writer, 0), 5)
        assert writer.failure is None
        assert len(made) == 3
        assert made[1]._txn_manager.is_fatal_error()
        assert made[2].commits == 1
        assert shared["committed"][0] == 1
    finally:
        await writer.close()


async def test_a_transaction_begun_ahead_whose_idle_commit_fails_does_not_stop_the_writer() -> None:
    """A broker restart fails the commit of a transaction begun ahead that nothing used. It
    held nothing new, so the writer initialises its producers again and goes on: it must not
    die, taking the answers of its calls in flight with it."""
    shared: dict[str, tuple[int | None, str]] = {"committed": (None, "")}
    made: list[_RealTxnState] = []
    commits: list[int] = []

    def factory(_id: str) -> _RealTxnState:
        p = _RealTxnState(shared, sender_dies=False)
        commit = p.commit_transaction

        async def commit_or_fail() -> None:
            commits.append(1)
            if p is made[0] and len(commits) == 4:  # the three ticks', then the idle one
                p._txn_manager.fatal_error(KafkaError("Unexpected error during batch delivery"))
                raise KafkaError("Unexpected error during batch delivery")
            await commit()

        p.commit_transaction = commit_or_fail  # type: ignore[method-assign]
        made.append(p)
        return p

    async def fetch_committed(tp: TopicPartition, stable: bool) -> tuple[int | None, str]:
        return shared["committed"]

    settings = KafkaSettings.model_validate(
        {"eos_tick_ms": 1, "eos_handoff_max_s": 0, "eos_prepared_idle_ms": 100, "eos_producers": 1}
    )
    writer = PartitionWriter(TP, settings, "me", fetch_committed, producer_factory=factory)
    await writer.start()
    try:
        for offset in range(3):
            await asyncio.wait_for(_outcome(writer, offset), 5)
        await until(lambda: len(made) == 2, timeout_s=5, interval_s=0.01)  # failed idle: a new one
        assert writer.failure is None
        await asyncio.wait_for(_outcome(writer, 3), 5)
        assert writer.failure is None
        assert shared["committed"][0] == 4
        assert made[1].commits >= 1
    finally:
        await writer.close()


@pytest.mark.parametrize("stopping", [True, False])
async def test_a_transaction_failing_while_we_stop_is_recovered_only_if_the_partition_is_still_ours(
    stopping: bool,
) -> None:
    """A broker restart during our own drain fails the transaction of an outcome. The group
    still assigns the partition here (we have not left it), so initialising the producers
    again fences no one else: the writer recovers and the answer is published. Handed off to
    another replica, it must not (that would fence the new owner): the outcome is `Fenced`."""
    writer, producer = await _writer(tick_ms=1)
    sent = producer.send_offsets_to_transaction
    failures: list[int] = []
    reinitialised: list[int] = []

    async def fail_once(offsets: Any, group_id: str) -> None:
        if not failures:
            failures.append(1)
            raise KafkaConnectionError("the broker restarts")
        await sent(offsets, group_id)

    async def start() -> None:
        reinitialised.append(1)

    try:
        await _outcome(writer, 0)
        producer.send_offsets_to_transaction = fail_once  # type: ignore[method-assign]
        producer.start = start  # type: ignore[method-assign]
        writer.hand_off((lambda: True) if stopping else None)
        outcome = _outcome(writer, 1)
        if stopping:
            await asyncio.wait_for(outcome, 5)
            assert reinitialised == [1]
            assert producer.committed[0] == 2
        else:
            with pytest.raises(Fenced):
                await asyncio.wait_for(outcome, 5)
            assert reinitialised == []
            assert producer.committed[0] == 1
    finally:
        await writer.close()


async def test_a_claim_in_a_tick_failing_as_we_stop_is_revoked_and_the_outcome_still_goes() -> None:
    """Our stop begins while a tick holding an outcome and a claim is in flight, and the tick
    fails (a broker restart). Recovered (the partition is still ours), the outcome goes again;
    the claim, never committed, fails `Revoked` at once (its call is the next owner's) instead
    of waiting, held, until the drain times out."""
    writer, producer = await _writer(tick_ms=1)
    sent = producer.send_offsets_to_transaction
    failures: list[int] = []

    async def stop_then_fail(offsets: Any, group_id: str) -> None:
        if not failures:
            failures.append(1)
            writer.hand_off(lambda: True)
            raise KafkaConnectionError("the broker restarts")
        await sent(offsets, group_id)

    try:
        assert writer.ledger is not None
        producer.send_offsets_to_transaction = stop_then_fail  # type: ignore[method-assign]
        writer.ledger.start(0)
        writer.ledger.start(1)
        outcome = asyncio.ensure_future(writer.publish(0, [OutMessage("claude.responses.p", b"k", b"v")]))
        claim = asyncio.ensure_future(writer.claim(1, attempts=1))
        with pytest.raises(Revoked):
            await asyncio.wait_for(claim, 2)
        await asyncio.wait_for(outcome, 5)
        assert failures == [1]
        assert _committed_claims(producer) == set()
        assert producer.committed[0] == 1
    finally:
        await writer.close()
