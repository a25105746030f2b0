"""The partner client (claude-gateway-client) without a broker: correlation rules, the
producer's settings, the blocking facade's mechanics, its signing contract against the
gateway's, and that it imports without the gateway's dependencies.

On the real broker with the gateway: tests/integration/test_partner_client.py.
"""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from claude_gateway_client import client as client_module
from claude_gateway_client import sync as sync_module
from claude_gateway_client.client import PartnerClient
from claude_gateway_client.correlation import Correlation, RecordRef
from claude_gateway_client.errors import DeadLettered, OutcomeTimeout
from claude_gateway_client.signing import canonical_string as client_canonical
from claude_gateway_client.sync import SyncPartnerClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.contracts.signing import canonical_string as gateway_canonical

TOPIC = "claude.requests.acme"


def _ref(offset: int) -> RecordRef:
    return RecordRef(TOPIC, 0, offset)


def _response(rid: str = "x") -> dict[str, Any]:
    return {"request_id": rid, "message": {"role": "assistant"}}


def _dead_letter(offset: int, reason: str, rid: str = "x") -> dict[str, Any]:
    return {
        "request_id": rid,
        "reason": reason,
        "original": {"topic": TOPIC, "partition": 0, "offset": offset},
    }


# -- correlation ----------------------------------------------------------------------------


def test_the_replay_of_a_copy_is_held_and_the_response_is_the_outcome() -> None:
    c = Correlation("x")
    c.acknowledged(c.attempt(), _ref(10))
    c.acknowledged(c.attempt(), _ref(11))  # sent again
    assert c.on_dead_letter(_dead_letter(11, "replay")) is False
    assert not c.decided
    assert c.ignored == [_dead_letter(11, "replay")]
    assert c.on_response(_response()) is True
    assert (c.outcome, c.dead_lettered) == (_response(), False)
    assert c.on_dead_letter(_dead_letter(10, "internal_error")) is False, "decided once"


def test_a_replay_of_the_first_record_is_the_outcome_the_id_was_used_before() -> None:
    c = Correlation("x")
    c.acknowledged(c.attempt(), _ref(10))
    assert c.on_dead_letter(_dead_letter(10, "replay")) is True
    assert c.dead_lettered


def test_a_dead_letter_read_before_its_acknowledgement_is_decided_by_it() -> None:
    c = Correlation("x")
    first = c.attempt()
    assert c.on_dead_letter(_dead_letter(10, "replay")) is False
    assert c.acknowledged(first, _ref(10)) is True
    assert c.outcome == _dead_letter(10, "replay")


def test_after_a_lost_acknowledgement_the_copy_does_not_decide() -> None:
    c = Correlation("x")
    c.attempt()  # written, but the acknowledgement was lost
    c.acknowledged(c.attempt(), _ref(11))
    assert c.on_dead_letter(_dead_letter(11, "replay")) is False
    assert c.on_dead_letter(_dead_letter(10, "replay")) is False, "unknown record: a copy's too"
    assert c.on_response(_response()) is True


def test_other_dead_letters_decide_unless_about_a_later_copy() -> None:
    c = Correlation("x")
    c.acknowledged(c.attempt(), _ref(10))
    c.acknowledged(c.attempt(), _ref(11))
    assert c.on_dead_letter(_dead_letter(11, "stale_timestamp")) is False
    assert c.on_dead_letter(_dead_letter(10, "unknown_model")) is True
    unknown = Correlation("y")
    unknown.attempt()
    assert unknown.on_dead_letter({"request_id": "y", "reason": "schema_violation"}) is True


ADMITTED = ("response", "upstream_bad_request")  # the first is admitted: copies are `replay`


