"""Fixtures shared by every test suite.

Real services, one per session: `kafka_bootstrap` (str, host:port), `kafka_admin`
(a started AIOKafkaAdminClient), `redis_url` (str). Per test: `new_topic` (a
TopicFactory making topics unique to the test) and `unique_group` (str).
See tests/support/kafka.py and tests/support/redis.py.
"""

from __future__ import annotations

from tests.support.kafka import kafka_admin, kafka_bootstrap, new_topic, unique_group
from tests.support.redis import redis_url

__all__ = ["kafka_admin", "kafka_bootstrap", "new_topic", "redis_url", "unique_group"]
