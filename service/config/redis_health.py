"""Whether the shared Redis answers: one state machine for the limiter, the budgets and the replay store.

    healthy ──(timeout)──► slow ──(`slow_strikes` timeouts in a row)──► down
       ▲  ◄──(an answer)──┘                                              │
       └──────────────────────(a probe's PING answers)───────────────────┘
    healthy / slow ──(connection refused, reset, any other Redis error)──► down

A call that found every connection of this replica's pool in use for `pool_timeout_s`
(`RedisPoolBusy`, a burst) says nothing of Redis: it changes no state. That call falls back
to the local state like a slow one; it is counted (`on_busy`) and logged at most once a minute.

A slow call is not a down Redis: the one call that timed out falls back to the
local state, the next calls still go to Redis, and only `slow_strikes`
timeouts in a row (no answer in between) declare it down. While down, every
user of Redis runs on its local state and a probe PINGs every
`probe_interval_s`; when Redis answers again, listeners hear it (the budgets
then add the spend they recorded locally to the shared counters).

Whether Redis still holds the gateway's data (a restart without persistence empties it) is
the epoch's concern (`redis_epoch.py`): a recovered Redis is checked for it before the
listeners hear that it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from service.config.redis_audit import RedisAudit
from service.config.redis_epoch import RedisEpoch
from service.telemetry.logs import Throttle, redact


def describe(exc: BaseException) -> dict[str, str]:
    """The log fields of a failed Redis call: its class, its message (a refused login and an
    untrusted TLS certificate were a bare `ConnectionError`, like a Redis that is down) and a
    hint at the setting when the configuration is the likely cause."""
    text = str(exc)
    out = {"error": type(exc).__name__, "cause": redact(text[:300])}
    if "CERTIFICATE_VERIFY_FAILED" in text:
        out["hint"] = "the Redis TLS certificate is not trusted: check ssl_ca_certs in redis.url"
    elif type(exc).__name__ == "AuthenticationError" or "WRONGPASS" in text or "NOAUTH" in text:
        out["hint"] = "Redis refused the login: check the user in redis.url and redis.password"
    elif "SSL" in text or "reset by peer" in text:
        out["hint"] = "TLS failed: is redis.url's scheme (redis:// or rediss://) the port's?"
    return out


log = logging.getLogger(__name__)

State = Literal["healthy", "slow", "down"]
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
"""What a call to Redis may raise when Redis, not the caller, is the problem."""

Listener = Callable[[bool], Awaitable[None] | None]


class RedisPoolBusy(RedisError):
    """Every connection of the pool stayed in use while the call waited for one: this
    replica's own queue of Redis calls, not an answer from Redis (`service/config/redis.py`)."""


class RedisHealth:
    def __init__(
        self,
        client: Any,
        *,
        slow_strikes: int = 3,
        probe_interval_s: float = 1.0,
        on_busy: Callable[[], None] | None = None,
        probe_key: str | None = None,
        epoch: RedisEpoch | None = None,
        audit: RedisAudit | None = None,
    ) -> None:
        self._client = client
        self.epoch = epoch
        """The data epoch, watched from `start()` (None: not watched)."""
        self._watch: asyncio.Task[None] | None = None
        self.audit = audit
        """Redis' eviction setting and evictions, checked from `start()` (None: not checked)."""
        self._auditing: asyncio.Task[None] | None = None
        self._probe_key = probe_key
        """Where the probe writes: a Redis that answers PING but refuses writes (OOM under
        `noeviction`, a read-only replica after a failover) stays down instead of flapping."""
        self._on_busy = on_busy
        self.busy = 0
        """Calls that waited in vain for a free connection of the pool (`RedisPoolBusy`)."""
        self._busy_warning = Throttle()
        self._slow_strikes = slow_strikes
        self._probe_interval_s = probe_interval_s
        self._strikes = 0
        self.state: State = "healthy"
        self._listeners: list[Listener] = []
        self._probe: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_error: str | None = None

    @property
    def down(self) -> bool:
        return self.state == "down"

    async def start(self) -> None:
        """Adopt the data epoch (when Redis answers) and watch it; audit the eviction setting."""
        if self.audit is not None and self._auditing is None:
            self._auditing = asyncio.get_running_loop().create_task(self.audit.run())
        if self.epoch is None or self._watch is not None:
            return
        try:
            await self.epoch.check()
        except REDIS_ERRORS as exc:
            self.failed(exc)
        self._watch = asyncio.get_running_loop().create_task(self.epoch.watch(lambda: self.down))

    def subscribe(self, listener: Listener) -> None:
        """`listener(True)` when Redis goes down, `listener(False)` when it is back."""
        self._listeners.append(listener)

    def ok(self) -> None:
        """A call answered."""
        if self.state == "slow":
            log.info("redis answers again after slow calls")
        if self.state != "down":
            self.state = "healthy"
            self._strikes = 0

    def failed(self, exc: BaseException) -> None:
        """A call failed with `exc` (one of `REDIS_ERRORS`)."""
        if isinstance(exc, RedisPoolBusy):
            self._pool_busy()
            return
        self.last_error = type(exc).__name__
        if self.state == "down":
            return
        if isinstance(exc, RedisTimeout | TimeoutError):
            self._strikes += 1
            if self._strikes < self._slow_strikes:
                if self.state == "healthy":
                    log.warning("redis is slow: a call timed out", extra={"strikes": self._strikes})
                self.state = "slow"
                return
        self._go_down(exc)

    def _pool_busy(self) -> None:
        self.busy += 1
        if self._on_busy is not None:
            self._on_busy()
        if self._busy_warning.due():
            log.warning(
                "every redis connection is in use: calls fall back to local state until one is free "
                "(raise redis.max_connections or redis.pool_timeout_s)",
                extra={"calls": self.busy},
            )

    def _go_down(self, exc: BaseException) -> None:
        self.state = "down"
        log.warning(
            "redis unreachable: limits, budgets and replay checks fall back to local state",
            extra=describe(exc),
        )
        self._notify(True)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    def _notify(self, down: bool) -> None:
        for listener in list(self._listeners):
            try:
                result = listener(down)
            except Exception:  # a listener's bug must not stop the state machine
                log.exception("redis health listener failed")
                continue
            if result is not None:
                task = asyncio.get_running_loop().create_task(_logged(result))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _probe_loop(self) -> None:
        while self.state == "down":
            await asyncio.sleep(self._probe_interval_s)
            try:
                if self._probe_key is None:
                    await self._client.ping()
                else:
                    await self._client.set(self._probe_key, "1", px=60_000)
                if self.epoch is not None:  # back, but with the data? (restored before going on)
                    await self.epoch.check()
            except REDIS_ERRORS as exc:
                self.last_error = type(exc).__name__
                continue
            self.state = "healthy"
            self._strikes = 0
            log.warning("redis reachable again: shared limits, budgets and replay checks restored")
            self._notify(False)

    async def aclose(self) -> None:
        for task in [self._probe, self._watch, self._auditing, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.epoch is not None:
            await self.epoch.aclose()


async def _logged(awaitable: Awaitable[None]) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("redis health listener failed")
