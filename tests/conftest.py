"""Session-wide real services (Kafka, Redis) and per-test unique names."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.kafka import kafka_broker
from tests.support.redis import redis_server


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with kafka_broker(tmp_path_factory.mktemp("kafka")) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def unique_group() -> str:
    return f"group-{uuid.uuid4().hex[:12]}"
