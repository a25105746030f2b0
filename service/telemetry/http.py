"""The service's own HTTP endpoint: /metrics, /healthz, /readyz.

- `/metrics`: Prometheus text format; gauges of outside state are refreshed first
  (`Metrics.refresh`).
- `/healthz` (liveness): the process and its event loop are alive. A heartbeat
  task ticks every `heartbeat_interval_s`; the answer is 503 when its last tick
  is older than `stale_after_s` (the loop was blocked, or the task died), and
  reports the worst loop lag seen since the previous check.
- `/readyz` (readiness): `ready()` says whether the replica is a working member
  and why not: 503 with the reason while not ready (not yet in the consumer
  group, broker silent, draining). A member that owns no partition (more replicas
  than partitions) is ready. `status()` adds details to the body either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.telemetry.metrics import Metrics

Readiness = Callable[[], tuple[bool, str]]

KEEPALIVE_S = 10.0
"""A connection that sends no whole request line and headers within this is closed (aiohttp's
default keeps an idle or half-sent connection open for an hour: a file descriptor each)."""
MAX_CONNECTIONS = 512
"""Connections served at once; more are closed at once, so that outsiders cannot use up the
process's file descriptors (which Kafka, Redis and Claude connections need too)."""
MAX_CONNECTIONS_PER_PEER = 32
"""From one address: one client cannot take every slot (the kubelet's probes keep theirs)."""
MAX_BODY_BYTES = 64 * 1024
"""No route takes a body bigger than a login form (aiohttp's default is 1 MiB per request)."""


def _cap_connections(server: web.Server, most: int, per_peer: int) -> None:
    """aiohttp's server has no cap: its connection callbacks are wrapped so that a connection
    past `most`, or past `per_peer` from one address, is closed as soon as it starts."""
    made, lost = server.connection_made, server.connection_lost
    peers: dict[Any, int] = {}
    peer_of: dict[Any, Any] = {}

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        made(handler, transport)
        peer = (transport.get_extra_info("peername") or ("?",))[0]
        peer_of[handler] = peer
        peers[peer] = peers.get(peer, 0) + 1
        if len(server.connections) > most or peers[peer] > per_peer:
            # closed once the handler has started (closing it here ends it before it starts)
            asyncio.get_running_loop().call_soon(handler.force_close)

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        lost(handler, exc)
        peer = peer_of.pop(handler, None)
        if peer is not None:
            peers[peer] -= 1
            if peers[peer] <= 0:
                del peers[peer]

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]


class HealthServer:
    """`ready()` returns (is_ready, reason); `status()` extra fields for the /readyz body;
    `mount(app)` adds more routes (the admin console)."""

    def __init__(
        self,
        metrics: Metrics,
        ready: Readiness,
        host: str,
        port: int,
        *,
        status: Callable[[], Mapping[str, Any]] | None = None,
        mount: Callable[[web.Application], None] | None = None,
        heartbeat_interval_s: float = 1.0,
        stale_after_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._status = status
        self._mount = mount
        self._host = host
        self._port = port
        self._interval = heartbeat_interval_s
        self._stale_after = stale_after_s
        self._clock = clock
        self._runner: web.AppRunner | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.last_tick: float = clock()
        self.max_lag_s = 0.0
        self.port: int | None = None

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("HealthServer.start() called twice")
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self._mount is not None:
            self._mount(app)  # the admin console's routes (service/admin/console.py)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE_S
        )
        await self._runner.setup()
        assert self._runner.server is not None
        _cap_connections(self._runner.server, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER)
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        self.last_tick = self._clock()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="healthz-heartbeat")

    async def stop(self) -> None:
        if self._heartbeat is not None:
            task, self._heartbeat = self._heartbeat, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            runner, self._runner = self._runner, None
            self.port = None
            await runner.cleanup()

    async def _beat(self) -> None:
        while True:
            expected = self._clock() + self._interval
            await asyncio.sleep(self._interval)
            now = self._clock()
            self.max_lag_s = max(self.max_lag_s, now - expected)
            self.last_tick = now

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the heartbeat is recent, with the numbers behind the answer."""
        age = self._clock() - self.last_tick
        alive = self._heartbeat is not None and not self._heartbeat.done() and age <= self._stale_after
        body: dict[str, Any] = {
            "status": "ok" if alive else "stalled",
            "heartbeat_age_s": round(age, 3),
            "max_loop_lag_s": round(self.max_lag_s, 3),
        }
        self.max_lag_s = 0.0
        return alive, body

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        self._refresh_ready()
        self._metrics.refresh()
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        alive, body = self.liveness()
        return web.json_response(body, status=200 if alive else 503)

    def _refresh_ready(self) -> tuple[bool, str]:
        ok, reason = self._ready()
        self._metrics.ready.set(1 if ok else 0)
        return ok, reason

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, reason = self._refresh_ready()
        body: dict[str, Any] = {"ready": ok, "reason": reason}
        if self._status is not None:
            body.update(self._status())
        return web.json_response(body, status=200 if ok else 503)
