"""A real Kafka broker for the tests, and unique names on it.

Where the broker comes from, in this order:

1. `KAFKA_BOOTSTRAP_SERVERS`, if set (a broker someone already runs);
2. testcontainers' Kafka module, where a Docker daemon answers (image: `KAFKA_TEST_IMAGE`,
   default confluentinc/cp-kafka:7.9.0, Kafka 3.9, in KRaft mode);
3. the local Apache Kafka of `scripts/kafka_local.py` (this machine has no Docker), with its
   files in a pytest temporary directory, stopped at the end of the session.

`GATEWAY_TEST_KAFKA=local` skips the Docker probe.

Every test gets its own names so tests never collide on the shared broker:

    async def test_x(new_topic: TopicFactory, unique_group: str) -> None:
        topic = await new_topic("orders")              # orders-1f3a9c0b2d, 3 partitions
        p = await new_topic.partner()                  # claude.{requests,responses,deadletter}.p1f3a9c0b2d
        await new_topic.create("my.exact.name", partitions=1)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib.util
import os
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

from service.config.kafka import transactional_producer
from service.config.settings import KafkaSettings

ROOT = Path(__file__).resolve().parents[2]
TOPIC_ALREADY_EXISTS = 36
DEFAULT_TC_IMAGE = "confluentinc/cp-kafka:7.9.0"


# --------------------------------------------------------------------------- names


def unique_suffix(length: int = 10) -> str:
    """A random lowercase hex string, valid in topic names, group ids and partner ids."""
    return uuid.uuid4().hex[:length]


def unique_name(prefix: str, sep: str = "-") -> str:
    """`<prefix><sep><unique_suffix()>`: unique_name("orders") -> 'orders-1f3a9c0b2d'."""
    return f"{prefix}{sep}{unique_suffix()}"


def unique_partner_id(prefix: str = "p") -> str:
    """A partner id that matches the gateway's rule ^[a-z0-9][a-z0-9_-]{0,62}$ and is unique per call."""
    return f"{prefix}{unique_suffix()}"


@dataclass(frozen=True)
class PartnerTopics:
    """The three topics of one partner, named as the gateway's default prefixes name them."""

    partner: str
    requests: str
    responses: str
    deadletter: str

    @classmethod
    def named(cls, partner: str, tag: str = "claude") -> PartnerTopics:
        return cls(
            partner, f"{tag}.requests.{partner}", f"{tag}.responses.{partner}", f"{tag}.deadletter.{partner}"
        )

    @property
    def all(self) -> tuple[str, str, str]:
        return (self.requests, self.responses, self.deadletter)


# --------------------------------------------------------------------------- the broker


@functools.cache
def kafka_local() -> ModuleType:
    """scripts/kafka_local.py as a module (it is a script, not part of the package); loaded once."""
    name = "_gateway_kafka_local"
    if name in sys.modules:  # one `_CHILDREN`: a broker is waited for by the module that started it
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "kafka_local.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def docker_answers(timeout_s: float = 2.0) -> bool:
    """True when a Docker daemon answers a ping within `timeout_s` (cheap, never raises)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not Path(host.removeprefix("unix://")).exists():
        return False
    try:
        import docker  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return False
    # The docker client can leave a socket behind when the daemon does not answer; with
    # filterwarnings=error its ResourceWarning would fail an unrelated test later.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=int(max(timeout_s, 1)))
        except Exception:
            return False
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()
            gc.collect()


@contextlib.contextmanager
def kafka_broker(workdir: Path) -> Iterator[str]:
    """Yield a bootstrap address (see the module docstring for where it comes from)."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if os.environ.get("GATEWAY_TEST_KAFKA") != "local" and docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer(os.environ.get("KAFKA_TEST_IMAGE", DEFAULT_TC_IMAGE)).with_kraft() as container:
            yield str(container.get_bootstrap_server())
        return
    kl = kafka_local()
    try:
        bootstrap: str = kl.start(workdir, die_with_parent=True)  # no orphan if pytest is killed
    except kl.KafkaLocalError as exc:
        pytest.fail(f"the local Kafka broker did not start ({exc.exit_code}): {exc}", pytrace=False)
    try:
        yield bootstrap
    finally:
        kl.stop(workdir)


