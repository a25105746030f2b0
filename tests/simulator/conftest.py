"""Fixtures for the simulator tests: a server factory and an HTTP session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from service.simulator import SimulatorConfig, SimulatorServer

SimFactory = Callable[..., Awaitable[SimulatorServer]]


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
