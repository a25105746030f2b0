"""The partition writer's tick (service/ingest/partition.py): what one transaction carries,
how it is sent while the one before commits (`turns.py`), and how a tick that failed is
checked against the committed state.

`TickWriter` is the half of `PartitionWriter` that runs ticks; the writer's lifecycle, the
pipeline's calls and the loop are in partition.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from enum import Enum

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from service.config.settings import KafkaSettings
from service.ingest import failpoints
from service.ingest.claims_seen import ClaimsSeen
from service.ingest.ledger import PartitionLedger, Snapshot
from service.ingest.sending import Item, fail, send_all
from service.ingest.tick import TickContents
from service.ingest.transactions import Offsets
from service.ingest.turns import Committing, Turns

log = logging.getLogger("service.ingest.partition")

CommitOffsets = Callable[[TopicPartition, int, str], Awaitable[None]]
"""At-least-once mode: commit (offset, metadata) with the consumer."""


class Fenced(Exception):
    """Another owner holds this partition: nothing may be published from here.
    The request is left to that owner (its claim, if any, resolved by policy there)."""


class State(Enum):
    STARTING = "starting"
    OWNED = "owned"
    SUSPENDED = "suspended"  # revoked, the rebalance not finished: new claims wait
    HANDOFF = "handoff"  # another replica owns it: finish claimed calls, refuse new ones
    CLOSED = "closed"


class TickWriter:
    """Ticks of one partition's writer: the state they share with `PartitionWriter`."""

    tp: TopicPartition
    settings: KafkaSettings
    owner: str
    ledger: PartitionLedger | None
    state: State
    transactions: int
    failure: BaseException | None
    _eos: bool
    _shared: AIOKafkaProducer | None
    _commit_offsets: CommitOffsets | None
    _turns: Turns
    _claims: ClaimsSeen
    _queue: list[Item]
    _wake: asyncio.Event
    _hurry: asyncio.Event
    _tick_lock: asyncio.Lock
    _last_tick: float
    _failures: int
    _last_owner: str
    """Who wrote the latest commit we know of (ours once we committed)."""
    _closing: bool
    _ours_while_stopping: Callable[[], bool] | None
    """Handed off by our own stop: whether the group still assigns the partition here."""

    async def _open_producer(self) -> None:
        raise NotImplementedError

    async def _read_committed(self) -> Snapshot:
        raise NotImplementedError

    @property
    def _holds_claims(self) -> bool:
        """Queued claims wait (`TickContents(hold_claims=...)`): the partition was revoked."""
        return self.state is not State.OWNED

    @property
    def claims_in_flight(self) -> int:
        return 0 if self.ledger is None else len(self.ledger.claims)

    async def _tick(self) -> None:
        ledger = self.ledger
        assert ledger is not None
        async with self._tick_lock:  # one tick at a time (the loop, and `close`)
            items, self._queue = self._queue, []
            prior = self._turns.committing
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
                if prior is not None:
                    fail(prior.taken, lost)
                raise
            self._last_tick = time.monotonic()

    def _contents(self, ledger: PartitionLedger, items: list[Item], base: Committing | None) -> TickContents:
        tick = TickContents(
            ledger,
            self.owner,
            self.settings.eos_max_claims,
            items,
            None if base is None else base.tick,
            hold_claims=self._holds_claims,
        )
        self._queue.extend(tick.left)
        return tick

    async def _tick_transactional(self, ledger: PartitionLedger, items: list[Item]) -> None:
        turns = self._turns
        txns = turns.next()
        prior = turns.committing
        if prior is not None and prior.txns is txns:  # one producer: its commit ends first
            await self._resolve_committing(wait=True)
            prior = None
        tick = self._contents(ledger, items, prior)
        taken = tick.items

        def join() -> list[Item]:  # while the transaction's partitions are being added
            late = tick.join(self._queue)
            items.extend(late)  # `_tick` fails them too if the tick dies
            return late

        try:
            try:
                refused, resend = await txns.send(taken, join, lambda: tick.offsets(self.tp))
                failed = bool(refused or resend)  # the idempotent sequence is broken past a refused batch
            except KafkaError as exc:
                if isinstance(exc, ProducerFenced):
                    raise
                self._warn_failed(exc)
                failed = True
            if not failed:
                failpoints.hit("tick.sent")
            if prior is not None and not await self._resolve_committing(wait=True):
                # the tick before failed: the producers were initialised again, which aborted
                # this one's transaction; its items go again after that tick's
                self._requeue(taken)
                return
            if failed:
                with contextlib.suppress(KafkaError):
                    await txns.abort()
                await self._reopen_verified(ledger, taken, tick.snap)
                return
        except ProducerFenced as exc:
            raise self._fenced() from exc
        committing = turns.committing = Committing(txns, tick)
        committing.task = asyncio.get_running_loop().create_task(self._commit(ledger, committing))
        committing.task.add_done_callback(self._committed)
        turns.advance()
        if turns.next() is not txns:
            # only if a tick is to come: a call whose claim stays in flight once this commits,
            # or items waiting (the last outcome of a quiet partition begins none, to be ended idle)
            await self._begin_ahead(bool(tick.snap.claims or self._queue), tick.offsets(self.tp))

    async def _commit(self, ledger: PartitionLedger, committing: Committing) -> None:
        """Commit a sent tick (the next one may be sent meanwhile) and settle it."""
        await committing.txns.commit()
        failpoints.hit("tick.committed")
        self.transactions += 1
        self._failures = 0
        self._settle(ledger, committing.taken, committing.tick.snap)
        if self._turns.next() is committing.txns and not self._closing:  # one producer
            # begins after this commit; its failure is its own (`_begin_ahead`), not the commit's
            await self._begin_ahead(None, committing.tick.offsets(self.tp))
            self._wake.set()  # the loop's wait is now until it is to be ended, if nothing comes

    def _committed(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is not None:  # retrieved; the loop verifies it
            self._hurry.set()
            self._wake.set()

    async def _resolve_committing(self, wait: bool = False) -> bool:
        """The tick committing, if it ended (or once it has, with `wait`): settled when it
        committed; when it failed, the producers are initialised again and the committed state
        decides (`_reopen_verified`). Returns False if it failed."""
        committing = self._turns.committing
        if committing is None or not (wait or committing.task.done()):
            return True
        self._turns.committing = None
        try:
            await asyncio.shield(committing.task)
            return True
        except ProducerFenced as exc:
            fenced = self._fenced()
            fail(committing.taken, fenced)
            raise fenced from exc
        except KafkaError as exc:
            self._warn_failed(exc)
        assert self.ledger is not None
        await self._reopen_verified(self.ledger, committing.taken, committing.tick.snap)
        return False

    def _fenced(self) -> Fenced:
        return Fenced(f"{self.tp}: a newer owner initialised its producer")

    def _warn_failed(self, exc: BaseException) -> None:
        log.warning(
            "transaction failed; verifying what was committed",
            extra={"topic": self.tp.topic, "partition": self.tp.partition, "error": type(exc).__name__},
        )

    async def _resolve_in_turn(self, wait: bool = False) -> bool:
        async with self._tick_lock:
            return await self._resolve_committing(wait)

    def _requeue(self, taken: list[Item]) -> None:
        self._queue[:0] = [i for i in taken if not i.done.done()]
        self._wake.set()

    async def _begin_ahead(self, expected: bool | None, offsets: Offsets) -> None:
        """Begin the next producer's transaction ahead if a tick is `expected` (None: if claims
        are in flight, as the ledger has them once the last commit was applied) or ticks come
        often (`Transactions.begin_ahead`). `offsets`: the offset commit of the tick just sent,
        written again in the one begun ahead."""
        if self._closing or self.state not in (State.OWNED, State.SUSPENDED):
            return
        if expected is None:
            expected = self.claims_in_flight > 0
        try:
            await self._turns.next().begin_ahead(expected, offsets)
        except ProducerFenced as exc:
            raise self._fenced() from exc
        except KafkaError as exc:  # nothing in it yet: the next tick on it fails, and recovers
            log.warning("beginning a transaction ahead failed", extra={"error": type(exc).__name__})

    async def _end_idle(self) -> None:
        """End a transaction begun ahead if nothing came for it (the writer stays idle)."""
        async with self._tick_lock:
            idle = self._turns.idle_for()
            if self._queue or idle is None or idle > 0:
                return
            # not before the tick committing: the transaction begun ahead holds its offsets
            if not await self._resolve_committing(wait=True):
                return
            try:
                await self._turns.end_idle()
            except ProducerFenced as exc:
                raise self._fenced() from exc
            except KafkaError as exc:
                # it held nothing new (the last tick's offsets again): committed or not, the
                # state is as before; new producers, and on if that state is still ours
                self._warn_failed(exc)
                assert self.ledger is not None
                committed, _ = await self._reopen()
                self._still_ours(self.ledger, committed)

    async def mark(self, partitions: list[TopicPartition], pids: Collection[int] | None = None) -> bool:
        """Commit a transaction holding `partitions` on each producer (the one begun ahead, if
        open), or on those with one of `pids`: its markers end whatever that producer id
        left hanging there (`hanging.watch`). True if one was committed."""
        if not self._eos or not self._turns.holds(pids):
            return False
        async with self._tick_lock:  # not while it starts (its producers are initialised then)
            await self._resolve_committing(wait=True)
            live = self.state in (State.OWNED, State.SUSPENDED, State.HANDOFF)
            if live and self.failure is None and self._turns.started:
                return await self._turns.mark(partitions, pids)
        return False

    async def _reopen_verified(self, ledger: PartitionLedger, taken: list[Item], snap: Snapshot) -> None:
        """After a failed or aborted tick: re-initialise the producer (which completes or
        aborts the open transaction), read the commit, and go on only if it is still ours.
        Then the tick's items either committed (settled now) or go back in the queue."""
        committed, delay = await self._reopen()
        if committed.owner == self.owner and committed.seq == snap.seq and committed.commit == snap.commit:
            self._settle(ledger, taken, snap, seen=True)  # it did commit (read stable: seen)
            return
        self._still_ours(ledger, committed)
        self._requeue(taken)  # it did not commit: again
        if self._failures > 1:
            await asyncio.sleep(delay)

    async def _reopen(self) -> tuple[Snapshot, float]:
        """Re-initialise the producers, retrying with backoff until the brokers answer, and
        read the commit: (it, the next backoff). Not once the partition is another's: their
        initialisation would fence its new owner."""
        self._failures += 1
        delay = min(5.0, 0.05 * 2**self._failures)
        while True:
            if not self._may_reopen():
                raise Fenced(f"{self.tp}: transaction failed during handoff")
            try:
                await self._open_producer()
                return await self._read_committed(), delay
            except KafkaError as exc:
                log.warning("writer recovery failed, retrying", extra={"error": type(exc).__name__})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _may_reopen(self) -> bool:
        """Whether initialising the producers fences no one but ourselves: the partition is
        ours, or it is handed off only because we stop and the group still assigns it here
        (a broker restart during the drain must not lose the answers of the calls finishing)."""
        if self.state is State.OWNED or self.state is State.SUSPENDED:
            return True
        stopping = self._ours_while_stopping
        return self.state is State.HANDOFF and stopping is not None and stopping()

    def _still_ours(self, ledger: PartitionLedger, committed: Snapshot) -> None:
        if committed.seq != ledger.seq or committed.owner != self._last_owner:
            raise Fenced(f"{self.tp}: the committed state was written by another owner")

    def _settle(self, ledger: PartitionLedger, taken: list[Item], snap: Snapshot, seen: bool = False) -> None:
        """Committed: outcomes are done; claims are done once the commit is seen (`claims_seen`)."""
        self._last_owner = snap.owner
        ledger.apply(
            [i.offset for i in taken if i.finish],
            [i.claim for i in taken if i.claim is not None],
            snap.seq,
            [i.offset for i in taken if i.release],
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
        tick = self._contents(ledger, ok, None)
        self._settle(ledger, tick.items, tick.snap)
        try:
            await self._commit_offsets(self.tp, tick.snap.commit, tick.metadata)
        except KafkaError as exc:  # at-least-once: a later commit covers it
            log.warning("offset commit failed", extra={"topic": self.tp.topic, "error": type(exc).__name__})