# --------------------------------------------------------------------------- transactions


@pytest.fixture
async def producers() -> AsyncIterator[list[AIOKafkaProducer]]:
    """The producers a test made (`started_transactional`), stopped after it."""
    made: list[AIOKafkaProducer] = []
    yield made
    for p in made:
        await p.stop()


async def started_transactional(
    settings: KafkaSettings, made: list[AIOKafkaProducer], txn_id: str
) -> AIOKafkaProducer:
    """The gateway's transactional producer for `txn_id`, started (and added to `made`, for the
    caller to stop: the `producers` fixture)."""
    p = transactional_producer(settings, txn_id)
    made.append(p)
    await p.start()
    return p


async def read_committed_values(
    bootstrap: str, tp: TopicPartition, want: int, timeout_s: float
) -> list[bytes]:
    """`read_committed` from the start of `tp` until `want` records or the timeout."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout_s
        while len(got) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(tp, timeout_ms=100)).values():
                got += [r.value or b"" for r in records]
    finally:
        await consumer.stop()
    return got


# --------------------------------------------------------------------------- topics


async def wait_for_topics(
    admin: AIOKafkaAdminClient, topics: list[str], partitions: int, timeout_s: float = 30.0
) -> None:
    """Wait until the broker's metadata shows every topic with `partitions` led partitions."""
    deadline = time.monotonic() + timeout_s
    pending = set(topics)
    while True:
        for described in await admin.describe_topics(sorted(pending)):
            parts = described.get("partitions") or []
            if (
                described.get("error_code") == 0
                and len(parts) >= partitions
                and all(p["error_code"] == 0 and p["leader"] >= 0 for p in parts)
            ):
                pending.discard(described["topic"])
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not ready within {timeout_s}s: {sorted(pending)}")
        await asyncio.sleep(0.05)


class TopicFactory:
    """Creates topics unique to one test and deletes them when the test ends.

    `await new_topic(prefix="test", partitions=3)` -> '<prefix>-<suffix>';
    `await new_topic.create(*names, partitions=3)` -> the exact names;
    `await new_topic.partner(partner=None, partitions=3, tag="claude")` -> PartnerTopics.
    Each returns once the broker's metadata shows the topics with their leaders.
    """

    def __init__(self, admin: AIOKafkaAdminClient) -> None:
        self.admin = admin
        self.created: list[str] = []

    async def __call__(self, prefix: str = "test", partitions: int = 3) -> str:
        name = unique_name(prefix)
        await self.create(name, partitions=partitions)
        return name

    async def create(
        self, *names: str, partitions: int = 3, configs: dict[str, str] | None = None
    ) -> list[str]:
        topics = [
            NewTopic(n, num_partitions=partitions, replication_factor=1, topic_configs=configs or {})
            for n in names
        ]
        response = await self.admin.create_topics(topics)
        for topic, code, *message in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise for_code(code)(f"could not create topic {topic}: {message}")
        self.created.extend(names)
        await wait_for_topics(self.admin, list(names), partitions)
        return list(names)

    async def partner(
        self, partner: str | None = None, partitions: int = 3, tag: str = "claude"
    ) -> PartnerTopics:
        topics = PartnerTopics.named(partner or unique_partner_id(), tag)
        await self.create(*topics.all, partitions=partitions)
        return topics

    async def delete_all(self) -> None:
        """Best effort: the topics die with the broker anyway."""
        if self.created:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.admin.delete_topics(self.created), timeout=10)
            self.created.clear()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's broker: `host:port`."""
    with kafka_broker(tmp_path_factory.mktemp("kafka")) as bootstrap:
        yield bootstrap


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def kafka_admin(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """One started aiokafka admin client for the session."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="tests-admin")
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


@pytest_asyncio.fixture(loop_scope="session")
async def new_topic(kafka_admin: AIOKafkaAdminClient) -> AsyncIterator[TopicFactory]:
    """A TopicFactory: topics unique to this test, deleted after it."""
    factory = TopicFactory(kafka_admin)
    try:
        yield factory
    finally:
        await factory.delete_all()


@pytest.fixture
def unique_group() -> str:
    """A consumer group id unique to this test."""
    return unique_name("group")
