"""The consume loop: fetch what can start soon, dispatch concurrently, hand partitions over cleanly.

- Every owned partition has a `PartitionWriter` (`partition.py`): claims,
  outcomes and the offset commit go through it, in one transaction per tick
  (exactly-once) or with the consumer's commit (at-least-once).
- A partition is fetched only while its writer is ready (the previous owner
  fenced, its state read and the position set to its commit), its window of
  offsets above the commit point has room, and its partner can start more
  work within `fetch_horizon_s` at its current rate (never beyond `max_queue`).
  Records beyond that are not dispatched: the position goes back to the first
  of them and the partition is paused. The backlog stays in Kafka.
- Revocation does not wait: the writer keeps committing what finishes until
  the rebalance ends. If the partition comes back, nothing is lost; if it goes
  elsewhere, requests not yet claimed are cancelled (the new owner does them)
  and claimed calls finish and publish until the new owner fences this one.
- On stop: no new claims, calls in flight finish within the drain timeout,
  finished work commits, the rest is left to the next owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from service.admission.registry import Registry
from service.config.kafka import client_kwargs
from service.config.settings import GatewaySettings
from service.contracts.outcomes import DeadLetter
from service.contracts.reasons import Reason
from service.egress.publisher import Publisher
from service.ingest.fetch import Fetched, Undecodable, fetch
from service.ingest.ledger import Claim
from service.ingest.partition import Fenced, OutMessage, PartitionWriter, Revoked, State
from service.ingest.stable_offsets import fetch_committed_stable
from service.pipeline import Pipeline
from service.scheduling.scheduler import Draining
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 1_000
BROKER_PROBE_INTERVAL_S = 5.0
BROKER_PROBE_TIMEOUT_S = 10.0
WRITER_RETRY_S = 1.0


class FatalPipelineError(RuntimeError):
    """A record could get no outcome at all (not even a dead letter): the service must stop."""


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
        self.owner = writer.owner

    async def claim(self, attempts: int) -> None:
        self.claiming = True
        await self._writer.claim(self.offset, attempts)
        self.claimed = True

    async def publish(self, messages: list[OutMessage]) -> None:
        await self._writer.publish(self.offset, messages)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: IngestLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._loop.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._loop.on_assigned(list(assigned))


class IngestLoop:
    def __init__(
        self,
        settings: GatewaySettings,
        pipeline: Pipeline,
        metrics: Metrics,
        registry: Callable[[], Registry],
        consumer: AIOKafkaConsumer | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.metrics = metrics
        self._registry = registry
        self._consumer = consumer
        self._publisher = publisher
        self.owner = f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"
        self._writers: dict[TopicPartition, PartitionWriter] = {}
        self._ready: set[TopicPartition] = set()
        self._starting: dict[TopicPartition, asyncio.Task[None]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._sinks: dict[TopicPartition, dict[int, tuple[RecordSink, asyncio.Task[None]]]] = defaultdict(
            dict
        )
        self._outstanding: dict[str, int] = defaultdict(int)
        self._finished: dict[str, int] = defaultdict(int)
        self._rate: dict[str, float] = {}
        self._rate_at = time.monotonic()
        self._fatal: BaseException | None = None
        self._next_observe = 0.0
        self._transactions = 0
        self.assigned = False
        self.draining = False
        self._started = False
        self.broker_seen_at: float | None = None
        """`time.monotonic()` of the broker's last answer (metadata probe, fetch with records, commit)."""
        self.broker_probe_interval_s = BROKER_PROBE_INTERVAL_S

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("IngestLoop.start() called twice")
        self._started = True
        k = self.settings.kafka
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                **client_kwargs(k),
                group_id=k.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=k.max_poll_records,
                session_timeout_ms=k.session_timeout_ms,
                heartbeat_interval_ms=k.heartbeat_interval_ms,
                max_poll_interval_ms=k.max_poll_interval_ms,
                isolation_level="read_committed",
            )
        await self._consumer.start()
        pattern = "^" + re.escape(k.request_topic_prefix) + ".+"
        self._consumer.subscribe(pattern=pattern, listener=_Listener(self))

    @property
    def consumer(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "IngestLoop.start() was not awaited"
        return self._consumer

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then drain, commit and return."""
        consumer = self.consumer
        probe = asyncio.get_running_loop().create_task(self._probe_broker(), name="broker-probe")
        try:
            while not stop.is_set():
                if self._fatal is not None:
                    raise FatalPipelineError("a record could not be given any outcome") from self._fatal
                fetched = await fetch(consumer, timeout_ms=100)
                if fetched:
                    self.broker_seen_at = time.monotonic()
                for tp, entries in _by_partition(fetched).items():
                    self._dispatch(tp, entries)
                self._replace_failed_writers()
                self._sync_pauses()
                now = time.monotonic()
                if now >= self._next_observe:
                    self._next_observe = now + 1.0
                    self._update_rates(now)
                    self.observe()
        finally:
            probe.cancel()
            await self._drain()

    def outstanding(self) -> dict[str, int]:
        """Records dispatched and not finished, per partner (what backpressure counts)."""
        return dict(self._outstanding)

    def broker_silent_s(self) -> float | None:
        """Seconds since the broker last answered; None before it ever did."""
        seen = self.broker_seen_at
        return None if seen is None else time.monotonic() - seen

    async def _probe_broker(self) -> None:
        while (consumer := self._consumer) is not None:
            try:
                await asyncio.wait_for(consumer.topics(), timeout=BROKER_PROBE_TIMEOUT_S)
            except (KafkaError, TimeoutError) as exc:
                log.debug("broker probe failed", extra={"error": type(exc).__name__})
            else:
                self.broker_seen_at = time.monotonic()
            await asyncio.sleep(self.broker_probe_interval_s)

    async def stop(self) -> None:
        if self._consumer is not None and self._started:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    # -- writers ---------------------------------------------------------------------

    async def _fetch_committed(self, tp: TopicPartition) -> tuple[int | None, str]:
        # the committed offset *with* its metadata, stable (no transactional commit pending);
        # aiokafka's public `committed()` drops the metadata and may answer a stale commit
        return await fetch_committed_stable(self.consumer._coordinator, tp)

    async def _commit_offsets(self, tp: TopicPartition, offset: int, metadata: str) -> None:
        if offset >= 0 and self._consumer is not None:
            await self._consumer.commit({tp: OffsetAndMetadata(offset, metadata)})
            self.broker_seen_at = time.monotonic()

    def _new_writer(self, tp: TopicPartition) -> PartitionWriter:
        plain = not self.settings.kafka.exactly_once
        return PartitionWriter(
            tp,
            self.settings.kafka,
            self.owner,
            self._fetch_committed,
            shared_producer=self._publisher.producer if plain and self._publisher is not None else None,
            commit_offsets=self._commit_offsets if plain else None,
        )

    def _open(self, tp: TopicPartition) -> None:
        writer = self._writers[tp] = self._new_writer(tp)
        self._ready.discard(tp)
        task = asyncio.get_running_loop().create_task(self._start_writer(tp, writer), name=f"open-{tp}")
        self._starting[tp] = task

    async def _start_writer(self, tp: TopicPartition, writer: PartitionWriter) -> None:
        while True:
            try:
                snapshot = await writer.start()
                break
            except KafkaError as exc:
                log.warning(
                    "could not take a partition over yet",
                    extra={"topic": tp.topic, "error": type(exc).__name__},
                )
                await asyncio.sleep(WRITER_RETRY_S)
        self._starting.pop(tp, None)
        if self._writers.get(tp) is not writer:
            self._retire(writer)
            return
        with contextlib.suppress(IllegalStateError):  # no longer assigned: the next rebalance decides
            if snapshot.commit >= 0:
                self.consumer.seek(tp, snapshot.commit)
            else:
                await self.consumer.seek_to_beginning(tp)
            self._ready.add(tp)
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

    def _retire(self, writer: PartitionWriter) -> None:
        """The partition is someone else's: cancel work not claimed, let claimed calls finish."""
        writer.hand_off()
        sinks = self._sinks.pop(writer.tp, {})
        for sink, task in sinks.values():
            if not sink.claiming:
                task.cancel()
        pending = [t for s, t in sinks.values() if s.claiming and not t.done()]
        task = asyncio.get_running_loop().create_task(self._close_after(writer, pending))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_after(self, writer: PartitionWriter, pending: list[asyncio.Task[None]]) -> None:
        if pending:
            await asyncio.wait(pending, timeout=self.settings.anthropic.timeout_s + 5)
        await writer.close()

    def _replace_failed_writers(self) -> None:
        for tp, writer in list(self._writers.items()):
            if writer.failure is not None and tp not in self._starting:
                log.warning(
                    "partition writer stopped; taking the partition over again",
                    extra={
                        "topic": tp.topic,
                        "partition": tp.partition,
                        "error": type(writer.failure).__name__,
                    },
                )
                self._retire(writer)
                self._open(tp)

    # -- dispatch and backpressure ---------------------------------------------------

    def _cap(self, pid: str) -> int:
        partner = self._registry().by_id.get(pid)
        if partner is None:
            return DEFAULT_MAX_QUEUE
        s = partner.settings
        floor = max(2 * s.max_concurrency, 8)
        by_rate = int(self._rate.get(pid, 0.0) * self.settings.kafka.fetch_horizon_s)
        return min(s.max_queue, max(floor, by_rate))

    def _dispatch(self, tp: TopicPartition, entries: list[ConsumerRecord | Undecodable]) -> None:
        writer = self._writers.get(tp)
        if writer is None or tp not in self._ready or writer.state is not State.OWNED:
            return  # the writer seeks to the commit point when ready
        ledger = writer.ledger
        assert ledger is not None
        pid = self._registry().partner_id_for_topic(tp.topic)
        cap, window = self._cap(pid), self.settings.kafka.eos_window
        sinks = self._sinks[tp]
        for rec in entries:
            if not ledger.accept(rec.offset):
                continue
            if self._outstanding[pid] >= cap or ledger.window >= window or self.draining:
                self.consumer.seek(tp, rec.offset)  # the rest stays in Kafka
                return
            if ledger.finished_before(rec.offset):
                writer.skip(rec.offset)
                continue
            ledger.start(rec.offset)
            sink = RecordSink(writer, rec.offset, ledger.inherited_claim(rec.offset))
            self._outstanding[pid] += 1
            if isinstance(rec, Undecodable):
                for later in range(rec.offset + 1, rec.last_offset + 1):  # a whole unreadable batch
                    writer.skip(later)
                work = self._undecodable(sink, pid, rec)
            else:
                work = self.pipeline.handle(rec, sink)
            task = asyncio.create_task(self._process(tp, sink, pid, rec.offset, work))
            sinks[rec.offset] = (sink, task)

    async def _undecodable(self, sink: RecordSink, pid: str, u: Undecodable) -> None:
        """A record the Kafka client could not decode: its dead letter, and the loop goes on."""
        dl = DeadLetter(pid, Reason.UNDECODABLE_RECORD, u.describe(), u.origin())
        await self.pipeline.emit.dead_letter(sink, dl, model="")

    async def _process(
        self, tp: TopicPartition, sink: RecordSink, pid: str, offset: int, work: Coroutine[Any, Any, None]
    ) -> None:
        try:
            await work
        except (Draining, Revoked, Fenced, asyncio.CancelledError):
            pass  # not finished here: the partition's next owner (or this one, after restart) does it
        except BaseException as exc:  # recorded here, re-raised by the loop
            log.critical(
                "record got no outcome; stopping without committing it",
                extra={"partner": pid, "topic": tp.topic, "partition": tp.partition, "offset": offset},
                exc_info=exc,
            )
            self._fatal = exc
        else:
            self._finished[pid] += 1
        finally:
            self._outstanding[pid] -= 1
            sinks = self._sinks.get(tp)
            if sinks is not None and sinks.get(offset, (None,))[0] is sink:
                del sinks[offset]

    def _sync_pauses(self) -> None:
        """Pause exactly the partitions that must not be fetched now."""
        consumer = self._consumer
        if consumer is None:
            return
        registry = self._registry()
        window = self.settings.kafka.eos_window
        want: set[TopicPartition] = set()
        by_partner: dict[str, int] = defaultdict(int)
        for tp in consumer.assignment():
            pid = registry.partner_id_for_topic(tp.topic)
            writer = self._writers.get(tp)
            ledger = writer.ledger if writer is not None else None
            if (
                self.draining
                or tp not in self._ready
                or ledger is None
                or ledger.window >= window
                or self._outstanding[pid] >= self._cap(pid)
            ):
                want.add(tp)
                by_partner[pid] += 1
        paused = consumer.paused()
        with contextlib.suppress(IllegalStateError):
            if want - paused:
                consumer.pause(*(want - paused))
            if paused - want:
                consumer.resume(*(paused - want))
        for partner in self.settings.partners:
            self.metrics.paused_partitions.labels(partner.id).set(by_partner.get(partner.id, 0))

    def _update_rates(self, now: float) -> None:
        elapsed = max(1e-3, now - self._rate_at)
        self._rate_at = now
        for pid in set(self._finished) | set(self._rate):
            current = self._finished.pop(pid, 0) / elapsed
            self._rate[pid] = 0.5 * self._rate.get(pid, current) + 0.5 * current

    # -- rebalances ----------------------------------------------------------------

    def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """No waiting here (a slow revocation stalls the whole group): writers keep
        committing what finishes; new claims wait for the assignment."""
        for tp in revoked:
            writer = self._writers.get(tp)
            if writer is not None:
                writer.suspend()

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        keep = set(assigned)
        for tp in list(self._writers):
            if tp not in keep:
                writer = self._writers.pop(tp)
                self._ready.discard(tp)
                starting = self._starting.pop(tp, None)
                if starting is not None:
                    starting.cancel()
                self._retire(writer)
                pid = self._registry().partner_id_for_topic(tp.topic)
                with contextlib.suppress(KeyError):  # no longer ours: its lag is another replica's to report
                    self.metrics.consumer_lag.remove(tp.topic, str(tp.partition), pid)
        with contextlib.suppress(IllegalStateError):
            self.consumer.pause(*assigned)  # until each writer is ready
        for tp in assigned:
            kept = self._writers.get(tp)
            if kept is not None and kept.failure is None:
                kept.reown()
            else:
                self._open(tp)
        self.assigned = bool(assigned)
        self.broker_seen_at = time.monotonic()  # joining the group took the broker's answers
        log.info("partitions assigned", extra={"count": len(assigned)})

    def observe(self) -> None:
        """Refresh the lag and exactly-once gauges (each second, and before each scrape)."""
        consumer = self._consumer
        if consumer is None:
            return
        registry = self._registry()
        m = self.metrics
        windows: dict[str, int] = defaultdict(int)
        claims: dict[str, int] = defaultdict(int)
        self._transactions += sum(w.take_transactions() for w in self._writers.values())
        m.eos_transactions.set(self._transactions)
        m.eos_writers.set(len(self._writers) if self.settings.kafka.exactly_once else 0)
        for tp, writer in self._writers.items():
            ledger = writer.ledger
            pid = registry.partner_id_for_topic(tp.topic)
            if ledger is not None:
                windows[pid] = max(windows[pid], ledger.window)
                claims[pid] += len(ledger.claims)
            high = consumer.highwater(tp)
            if high is not None and ledger is not None and ledger.low_watermark >= 0:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition), pid).set(
                    max(0, high - ledger.low_watermark)
                )
        for partner in self.settings.partners:
            m.eos_window.labels(partner.id).set(windows.get(partner.id, 0))
            m.eos_claims.labels(partner.id).set(claims.get(partner.id, 0))

    async def _drain(self) -> None:
        self.draining = True
        self.pipeline.scheduler.close()
        consumer = self._consumer
        if consumer is not None:
            with contextlib.suppress(IllegalStateError):
                consumer.pause(*consumer.assignment())
        for task in self._starting.values():
            task.cancel()
        writers = list(self._writers.values())
        self._writers.clear()
        for writer in writers:
            self._retire(writer)
        if self._retiring:
            log.info("draining calls in flight", extra={"count": len(self._retiring)})
            _, still = await asyncio.wait(set(self._retiring), timeout=self.settings.runtime.drain_timeout_s)
            if still:
                log.warning(
                    "drain timed out; calls in flight are left to the next owner", extra={"count": len(still)}
                )
                for writer in writers:
                    await writer.close()


def _by_partition(fetched: Fetched) -> dict[TopicPartition, list[ConsumerRecord | Undecodable]]:
    """Records and undecodable records of each partition, in offset order."""
    out: dict[TopicPartition, list[ConsumerRecord | Undecodable]] = dict(fetched.records.items())
    if fetched.undecodable:
        for u in fetched.undecodable:
            out.setdefault(u.tp, []).append(u)
        for tp in {u.tp for u in fetched.undecodable}:
            out[tp].sort(key=lambda r: r.offset)
    return out
