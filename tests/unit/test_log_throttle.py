"""A warning about a condition that lasts is repeated at most once per interval, and at once
after the condition cleared."""

from __future__ import annotations

from service.telemetry.logs import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_warning_at_once_then_once_per_interval() -> None:
    clock = Clock()
    t = Throttle(60.0, clock)
    assert not t.warned
    seen = []
    for _ in range(130):
        seen.append(t.due())
        clock.now += 1.0
    assert [i for i, due in enumerate(seen) if due] == [0, 60, 120]
    assert t.warned


def test_clear_warns_at_once_about_the_next_occurrence() -> None:
    clock = Clock()
    t = Throttle(60.0, clock)
    assert t.due()
    clock.now += 5
    assert not t.due()
    t.clear()
    assert not t.warned
    assert t.due(), "a new occurrence after the condition ended is warned about at once"
    clock.now += 59.9
    assert not t.due()
