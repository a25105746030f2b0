"""An asyncio event loop on virtual time: sleeps and timeouts take no wall time.

When nothing is ready, the loop jumps its clock to the next timer instead of
waiting, so minutes of scheduler and limiter behaviour (token buckets that refill
per second, calls that take 50 ms) run in milliseconds, deterministically. Use
`loop.time` as the clock of whatever is under test. No I/O: a loop with nothing
scheduled and nothing ready has deadlocked, and says so.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class _NoIoSelector(selectors.BaseSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise RuntimeError("virtual-time loop: nothing ready and nothing scheduled (deadlock)")
        self._loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(_NoIoSelector(self))
        self._clock_resolution = 0.0  # a timer fires once its time has come, never before

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds

    def _run_once(self) -> None:
        # Idle: jump to the next timer exactly (asyncio would fire it up to a clock resolution
        # early, before the clock reads its time, and code re-checking the clock would spin).
        # At least a nanosecond, so that a wait below float precision still moves time.
        ready: Any = getattr(self, "_ready")  # noqa: B009 - asyncio internals, stable since 3.4
        scheduled: Any = getattr(self, "_scheduled")  # noqa: B009
        if not ready and scheduled and scheduled[0].when() >= self._now:
            self._now = max(scheduled[0].when(), self._now + 1e-9)
        super()._run_once()  # type: ignore[misc]


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:  # a failed assertion leaves tasks behind: cancel them before closing
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            loop.close()
