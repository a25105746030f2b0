"""The blocking partner client: the asyncio client on an event loop of its own thread.

    with SyncPartnerClient("kafka:9092", "acme", key_id="k2025a", secret=secret) as client:
        response = client.request({"model": "claude-haiku-4-5", "max_tokens": 256,
                                   "messages": [{"role": "user", "content": "Hello"}]})

One implementation of signing, producing and correlation (`client.py`) serves both
APIs. Every call hands a coroutine to the client's loop and blocks the calling thread
until it is done; any number of threads may call at once. An interrupt (Ctrl-C) or an
exception in the waiting thread cancels the call on the loop. Calls from the loop's own
thread are refused (they would wait for themselves). The thread is a daemon: a program
that forgets `close()` can still exit, but `close()` (or `with`) flushes and disconnects.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar

from claude_gateway_client.client import DEFAULT_TIMEOUT_S, PartnerClient

T = TypeVar("T")


class SyncPartnerClient:
    """Takes the arguments of `PartnerClient`; `start()`/`close()` or `with`."""

    def __init__(self, bootstrap_servers: str, partner_id: str, **options: Any) -> None:
        self._args = (bootstrap_servers, partner_id)
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: PartnerClient | None = None
        self._lock = threading.Lock()
        self._state = "new"

    def start(self) -> None:
        """Start the loop thread and connect. A second `start` is refused."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError("SyncPartnerClient.start() called twice")
            self._state = "starting"
            loop = self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=_run, args=(loop,), name=f"claude-gateway-client-{self._args[1]}", daemon=True
            )
            self._thread.start()
        try:
            self._client = self._call(self._connect())
        except BaseException:
            self._shutdown()
            raise
        self._state = "running"

    async def _connect(self) -> PartnerClient:
        client = PartnerClient(*self._args, **self._options)  # built on its loop (aiokafka wants that)
        await client.start()
        return client

    def close(self) -> None:
        """Disconnect and stop the thread; safe to call twice."""
        with self._lock:
            if self._state in ("new", "closed"):
                self._state = "closed"
                return
            self._state = "closed"
        try:
            if self._client is not None:
                self._call(self._client.stop())
        finally:
            self._shutdown()

    def __enter__(self) -> SyncPartnerClient:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def send(
        self,
        params: Mapping[str, Any],
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """`PartnerClient.send`, blocking."""
        return self._call(self._running().send(params, request_id, metadata))

    def outcome(self, request_id: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """`PartnerClient.outcome`, blocking."""
        return self._call(self._running().outcome(request_id, timeout_s))

    def request(
        self,
        params: Mapping[str, Any],
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> dict[str, Any]:
        """`PartnerClient.request`, blocking: the response, or `DeadLettered`."""
        return self._call(self._running().request(params, request_id, metadata, timeout_s))

    def pending(self) -> int:
        return self._running().pending()

    def _running(self) -> PartnerClient:
        if self._state != "running" or self._client is None:
            raise RuntimeError(f"SyncPartnerClient is {self._state}, not running")
        return self._client

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None or threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncPartnerClient: no loop, or called from the client's own thread")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # an interrupt of the waiting thread stops the call too
            raise

    def _shutdown(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
        self._state = "closed"


def _run(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
