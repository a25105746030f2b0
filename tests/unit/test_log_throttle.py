"""A warning about a condition that lasts is repeated at most once per interval, and at once
after the condition cleared; a client library's identical records likewise."""

from __future__ import annotations

import logging

from service.telemetry.logs import RepeatFilter, Throttle
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


def test_a_client_librarys_repeated_record_passes_once_per_interval_and_says_how_many_were_dropped() -> None:
    """aiokafka logs `Topic %s not found in cluster metadata` about ten times a second while a
    topic is missing; the service's own records are never filtered."""
    clock = FakeClock()
    f = RepeatFilter(every_s=60.0, clock=clock)

    def record(name: str, topic: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, "Topic %s not found", (topic,), None)

    passed = []
    for _ in range(600):  # a minute at ten a second
        r = record("aiokafka.cluster", "dl.acme")
        passed.append((f.filter(r), getattr(r, "repeated", None)))
        clock.advance(0.1)
    assert [i for i, (ok, _) in enumerate(passed) if ok] == [0]
    assert f.filter(record("aiokafka.cluster", "dl.globex")), "another topic is another record"
    assert all(f.filter(record("service.ingest.partition", "dl.acme")) for _ in range(5))
    clock.advance(0.1)
    again = record("aiokafka.cluster", "dl.acme")
    assert f.filter(again)
    assert again.repeated == 599  # type: ignore[attr-defined]