@st.composite
def _scenarios(draw: st.DrawFn) -> tuple[list[tuple[str, Any]], str, dict[str, Any] | None]:
    """Sends of one id, each written or not and its acknowledgement delivered or lost; the
    gateway's outcome for each written record; all in any order causality allows (attempt
    k+1 starts after attempt k's send ended; a record's outcome comes after its attempt
    started, maybe before its acknowledgement). Returns the events, the kind of the real
    outcome, and the first record's own outcome."""
    n = draw(st.integers(1, 4))
    written = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    acked = [w and draw(st.booleans()) for w in written]
    kind = draw(st.sampled_from([*ADMITTED, "unknown_model", "used_before"]))
    offsets = {k: 100 + k for k in range(n) if written[k]}
    first = min(offsets)

    def outcome_of(k: int) -> dict[str, Any]:
        if kind == "used_before" or (k != first and kind in ADMITTED):
            return _dead_letter(offsets[k], "replay")
        return _response() if kind == "response" else _dead_letter(offsets[k], kind)

    base: list[tuple[str, Any]] = []
    starts: dict[int, int] = {}
    for k in range(n):
        starts[k] = len(base)
        base.append(("attempt", k))
        if acked[k]:
            base.append(("ack", (k, offsets[k])))
    inserted: dict[int, list[tuple[str, Any]]] = {}
    for k in offsets:
        at = draw(st.integers(starts[k] + 1, len(base)))
        inserted.setdefault(at, []).append(("outcome", outcome_of(k)))
    events: list[tuple[str, Any]] = []
    for i in range(len(base) + 1):
        events += draw(st.permutations(inserted.get(i, [])))
        if i < len(base):
            events.append(base[i])
    known = kind != "used_before" or acked[0]  # documented: else the client cannot tell
    return events, kind, outcome_of(first) if known else None


@settings(max_examples=400, deadline=None)
@given(_scenarios())
def test_the_outcome_taken_is_the_first_records(scenario: tuple[list[tuple[str, Any]], str, Any]) -> None:
    events, kind, expect = scenario
    c = Correlation("x")
    for event, arg in events:
        if event == "attempt":
            assert c.attempt() == arg
        elif event == "ack":
            c.acknowledged(arg[0], _ref(arg[1]))
        elif "message" in arg:
            c.on_response(arg)
        else:
            c.on_dead_letter(arg)
    if kind == "unknown_model":  # refused at admission: every copy is refused the same way
        assert c.outcome is not None
        assert c.outcome["reason"] == "unknown_model"
    else:
        assert c.outcome == expect


# -- the producer -----------------------------------------------------------------------------


class _Captured(Exception):
    pass


def test_the_producer_is_idempotent_with_acks_all(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Producer:
        def __init__(self, **kw: Any) -> None:
            seen.update(kw)

        async def start(self) -> None:
            raise _Captured

        async def stop(self) -> None:
            seen["stopped"] = True

    monkeypatch.setattr(client_module, "AIOKafkaProducer", Producer)
    c = client_module.PartnerClient("k:9092", "acme", security_protocol="SSL")
    with pytest.raises(_Captured):
        asyncio.run(c.start())
    assert (seen["acks"], seen["enable_idempotence"], seen["security_protocol"]) == ("all", True, "SSL")
    assert seen["stopped"], "a failed start closes what it opened"
    with pytest.raises(ValueError, match="acks"):
        client_module.PartnerClient("k:9092", "acme", acks=1)


def test_outcome_of_an_id_never_sent_is_refused() -> None:
    c = client_module.PartnerClient("k:9092", "acme")
    with pytest.raises(ValueError, match="not sent by this client"):
        asyncio.run(c.outcome("nope", 0.1))


# -- the blocking facade ----------------------------------------------------------------------


class _FakeAsync:
    """Stands in for PartnerClient on the facade's loop (the real one: integration tests)."""

    loop_threads: set[str] = set()

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, params: Any, request_id: str | None = None, metadata: Any = None) -> str:
        _FakeAsync.loop_threads.add(threading.current_thread().name)
        await asyncio.sleep(0.05)
        return str(request_id)

    async def request(
        self, params: Any, request_id: Any = None, metadata: Any = None, timeout_s: float = 1
    ) -> Any:
        if params.get("model") == "bad":
            raise DeadLettered({"reason": "unknown_model", "detail": "no", "request_id": request_id})
        if params.get("hang"):
            await asyncio.sleep(3600)
        return {"request_id": request_id}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_module, "PartnerClient", _FakeAsync)
    _FakeAsync.loop_threads = set()


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("claude-gateway-client-")]


@pytest.mark.usefixtures("fake")
def test_sync_calls_run_on_the_clients_loop_from_many_threads() -> None:
    with SyncPartnerClient("k:9092", "acme") as client:
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: client.send({}, f"r{i}"), range(16)))
        assert ids == [f"r{i}" for i in range(16)]
        assert _FakeAsync.loop_threads == {"claude-gateway-client-acme"}
        assert client.request({}, "r1") == {"request_id": "r1"}
        with pytest.raises(DeadLettered) as caught:
            client.request({"model": "bad"}, "r2")
        assert caught.value.reason == "unknown_model"
        inner = client._client
    assert isinstance(inner, _FakeAsync)
    assert inner.stopped
    assert _client_threads() == []
    client.close()  # twice: nothing happens
    with pytest.raises(RuntimeError, match="closed"):
        client.send({}, "late")
    with pytest.raises(RuntimeError, match="twice"):
        client.start()


