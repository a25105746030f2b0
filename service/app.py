"""The gateway application: wires ingest, admission, scheduling, upstream and egress.

Callers may inject parts (tests do); `run()` owns their lifetimes with an
exit stack and returns after a graceful drain once `stop` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from service.admission.admit import Admission
from service.admission.registry import Registry
from service.config.settings import GatewaySettings
from service.egress.publisher import Publisher
from service.ingest.consumer import IngestLoop
from service.pipeline import Pipeline
from service.scheduling.limiter import Limiter, LocalLimiter
from service.scheduling.redis_limiter import RedisLimiter
from service.scheduling.scheduler import Scheduler
from service.telemetry.http import HealthServer
from service.telemetry.metrics import Metrics
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
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.registry = Registry.build(settings)
        self.claude = claude or ClaudeClient(settings.anthropic)
        self.publisher = publisher or Publisher(settings.kafka)
        self.admission = Admission(self.registry)
        self.limiter = limiter or self._make_limiter(settings)
        self.scheduler = Scheduler(settings, self.limiter)
        self.pipeline = Pipeline(
            settings, self.admission, self.scheduler, self.claude, self.publisher, self.metrics
        )
        self.ingest = IngestLoop(settings, self.pipeline, self.metrics, lambda: self.registry)
        self.http: HealthServer | None = None
        if serve_http:
            rt = settings.runtime
            self.http = HealthServer(self.metrics, self.readiness, rt.http_host, rt.http_port)
        self._install_keys(self.registry)

    def _make_limiter(self, settings: GatewaySettings) -> Limiter:
        org = settings.org_limits
        partners = {p.id: p.limits for p in settings.partners}
        if settings.limiter_backend == "redis":
            assert settings.redis is not None  # enforced by the settings model
            return RedisLimiter(settings.redis, org, partners, on_degraded=self._on_redis_degraded)
        return LocalLimiter(org, partners)

    def _on_redis_degraded(self, degraded: bool) -> None:
        self.metrics.redis_degraded.set(1 if degraded else 0)

    @property
    def redis_degraded(self) -> bool:
        return isinstance(self.limiter, RedisLimiter) and self.limiter.degraded

    def _install_keys(self, registry: Registry) -> None:
        for pid, partner in registry.by_id.items():
            self.claude.set_key(pid, partner.api_key)
        for pid in list(self.claude_partners()):
            if pid not in registry.by_id:
                self.claude.remove_key(pid)

    def claude_partners(self) -> list[str]:
        return [p.id for p in self.settings.partners]

    def readiness(self) -> tuple[bool, str]:
        if self.ingest.draining:
            return False, "draining"
        if not self.ingest.assigned:
            return False, "no partitions assigned yet"
        return True, "ok"

    def reload(self, settings: GatewaySettings) -> None:
        """Apply new settings and secrets to the next message (keys, partners, policy)."""
        registry = Registry.build(settings)
        self._install_keys(registry)
        self.scheduler.reconfigure(settings)
        self.settings = settings
        self.registry = registry
        self.admission.registry = registry
        self.pipeline.settings = settings
        log.info("configuration reloaded", extra={"partners": len(settings.partners)})

    async def run(self, stop: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self.http is not None:
                await self.http.start()
                stack.push_async_callback(self.http.stop)
                log.info("http endpoint listening", extra={"port": self.http.port})
            stack.push_async_callback(self.claude.aclose)
            await self.publisher.start()
            stack.push_async_callback(self.publisher.stop)
            stack.push_async_callback(self.scheduler.aclose)
            if isinstance(self.limiter, RedisLimiter):
                stack.push_async_callback(self.limiter.aclose)
            await self.ingest.start()
            stack.push_async_callback(self.ingest.stop)
            log.info("gateway started", extra={"partners": len(self.settings.partners)})
            await self.ingest.run(stop)
            log.info("gateway drained; stopping")
