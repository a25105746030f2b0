"""A warning about a condition that lasts is repeated at most once per interval, and at once
after the condition cleared."""

from __future__ import annotations

from service.telemetry.logs import Throttle
from tests.support.clock import FakeClock


def test_first_warning_at_once_then_once_per_interval() -> None:
    clock = FakeClock()
    t = Throttle(60.0, clock)
    assert not t.warned
    seen = []
    for _ in range(130):
        seen.append(t.due())
        clock.advance(1.0)
    assert [i for i, due in enumerate(seen) if due] == [0, 60, 120]
    assert t.warned


def test_clear_warns_at_once_about_the_next_occurrence() -> None:
    clock = FakeClock()
    t = Throttle(60.0, clock)
    assert t.due()
    clock.advance(5)
    assert not t.due()
    t.clear()
    assert not t.warned
    assert t.due(), "a new occurrence after the condition ended is warned about at once"
    clock.advance(59.9)
    assert not t.due()