@pytest.mark.usefixtures("fake")
def test_a_call_from_the_loops_own_thread_is_refused() -> None:
    client = SyncPartnerClient("k:9092", "acme")
    client.start()
    try:
        loop = client._loop
        assert loop is not None
        refused: list[BaseException] = []
        done = threading.Event()

        def from_loop() -> None:
            try:
                client.send({}, "x")
            except RuntimeError as exc:
                refused.append(exc)
            done.set()

        loop.call_soon_threadsafe(from_loop)
        assert done.wait(5)
        assert len(refused) == 1
        assert "own thread" in str(refused[0])
        assert client.send({}, "y") == "y", "the client still works"
    finally:
        client.close()


def test_a_failed_start_leaves_no_thread_behind() -> None:
    client = SyncPartnerClient("127.0.0.1:1", "acme", request_timeout_ms=2000)
    with pytest.raises(KafkaConnectionError):
        client.start()
    assert _client_threads() == []
    client.close()


# -- contract and packaging ---------------------------------------------------------------------


@settings(max_examples=200)
@given(
    st.text(min_size=1, max_size=40),
    st.one_of(st.none(), st.text(max_size=40).map(str.encode)),
    st.text(min_size=1, max_size=40),
    st.integers(0, 10**13).map(str),
    st.binary(max_size=200),
)
def test_the_clients_canonical_string_is_the_gateways(
    topic: str, key: bytes | None, rid: str, ts: str, value: bytes
) -> None:
    assert client_canonical(topic, key, rid, ts, value) == gateway_canonical(topic, key, rid, ts, value)


BLOCKED = ["aiohttp", "anthropic", "prometheus_client", "redis", "pydantic", "yaml", "opentelemetry",
           "fastjsonschema", "httpx", "service"]  # fmt: skip

PROBE = f"""
import sys
from importlib.abc import MetaPathFinder

class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("the client must not need " + name)
        return None

sys.meta_path.insert(0, Block())
import claude_gateway_client
from claude_gateway_client import PartnerClient, SyncPartnerClient, DeadLettered, OutcomeTimeout, sign
import claude_gateway_client.correlation, claude_gateway_client.sync, claude_gateway_client.signing
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
print(loaded)
"""


def test_the_client_imports_without_the_gateways_dependencies() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, cwd="/", check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_outcome_errors_survive_pickling() -> None:
    """For process pools and task queues: both failed to unpickle (AttributeError, TypeError)."""
    dead = DeadLettered({"request_id": "r-1", "reason": "oversize", "partner": "acme"})
    back = pickle.loads(pickle.dumps(dead))
    assert (back.reason, back.request_id) == ("oversize", "r-1")
    timeout = pickle.loads(pickle.dumps(OutcomeTimeout("r-2", 5.0, [])))
    assert (timeout.request_id, str(timeout)) == ("r-2", "no outcome for request 'r-2' within 5s")


async def test_a_request_id_the_contract_refuses_is_refused_before_it_is_sent() -> None:
    """Its dead letter would carry no request id (the schema refuses it): the caller waited."""
    client = PartnerClient("127.0.0.1:1", "acme", await_outcomes=False)
    client._producer = object()  # type: ignore[assignment]  # started, as far as `send` looks
    for rid in ("a" * 129, "-starts-with-a-dash", "has space", "ünïcode"):
        with pytest.raises(ValueError, match="does not match"):
            await client.send({"model": "m", "max_tokens": 1, "messages": []}, request_id=rid)


def test_producer_and_consumer_options_go_to_their_own_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """`**kafka` goes to both: a consumer-only option (max_partition_fetch_bytes) made the
    producer raise TypeError, so a partner could not raise the 1 MB request limit either."""
    with pytest.raises(ValueError, match="acks"):
        PartnerClient("127.0.0.1:1", "acme", producer_options={"acks": 1})
    client = PartnerClient(
        "127.0.0.1:1", "acme", producer_options={"max_request_size": 4 << 20},
        consumer_options={"max_partition_fetch_bytes": 4 << 20},
    )  # fmt: skip
    assert client._producer_options == {"max_request_size": 4 << 20}
    assert client._consumer_options == {"max_partition_fetch_bytes": 4 << 20}
