"""Which request partitions this replica owns, their writers, and the requests on each.

- A partition assigned to us gets a `PartitionWriter`. It is *ready* (fetched)
  only once the writer has fenced the previous owner, read what it committed,
  and the consumer's position is set to that commit point.
- Revocation does not wait for calls (a slow revocation stalls the whole group):
  the writer keeps committing what finishes, new claims wait for the assignment;
  only a tick already carrying claims commits first (milliseconds), so the next
  owner's handoff check sees every claim we will call. If the partition comes
  back, nothing is lost.
- A partition that went elsewhere is *retired*: requests that never asked for
  a claim are cancelled (the new owner does them, nothing was billed), claimed
  calls finish and publish until the new owner fences this one, then the
  writer closes.
- A writer that stopped (an unverifiable transaction failure) is replaced if
  the partition is still ours: the new one reads the committed state again.
- Once draining, nothing opens: a partition assigned to a replica on its way
  out (a rebalance between the drain and the consumer leaving the group) waits
  for the next owner. Opening it would fence nobody useful, and its producer
  would outlive the consumer it reads commits through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from service.config.settings import GatewaySettings
from service.egress.publisher import Publisher
from service.ingest.hanging import HANGING_AFTER_S, written_topics
from service.ingest.ledger import Claim
from service.ingest.partition import PartitionWriter, State
from service.ingest.sending import OutMessage
from service.ingest.stable_offsets import commit_pending, fetch_committed_stable

log = logging.getLogger(__name__)

WRITER_RETRY_S = 1.0
END_TRIES = 6
"""Times a takeover asks the partition's end offset (`_beyond_the_end`), 1 s, 2 s, ... apart."""
REVOKE_SETTLE_MAX_S = 5.0
"""How long a revocation waits for a tick carrying claims to commit (a transaction: ms)."""
CLOSE_AFTER_DRAIN_S = 2.0
"""Once the drain timed out, how long the writers get to commit what finished."""


class RecordSink:
    """Where one record's claim and outcome go: its partition's writer."""

    def __init__(self, writer: PartitionWriter, offset: int, inherited: Claim | None) -> None:
        self._writer = writer
        self.offset = offset
        self.inherited = inherited
        """A claim left by an owner that is gone: the call may already have been made."""
        self.claiming = False
        """A claim was asked for: it may commit, so the task must not be cancelled any more
        (a committed claim without its call would read as an unknown outcome)."""
        self.claimed = False
        self.attempts = inherited.attempts if inherited is not None else 0
        """The attempt count of the latest claim: calls that may have been billed."""
        self.owner = writer.owner

    async def claim(self, attempts: int) -> None:
        self.claiming = True
        await self._writer.claim(self.offset, attempts)
        self.claimed = True
        self.attempts = attempts

    @property
    def handed_off(self) -> bool:
        return self._writer.handed_off.is_set()

    async def backoff(self, delay_s: float) -> None:
        """Wait before a retry; cut short when the partition goes to another replica (which
        then gets the retry, `release`) rather than hold its takeover for the delay."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._writer.handed_off.wait(), delay_s)

    async def release(self) -> None:
        """Our claim's last call was answered unbilled and the request is left to the next
        owner: drop the claim (committed), so that owner calls it afresh."""
        await self._writer.release(self.offset)
        self.claimed = False

    def leave(self) -> None:
        """Our claim's last call had an unknown outcome and its retry is left to the next
        owner: the claim stays, and the stop does not count it as an answer lost."""
        self._writer.leave(self.offset, self.attempts)

    async def publish(self, messages: list[OutMessage], *, linger: bool = False) -> None:
        """The outcome of a record that made no call (a cache hit, a rejection) does not wait
        for the tick's linger unless asked to (`linger`): its publish is all its latency."""
        await self._writer.publish(self.offset, messages, linger=linger or self.claiming)


