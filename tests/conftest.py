"""Fixtures shared by every test suite.

Real services, one per session: `kafka_bootstrap` (str, host:port), `kafka_admin`
(a started AIOKafkaAdminClient), `redis_url` (str). Per test: `new_topic` (a
TopicFactory making topics unique to the test) and `unique_group` (str).
See tests/support/kafka.py and tests/support/redis.py.

Every test ends with a garbage collection, so a socket, connection or task a
test leaves open is reported against that test (warnings are errors), not
against whichever later test happens to trigger the collection. What survives a
collection is then frozen out of the collector, so each collection walks only what
the test itself made: walking everything every time took ~0.16 s a test, over
three minutes a run.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.support.kafka import kafka_admin, kafka_bootstrap, new_topic, producers, unique_group
from tests.support.redis import redis_url

__all__ = ["kafka_admin", "kafka_bootstrap", "new_topic", "producers", "redis_url", "unique_group"]


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Hypothesis' end-of-run import checks referrers through the collector,
    # which does not see frozen objects.
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _collect_leaks_of_this_test() -> Iterator[None]:
    yield
    gc.collect()
    gc.freeze()
