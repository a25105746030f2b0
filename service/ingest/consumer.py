"""The consume loop: fetch what can start soon, dispatch concurrently, keep the backlog in Kafka.

- Partitions are owned through `ownership.py`: each has a writer through which
  its claims, outcomes and offset commits go (`partition.py`).
- A partition is fetched only while its writer is ready, its window of offsets
  above the commit point has room (`kafka.eos_window`), and its partner can
  start more work within `kafka.fetch_horizon_s` at its current rate (never
  beyond `max_queue`). Records beyond that are not dispatched: the position
  goes back to the first of them and the partition is paused.
- A record the Kafka client cannot decode gets an `undecodable_record` dead
  letter (`fetch.py`); the loop goes on.
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
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from service.admission.registry import Registry
from service.config.kafka import client_kwargs
from service.config.settings import GatewaySettings
from service.contracts.outcomes import DeadLetter
from service.contracts.reasons import Reason
from service.egress.publisher import Publisher
from service.ingest.fetch import Fetched, Undecodable, fetch, position, until_stopped
from service.ingest.ownership import Ownership, RecordSink
from service.ingest.partition import Fenced, Revoked
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


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: IngestLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._loop.on_revoked(list(revoked))

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
        self.owner = f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"
        self.ownership = Ownership(lambda: self.settings, lambda: self.consumer, self.owner, publisher)
        self._outstanding: dict[str, int] = defaultdict(int)
        self._finished: dict[str, int] = defaultdict(int)
        self._rate: dict[str, float] = {}
        self._rate_at = time.monotonic()
        self._fatal: BaseException | None = None
        self._next_observe = 0.0
        self._transactions = 0
        self.joined = False
        """The consumer has joined the group (its first assignment came, maybe empty): it is
        a member and takes partitions at every rebalance. Stays true through later rebalances."""
        self.partitions = 0
        """Partitions this replica owns now (a replica beyond the partition count owns none and
        idles, joined)."""
        self.draining = False
        self.left_unpublished = 0
        """After the drain: our claimed calls whose answers it could not publish."""
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
                max_partition_fetch_bytes=k.max_partition_fetch_bytes,
                session_timeout_ms=k.session_timeout_ms,
                heartbeat_interval_ms=k.heartbeat_interval_ms,
                max_poll_interval_ms=k.max_poll_interval_ms,
                isolation_level="read_committed",
            )
        await self._consumer.start()
        pattern = "^" + re.escape(k.request_topic_prefix) + ".+"
        self._consumer.subscribe(pattern=pattern, listener=_Listener(self))

    @property
    def assigned(self) -> bool:
        """This replica owns at least one partition now."""
        return self.partitions > 0

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
                fetched = await until_stopped(consumer, stop, fetch(consumer, timeout_ms=100), Fetched())
                if fetched:
                    self.broker_seen_at = time.monotonic()
                by_tp = _by_partition(fetched)
                for tp, entries in by_tp.items():
                    self._dispatch(tp, entries)
                # no await since the fetch: every record returned is dispatched. A fetch of
                # markers alone returns nothing: every partition is looked at once a second
                every = time.monotonic() >= self._next_observe
                self._pass_gaps(self.consumer.assignment() if every else by_tp)
                self.ownership.replace_failed()
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
        await self.ownership.close()  # nothing reads commits through the consumer after this
        if self._consumer is not None and self._started:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

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
        writer = self.ownership.writer(tp)
        if writer is None:
            return  # not ready: its writer seeks to the commit point when it is
        ledger = writer.ledger
        assert ledger is not None
        pid = self._registry().partner_id_for_topic(tp.topic)
        cap, window = self._cap(pid), self.settings.kafka.eos_window
        for rec in entries:
            if not ledger.accept(rec.offset):
                continue
            if self._outstanding[pid] >= cap or ledger.window >= window or self.draining:
                if tp in self.consumer.assignment():  # revoked meanwhile: its next owner reads it
                    self.consumer.seek(tp, rec.offset)  # the rest stays in Kafka
                return
            if ledger.finished_before(rec.offset):
                writer.skip(rec.offset)
                continue
            ledger.start(rec.offset)
            sink = RecordSink(writer, rec.offset, ledger.inherited_claim(rec.offset))
            if isinstance(rec, Undecodable):
                for later in range(rec.offset + 1, rec.last_offset + 1):  # a whole unreadable batch
                    writer.skip(later)
            self._spawn(tp, sink, pid, rec)

    def _pass_gaps(self, tps: Iterable[TopicPartition]) -> None:
        """Let each ready partition's commit point pass the offsets the consumer moved over
        without returning a record (a partner's transaction markers, its aborted records)."""
        consumer = self.consumer
        for tp in tps:
            writer = self.ownership.writer(tp)
            at = None if writer is None else position(consumer, tp)
            if writer is not None and at is not None:
                writer.passed(at)

    def _spawn(
        self, tp: TopicPartition, sink: RecordSink, pid: str, rec: ConsumerRecord | Undecodable
    ) -> None:
        """The record's task. Its bookkeeping ends in a done callback, which runs even when the
        task is cancelled before it started (a revocation or the drain right after the fetch):
        a `finally` in the task would not, and the partner's outstanding count would leak. The
        work's coroutine is made inside the task, so a task that never ran leaves none
        un-awaited."""
        self._outstanding[pid] += 1
        task = asyncio.create_task(self._process(tp, sink, pid, rec))
        self.ownership.track(tp, sink, task)

        def done(_: asyncio.Task[None]) -> None:
            self._outstanding[pid] -= 1
            self.ownership.untrack(tp, sink)

        task.add_done_callback(done)

    async def _undecodable(self, sink: RecordSink, pid: str, u: Undecodable) -> None:
        """A record the Kafka client could not decode: its dead letter, and the loop goes on."""
        dl = DeadLetter(pid, Reason.UNDECODABLE_RECORD, u.describe(), u.origin())
        await self.pipeline.emit.dead_letter(sink, dl, model="")

    async def _process(
        self, tp: TopicPartition, sink: RecordSink, pid: str, rec: ConsumerRecord | Undecodable
    ) -> None:
        try:
            if isinstance(rec, Undecodable):
                await self._undecodable(sink, pid, rec)
            else:
                await self.pipeline.handle(rec, sink)
        except (Draining, Revoked, Fenced, asyncio.CancelledError):
            pass  # not finished here: the partition's next owner (or this one, after restart) does it
        except BaseException as exc:  # recorded here, re-raised by the loop
            log.critical(
                "record got no outcome; stopping without committing it",
                extra={"partner": pid, "topic": tp.topic, "partition": tp.partition, "offset": sink.offset},
                exc_info=exc,
            )
            self._fatal = exc
        else:
            self._finished[pid] += 1

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
            writer = self.ownership.writer(tp)
            ledger = writer.ledger if writer is not None else None
            if (
                self.draining
                or ledger is None
                or ledger.window >= window
                or self._outstanding[pid] >= self._cap(pid)
            ):
                want.add(tp)
                by_partner[pid] += 1
        paused = consumer.paused()
        with contextlib.suppress(IllegalStateError, AssertionError):
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

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """No waiting for calls here (a slow revocation stalls the whole group): writers
        keep committing what finishes; new claims wait for the assignment."""
        await self.ownership.on_revoked(revoked)

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        registry = self._registry()
        for tp in self.ownership.on_assigned(assigned):
            pid = registry.partner_id_for_topic(tp.topic)
            with contextlib.suppress(KeyError):  # no longer ours: its lag is another replica's to report
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition), pid)
        self.joined = True
        self.partitions = len(assigned)
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
        writers = self.ownership.writers
        self._transactions += sum(w.take_transactions() for w in writers.values())
        m.eos_transactions.set(self._transactions)
        m.eos_writers.set(len(writers) if self.settings.kafka.exactly_once else 0)
        assigned = consumer.assignment()
        for tp, writer in writers.items():
            ledger = writer.ledger
            pid = registry.partner_id_for_topic(tp.topic)
            if ledger is not None:
                windows[pid] = max(windows[pid], ledger.window)
                claims[pid] += len(ledger.claims)
            high = consumer.highwater(tp) if tp in assigned else None  # a writer handing off: revoked
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
        self.left_unpublished = await self.ownership.drain(self.settings.runtime.drain_timeout_s)


def _by_partition(fetched: Fetched) -> dict[TopicPartition, list[ConsumerRecord | Undecodable]]:
    """Records and undecodable records of each partition, in offset order."""
    out: dict[TopicPartition, list[ConsumerRecord | Undecodable]] = dict(fetched.records.items())
    if fetched.undecodable:
        for u in fetched.undecodable:
            out.setdefault(u.tp, []).append(u)
        for tp in {u.tp for u in fetched.undecodable}:
            out[tp].sort(key=lambda r: r.offset)
    return out
