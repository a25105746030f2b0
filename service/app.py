"""The gateway application: wires ingest, admission, scheduling, upstream and egress.

Callers may inject parts (tests do); `run()` owns their lifetimes with an
exit stack and returns after a graceful drain once `stop` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiokafka.errors import KafkaError
from opentelemetry.trace import TracerProvider

from service.admin.console import Console
from service.admission.admit import Admission
from service.admission.budget import Budgets, RedisLedger
from service.admission.pricing import price_version
from service.admission.registry import Registry
from service.admission.replay import LocalReplayStore, RedisReplayStore, ReplayGuard
from service.batches.pending import BatchContext
from service.batches.routing import Router, Turnaround
from service.batches.shared_turnaround import SharedTurnarounds
from service.batches.worker import BatchWorker
from service.config.kafka import connect_failure
from service.config.redis import redis_client
from service.config.redis_audit import RedisAudit
from service.config.redis_epoch import RedisEpoch
from service.config.redis_health import RedisHealth
from service.config.settings import GatewaySettings
from service.egress.publisher import Publisher
from service.ingest.consumer import IngestLoop
from service.ingest.hanging import WATCH_EVERY_S, Mark, written_topics
from service.ingest.hanging import watch as watch_hanging
from service.lifecycle import until_kafka_answers, watch_topics
from service.pipeline import Pipeline
from service.response_cache.cache import ResponseCache
from service.scheduling.limiter import Limiter, LocalLimiter
from service.scheduling.pools import LimitConfig
from service.scheduling.redis_limiter import RedisLimiter
from service.scheduling.scheduler import Scheduler
from service.telemetry.audit import Audit
from service.telemetry.http import HealthServer
from service.telemetry.logs import register_secrets
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import Tracing
from service.topics import ensure_usage_topic
from service.upstream.client import ClaudeClient

log = logging.getLogger(__name__)


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        metrics: Metrics | None = None,
        claude: ClaudeClient | None = None,
        publisher: Publisher | None = None,
        serve_http: bool = True,
        limiter: Limiter | None = None,
        tracer_provider: TracerProvider | None = None,
        broker_silence_limit_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.registry = Registry.build(settings)
        self._register_secrets(self.registry)
        self.tracing = Tracing(tracer_provider, consumer_group=settings.kafka.group_id)
        self.claude = claude or ClaudeClient(settings.anthropic, open_telemetry=self.tracing.sdk_option())
        self.publisher = publisher or Publisher(settings.kafka)
        self.audit = Audit(settings.kafka.audit_topic, self.publisher)
        self.redis = redis_client(settings.redis) if settings.redis is not None else None
        # one view of Redis' health for the limiter, the budgets and the replay store
        self.redis_health = _redis_health(self.redis, settings, self.metrics)
        epoch = self.redis_health.epoch if self.redis_health is not None else None
        ledger = RedisLedger(self.redis, settings.redis.key_prefix, epoch=epoch) if settings.redis else None
        self.budgets = Budgets(
            lambda: self.registry,
            shared=ledger,
            metrics=self.metrics,
            audit=self.audit,
            health=self.redis_health,
        )
        replay = ReplayGuard(
            LocalReplayStore(settings.runtime.replay_cache_max_entries),
            RedisReplayStore(self.redis, settings.redis.key_prefix, epoch) if settings.redis else None,
            health=self.redis_health,
        )
        self.admission = Admission(self.registry, replay=replay, budgets=self.budgets)
        self.admission.operator_replays.configure(settings)  # dead letters replayed by an operator
        register_secrets(self.admission.operator_replays.secrets())
        self.limiter = limiter or self._make_limiter(settings)
        self.scheduler = Scheduler(settings, self.limiter)
        self.router = Router(Turnaround(settings.batches))
        self.cache = ResponseCache.build(settings, self.metrics, self.redis, self.redis_health)
        self.pipeline = Pipeline(
            settings,
            self.admission,
            self.scheduler,
            self.claude,
            self.metrics,
            tracing=self.tracing,
            cache=self.cache,
            router=self.router,
        )
        self.batch_worker = BatchWorker(
            BatchContext(lambda: self.settings, self.admission, self.claude, self.router, self.metrics)
        )
        self.ingest = IngestLoop(
            settings, self.pipeline, self.metrics, lambda: self.registry, publisher=self.publisher
        )
        self.console = Console(self, settings.admin.token.resolve() if settings.admin else None)
        self.pipeline.pauses = self.console.pauses  # pause/drain from the console: held, not dead-lettered
        if epoch is not None:  # what each replica writes back into a Redis that lost its data
            epoch.on_lost("budget counters", self.budgets.write_back)
            epoch.on_lost("replay sightings", replay.write_back)
            epoch.on_lost("pauses", self.console.pauses.write_back)
        self.broker_silence_limit_s = broker_silence_limit_s
        self.metrics.on_scrape(self._refresh_gauges)
        for partner in settings.partners:
            self.metrics.init_partner(partner.id)
        self.kafka_not_reached: str | None = None
        """Why the first contact with Kafka failed, until it succeeds (readiness says it)."""
        self.http: HealthServer | None = None
        if serve_http:
            rt = settings.runtime
            self.http = HealthServer(
                self.metrics,
                self.readiness,
                rt.http_host,
                rt.http_port,
                status=self.status,
                mount=self.console.mount if self.console.enabled else None,
            )
        self.claude.sync_keys(self.registry.api_keys())
        self.audit.loaded(self.registry)
        prices = {"price_version": price_version(settings), "models": len(settings.models)}
        log.info("prices loaded", extra=prices)

    def _make_limiter(self, settings: GatewaySettings) -> Limiter:
        limits = LimitConfig.of(settings)
        if settings.limiter_backend == "redis":
            assert settings.redis is not None  # enforced by the settings model
            return RedisLimiter(
                settings.redis,
                limits,
                client=self.redis,
                health=self.redis_health,
                on_degraded=self._on_redis_degraded,
            )
        return LocalLimiter(limits)

    def _on_redis_degraded(self, degraded: bool) -> None:
        self.metrics.redis_degraded.set(1 if degraded else 0)

    @property
    def redis_degraded(self) -> bool:
        """Redis is down: limits, budgets and replay checks run on this replica's local state."""
        return self.redis_health is not None and self.redis_health.down

    def _redis_fallbacks(self) -> dict[str, bool]:
        """Which parts run on local state now (each part that uses Redis)."""
        parts = {
            "budgets": self.budgets.shared is not None,
            "replay": self.admission.replay.shared is not None,
            "response_cache": self.cache.shared,  # its fallback: every lookup a miss, nothing stored
        }
        parts["limiter"] = isinstance(self.limiter, RedisLimiter)
        return {part: self.redis_degraded for part, uses in parts.items() if uses}

    def readiness(self) -> tuple[bool, str]:
        """Whether this replica is a working member of the consumer group, and why not:
        joining, broker silent, draining. A member that owns no partition (more replicas
        than partitions) is ready: it takes partitions at the next rebalance."""
        if self.ingest.draining:
            return False, "draining: the gateway is stopping"
        if not self.ingest.joined:
            if self.kafka_not_reached is not None:
                return False, f"Kafka not reached yet: {self.kafka_not_reached}"
            return False, "not in the consumer group yet: joining"
        silent = self.ingest.broker_silent_s()
        if silent is None or silent > self.broker_silence_limit_s:
            never = "never" if silent is None else f"not for {silent:.0f}s"
            failure = connect_failure(self.settings.kafka.bootstrap_servers)
            why = "" if failure is None else f"; last connection error: {failure.cause}"
            limit = f"limit {self.broker_silence_limit_s:.0f}s"
            return False, f"the Kafka broker has answered {never} ({limit}){why}"
        return True, "ok"

    def _kafka_not_reached(self, cause: str) -> None:
        self.kafka_not_reached = cause

    def status(self) -> dict[str, Any]:
        """Details for /readyz beside the verdict."""
        silent = self.ingest.broker_silent_s()
        return {
            "draining": self.ingest.draining,
            "joined": self.ingest.joined,
            "assigned": self.ingest.assigned,
            "partitions": self.ingest.partitions,
            "broker_silent_s": None if silent is None else round(silent, 3),
            "redis_degraded": self.redis_degraded,
            "redis": None
            if self.redis_health is None
            else {"state": self.redis_health.state, "local_fallback": self._redis_fallbacks()},
            "tracing": self.tracing.enabled,
        }

    def _refresh_gauges(self) -> None:
        """Gauges of state held elsewhere, refreshed before each scrape."""
        m = self.metrics
        for (scope, bucket), level in self.scheduler.limiter.levels().items():
            m.set_limiter_level(scope, bucket, level)  # requests and tokens in separate metrics
        outstanding = self.ingest.outstanding()
        for partner in self.settings.partners:
            waiting = outstanding.get(partner.id, 0) - m.in_flight_now(partner.id)
            m.queued.labels(partner.id).set(max(0, waiting))
        m.redis_degraded.set(1 if self.redis_degraded else 0)
        self.ingest.observe()

    def _register_secrets(self, registry: Registry) -> None:
        """Every secret value the gateway holds, masked in its logs from now on."""
        values = [p.api_key for p in registry.by_id.values()]
        values += [key for p in registry.by_id.values() for key in p.signing_keys.values()]
        k, r, a = registry.settings.kafka, registry.settings.redis, registry.settings.admin
        refs = (k.sasl_password, k.sasl_oauth_token, r.password if r else None, a.token if a else None)
        for ref in refs:
            if ref is not None:
                with contextlib.suppress(ValueError):  # unreadable: reported where it is used
                    values.append(ref.resolve())
        register_secrets(values)

    def _outcome_topics(self) -> set[str]:
        """The response and dead-letter topics of the request topics consumed now (of their
        partners, or of the topic's suffix for a topic no partner has: its `unknown_partner`
        dead letters go there)."""
        s, registry = self.settings, self.registry
        out: set[str] = set()
        for topic in self.ingest.consumer.subscription():
            if topic != s.realtime_topic():  # requests back from the batch path: their partners'
                pid = registry.partner_id_for_topic(topic)
                out |= {s.response_topic(pid), s.deadletter_topic(pid)}
        return out

    def reload(self, settings: GatewaySettings) -> None:
        """Apply new settings and secrets to the next message: partners, policy, budgets,
        Anthropic keys, signing keys. Raises `RegistryError` (and changes nothing) when a
        secret cannot be read."""
        registry = Registry.build(settings)
        self._register_secrets(registry)
        self.console.reload(settings)  # raises (changing nothing) when the new token cannot be read
        self.admission.operator_replays.configure(settings)
        register_secrets(self.admission.operator_replays.secrets())
        old, old_settings = self.registry, self.settings
        self.claude.sync_keys(registry.api_keys())
        self.scheduler.reconfigure(settings)
        self.settings = settings
        self.registry = registry
        self.admission.registry = registry
        for partner in settings.partners:
            self.metrics.init_partner(partner.id)
        self.pipeline.settings = settings
        self.cache.configure(settings)
        self.ingest.settings = settings
        self.budgets.config_changed()
        self.audit.changes(old, registry)
        needs_restart = [
            name
            for name in ("kafka", "anthropic", "redis", "limiter_backend")
            if getattr(old_settings, name) != getattr(settings, name)
        ]
        if needs_restart:
            log.warning(
                "configuration reloaded, but these sections only take effect after a restart",
                extra={"sections": ",".join(needs_restart)},
            )
        old_prices, new_prices = price_version(old_settings), price_version(settings)
        if old_prices != new_prices:  # costs from now on carry the new version
            log.info("prices changed", extra={"price_version": new_prices, "previous": old_prices})
        log.info("configuration reloaded", extra={"partners": len(settings.partners)})

    async def run(self, stop: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self.http is not None:
                await self.http.start()
                stack.push_async_callback(self.http.stop)
                log.info("http endpoint listening", extra={"port": self.http.port})
            stack.push_async_callback(self.claude.aclose)
            # the first contact with Kafka: retried with backoff while it does not answer
            if not await until_kafka_answers(stop, self.settings.kafka, on_failure=self._kafka_not_reached):
                log.info("stopped before Kafka answered")
                return
            self.kafka_not_reached = None
            stack.push_async_callback(self.publisher.stop)  # also what a failed start opened
            await self.publisher.start()
            await self.audit.start()
            stack.push_async_callback(self.audit.stop)
            if self.redis is not None:
                stack.push_async_callback(self.redis.aclose)
            if self.redis_health is not None:
                stack.push_async_callback(self.redis_health.aclose)
                await self.redis_health.start()  # the data epoch, watched
            stack.push_async_callback(self.budgets.aclose)  # before Redis closes: a last push
            stack.push_async_callback(self.scheduler.aclose)
            if isinstance(self.limiter, RedisLimiter):
                stack.push_async_callback(self.limiter.aclose)
            await _ensure_usage_topic(self.settings)
            stack.push_async_callback(self.ingest.stop)
            await self.ingest.start()
            console = asyncio.create_task(self.console.run(stop), name="admin-console")
            stack.push_async_callback(_finish, console)
            if self.settings.batches.enabled:  # the batch worker, where the group makes this replica it
                batches = asyncio.create_task(self.batch_worker.run(stop), name="batch-worker")
                stack.push_async_callback(_finish, batches, 15.0)  # leaves its group, closes its clients
                if self.redis is not None and self.settings.redis is not None:  # every replica routes
                    shared = SharedTurnarounds(
                        self.redis, self.settings.redis.key_prefix, self.router.turnaround
                    )
                    turnarounds = asyncio.create_task(shared.run(stop), name="batch-turnarounds")
                    stack.push_async_callback(_finish, turnarounds)
            topics = asyncio.create_task(
                watch_topics(
                    self.ingest.consumer.subscription,
                    self.ingest.consumer._client.force_metadata_update,  # new topics within seconds
                    stop,
                    self.settings.kafka,
                    known_topics=self.ingest.consumer._client.cluster.topics,
                    outcome_topics=self._outcome_topics,
                ),
                name="topics",
            )
            stack.push_async_callback(_finish, topics)
            if self.settings.kafka.exactly_once:
                hanging = asyncio.create_task(self._watch_hanging(stop), name="hanging-transactions")
                stack.push_async_callback(_finish, hanging)
            log.info("gateway started", extra={"partners": len(self.settings.partners)})
            stopping = asyncio.create_task(_on_stop(stop, self.budgets.close))
            stack.callback(stopping.cancel)
            await self.ingest.run(stop)
            log.info("gateway drained; stopping")

    def _watch_hanging(self, stop: asyncio.Event) -> Coroutine[Any, Any, None]:
        """Transactions left hanging in what the gateway writes: ended by the writers here."""

        def markers() -> list[Mark]:
            writers: list[Mark] = [w.mark for w in self.ingest.ownership.writers.values()]
            return writers + self.batch_worker.markers()

        k = self.settings.kafka
        return watch_hanging(
            self.ingest.consumer._client,
            lambda: written_topics(self.settings),
            markers,
            stop,
            stuck_after_s=k.transaction_timeout_ms / 1000 + 2 * WATCH_EVERY_S,
            found=self.metrics.eos_hanging.inc,
            stuck_now=self.metrics.eos_stuck.set,
        )


def _redis_health(redis: Any, settings: GatewaySettings, metrics: Metrics) -> RedisHealth | None:
    """One view of Redis' health and data epoch for the limiter, the budgets, the replay
    store and the pauses."""
    if redis is None or settings.redis is None:
        return None
    tag = "{" + settings.redis.key_prefix + "}"
    epoch = RedisEpoch(redis, f"{tag}:epoch", on_lost=metrics.redis_data_lost.inc)
    audit = RedisAudit(redis, may_evict=metrics.redis_may_evict.set, evicted=metrics.redis_evicted_keys.inc)
    return RedisHealth(
        redis, on_busy=metrics.redis_pool_busy.inc, probe_key=f"{tag}:health", epoch=epoch, audit=audit
    )


async def _ensure_usage_topic(settings: GatewaySettings) -> None:
    """Billed outcomes wait for the usage topic: create it now rather than have the broker
    auto-create it inside the first transactions (or not at all); `watch_topics` keeps
    warning while it is missing."""
    try:
        if await asyncio.wait_for(ensure_usage_topic(settings), 30):
            log.info("usage topic created", extra={"topic": settings.kafka.usage_topic})
    except (KafkaError, OSError, TimeoutError) as exc:
        log.warning(
            "could not create the usage topic",
            extra={"topic": settings.kafka.usage_topic, "error": type(exc).__name__},
        )


async def _finish(task: asyncio.Task[None], timeout_s: float = 2.0) -> None:
    """Let a task that watches `stop` end by itself, briefly; then cancel it."""
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(task, timeout_s)


async def _on_stop(stop: asyncio.Event, action: Callable[[], None]) -> None:
    await stop.wait()
    action()
