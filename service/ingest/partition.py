"""The writer of one owned request partition: claims, outcomes and offsets in one transaction.

Exactly-once (`kafka.exactly_once`, the default) works per input partition:

- A transactional producer whose `transactional_id` is derived from the group,
  topic and partition. Initialising it on assignment fences the previous
  owner: a zombie can no longer commit for this partition (the first
  exactly-once design of Kafka Streams; aiokafka has no KIP-447).
- A short "tick" transaction every `eos_tick_ms` carries the outcomes that
  finished since the last one and the offset commit (`send_offsets_to_transaction`)
  whose metadata records finished offsets above the commit point and the
  claims (`ledger.py`). The next transaction begins as soon as one commits
  (`transactions.py`), so a tick mostly costs three round trips, not five.
- The tick lingers only for claims and for outcomes of calls, whose latency is the
  call's: an outcome that made no call (a cache hit, a rejection) goes in the next
  transaction at once, as its publish is all the latency its partner sees.
- A Claude call starts only after the tick that recorded its claim committed;
  no transaction is ever held open across a call.
- A writer whose transaction fails in a way it cannot verify stops (`Fenced`);
  the ingest loop gives the partition a new writer if it still owns it, which
  reads the committed state again. Before committing after such an error the
  writer re-reads the commit and goes on only if it is still its own.

At-least-once mode (`exactly_once: false`) keeps the same ledger and metadata
but publishes through the shared idempotent producer and commits with the
consumer; claims do not wait for a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from service.config.kafka import transactional_producer
from service.config.settings import KafkaSettings
from service.ingest import failpoints
from service.ingest.claims_seen import ClaimsSeen
from service.ingest.hanging import heal
from service.ingest.ledger import Claim, PartitionLedger, Snapshot
from service.ingest.sending import Item, OutMessage, fail, send_all
from service.ingest.stable_offsets import UnstableOffset
from service.ingest.takeover import FetchCommitted, await_handoff, read_committed
from service.ingest.tick import TickContents
from service.ingest.transactions import Transactions

log = logging.getLogger(__name__)

CommitOffsets = Callable[[TopicPartition, int, str], Awaitable[None]]
"""At-least-once mode: commit (offset, metadata) with the consumer."""


class Fenced(Exception):
    """Another owner holds this partition: nothing may be published from here.
    The request is left to that owner (its claim, if any, resolved by policy there)."""


class Revoked(Exception):
    """The partition went to another replica before this request's call started;
    the new owner processes it (nothing was billed)."""


class State(Enum):
    STARTING = "starting"
    OWNED = "owned"
    SUSPENDED = "suspended"  # revoked, the rebalance not finished: new claims wait
    HANDOFF = "handoff"  # another replica owns it: finish claimed calls, refuse new ones
    CLOSED = "closed"


def transactional_id(group_id: str, tp: TopicPartition) -> str:
    return f"{group_id}.{tp.topic}.{tp.partition}"


class PartitionWriter:
    """Claims and outcomes of one partition, committed with its offset and metadata."""

    def __init__(
        self,
        tp: TopicPartition,
        settings: KafkaSettings,
        owner: str,
        fetch_committed: FetchCommitted,
        *,
        shared_producer: AIOKafkaProducer | None = None,
        commit_offsets: CommitOffsets | None = None,
        producer_factory: Callable[[str], AIOKafkaProducer] | None = None,
        written_topics: Callable[[], list[str]] | None = None,
    ) -> None:
        self.tp = tp
        self.settings = settings
        self.owner = owner
        self._fetch_committed = fetch_committed
        self._eos = settings.exactly_once
        self._shared = shared_producer
        self._commit_offsets = commit_offsets
        self._factory = producer_factory or self._new_producer
        self._written_topics = written_topics
        """The topics this writer's transactions may have written (to end one left hanging)."""
        self._producer: AIOKafkaProducer | None = None
        self._txns = Transactions(settings.group_id, settings.eos_prepared_idle_ms / 1000)
        self._claims = ClaimsSeen(tp, owner, fetch_committed, lambda: self.mark([]), Fenced)
        """Committed claims whose calls wait until the commit is seen (`claims_seen.py`)."""
        self.ledger: PartitionLedger | None = None
        self.state = State.STARTING
        self._queue: list[Item] = []
        self._wake = asyncio.Event()
        self._owned = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tick_lock = asyncio.Lock()
        self._last_tick = 0.0
        self._hurry = asyncio.Event()
        """The next tick goes without its linger: an item found the writer idle (no tick in
        flight, none waiting), or an outcome that may not wait came (`publish(linger=False)`)."""
        self.transactions = 0
        self._failures = 0
        self._last_owner = ""
        """Who wrote the latest commit we know of (ours once we committed)."""
        self.failure: BaseException | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------

    def _new_producer(self, txn_id: str) -> AIOKafkaProducer:
        return transactional_producer(self.settings, txn_id)

    async def start(self) -> Snapshot:
        """Take the partition over: wait briefly for a live previous owner's calls, fence
        it, and read what it committed. Returns the restored state (seek to its commit)."""
        if self._eos:
            await await_handoff(self._fetch_committed, self.tp, self.settings, self.owner)
            await self._open_producer()
        snapshot = await self._read_committed()
        self.ledger = PartitionLedger(snapshot)
        self._last_owner = snapshot.owner
        self.state = State.OWNED
        self._owned.set()
        self._loop_task = asyncio.get_running_loop().create_task(
            self._run(), name=f"writer-{self.tp.topic}-{self.tp.partition}"
        )
        return snapshot

    async def _open_producer(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        self._producer = self._factory(transactional_id(self.settings.group_id, self.tp))
        self._txns.reset(self._producer)
        await self._producer.start()  # init_transactions: bumps the epoch, fences the previous owner

    async def _read_committed(self) -> Snapshot:
        """The committed state, stable. A commit still pending once our producer is initialised
        is a transaction left hanging (`hanging.py`): end it, then read."""
        try:
            return await read_committed(self._fetch_committed, self.tp)
        except UnstableOffset:
            if self._producer is None or self._written_topics is None:
                raise
            log.warning(
                "the committed offset stayed unstable: ending a transaction left hanging",
                extra={"topic": self.tp.topic, "partition": self.tp.partition},
            )
        await heal(self._producer, self.settings.group_id, self._written_topics())
        return await read_committed(self._fetch_committed, self.tp)

    def suspend(self) -> None:
        """Revoked: keep finishing and committing, but hold new claims until the rebalance says."""
        if self.state is State.OWNED:
            self.state = State.SUSPENDED
            self._owned.clear()

    def reown(self) -> None:
        if self.state is State.SUSPENDED:
            self.state = State.OWNED
            self._owned.set()

    def hand_off(self) -> None:
        """Another replica owns it now: calls already claimed finish and commit (until fenced);
        requests waiting for a claim get `Revoked`."""
        if self.state in (State.OWNED, State.SUSPENDED, State.STARTING):
            self.state = State.HANDOFF
            self._owned.set()  # wake claim waiters so they see HANDOFF

    def take_transactions(self) -> int:
        """Transactions committed since the last call (for the metrics)."""
        n, self.transactions = self.transactions, 0
        return n

    @property
    def claims_in_flight(self) -> int:
        return 0 if self.ledger is None else len(self.ledger.claims)

    async def close(self) -> None:
        """Commit what is finished, then stop the producer."""
        if self.state is State.CLOSED:
            return
        self._closing = True  # the last tick begins nothing ahead
        if self._loop_task is not None and self.failure is None:
            with contextlib.suppress(Exception):
                await self._tick()
        self.state = State.CLOSED
        self._fail_all(Fenced(f"{self.tp} writer closed"))
        await self._claims.close(Fenced(f"{self.tp} writer closed"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        if self._producer is not None:
            producer, self._producer = self._producer, None
            with contextlib.suppress(Exception):
                await producer.stop()

    # -- what the pipeline calls ---------------------------------------------------------

    async def claim(self, offset: int, attempts: int) -> None:
        """Record that this request's call is about to start; returns once committed.
        Raises `Revoked` when the partition went elsewhere first, `Fenced` when lost."""
        while self.state is not State.OWNED:
            if self.state in (State.HANDOFF, State.CLOSED) or self.failure is not None:
                raise Revoked(f"{self.tp} is owned by another replica")
            await self._owned.wait()
        item = Item(offset, claim=Claim(offset, int(time.time() * 1000), attempts, self.owner))
        if not self._eos:
            return
        await self._submit(item)

    async def publish(self, offset: int, messages: Sequence[OutMessage], *, linger: bool = True) -> None:
        """Publish the request's outcome and mark it finished, atomically; returns once committed.
        With `linger` False it goes in the next transaction without waiting to share it (the
        transaction in flight, if any, ends first). Raises the broker's error for a message it
        refused (the caller makes a smaller outcome), or `Fenced`."""
        await self._submit(Item(offset, messages=messages, finish=True), hurry=not linger)

    def skip(self, offset: int) -> None:
        """A record the previous owner finished: counted done without any call or outcome."""
        assert self.ledger is not None
        self.ledger.start(offset)
        self.ledger.apply([offset], [], self.ledger.seq)

    async def _submit(self, item: Item, hurry: bool = False) -> None:
        if self.failure is not None or self.state is State.CLOSED:
            raise Fenced(f"{self.tp} is no longer written from here")
        if hurry or (not self._queue and not self._tick_lock.locked()):
            self._hurry.set()
        self._queue.append(item)
        self._wake.set()
        await item.done

    # -- the tick ------------------------------------------------------------------------

    async def _run(self) -> None:
        tick_s = self.settings.eos_tick_ms / 1000
        heartbeat_s = self.settings.eos_heartbeat_s
        try:
            while True:
                idle = self._txns.idle_for()
                wait_s = heartbeat_s if idle is None else min(heartbeat_s, max(idle, 0.0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait_s)
                # an item that finds the writer idle goes at once; what comes while a tick is
                # in flight is gathered into the next one, which waits at most `eos_tick_ms`
                # after the previous one ended, unless an item that may not wait comes
                linger = tick_s - (time.monotonic() - self._last_tick)
                if linger > 0 and not self._hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), timeout=linger)
                self._hurry.clear()
                self._wake.clear()
                beat = (
                    self._eos
                    and self.claims_in_flight > 0
                    and time.monotonic() - self._last_tick >= heartbeat_s
                )
                if self._queue or beat:
                    await self._tick()
                else:
                    await self._end_idle()
        except asyncio.CancelledError:
            raise
        except Fenced as exc:
            self._die(exc)
        except Exception as exc:  # never silent: the loop replaces this writer
            log.exception(
                "partition writer failed", extra={"topic": self.tp.topic, "partition": self.tp.partition}
            )
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        self.failure = exc
        self._fail_all(
            exc if isinstance(exc, Fenced) else Fenced(f"{self.tp} writer failed: {type(exc).__name__}")
        )

    def _fail_all(self, exc: BaseException) -> None:
        self._claims.fail(exc)
        items, self._queue = self._queue, []
        fail(items, exc)

    async def _tick(self) -> None:
        ledger = self.ledger
        assert ledger is not None
        async with self._tick_lock:  # one transaction at a time (the loop, and `close`)
            items, self._queue = self._queue, []
            try:
                if self._eos:
                    await self._tick_transactional(ledger, items)
                else:
                    await self._tick_plain(ledger, items)
            except BaseException as exc:  # no waiter may hang on a tick that died
                lost = (
                    exc
                    if isinstance(exc, Fenced)
                    else Fenced(f"{self.tp}: tick failed: {type(exc).__name__}")
                )
                fail(items, lost)
                raise
            self._last_tick = time.monotonic()

    def _contents(self, ledger: PartitionLedger, items: list[Item]) -> TickContents:
        tick = TickContents(ledger, self.owner, self.settings.eos_max_claims, items)
        self._queue.extend(tick.left)
        return tick

    async def _tick_transactional(self, ledger: PartitionLedger, items: list[Item]) -> None:
        tick = self._contents(ledger, items)
        taken = tick.items

        def join() -> list[Item]:  # while the transaction's partitions are being added
            late = tick.join(self._queue)
            items.extend(late)  # `_tick` fails them too if the tick dies
            return late

        try:
            refused, resend = await self._txns.send(taken, join, lambda: tick.offsets(self.tp))
            if refused or resend:
                # the idempotent sequence is broken past a refused batch: abort, start afresh
                with contextlib.suppress(KafkaError):
                    await self._txns.abort()
                await self._reopen_verified(ledger, taken, tick.snap)
                return
            failpoints.hit("tick.sent")
            await self._txns.commit()
            failpoints.hit("tick.committed")
        except ProducerFenced as exc:
            raise Fenced(f"{self.tp}: a newer owner initialised its producer") from exc
        except KafkaError as exc:
            log.warning(
                "transaction failed; verifying what was committed",
                extra={"topic": self.tp.topic, "partition": self.tp.partition, "error": type(exc).__name__},
            )
            await self._reopen_verified(ledger, taken, tick.snap)
            return
        self.transactions += 1
        self._failures = 0
        self._settle(ledger, taken, tick.snap)
        if not self._closing and self.state in (State.OWNED, State.SUSPENDED):
            await self._begin_ahead()

    async def _begin_ahead(self) -> None:
        try:
            await self._txns.begin_ahead(expected=self.claims_in_flight > 0)
        except ProducerFenced as exc:
            raise Fenced(f"{self.tp}: a newer owner initialised its producer") from exc

    async def _end_idle(self) -> None:
        """End the transaction begun ahead if nothing came for it (the writer stays idle)."""
        async with self._tick_lock:
            if self._queue:
                return
            try:
                await self._txns.end_idle()
            except ProducerFenced as exc:
                raise Fenced(f"{self.tp}: a newer owner initialised its producer") from exc

    async def mark(self, partitions: list[TopicPartition]) -> None:
        """Commit a transaction holding `partitions` (the one begun ahead, if open): its markers
        end whatever this producer id left hanging there (`hanging.watch`)."""
        if not self._eos:
            return
        async with self._tick_lock:  # not while it starts (its producer is initialised then)
            live = self.state in (State.OWNED, State.SUSPENDED, State.HANDOFF)
            if live and self.failure is None and self._producer is not None:
                await self._txns.mark(partitions)

    async def _reopen_verified(self, ledger: PartitionLedger, taken: list[Item], snap: Snapshot) -> None:
        """After a failed or aborted tick: re-initialise the producer (which completes or
        aborts the open transaction), read the commit, and go on only if it is still ours.
        Then the tick's items either committed (settled now) or go back in the queue."""
        if self.state is not State.OWNED and self.state is not State.SUSPENDED:
            raise Fenced(f"{self.tp}: transaction failed during handoff")
        self._failures += 1
        delay = min(5.0, 0.05 * 2**self._failures)
        while True:
            try:
                await self._open_producer()
                committed = await self._read_committed()
                break
            except KafkaError as exc:
                log.warning("writer recovery failed, retrying", extra={"error": type(exc).__name__})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if committed.owner == self.owner and committed.seq == snap.seq and committed.commit == snap.commit:
            self._settle(ledger, taken, snap, seen=True)  # it did commit (read stable: seen)
            return
        if committed.seq != ledger.seq or committed.owner != self._last_owner:
            raise Fenced(f"{self.tp}: the committed state was written by another owner")
        self._queue[:0] = [i for i in taken if not i.done.done()]  # it did not commit: again
        if self._failures > 1:
            await asyncio.sleep(delay)
        self._wake.set()

    def _settle(self, ledger: PartitionLedger, taken: list[Item], snap: Snapshot, seen: bool = False) -> None:
        """Committed: outcomes are done; claims are done once the commit is seen (`claims_seen`)."""
        self._last_owner = snap.owner
        ledger.apply(
            [i.offset for i in taken if i.finish], [i.claim for i in taken if i.claim is not None], snap.seq
        )
        unseen: list[Item] = []
        for item in taken:
            if item.done.done():
                continue
            if item.claim is not None and self._eos and not seen:
                unseen.append(item)
            else:
                item.done.set_result(None)
        if unseen:
            self._claims.add(snap.seq, unseen)

    async def _tick_plain(self, ledger: PartitionLedger, items: list[Item]) -> None:
        producer = self._shared
        assert producer is not None
        assert self._commit_offsets is not None
        refused, resend = await send_all(producer, items)
        self._queue[:0] = resend  # at-least-once: sent again alone on the next tick
        ok = [i for i in items if i not in refused and i not in resend]
        tick = self._contents(ledger, ok)
        self._settle(ledger, tick.items, tick.snap)
        try:
            await self._commit_offsets(self.tp, tick.snap.commit, tick.metadata)
        except KafkaError as exc:  # at-least-once: a later commit covers it
            log.warning("offset commit failed", extra={"topic": self.tp.topic, "error": type(exc).__name__})
