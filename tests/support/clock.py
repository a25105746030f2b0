"""A fake clock for tests: time moves only when a test moves it.

The service takes its clocks as callables (`clock: Callable[[], float] = time.monotonic`
or `time.time`), so a `FakeClock` is passed as it is: calling it reads the time.
Move it with `advance(seconds)`, or set `now` to put it at an absolute time.
For asyncio code that sleeps, run on virtual time instead (tests/support/vtime.py).
"""

from __future__ import annotations


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
