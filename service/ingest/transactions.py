"""One partition writer's transactions: begun ahead, prepared, sent, committed.

A tick's transaction carries records (outcomes, metering records) and the offset commit. Run
naively it costs five round trips in turn (AddPartitionsToTxn, Produce, AddOffsetsToTxn,
TxnOffsetCommit, EndTxn), and its first request waits while the coordinator still writes the
previous transaction's markers. So, once a transaction commits and another tick is expected
soon, the next one begins at once and adds, in the background (`txn_sender.prepare`), the
consumer group and the partitions the writer wrote in at least a quarter of its last ticks
(`PREPARED_SHARE`), then commits the last tick's offsets again (`_prewrite_offsets`). A tick
that finds all that done sends its records and its offsets together, and ends: two round
trips. (The partitions' leaders and the group coordinator each ask the transaction
coordinator whether a transaction holds what it writes, KIP-890, and of two questions pending
for one transaction the broker refuses one; the group coordinator asks only about the
transaction's first offset commit, which is the one written ahead. Without it, the offsets go
once the records are acked: three round trips.) What a tick writes elsewhere is added first
(`txn_sender.ready`), before anything is sent; outcomes that come while it waits for that (or
for the previous transaction's markers, which hold up any addition) join it (`send`'s `join`).

"Expected soon": calls are in flight (their outcomes will come), or the last three ticks came
within `kafka.eos_prepared_idle_ms`. A partition that sees a request every few seconds (a
claim, then its outcome) thus begins no transaction that nothing uses. One begun ahead that
gets nothing for `eos_prepared_idle_ms` is ended (it holds nothing new: no partition's
readers wait for it), and the next tick begins its own. It is committed, not aborted: its markers
also end any transaction this producer id left hanging in a partition it added (`hanging.py`),
and a COMMIT ends it as its coordinator had decided, where an ABORT would drop its records.
With `eos_prepared_idle_ms: 0` no transaction is begun ahead.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from service.config import txn_sender
from service.ingest.sending import Item, route, send_all

RECENT_TICKS = 32
"""The ticks whose partitions say which to add ahead."""
PREPARED_SHARE = 4
"""A partition is added ahead when at least 1 / PREPARED_SHARE of the recent ticks wrote it: the
usage partition of the partner (keyed by partner) and, of a topic with a few partitions, each.
Of a topic with many, none: the next tick would hardly write the same ones, and each partition
added gets a marker when the transaction ends."""
PREPARED_MAX = 8
"""At most this many partitions added ahead."""
JOIN_ROUNDS = 4
"""How many times a transaction waiting for its partitions takes in what came meanwhile."""

Offsets = dict[TopicPartition, tuple[int, str]]


class ProducerBroken(KafkaError):  # type: ignore[misc]  # aiokafka is untyped
    """The producer's sender died (aiokafka's FATAL_ERROR: a broker went away mid-batch): no
    transaction can begin, commit or abort on it. Raised where aiokafka would fail an
    assertion, as the KafkaError the writer recovers from by initialising a new producer."""


class Transactions:
    """The transactions of one producer (replaced with it: `reset`)."""

    def __init__(self, group_id: str, prepared_idle_s: float, sent_at: deque[float] | None = None) -> None:
        self.group_id = group_id
        self.prepared_idle_s = prepared_idle_s
        self.producer: AIOKafkaProducer | None = None
        self._open = False
        self._prepared_at: float | None = None
        """When the open transaction was begun ahead (None: begun by a tick, or none open)."""
        self._prewrite: asyncio.Task[None] | None = None
        """The open transaction's offset commit written ahead (`begin_ahead`), if any."""
        self._recent: deque[frozenset[TopicPartition]] = deque(maxlen=RECENT_TICKS)
        self._written: Counter[TopicPartition] = Counter()
        """How many of `_recent` wrote each partition."""
        self._sent_at: deque[float] = deque(maxlen=3) if sent_at is None else sent_at
        """When the writer's last three ticks began sending: shared by the producers taking
        turns (`turns.py`), so "ticks come often" is the partition's rate, not half of it."""

    def reset(self, producer: AIOKafkaProducer) -> None:
        """A new producer (its transaction state is fresh)."""
        self.producer = producer
        self._open = False
        self._prepared_at = None
        self.drop_prewrite()

    @property
    def _producer(self) -> AIOKafkaProducer:
        assert self.producer is not None
        if _broken(self.producer):
            raise ProducerBroken("the producer's sender failed; it is to be initialised again")
        return self.producer

    async def send(
        self,
        items: list[Item],
        join: Callable[[], list[Item]],
        offsets: Callable[[], dict[TopicPartition, tuple[int, str]]],
    ) -> tuple[list[Item], list[Item]]:
        """Send `items` and then `offsets()` in the open transaction (begun if none is):
        (the items refused for good, those to send again alone), as `send_all`. While the
        coordinator adds the transaction's partitions, items that come meanwhile may `join`
        it (at most `JOIN_ROUNDS` times): nothing has been sent yet."""
        producer = self._producer
        if not self._open:
            await producer.begin_transaction()
            self._open = True
        self._prepared_at = None
        items, late = list(items), items
        routes: dict[int, TopicPartition] = {}
        for round_ in range(JOIN_ROUNDS + 1):
            routes.update(await route(producer, late))
            await txn_sender.ready(producer, set(routes.values()), self.group_id)
            late = join() if round_ < JOIN_ROUNDS else []
            if not late:
                break
            items += late
        written = set(routes.values())
        self._sent_at.append(time.monotonic())
        self._remember(written)
        if not await self._prewritten():
            # the offsets once the records are acked: the leader of a record's partition and
            # the group coordinator each ask the transaction coordinator whether the
            # transaction holds what they write (KIP-890), and of two such questions in flight
            # for one transaction the broker fails the first (the records
            # NOT_ENOUGH_REPLICAS, the offsets COORDINATOR_NOT_AVAILABLE: both retried after
            # 100 ms)
            sent = await send_all(producer, items, routes)
            await producer.send_offsets_to_transaction(offsets(), self.group_id)
            return sent
        # the transaction already wrote to the group's offsets (`begin_ahead`): the group
        # coordinator asks nothing, and the records and the offsets go together
        records = asyncio.get_running_loop().create_task(send_all(producer, items, routes))
        try:
            await producer.send_offsets_to_transaction(offsets(), self.group_id)
        except BaseException:
            records.add_done_callback(_retrieve)  # the transaction is aborted: its error wins
            raise
        return await records

    async def commit(self) -> None:
        await self._prewritten()
        await self._producer.commit_transaction()
        self._open = False

    async def abort(self) -> None:
        self._open = False
        self.drop_prewrite()
        if self.producer is not None and _broken(self.producer):
            return  # nothing ends through it: initialising its successor aborts the transaction
        await self._producer.abort_transaction()

    async def begin_ahead(self, expected: bool, offsets: Offsets | None = None) -> None:
        """Begin the next transaction now and prepare it in the background, if a tick is
        `expected` (calls in flight) or the ticks come often. `offsets`: the last tick's
        offset commit, acked; written again in this one once prepared (`_prewrite_offsets`)."""
        sent = self._sent_at
        frequent = len(sent) == sent.maxlen and sent[-1] - sent[0] < self.prepared_idle_s
        if self.prepared_idle_s <= 0 or self._open or not (expected or frequent):
            return
        producer = self._producer
        await producer.begin_transaction()
        self._open = True
        self._prepared_at = time.monotonic()
        likely = self._likely()
        txn_sender.prepare(producer, likely, self.group_id)
        if offsets:
            self._prewrite = asyncio.get_running_loop().create_task(
                self._prewrite_offsets(producer, likely, offsets)
            )

    async def _prewrite_offsets(
        self, producer: AIOKafkaProducer, likely: list[TopicPartition], offsets: Offsets
    ) -> None:
        """Commit the last tick's offsets again in the transaction begun ahead, once its
        partitions are added: the group coordinator asks the transaction coordinator about a
        transaction's first offset commit only (KIP-890), so the tick's own commit can then go
        with its records instead of after them. Harmless whatever comes next: the same offsets
        and metadata, the later record of the group's offsets (`turns.py`), committed only
        after the tick that wrote them first (its `commit` and `end_idle` wait for it), and
        gone with this transaction if that tick failed (the producers are initialised again)."""
        await txn_sender.ready(producer, likely, self.group_id)
        await producer.send_offsets_to_transaction(offsets, self.group_id)

    async def _prewritten(self) -> bool:
        """Whether the open transaction's offsets were written ahead (waits for them; raises
        the error that failed them)."""
        task, self._prewrite = self._prewrite, None
        if task is None:
            return False
        await task
        return True

    def drop_prewrite(self) -> None:
        """Cancel the offsets being written ahead: the transaction or its producer is gone."""
        task, self._prewrite = self._prewrite, None
        if task is None:
            return
        task.cancel()
        task.add_done_callback(_retrieve)  # the producer it ran on is gone

    async def mark(self, partitions: list[TopicPartition]) -> None:
        """Commit the open transaction (begun if none is), holding `partitions` too: a marker of
        this producer id in each ends what it left hanging there (`hanging.py`)."""
        producer = self._producer
        if not self._open:
            await producer.begin_transaction()
            self._open = True
        self._prepared_at = None
        await txn_sender.ready(producer, partitions, self.group_id)
        await self.commit()

    def _remember(self, written: set[TopicPartition]) -> None:
        if len(self._recent) == RECENT_TICKS:
            self._written.subtract(self._recent[0])
        self._recent.append(frozenset(written))
        self._written.update(written)

    def _likely(self) -> list[TopicPartition]:
        least = len(self._recent) / PREPARED_SHARE
        often = [(n, tp) for tp, n in self._written.items() if n > 0 and n >= least]
        for tp in [tp for tp, n in self._written.items() if n <= 0]:
            del self._written[tp]
        return [tp for _, tp in sorted(often, key=lambda e: e[0], reverse=True)[:PREPARED_MAX]]

    def idle_for(self) -> float | None:
        """Seconds until the transaction begun ahead is to be ended (None: there is none)."""
        if self._prepared_at is None:
            return None
        return self._prepared_at + self.prepared_idle_s - time.monotonic()

    async def end_idle(self) -> None:
        """Commit the transaction begun ahead (nothing new in it) if it waited
        `prepared_idle_s` for nothing."""
        left = self.idle_for()
        if left is None or left > 0:
            return
        self._prepared_at = None
        await self.commit()


def _broken(producer: AIOKafkaProducer) -> bool:
    txn = producer._txn_manager  # None: not transactional
    return txn is not None and bool(txn.is_fatal_error())


def _retrieve(task: asyncio.Task[object]) -> None:
    """A task whose result no one awaits: its error is retrieved, not logged as lost."""
    if not task.cancelled():
        task.exception()
