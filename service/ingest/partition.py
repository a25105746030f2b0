"""The writer of one owned request partition: claims, outcomes and offsets in one transaction.

Exactly-once (`kafka.exactly_once`, the default) works per input partition:

- Transactional producers whose `transactional_id`s are derived from the group,
  topic and partition. Initialising them on assignment fences the previous
  owner: a zombie can no longer commit for this partition (the first
  exactly-once design of Kafka Streams; aiokafka has no KIP-447). They take
  turns (`turns.py`): the next tick is sent while the last one commits.
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
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaProducer, TopicPartition

from service.config.kafka import transactional_producer
from service.config.settings import KafkaSettings
from service.ingest.claims_seen import ClaimsSeen
from service.ingest.ledger import Claim, PartitionLedger, Snapshot
from service.ingest.sending import Item, OutMessage, fail
from service.ingest.stable_offsets import UnstableOffset
from service.ingest.takeover import CommitPending, FetchCommitted, await_handoff, read_committed
from service.ingest.turns import Turns
from service.ingest.writer_tick import CommitOffsets, Fenced, State, TickWriter

__all__ = ["CommitOffsets", "Fenced", "PartitionWriter", "Revoked", "State", "transactional_id"]

log = logging.getLogger(__name__)


class Revoked(Exception):
    """The partition went to another replica before this request's call started;
    the new owner processes it (nothing was billed)."""


def transactional_id(group_id: str, tp: TopicPartition) -> str:
    return f"{group_id}.{tp.topic}.{tp.partition}"


class PartitionWriter(TickWriter):
    """Claims and outcomes of one partition, committed with its offset and metadata."""

    def __init__(
        self,
        tp: TopicPartition,
        settings: KafkaSettings,
        owner: str,
        fetch_committed: FetchCommitted,
        *,
        commit_pending: CommitPending | None = None,
        shared_producer: AIOKafkaProducer | None = None,
        commit_offsets: CommitOffsets | None = None,
        producer_factory: Callable[[str], AIOKafkaProducer] | None = None,
        written_topics: Callable[[], list[str]] | None = None,
    ) -> None:
        self.tp = tp
        self.settings = settings
        self.owner = owner
        self._fetch_committed = fetch_committed
        self._commit_pending = commit_pending
        """Whether an offset commit is pending (the takeover waits for a live owner's)."""
        self._eos = settings.exactly_once
        self._shared = shared_producer
        self._commit_offsets = commit_offsets
        self._factory = producer_factory or self._new_producer
        self._written_topics = written_topics
        """The topics this writer's transactions may have written (to end one left hanging)."""
        self._turns = Turns(
            settings.group_id,
            transactional_id(settings.group_id, tp),
            settings.eos_producers,
            settings.eos_prepared_idle_ms / 1000,
            self._factory,
        )
        self._claims = ClaimsSeen(tp, owner, fetch_committed, lambda: self.mark([]), Fenced)
        """Committed claims whose calls wait until the commit is seen (`claims_seen.py`)."""
        self.ledger: PartitionLedger | None = None
        self.state = State.STARTING
        self._queue: list[Item] = []
        self._wake = asyncio.Event()
        self._owned = asyncio.Event()
        self.handed_off = asyncio.Event()
        """Set once another replica owns the partition (or the writer closed): calls not yet
        made here are left to it."""
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
        self._ours_while_stopping: Callable[[], bool] | None = None
        self._passed = False
        """The commit point moved past offsets holding no record (`passed`) since the last tick."""
        self._left_unknown: set[tuple[int, int]] = set()
        """(offset, attempts) of our claims left on purpose to the next owner: their last
        call's outcome was unknown and their partner's policy allows one extra call (`leave`)."""

    # -- lifecycle ---------------------------------------------------------------------

    def _new_producer(self, txn_id: str) -> AIOKafkaProducer:
        return transactional_producer(self.settings, txn_id)

    async def start(self) -> Snapshot:
        """Take the partition over: wait briefly for a live previous owner's calls, fence
        it, and read what it committed. Returns the restored state (seek to its commit)."""
        if self._eos:
            await await_handoff(
                self._fetch_committed, self.tp, self.settings, self.owner, self._commit_pending
            )
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

    def read_from_start(self) -> Snapshot:
        """The committed state is of a log that is gone (`Ownership._beyond_the_end`): start
        with none, before any record (the partition is read from its beginning)."""
        snapshot = Snapshot(-1, owner=self.owner)
        self.ledger = PartitionLedger(snapshot)
        return snapshot

    async def _open_producer(self) -> None:
        await self._turns.open()  # init_transactions: bumps the epochs, fences the previous owner

    async def _read_committed(self) -> Snapshot:
        """The committed state, stable. A commit still pending once our producer is initialised
        is a transaction left hanging (`hanging.py`): end it, then read."""
        try:
            return await read_committed(self._fetch_committed, self.tp)
        except UnstableOffset:
            if not self._turns.started or self._written_topics is None:
                raise
            log.warning(
                "the committed offset stayed unstable: ending a transaction left hanging",
                extra={"topic": self.tp.topic, "partition": self.tp.partition},
            )
        await self._turns.heal(self._written_topics())
        return await read_committed(self._fetch_committed, self.tp)

    def suspend(self) -> None:
        """Revoked: keep finishing and committing, but hold new claims until the rebalance says."""
        if self.state is State.OWNED:
            self.state = State.SUSPENDED
            self._owned.clear()

    async def settle(self, timeout_s: float) -> None:
        """Revoked: wait (at most `timeout_s`) for the tick being sent or committed, which may
        carry claims taken before the revocation, to commit. The group moves the partition on
        only once we return (we rejoin after the revocation), so the next owner's handoff check
        finds those claims committed or pending, never one committing behind its back (which
        it would fence after a call was made here: an unknown outcome in a graceful rebalance)."""

        if not self._eos:  # at-least-once: calls do not wait for their claims' commit anyway
            return

        async def sent_and_committed() -> None:
            async with self._tick_lock:  # the tick being sent
                committing = self._turns.committing
            if committing is not None:
                await asyncio.wait([committing.task])

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sent_and_committed(), timeout_s)

    def reown(self) -> None:
        if self.state is State.SUSPENDED:
            self.state = State.OWNED
            self._owned.set()
            self._wake.set()  # the claims held while it was revoked go now

    def hand_off(self, ours_while_stopping: Callable[[], bool] | None = None) -> None:
        """Another replica owns it now: calls already claimed finish and commit (until fenced);
        requests waiting for a claim get `Revoked`. Handed off because this replica stops,
        `ours_while_stopping` tells whether the group still assigns it here: while it does,
        a failed transaction is recovered as by an owner (`_may_reopen`)."""
        if self.state in (State.OWNED, State.SUSPENDED, State.STARTING):
            self.state = State.HANDOFF
            self._ours_while_stopping = ours_while_stopping
            self._owned.set()  # wake claim waiters so they see HANDOFF
            self.handed_off.set()  # and retries waiting out their delay
            self._revoke_queued_claims()

    def _revoke_queued_claims(self) -> None:
        """Claims queued before the hand-off (held since the revocation, `tick.py`, or back
        from a failed tick): never committed, their calls never made; the next owner makes them."""
        held = [i for i in self._queue if i.claim is not None]
        self._queue = [i for i in self._queue if i.claim is None]
        fail(held, Revoked(f"{self.tp} is owned by another replica"))

    def _requeue(self, taken: list[Item]) -> None:
        super()._requeue(taken)
        if self.state is State.HANDOFF:  # recovered during our own stop (`_may_reopen`)
            self._revoke_queued_claims()

    def own_claims(self) -> int:
        """Claims of ours committed and not resolved whose answers we had and did not publish
        (not those left on purpose with an unknown outcome: `left_unknown`)."""
        return sum(not left for left in self._own_claims())

    def left_unknown(self) -> int:
        """Claims of ours still committed that `leave` left to the next owner."""
        return sum(self._own_claims())

    def _own_claims(self) -> list[bool]:
        ledger = self.ledger
        if ledger is None:
            return []
        left = self._left_unknown
        return [(c.offset, c.attempts) in left for c in ledger.claims.values() if c.owner == self.owner]

    def leave(self, offset: int, attempts: int) -> None:
        """The request's last call under our claim had an unknown outcome and its retry is left
        to the partition's next owner (we stop, or the partition went elsewhere): the claim
        stays committed, so that owner makes the one extra call `on_unknown: retry` allows."""
        ledger = self.ledger
        claim = None if ledger is None else ledger.claims.get(offset)
        if claim is None or claim.owner != self.owner or claim.attempts != attempts:
            return
        self._left_unknown.add((offset, attempts))
        log.info(
            "a call of unknown outcome is left to the partition's next owner for its extra call",
            extra={"topic": self.tp.topic, "partition": self.tp.partition, "offset": offset},
        )

    def take_transactions(self) -> int:
        """Transactions committed since the last call (for the metrics)."""
        n, self.transactions = self.transactions, 0
        return n

    async def close(self, timeout_s: float | None = None) -> None:
        """Commit what is finished (for at most `timeout_s`: a tick waiting for a broker that
        is away waits without end), then stop the producer."""
        if self.state is State.CLOSED:
            return
        self._closing = True  # the last tick begins nothing ahead
        if self._loop_task is not None and self.failure is None:
            deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
            with contextlib.suppress(Exception):
                async with asyncio.timeout_at(deadline):
                    await self._tick()
            with contextlib.suppress(Exception):
                async with asyncio.timeout_at(deadline):
                    await self._resolve_in_turn(wait=True)
        self.state = State.CLOSED
        self.handed_off.set()
        self._fail_all(Fenced(f"{self.tp} writer closed"))
        await self._claims.close(Fenced(f"{self.tp} writer closed"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        await self._turns.stop()

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

    async def release(self, offset: int) -> None:
        """Drop this request's committed claim, unfinished: its last call was answered with an
        error (nothing billed) and it is left to the partition's next owner, which then calls
        it afresh instead of taking its outcome for unknown. Returns once committed."""
        if self._eos:
            await self._submit(Item(offset, release=True), hurry=True)
            log.info(
                "claim released: the request is left to the partition's next owner",
                extra={"topic": self.tp.topic, "partition": self.tp.partition, "offset": offset},
            )

    async def publish(self, offset: int, messages: Sequence[OutMessage], *, linger: bool = True) -> None:
        """Publish the request's outcome and mark it finished, atomically; returns once committed.
        With `linger` False it goes in the next transaction without waiting to share it (the
        transaction in flight, if any, ends first). Raises the broker's error for a message it
        refused (the caller makes a smaller outcome), or `Fenced`."""
        await self._submit(Item(offset, messages=messages, finish=True), hurry=not linger)

    def passed(self, position: int) -> None:
        """The consumer's position on this partition, every record below it dispatched: the
        commit point passes what lies between (`PartitionLedger.pass_to`). With nothing else
        to commit, a tick commits it within `eos_heartbeat_s`."""
        if self.ledger is not None and self.state is State.OWNED and self.ledger.pass_to(position):
            self._passed = True

    def skip(self, offset: int) -> None:
        """A record the previous owner finished: counted done without any call or outcome."""
        assert self.ledger is not None
        self.ledger.start(offset)
        self.ledger.apply([offset], [], self.ledger.seq)

    async def _submit(self, item: Item, hurry: bool = False) -> None:
        if self.failure is not None or self.state is State.CLOSED:
            raise Fenced(f"{self.tp} is no longer written from here")
        committing = self._turns.committing
        ended = committing is None or committing.task.done()
        if hurry or (not self._queue and not self._tick_lock.locked() and ended):
            self._hurry.set()
        self._queue.append(item)
        self._wake.set()
        await item.done

    # -- the tick ------------------------------------------------------------------------

    async def _run(self) -> None:
        tick_s = self.settings.eos_tick_ms / 1000
        heartbeat_s = self.settings.eos_heartbeat_s
        try:
            # not `while True`: on Python 3.11 a cancel that meets the wake being set is lost
            # inside `wait_for` (it returns instead), and `close` would wait for this for good
            while self.state is not State.CLOSED:
                idle = self._turns.idle_for()
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
                await self._resolve_in_turn()  # if it failed: verified, its items again
                beat = (
                    self._passed or (self._eos and self.claims_in_flight > 0)
                ) and time.monotonic() - self._last_tick >= heartbeat_s
                if self._sendable() or beat:
                    self._passed = False  # every tick commits the latest commit point
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

    def _sendable(self) -> bool:
        """Something queued can go in a tick: not only claims held while revoked."""
        if self._holds_claims:
            return any(i.claim is None for i in self._queue)
        return bool(self._queue)

    def _die(self, exc: BaseException) -> None:
        self.failure = exc
        self._fail_all(
            exc if isinstance(exc, Fenced) else Fenced(f"{self.tp} writer failed: {type(exc).__name__}")
        )

    def _fail_all(self, exc: BaseException) -> None:
        self._claims.fail(exc)
        items, self._queue = self._queue, []
        fail(items, exc)
        committing, self._turns.committing = self._turns.committing, None
        if committing is not None:
            fail(committing.taken, exc)
