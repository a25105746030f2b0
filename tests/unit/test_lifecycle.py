"""`watch_topics`: what it says while the usage topic is missing, and when it is back."""

from __future__ import annotations

import asyncio
import logging

import pytest

from service.config.settings import KafkaSettings
from service.lifecycle import watch_topics

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
