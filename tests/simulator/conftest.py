"""Fixtures for the simulator tests: a server factory, SDK clients and an HTTP session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import pytest

from service.simulator import SimulatorConfig, SimulatorServer

SimFactory = Callable[..., Awaitable[SimulatorServer]]
ClientFactory = Callable[..., anthropic.AsyncAnthropic]
SDK_KEY = "sk-sim-alice"


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    """Start simulators on free ports; all are stopped after the test."""
    servers: list[SimulatorServer] = []

    async def factory(config: SimulatorConfig | None = None, **kwargs: Any) -> SimulatorServer:
        server = SimulatorServer(config or SimulatorConfig(), **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """Official SDK clients for a simulator (no retries, as the gateway runs it); closed after the test."""
    clients: list[anthropic.AsyncAnthropic] = []

    def factory(sim: SimulatorServer, api_key: str = SDK_KEY) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(api_key=api_key, base_url=sim.url, max_retries=0)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()
