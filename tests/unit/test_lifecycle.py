"""`watch_topics`: what it says while the usage topic or an outcome topic is missing, and when it is
back; `report_slow_stop`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from service.config.settings import KafkaSettings
from service.lifecycle import report_slow_stop, watch_topics

USAGE = "acme.usage"


async def _warned_while_missing(
    caplog: pytest.LogCaptureFixture,
    warning: str,
    topics: set[str],
    missing: str,
    **kw: Callable[[], set[str]],
) -> list[logging.LogRecord]:
    """Run `watch_topics` over the brokers' `topics` (the request topic `req.acme` consumed):
    `warning` must repeat while `missing` is absent and stop once it exists. Returns the
    warnings said."""
    caplog.set_level(logging.WARNING, logger="service.lifecycle")
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:9", group_id="g", usage_topic=USAGE)
    stop = asyncio.Event()

    async def refresh() -> None:
        return None

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith(warning)]

    task = asyncio.create_task(
        watch_topics(
            lambda: {"req.acme"},
            refresh,
            stop,
            settings,
            every_s=0.01,
            repeat_s=0.05,
            known_topics=lambda: topics,
            **kw,
        )
    )
    try:
        for _ in range(200):
            if len(warnings()) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(warnings()) >= 2, "repeated while missing"
        topics.add(missing)
        await asyncio.sleep(0.1)
        said = warnings()
        await asyncio.sleep(0.2)
        assert len(warnings()) == len(said), "silent once it exists"
        return said
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


async def test_a_missing_usage_topic_is_warned_about_until_it_exists(
    caplog: pytest.LogCaptureFixture,
) -> None:
    said = await _warned_while_missing(caplog, "the usage topic does not exist", {"req.acme"}, USAGE)
    assert getattr(said[0], "topic", None) == USAGE


async def test_missing_outcome_topics_are_named_until_they_exist(caplog: pytest.LogCaptureFixture) -> None:
    """A partner's dead-letter (or response) topic that does not exist, on a broker that does not
    create topics (production), holds its partition's outcomes for good: say which topics."""
    said = await _warned_while_missing(
        caplog,
        "outcome topics do not exist",
        {"req.acme", USAGE, "resp.acme"},
        "dl.acme",
        outcome_topics=lambda: {"resp.acme", "dl.acme"},
    )
    assert getattr(said[0], "topics", None) == ["dl.acme"]


async def test_a_slow_stop_says_what_each_task_waits_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="service.lifecycle")
    gate = asyncio.Event()

    async def innermost_wait() -> None:
        await gate.wait()

    async def drain_that_hangs() -> None:
        await innermost_wait()

    stuck = asyncio.create_task(drain_that_hangs(), name="the-stuck-one")
    stop = asyncio.Event()
    report = asyncio.create_task(report_slow_stop(stop, 0.05))
    await asyncio.sleep(0.1)
    assert not caplog.records  # nothing before the stop is asked for
    stop.set()
    await asyncio.wait_for(report, 1)
    (record,) = [r for r in caplog.records if r.getMessage() == "still stopping"]
    waiting: str = record.waiting  # type: ignore[attr-defined]
    (line,) = [w for w in waiting.splitlines() if w.startswith("the-stuck-one: ")]
    assert line.index("drain_that_hangs") < line.index("innermost_wait") < line.index(" wait (")
    gate.set()
    await stuck
