"""`SimulatorServer`: the simulator's lifecycle, for tests, benchmarks and the CLI.

    async with SimulatorServer(SimulatorConfig(seed=1)) as sim:
        client = AsyncAnthropic(api_key="sk-any", base_url=sim.url, max_retries=0)
        ...
        sim.stats()

`start()` binds (port 0 = a free port) and `stop()` closes; `stop()` is safe
to call twice and a second `start()` is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from aiohttp import web

from service.simulator.buckets import Clock
from service.simulator.config import SimulatorConfig, updated_config
from service.simulator.engine import SimulatorEngine
from service.simulator.routes import build_app


class SimulatorServer:
    """One simulated Claude API organisation behind an HTTP server."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = SimulatorEngine(config or SimulatorConfig(), clock=clock, wall_clock=wall_clock)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._started = False

    @property
    def config(self) -> SimulatorConfig:
        """The config in force (it changes with `update_config`)."""
        return self.engine.config

    @property
    def port(self) -> int:
        """The bound TCP port (known once started)."""
        if self._port is None:
            raise RuntimeError("the simulator is not started; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """Base URL to give the SDK as `base_url`, e.g. `http://127.0.0.1:40123`."""
        host = self.engine.config.host
        if host in ("0.0.0.0", "", "::"):  # noqa: S104 - we only format a URL here
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve. Refused if already started (even if stopped since)."""
        if self._started:
            raise RuntimeError("SimulatorServer.start() was already called; create a new server")
        self._started = True
        runner = web.AppRunner(build_app(self.engine), access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        config = self.engine.config
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await self.stop()
            raise
        addresses = runner.addresses
        if not addresses:
            await self.stop()
            raise RuntimeError("the simulator did not bind a socket")
        self._port = int(addresses[0][1])

    async def stop(self) -> None:
        """Stop serving and close every connection. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        """The same JSON-ready dict as `GET /_sim/stats`."""
        return self.engine.snapshot()

    def calls(self, min_ok: int = 0, min_billed: int = 0, min_all: int = 0) -> dict[str, Any]:
        """The same JSON-ready dict as `GET /_sim/calls` (calls per request and per batch
        custom_id, see calls.py)."""
        return self.engine.stats.calls(min_ok, min_billed, min_all)

    def reset(self) -> None:
        """Zero the stats, fill the buckets, re-seed (as `POST /_sim/reset`)."""
        self.engine.reset()

    def update_config(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """Deep-merge `changes` into the config (as `POST /_sim/config`); returns the new config."""
        if "host" in changes or "port" in changes:
            raise ValueError("host and port cannot change while the simulator runs")
        config = updated_config(self.engine.config, changes)
        self.engine.reconfigure(config)
        return config
