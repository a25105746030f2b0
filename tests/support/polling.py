"""Waiting in a test for something the service does in the background."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(condition: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.02) -> None:
    """Return once `condition()` is true; fail the test ("timed out") after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(interval_s)
