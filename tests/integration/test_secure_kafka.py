"""The gateway on a secured broker: SASL_SSL with SCRAM-SHA-512, TLS from a private CA.

The broker (tests/support/secure_kafka.py) also has a PLAINTEXT listener: the test helpers
(topics, partner traffic, outcomes, committed offsets, metering) use it; the gateway is given
only the SASL_SSL one, with its password in a file and the run's CA. The broker ends every
SCRAM session after 3 s (`connections.max.reauth.ms`), and aiokafka never re-authenticates,
so the gateway's connections are closed and opened again, authenticating anew, all the time.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError

from service.app import Gateway
from service.config.settings import GatewaySettings
from service.simulator import SimulatorConfig, SimulatorServer
from service.telemetry.logs import JsonFormatter
from tests.support.gateway import (
    Message,
    World,
    collect,
    committed_offsets,
    make_world,
    produce,
    spread,
    usage_records,
)
from tests.support.scram import set_scram_password
from tests.support.secure_kafka import REAUTH_MS, SecureKafka, missing_tools, secure_kafka

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(missing_tools()), reason=f"a secured Kafka needs {missing_tools()}"),
]

USER = "gateway"
PASSWORD = f"scram-{uuid.uuid4().hex}"  # this run's; written at the broker's storage format


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    with secure_kafka(tmp_path_factory.mktemp("secure-kafka"), {USER: PASSWORD}) as b:
        yield b


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[list[str]]:
    """Every log line of the test as the gateway writes them (JsonFormatter, with its masking);
    the service's at DEBUG, aiokafka's and the HTTP clients' from INFO. Kept in the test's
    tmp dir (`gateway.log`)."""
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Lines()
    handler.setFormatter(JsonFormatter())
    quieter = {
        name: logging.getLogger(name) for name in ("aiokafka", "httpcore", "httpcore2", "httpx2", "anthropic")
    }
    levels = {name: lg.level for name, lg in quieter.items()}
    root = logging.getLogger()
    root_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for lg in quieter.values():
        lg.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        (tmp_path / "gateway.log").write_text("".join(f"{line}\n" for line in lines))
        root.removeHandler(handler)
        root.setLevel(root_level)
        for name, lg in quieter.items():
            lg.setLevel(levels[name])


def secured_settings(
    world: World, sim_url: str, broker: SecureKafka, user: str, pwfile: Path
) -> GatewaySettings:
    return world.settings(
        sim_url,
        kafka={
            "bootstrap_servers": broker.sasl_ssl,  # only the secured listener
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": user,
            "sasl_password": {"file": str(pwfile)},
            "ssl_cafile": str(broker.cafile),
        },
    )


@contextlib.asynccontextmanager
async def gateway_running(settings: GatewaySettings) -> AsyncIterator[Gateway]:
    gateway = Gateway(settings, serve_http=False)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def simulator(world: World) -> SimulatorServer:
    return SimulatorServer(SimulatorConfig.model_validate({"api_keys": world.keys, "seed": 5}))


async def authenticates(broker: SecureKafka, user: str, password: str) -> bool:
    """A new SASL_SSL connection as `user` with `password` is accepted. One connection of
    `aiokafka.conn`, not an aiokafka client: the gateway's `aiokafka.client.create_conn` gives
    any client of this process whose password is one of the gateway's the current content of
    its file instead (the old password would pass)."""
    host, _, port = broker.sasl_ssl.rpartition(":")
    try:
        conn = await create_conn(host, int(port), **broker.sasl_kwargs(user, password))
    except KafkaError:
        return False
    conn.close()
    return True


async def until_authenticates(broker: SecureKafka, user: str, password: str, timeout_s: float = 10) -> None:
    """The broker applies a credential change once its metadata has it: a moment after the
    AlterUserScramCredentials answer."""
    deadline = time.monotonic() + timeout_s
    while not await authenticates(broker, user, password):
        assert time.monotonic() < deadline, f"{user} was not accepted with the new password in {timeout_s}s"
        await asyncio.sleep(0.2)


async def end_offsets(world: World) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=world.bootstrap)
    await consumer.start()
    try:
        tps = [
            TopicPartition(world.request_topic(p), i) for p in world.partners for i in range(world.partitions)
        ]
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        return ends
    finally:
        await consumer.stop()


async def until_committed_to_the_end(world: World, timeout_s: float = 15) -> dict[TopicPartition, int]:
    """The gateway's group has committed every request partition up to its end offset."""
    ends = await end_offsets(world)
    deadline = time.monotonic() + timeout_s
    while (committed := await committed_offsets(world, f"{world.tag}-gateway")) != ends:
        if time.monotonic() > deadline:
            return committed
        await asyncio.sleep(0.3)
    return committed


def request_ids(messages: list[Message]) -> set[str]:
    return {str(orjson.loads(m[2] or b"{}")["request_id"]) for m in messages}


def leaked(lines: list[str], *secrets: str) -> list[str]:
    return [line for line in lines if any(s in line for s in secrets)]


