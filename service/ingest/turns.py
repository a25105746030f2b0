"""A partition writer's transactional producers, taking turns (`kafka.eos_producers`, 2).

One producer's transactions run one at a time, and each waits for the last one's end: after
EndTxn the coordinator writes the commit markers, and until they are written it answers the
next transaction's first addition CONCURRENT_TRANSACTIONS. On a loaded broker that wait, not
the transaction, was most of an outcome's publish (p99 33 ms of `txn_sender.ready` in the
response-cache bench). With two producers, the next tick is sent on the other one while a
transaction commits, and commits once that one has:

- its offsets are sent after the committing transaction's offsets were acked, so its offset
  commit is the later record of `__consumer_offsets`, and the group coordinator keeps the
  later record whatever order the markers come in;
- its EndTxn goes only once the committing transaction's EndTxn succeeded. If that one fails,
  every producer is initialised again (which aborts this one) and both ticks are verified
  against the committed state (`TickWriter._resolve_committing`). The same holds for one
  begun ahead that is ended with nothing new (`end_idle`): it holds the committing tick's
  offsets, written again (`transactions.py`), so it too waits for that tick's commit.

So offsets only move forward, and a transaction commits only after every earlier one did.
Each producer has its own `transactional_id`: the first is the writer's id of one producer
(`partition.transactional_id`), the others add `.1`, `.2`; a new owner initialises them all,
which fences every one of the previous owner's. Each is a connection per partition owned.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, TopicPartition

from service.config.kafka import start_whole
from service.ingest.hanging import heal, producer_id
from service.ingest.sending import Item
from service.ingest.tick import TickContents
from service.ingest.transactions import Transactions


@dataclass
class Committing:
    """A tick whose transaction is committing (its EndTxn in flight) while the next is sent."""

    txns: Transactions
    tick: TickContents
    task: asyncio.Task[None] = field(init=False)

    @property
    def taken(self) -> list[Item]:
        return self.tick.items


def producer_ids(base_id: str, count: int) -> list[str]:
    """The transactional ids of a writer's producers: its id of one producer, then `.1`..."""
    return [base_id] + [f"{base_id}.{i}" for i in range(1, count)]


class Turns:
    """The producers of one writer and whose turn it is; `committing`: the tick committing."""

    def __init__(
        self,
        group_id: str,
        base_id: str,
        count: int,
        prepared_idle_s: float,
        factory: Callable[[str], AIOKafkaProducer],
    ) -> None:
        self.group_id = group_id
        self._ids = producer_ids(base_id, count)
        self._factory = factory
        sent_at: deque[float] = deque(maxlen=3)  # the writer's ticks, whichever producer sent them
        self.txns = [Transactions(group_id, prepared_idle_s, sent_at) for _ in self._ids]
        self._turn = 0
        self.committing: Committing | None = None
        self._opening: asyncio.Task[None] | None = None

    @property
    def producers(self) -> list[AIOKafkaProducer]:
        return [t.producer for t in self.txns if t.producer is not None]

    @property
    def started(self) -> bool:
        return all(t.producer is not None for t in self.txns)

    def next(self) -> Transactions:
        """The producer the next tick is sent on."""
        return self.txns[self._turn]

    def advance(self) -> None:
        self._turn = (self._turn + 1) % len(self.txns)

    def free(self) -> list[Transactions]:
        """The producers not committing."""
        busy = None if self.committing is None else self.committing.txns
        return [t for t in self.txns if t is not busy]

    async def open(self) -> None:
        """(Re)create and initialise every producer: each InitProducerId bumps its epoch, which
        fences the previous owner's and ends (aborts) its open transaction. Together: a
        takeover waits for one round of InitProducerId, not one per producer."""
        await self.stop()
        for txn_id, txns in zip(self._ids, self.txns, strict=True):
            txns.reset(self._factory(txn_id))
        self._opening = opening = asyncio.ensure_future(start_whole(self.producers))
        try:
            await opening  # cancelling `open` cancels it too
        finally:
            if self._opening is opening:
                self._opening = None
        self._turn = 0

    async def stop(self) -> None:
        """Stop every producer. An `open` under way is cancelled first and its starts are let
        end (`start_whole`): a producer's `stop` during its `start` closes only what exists,
        and the start would then connect on a closed client, where no stop reaches."""
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            await asyncio.wait([opening])
        stopping = []
        for txns in self.txns:
            txns.drop_prewrite()
            producer, txns.producer = txns.producer, None
            if producer is not None:
                stopping.append(_stop(producer))
        await asyncio.gather(*stopping)

    async def heal(self, topics: list[str]) -> None:
        """End what any of the producers' ids left hanging (`hanging.heal`)."""
        for producer in self.producers:
            await heal(producer, self.group_id, topics)

    def idle_for(self) -> float | None:
        """Seconds until a transaction begun ahead is to be ended (None: none is)."""
        left = [s for s in (t.idle_for() for t in self.txns) if s is not None]
        return min(left) if left else None

    async def end_idle(self) -> None:
        for txns in self.free():
            await txns.end_idle()

    def holds(self, pids: Collection[int] | None) -> bool:
        """Whether one of the producers has one of these ids (None: any)."""
        return pids is None or any(producer_id(t.producer) in pids for t in self.txns)

    async def mark(self, partitions: list[TopicPartition], pids: Collection[int] | None = None) -> bool:
        """A transaction holding `partitions` committed by every producer (none committing), or
        by those with one of `pids`. True if one was."""
        marked = False
        for txns in self.txns:
            if pids is None or producer_id(txns.producer) in pids:
                await txns.mark(partitions)
                marked = True
        return marked


PRODUCER_STOP_S = 3.0
"""How long a producer's stop may take. With a broker away, aiokafka's sender waits for its
requests in flight without end (a transactional offset commit looks for its coordinator)."""


async def _stop(producer: AIOKafkaProducer) -> None:
    try:
        await asyncio.wait_for(producer.stop(), PRODUCER_STOP_S)  # cancelled: so are its requests
    except TimeoutError:
        with contextlib.suppress(Exception):
            await producer.client.close()  # its connections: the stop never got to them
    except Exception:  # noqa: BLE001 - a producer that fails to stop is gone all the same
        return
