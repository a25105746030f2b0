"""`watch_topics`: what it says while the usage topic or an outcome topic is missing, and when it is
back; `report_slow_stop`."""

from __future__ import annotations

import asyncio
import logging

import pytest

from service.config.settings import KafkaSettings
from service.lifecycle import report_slow_stop, watch_topics

USAGE = "acme.usage"


async def test_a_missing_usage_topic_is_warned_about_until_it_exists(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service.lifecycle")
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:9", group_id="g", usage_topic=USAGE)
    topics: set[str] = {"req.acme"}
    stop = asyncio.Event()

    async def refresh() -> None:
        return None

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("the usage topic does not exist")]

    task = asyncio.create_task(
        watch_topics(
            lambda: {"req.acme"},
            refresh,
            stop,
            settings,
            every_s=0.01,
            repeat_s=0.05,
            known_topics=lambda: topics,
        )
    )
    try:
        for _ in range(200):
            if len(warnings()) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(warnings()) >= 2, "repeated while missing"
        assert getattr(warnings()[0], "topic", None) == USAGE
        topics.add(USAGE)
        await asyncio.sleep(0.1)
        said = len(warnings())
        await asyncio.sleep(0.2)
        assert len(warnings()) == said, "silent once it exists"
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


async def test_missing_outcome_topics_are_named_until_they_exist(caplog: pytest.LogCaptureFixture) -> None:
    """A partner's dead-letter (or response) topic that does not exist, on a broker that does not
    create topics (production), holds its partition's outcomes for good: say which topics."""
    caplog.set_level(logging.WARNING, logger="service.lifecycle")
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:9", group_id="g", usage_topic=USAGE)
    topics: set[str] = {"req.acme", USAGE, "resp.acme"}
    stop = asyncio.Event()

    async def refresh() -> None:
        return None

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("outcome topics do not exist")]

    task = asyncio.create_task(
        watch_topics(
            lambda: {"req.acme"},
            refresh,
            stop,
            settings,
            every_s=0.01,
            repeat_s=0.05,
            known_topics=lambda: topics,
            outcome_topics=lambda: {"resp.acme", "dl.acme"},
        )
    )
    try:
        for _ in range(200):
            if len(warnings()) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(warnings()) >= 2, "repeated while missing"
        assert getattr(warnings()[0], "topics", None) == ["dl.acme"]
        topics.add("dl.acme")
        await asyncio.sleep(0.1)
        said = len(warnings())
        await asyncio.sleep(0.2)
        assert len(warnings()) == said, "silent once it exists"
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


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