def authentications(lines: list[str], user: str) -> list[float]:
    """When the gateway's connections authenticated as `user` (aiokafka's log line), in seconds."""
    events = (orjson.loads(line) for line in lines)
    return [
        calendar.timegm(time.strptime(e["ts"][:19], "%Y-%m-%dT%H:%M:%S")) + int(e["ts"][20:23]) / 1000
        for e in events
        if e["event"] == f"Authenticated as {user} via SCRAM-SHA-512"
    ]


async def test_scram_sha512_over_sasl_ssl_every_request_answered_once_and_metered(
    broker: SecureKafka, tmp_path: Path, logs: list[str]
) -> None:
    world = await make_world(broker.plaintext, tmp_path, ["acme", "globex"])
    pwfile = tmp_path / "kafka.password"
    pwfile.write_text(PASSWORD + "\n")  # as a mounted Secret: a trailing newline
    valid = spread(world, 90, "sec")
    broken: list[Message] = [(world.request_topic("globex"), None, b'{"request_id": "half", ')]
    began = time.monotonic()
    async with (
        simulator(world) as sim,
        gateway_running(secured_settings(world, sim.url, broker, USER, pwfile)),
    ):
        await produce(world.bootstrap, valid[:45] + broken)
        await asyncio.sleep(REAUTH_MS / 1000 + 0.5)  # the first sessions expire: reconnections
        await produce(world.bootstrap, valid[45:])
        out = await collect(world, len(valid) + 1, timeout_s=90, settle_s=1.0)
        committed = await until_committed_to_the_end(world)
        usage = await usage_records(world, len(out.responses), timeout_s=30)
        billed_twice = sim.calls(min_billed=2)["calls_by_request"]
    took = time.monotonic() - began

    ids = out.request_ids()
    assert out.total == len(valid) + 1, f"{out.total} outcomes for {len(valid) + 1} requests ({took:.0f}s)"
    assert {rid for rid, n in ids.items() if n > 1} == set(), "an outcome twice"
    assert {str(d["request_id"]) for d in out.responses} == request_ids(valid)
    assert out.reasons() == {"malformed_json": 1}
    assert committed == await end_offsets(world), "the group's offsets did not reach the end"
    assert sorted((r["partner"], r["request_id"]) for r in usage) == sorted(
        (d["partner"], d["request_id"]) for d in out.responses
    ), "one metering record per response"
    assert billed_twice == {}, "a request called twice upstream"
    # the broker ended the gateway's sessions; its new connections authenticated again
    assert any('"event":"gateway started"' in line for line in logs), "no gateway log captured"
    times = authentications(logs, USER)
    assert times, "the gateway never authenticated"
    assert max(times) - min(times) > REAUTH_MS / 1000, "no re-authentication after a session expired"
    assert leaked(logs, PASSWORD) == []


async def test_scram_password_rotated_on_the_broker_then_in_the_file_without_a_restart(
    broker: SecureKafka, tmp_path: Path, logs: list[str]
) -> None:
    """The operator's rotation: the broker's credential first, then the Secret's file. The
    gateway keeps its connections (authenticated before) until the broker ends their session;
    each new connection must read the file again. Before d190d23 it used the password it was
    built with: refused from the first reconnection on, the requests after the rotation were
    never answered."""
    user, first, second = (
        f"rot{uuid.uuid4().hex[:8]}",
        f"first-{uuid.uuid4().hex}",
        f"second-{uuid.uuid4().hex}",
    )
    await set_scram_password(broker.plaintext, user, first)  # a user made at run time
    await until_authenticates(broker, user, first)
    world = await make_world(broker.plaintext, tmp_path, ["acme", "globex"])
    pwfile = tmp_path / "kafka.password"
    pwfile.write_text(first + "\n")
    before, after = spread(world, 30, "before"), spread(world, 30, "after")
    async with (
        simulator(world) as sim,
        gateway_running(secured_settings(world, sim.url, broker, user, pwfile)),
    ):
        await produce(world.bootstrap, before)
        assert (await collect(world, len(before), timeout_s=60)).total == len(before)

        await set_scram_password(broker.plaintext, user, second)
        pwfile.write_text(second + "\n")
        rotated = len(logs)
        await until_authenticates(broker, user, second)
        assert not await authenticates(broker, user, first), "the old password still accepted"
        await asyncio.sleep(REAUTH_MS / 1000 + 1)  # every session of the gateway's has expired

        await produce(world.bootstrap, after)
        out = await collect(world, len(before) + len(after), timeout_s=30, settle_s=1.0)
        committed = await until_committed_to_the_end(world)

    answered = {str(d["request_id"]) for d in out.responses + out.dead_letters}
    assert request_ids(after) - answered == set(), (
        f"{len(request_ids(after) - answered)} of {len(after)} requests sent after the rotation "
        "never answered"
    )
    assert authentications(logs[rotated:], user), "no new connection after the rotation"
    assert out.total == len(before) + len(after)
    assert all(n == 1 for n in out.request_ids().values()), "an outcome twice"
    assert out.reasons() == {}
    assert committed == await end_offsets(world)
    assert leaked(logs, first, second) == []