class Ownership:
    def __init__(
        self,
        settings: Callable[[], GatewaySettings],
        consumer: Callable[[], AIOKafkaConsumer],
        owner: str,
        publisher: Publisher | None = None,
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self.owner = owner
        self._publisher = publisher
        self.writers: dict[TopicPartition, PartitionWriter] = {}
        self.ready: set[TopicPartition] = set()
        self._starting: dict[TopicPartition, asyncio.Task[None]] = {}
        self.retiring: set[asyncio.Task[None]] = set()
        self._retiring_by_tp: dict[TopicPartition, asyncio.Task[None]] = {}
        """The last retired writer of each partition, while it finishes its calls."""
        self.sinks: dict[TopicPartition, dict[int, tuple[RecordSink, asyncio.Task[None]]]] = defaultdict(dict)
        self.closed = False
        """Draining or stopped: no writer opens any more."""
        self._retaking: dict[TopicPartition, int] = {}
        """Partitions taken over again after their writer failed: our claims it left."""

    def writer(self, tp: TopicPartition) -> PartitionWriter | None:
        """The partition's writer if records may be dispatched to it now."""
        writer = self.writers.get(tp)
        if writer is None or tp not in self.ready or writer.state is not State.OWNED:
            return None
        return writer

    # -- rebalances ---------------------------------------------------------------------

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """New claims wait; a tick already carrying claims commits before we rejoin the group
        (`PartitionWriter.settle`), milliseconds. Nothing else is waited for."""
        writers = [w for w in (self.writers.get(tp) for tp in revoked) if w is not None]
        for writer in writers:
            writer.suspend()
        await asyncio.gather(*(w.settle(REVOKE_SETTLE_MAX_S) for w in writers))

    def on_assigned(self, assigned: list[TopicPartition]) -> list[TopicPartition]:
        """Keep, open or retire writers; returns the partitions no longer ours."""
        if self.closed:
            return []
        keep = set(assigned)
        gone = [tp for tp in self.writers if tp not in keep]
        existing = self._existing_topics()
        for tp in gone:
            writer = self.writers.pop(tp)
            self.ready.discard(tp)
            starting = self._starting.pop(tp, None)
            if starting is not None:
                starting.cancel()
            self._retaking.pop(tp, None)
            self.retire(writer, deleted=existing is not None and tp.topic not in existing)
        with contextlib.suppress(IllegalStateError):
            self._consumer().pause(*assigned)  # until each writer is ready
        for tp in assigned:
            kept = self.writers.get(tp)
            if kept is not None and kept.failure is None:
                kept.reown()
            else:
                self._open(tp)
        return gone

    def replace_failed(self) -> None:
        if self.closed:
            return
        for tp, writer in list(self.writers.items()):
            if writer.failure is not None and tp not in self._starting:
                log.warning(
                    "partition writer stopped; taking the partition over again",
                    extra={
                        "topic": tp.topic,
                        "partition": tp.partition,
                        "error": type(writer.failure).__name__,
                    },
                )
                self.retire(writer)
                # its calls' answers are lost; retaken, the partition resolves their claims
                self._retaking[tp] = self._retaking.get(tp, 0) + writer.own_claims()
                self._open(tp)

    # -- writers ------------------------------------------------------------------------

    async def _fetch_committed(self, tp: TopicPartition, stable: bool = True) -> tuple[int | None, str]:
        # the committed offset *with* its metadata, and stable (no transactional commit
        # pending): aiokafka's public `committed()` drops the metadata and may answer stale
        # a commit pending this long after the writer initialised its producer is hanging:
        # `UnstableOffset`, and the writer ends it (hanging.py)
        return await fetch_committed_stable(
            self._consumer()._coordinator, tp, stable=stable, unstable_max_s=HANGING_AFTER_S
        )

    async def _commit_pending(self, tp: TopicPartition) -> bool:
        return await commit_pending(self._consumer()._coordinator, tp)

    async def _commit_offsets(self, tp: TopicPartition, offset: int, metadata: str) -> None:
        if offset >= 0:
            await self._consumer().commit({tp: OffsetAndMetadata(offset, metadata)})

    def _open(self, tp: TopicPartition) -> None:
        kafka = self._settings().kafka
        plain = not kafka.exactly_once
        writer = self.writers[tp] = PartitionWriter(
            tp,
            kafka,
            self.owner,
            self._fetch_committed,
            commit_pending=self._commit_pending,
            shared_producer=self._publisher.producer if plain and self._publisher is not None else None,
            commit_offsets=self._commit_offsets if plain else None,
            written_topics=lambda: written_topics(self._settings()),
        )
        self.ready.discard(tp)
        self._starting[tp] = asyncio.get_running_loop().create_task(
            self._start(tp, writer), name=f"open-{tp}"
        )

    async def _start(self, tp: TopicPartition, writer: PartitionWriter) -> None:
        previous = self._retiring_by_tp.pop(tp, None)
        if previous is not None and not previous.done():
            # the partition came back while our own old writer finishes its calls: let it,
            # rather than fence it and turn its calls into unknown outcomes
            await asyncio.wait([previous], timeout=self._settings().kafka.eos_handoff_max_s)
        while True:
            try:
                snapshot = await writer.start()
                break
            except Exception as exc:  # a takeover given up would leave the partition unread
                if self.closed:
                    return  # drain or close closes the writer
                log.warning(
                    "could not take a partition over yet",
                    extra={"topic": tp.topic, "partition": tp.partition, "error": type(exc).__name__},
                    exc_info=not isinstance(exc, KafkaError),  # not the broker's answer: a bug
                )
                await asyncio.sleep(WRITER_RETRY_S)
        self._starting.pop(tp, None)
        self._retaking.pop(tp, None)
        if self.writers.get(tp) is not writer:
            self.retire(writer)
            return
        if snapshot.commit > 0 and await self._beyond_the_end(tp, snapshot.commit):
            snapshot = writer.read_from_start()
        consumer = self._consumer()
        # no longer assigned (aiokafka asserts): the next rebalance decides
        with contextlib.suppress(IllegalStateError, AssertionError):
            if snapshot.commit >= 0:
                consumer.seek(tp, snapshot.commit)
            else:
                await consumer.seek_to_beginning(tp)
            self.ready.add(tp)
        if snapshot.claims or snapshot.finished:
            log.info(
                "partition taken over with work recorded above its commit point",
                extra={
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "offset": snapshot.commit,
                    "finished": len(snapshot.finished),
                    "claimed": len(snapshot.claims),
                    "previous_owner": snapshot.owner,
                },
            )

    async def _beyond_the_end(self, tp: TopicPartition, commit: int) -> bool:
        """The committed offset lies past the partition's last stable offset, which no commit
        of ours ever does: the topic was deleted and created again (or its log truncated)
        with this group's commit left in place. Its records from the start were never read.
        Asked again on a failure (a topic just created): taken for "no", the records below the
        commit point were passed as done, without an outcome (CI)."""
        for attempt in range(END_TRIES):
            try:
                ends = await asyncio.wait_for(self._consumer().end_offsets([tp]), 10.0)
            except Exception as exc:  # noqa: BLE001 - the broker's or the client's: asked again
                if self.closed:
                    return False
                log.warning(
                    "could not read a partition's end offset yet",
                    extra={"topic": tp.topic, "partition": tp.partition, "error": type(exc).__name__},
                )
                await asyncio.sleep(WRITER_RETRY_S * (attempt + 1))
                continue
            end = ends.get(tp)
            if end is not None and commit > end:
                log.error(
                    "the committed offset is beyond the partition's end: its topic was created "
                    "again or its log truncated; reading it from the start",
                    extra={"topic": tp.topic, "partition": tp.partition, "committed": commit, "end": end},
                )
                return True
            return False
        log.error(
            "a partition's end offset could not be read: a commit beyond it is not looked for",
            extra={"topic": tp.topic, "partition": tp.partition, "committed": commit},
        )
        return False

    async def _deleted(self, topic: str) -> bool:
        """Still absent from fresh metadata (a topic is absent while it is deleted, not while
        its partitions elect leaders)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._consumer()._client.force_metadata_update(), 10.0)
            existing = self._existing_topics()
            return existing is not None and topic not in existing
        return False

    def _existing_topics(self) -> set[str] | None:
        """The topics in the consumer's metadata (refreshed by the rebalance that calls
        `on_assigned`), or None when it cannot say."""
        with contextlib.suppress(Exception):
            return set(self._consumer()._client.cluster.topics())
        return None

    def retire(self, writer: PartitionWriter, stopping: bool = False, deleted: bool = False) -> None:
        """The partition is someone else's (or will be: we are `stopping`): cancel work not
        claimed, let claimed calls finish. `deleted`: its topic was absent from the metadata.
        Once fresh metadata confirms it, nothing more is committed for it (a topic created
        again under the name would get this log's commit point, and its first records would be
        taken as read), and its calls' outcomes have nowhere to go."""
        writer.hand_off(self._assigned_here(writer.tp) if stopping else None)
        sinks = self.sinks.pop(writer.tp, {})
        for sink, task in sinks.values():
            if not sink.claiming:
                task.cancel()
        pending = [t for s, t in sinks.values() if s.claiming and not t.done()]
        task = asyncio.get_running_loop().create_task(self._close_after(writer, pending, deleted))
        self.retiring.add(task)
        self._retiring_by_tp[writer.tp] = task
        task.add_done_callback(self.retiring.discard)

    def _assigned_here(self, tp: TopicPartition) -> Callable[[], bool]:
        def assigned() -> bool:
            with contextlib.suppress(IllegalStateError):
                return tp in self._consumer().assignment()
            return False

        return assigned

    async def _close_after(
        self, writer: PartitionWriter, pending: list[asyncio.Task[None]], maybe_deleted: bool
    ) -> None:
        try:
            settings = self._settings()
            if maybe_deleted and await self._deleted(writer.tp.topic):
                log.warning(
                    "a request topic was deleted: its partition's writer stops without committing",
                    extra={"topic": writer.tp.topic, "partition": writer.tp.partition},
                )
                await writer.close(0.0)
                return
            if pending:
                await asyncio.wait(pending, timeout=settings.anthropic.timeout_s + 5)
            # bounded: a partition whose topic is gone never commits, and its writer (a producer,
            # a task) would otherwise stay until the process exits. A new owner fences it sooner
            # (its transactions fail, and close ends at once).
            await writer.close(settings.runtime.drain_timeout_s)
        finally:
            if self._retiring_by_tp.get(writer.tp) is asyncio.current_task():
                del self._retiring_by_tp[writer.tp]

    # -- records ------------------------------------------------------------------------

    def track(self, tp: TopicPartition, sink: RecordSink, task: asyncio.Task[None]) -> None:
        self.sinks[tp][sink.offset] = (sink, task)

    def untrack(self, tp: TopicPartition, sink: RecordSink) -> None:
        sinks = self.sinks.get(tp)
        if sinks is not None and sinks.get(sink.offset, (None,))[0] is sink:
            del sinks[sink.offset]

    async def close(self) -> None:
        """Before the consumer stops (after `drain`, or instead of it when the loop never ran):
        writers still starting are cancelled and awaited, and any writer left is closed."""
        self.closed = True
        starting = list(self._starting.values())
        self._starting.clear()
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        writers = list(self.writers.values())
        self.writers.clear()
        self.ready.clear()
        for writer in writers:
            await writer.close()

    async def drain(self, timeout_s: float) -> int:
        """Stop: no new claims, claimed calls finish within `timeout_s`, finished work commits.
        Returns how many of our claimed calls it leaves without a published answer (the drain
        timed out, or a writer failed): the partitions' next owners resolve those by policy."""
        self.closed = True
        retaking = sum(self._retaking.get(tp, 0) for tp in self._starting)
        for task in self._starting.values():
            task.cancel()
        writers = list(self.writers.values())
        self.writers.clear()
        self.ready.clear()
        for writer in writers:
            self.retire(writer, stopping=True)
        if self.retiring:
            log.info("draining calls in flight", extra={"count": len(self.retiring)})
            _, still = await asyncio.wait(set(self.retiring), timeout=timeout_s)
            if still:
                log.warning(
                    "drain timed out; calls in flight are left to the next owner", extra={"count": len(still)}
                )
                # what finished meanwhile commits now, unless the brokers are away
                await asyncio.gather(*(w.close(CLOSE_AFTER_DRAIN_S) for w in writers))
        left = sum(w.own_claims() for w in writers) + retaking
        unknown = sum(w.left_unknown() for w in writers)
        if unknown:
            log.warning(
                "stopped with calls of unknown outcome awaiting their extra call; the partitions' "
                "next owners make it (on_unknown: retry)",
                extra={"count": unknown},
            )
        if left:
            log.error(
                "stopped with claimed calls whose answers are not published; the partitions' "
                "next owners resolve them by each partner's on_unknown policy",
                extra={"count": left},
            )
        return left
