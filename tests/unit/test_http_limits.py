"""What an outsider can hold on the HTTP port (service/telemetry/http.py): a probe found that
idle or half-sent connections stayed open an hour each, without a cap: 1,014 of them took a
process limited to 1,024 file descriptors, /healthz failed (the liveness probe would restart
the pod again and again) and the gateway could open no socket to Kafka, Redis or Claude; and
that a POST body of up to 1 MiB was buffered before any check, without a time limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from service.telemetry import http
from service.telemetry.http import HealthServer
from service.telemetry.metrics import Metrics


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HealthServer]:
    monkeypatch.setattr(http, "KEEPALIVE_S", 0.5)
    monkeypatch.setattr(http, "MAX_CONNECTIONS_PER_PEER", 8)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    s = HealthServer(
        Metrics(), lambda: (True, "ok"), "127.0.0.1", 0, mount=lambda app: app.router.add_post("/echo", echo)
    )
    await s.start()
    yield s
    await s.stop()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """The server closed the connection (EOF) within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1024):
                pass
    except TimeoutError:
        return False
    return True


async def _healthz(port: int) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
        return r.status


async def test_a_half_sent_request_is_closed(server: HealthServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    await writer.drain()
    try:
        assert await _closed_within(reader, 5), "held open"
    finally:
        writer.close()


async def test_one_address_cannot_take_every_connection(server: HealthServer) -> None:
    conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(8)]
    try:
        extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await _closed_within(extra_reader, 2), "a ninth connection from one address is refused"
        extra_writer.close()
        for reader, _ in conns[:2]:
            assert not await _closed_within(reader, 0.1), "the first ones are kept (until idle too long)"
    finally:
        for _, writer in conns:
            writer.close()
    await asyncio.sleep(0.2)
    assert await _healthz(server.port) == 200, "their slots are free again"


async def test_a_body_bigger_than_any_route_takes_is_refused(server: HealthServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{server.port}/echo", data=b"x" * 1000) as r:
            assert (r.status, await r.text()) == (200, "1000")
        async with s.post(f"http://127.0.0.1:{server.port}/echo", data=b"x" * (http.MAX_BODY_BYTES + 1)) as r:
            assert r.status == 413
