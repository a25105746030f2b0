"""`create_topics` (service/config/kafka.py): aiokafka's `create_topics` returns the broker's
per-topic errors instead of raising them; the helper raises every one but "already exists"."""

from __future__ import annotations

import argparse
from typing import Any

import orjson
import pytest
from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError, TopicAuthorizationFailedError

from service.config.kafka import create_topics


class _Response:
    def __init__(self, topic_errors: list[tuple[Any, ...]]) -> None:
        self.topic_errors = topic_errors


class _Admin:
    def __init__(self, codes: dict[str, int]) -> None:
        self.codes = codes
        self.asked: list[str] = []

    async def create_topics(self, topics: list[NewTopic]) -> _Response:
        self.asked += [t.name for t in topics]
        return _Response([(t.name, self.codes.get(t.name, 0), None) for t in topics])


def _topics(*names: str) -> list[NewTopic]:
    return [NewTopic(n, 3, 1) for n in names]


async def test_the_created_topics_are_named_and_an_existing_one_is_no_error() -> None:
    admin = _Admin({"b": TopicAlreadyExistsError.errno})
    assert await create_topics(admin, _topics("a", "b", "c")) == ["a", "c"]  # type: ignore[arg-type]
    assert admin.asked == ["a", "b", "c"]


async def test_a_refusal_raises_naming_the_topic() -> None:
    admin = _Admin({"usage": TopicAuthorizationFailedError.errno})
    with pytest.raises(TopicAuthorizationFailedError, match="usage"):
        await create_topics(admin, _topics("usage"))  # type: ignore[arg-type]


async def test_nothing_to_create_asks_nothing() -> None:
    admin = _Admin({})
    assert await create_topics(admin, []) == []  # type: ignore[arg-type]
    assert admin.asked == []


def test_topics_ensure_says_a_refusal_in_one_line_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service import topics
    from service.config.loader import parse_config

    async def refused(*_: Any, **__: Any) -> list[dict[str, Any]]:
        raise TopicAuthorizationFailedError("could not create the topic acme.usage: denied")

    monkeypatch.setattr(topics, "ensure", refused)
    settings = parse_config({"partners": [{"id": "acme", "api_key": {"env": "K"}}]})
    args = argparse.Namespace(
        partitions=3,
        replication_factor=None,
        deadletter_retention_days=30.0,
        usage_retention_days=30.0,
        dry_run=False,
    )
    assert topics.run(args, settings) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert orjson.loads(err) == {
        "error": "TopicAuthorizationFailedError",
        "detail": "[Error 29] TopicAuthorizationFailedError: could not create the topic acme.usage: denied",
    }
