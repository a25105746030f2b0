"""Routing by urgency, the handoff record, a batch's state and what each result becomes."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.admission.admit import Record
from service.batches.records import (
    HEADER,
    BadHandoff,
    BatchState,
    Handoff,
    from_ranges,
    handoff_message,
    read_handoff,
    to_ranges,
)
from service.batches.results import Decision, decide
from service.batches.routing import Router, Turnaround, UrgencyError, custom_id, parse_urgency
from service.config.batching import BatchSettings
from service.config.loader import parse_config
from service.config.settings import GatewaySettings

NOW = 1_796_083_200.0  # 2026-12-01T00:00:00Z


def _settings(**batches: object) -> GatewaySettings:
    return parse_config(
        {
            "batches": {"enabled": True, "expected_turnaround_s": 3600, "margin_s": 600, **batches},
            "partners": [],
        }
    )


def _handoff(**kw: object) -> Handoff:
    base: dict[str, object] = dict(
        partner="acme", request_id="r-1", respond_by=None, routed_at=NOW, topic="claude.requests.acme",
        partition=2, offset=41, timestamp_ms=1, model="claude-haiku-4-5", submissions=1,
    )  # fmt: skip
    base.update(kw)
    return Handoff(**base)  # type: ignore[arg-type]


# -- urgency ------------------------------------------------------------------------------------


def test_urgency_defaults_to_the_partner_class_and_reads_rfc3339() -> None:
    assert parse_urgency({}, "auto").service_class == "auto"
    u = parse_urgency({"service_class": "batch", "respond_by": "2026-12-01T01:00:00Z"}, "realtime")
    assert (u.service_class, u.respond_by) == ("batch", NOW + 3600)
    assert parse_urgency({"respond_by": "2026-12-01T02:00:00+01:00"}, "auto").respond_by == NOW + 3600
    for lenient in ("2026-12-01t01:00:00z", "2026-12-01 01:00:00.000000001Z", "2026-12-01T00:30:00-00:30"):
        assert parse_urgency({"respond_by": lenient}, "auto").respond_by == pytest.approx(NOW + 3600)


@pytest.mark.parametrize(
    "doc",
    [
        {"service_class": "later"},
        {"service_class": 3},
        {"respond_by": "tomorrow"},
        {"respond_by": "2026-12-01T01:00:00"},  # no zone
        {"respond_by": 1796144400},
        {"respond_by": "2" * 100},
        # ISO 8601 forms that are not RFC 3339 (datetime.fromisoformat reads them all)
        {"respond_by": "2026-W49-2T01:00:00Z"},  # a week date
        {"respond_by": "20261201T010000Z"},  # basic format
        {"respond_by": "2026-12-01T01:00Z"},  # no seconds
        {"respond_by": "2026-12-01T01Z"},
        {"respond_by": "2026-12-01T01:00:00+0100"},  # offset without a colon
        {"respond_by": "2026-13-01T01:00:00Z"},  # month 13
    ],
)
def test_malformed_urgency_is_refused_with_a_sentence(doc: dict[str, object]) -> None:
    with pytest.raises(UrgencyError):
        parse_urgency(doc, "realtime")


def test_auto_goes_to_a_batch_only_when_the_deadline_leaves_room() -> None:
    s = _settings().batches
    router = Router(Turnaround(s))
    needed = 3600 * s.turnaround_factor + s.margin_s
    assert router.route(s, parse_urgency({"service_class": "auto"}, "realtime"), NOW) == "batch"
    auto = parse_urgency({"service_class": "auto", "respond_by": "2026-12-01T02:00:00Z"}, "realtime")
    assert auto.respond_by is not None
    assert router.route(s, auto, auto.respond_by - needed) == "batch"
    assert router.route(s, auto, auto.respond_by - needed + 1) == "realtime"
    assert (
        router.route(
            s, parse_urgency({"service_class": "batch", "respond_by": "2026-12-01T00:00:01Z"}, "x"), NOW
        )
        == "batch"
    )
    assert router.route(s, parse_urgency({}, "realtime"), NOW) == "realtime"
    off = _settings(enabled=False).batches
    assert router.route(off, parse_urgency({"service_class": "batch"}, "realtime"), NOW) == "realtime"


def test_the_expected_turnaround_follows_what_batches_took() -> None:
    t = Turnaround(BatchSettings(expected_turnaround_s=3600))
    for seconds in (100, 200, 300, 400):
        t.observe(seconds)
    assert t.expected_s == 3600, "four observations are not enough"
    for seconds in range(500, 2100, 100):
        t.observe(seconds)
    assert 1800 <= t.expected_s <= 2000, "the p95 of what was seen"
    t.observe(float("nan"))
    t.observe(-5)
    assert t.expected_s <= 2000


@given(
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=128),
    st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True),
)
def test_custom_ids_follow_anthropics_rules_and_are_stable(request_id: str, partner: str) -> None:
    cid = custom_id(partner, request_id)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cid)
    assert cid == custom_id(partner, request_id)
    assert cid != custom_id(partner, request_id + "x")


# -- the handoff record -------------------------------------------------------------------------


def test_a_handoff_keeps_the_partners_record_byte_for_byte_and_drops_a_forged_header() -> None:
    value = b'{"request_id": "r-1", "params": {}}  '
    rec = Record(
        "claude.requests.acme", 2, 41, 1, b"k", value, (("sig", b"abc"), (HEADER, b'{"partner": "evil"}'))
    )
    msg = handoff_message("pending", rec, _handoff())
    assert (msg.topic, msg.key, msg.value) == ("pending", b"k", value)
    assert [name for name, _ in msg.headers] == ["sig", HEADER]
    back = Record("pending", 0, 7, 2, msg.key, msg.value, msg.headers)
    handoff, original = read_handoff(back)
    assert handoff == _handoff()
    assert (original.topic, original.partition, original.offset) == ("claude.requests.acme", 2, 41)
    assert original.value == value
    assert list(original.headers) == [("sig", b"abc")]


@pytest.mark.parametrize("headers", [(), ((HEADER, b"not json"),), ((HEADER, b'{"partner": "acme"}'),)])
def test_an_unreadable_handoff_is_refused(headers: tuple[tuple[str, bytes], ...]) -> None:
    with pytest.raises(BadHandoff):
        read_handoff(Record("pending", 0, 1, None, None, b"{}", headers))


@given(st.sets(st.integers(min_value=0, max_value=10_000), max_size=300))
def test_member_ranges_round_trip(offsets: set[int]) -> None:
    assert from_ranges(to_ranges(offsets)) == sorted(offsets)


def test_a_batch_state_round_trips_without_its_handoffs() -> None:
    state = BatchState(
        "acme.1", "acme", NOW, [5, 6, 7, 9], reserved=[[10, 20], [1, 2], [3, 4], [5, 6]], shared=True
    )
    state.handoffs["x"] = (5, _handoff())
    back = BatchState.decode(state.encode())
    assert (back.members, back.reserved, back.shared, back.phase, back.handoffs) == (
        [5, 6, 7, 9],
        state.reserved,
        True,
        "intent",
        {},
    )
    assert back.reserved_of(9) == (5, 6)
    assert back.reserved_of(8) == (0, 0)
    assert len(orjson.loads(state.encode())["members"]) == 2, "contiguous members are one range"
    assert back.headers == {}


def test_a_batch_state_keeps_its_workspace_for_the_calls_after_a_crash() -> None:
    """The batch's `workspace_id` / `user_profile_id` (its calls' headers) are recorded with
    its intent: a worker that restarts polls and reads the batch in the same workspace."""
    headers = {"workspace_id": "wrkspc_01", "user_profile_id": "uprof_1"}
    state = BatchState("acme.1", "acme", NOW, [5], headers=headers)
    assert BatchState.decode(state.encode()).headers == headers


# -- results ------------------------------------------------------------------------------------


def test_a_succeeded_result_is_a_response_served_by_batch() -> None:
    gs = _settings()
    message = {
        "id": "msg_1",
        "model": "claude-haiku-4-5",
        "usage": {"input_tokens": 9, "output_tokens": 3, "service_tier": "batch"},
    }
    d = decide(
        gs,
        Router(Turnaround(gs.batches)),
        _handoff(metadata={"a": "b"}),
        {"type": "succeeded", "message": message},
        "msgbatch_1",
        NOW,
    )
    assert (d.action, d.kind) == ("response", "succeeded")
    assert d.cost is not None
    assert d.cost.doc()["service_tier"] == "batch"
    doc = orjson.loads(d.messages[0].value)
    assert doc["cost"] == d.cost.doc()
    record = orjson.loads(d.messages[1].value)
    assert d.messages[1].topic == gs.kafka.usage_topic
    assert (record["served_by"], record["cost"], record["request_id"]) == ("batch", doc["cost"], "r-1")
    assert d.messages[0].topic == gs.response_topic("acme")
    assert doc["served_by"] == {"path": "batch", "batch_id": "msgbatch_1"}
    assert (doc["message"], doc["metadata"], doc["request_id"]) == (message, {"a": "b"}, "r-1")


@pytest.mark.parametrize(
    ("result", "handoff", "action", "reason"),
    [
        ({"type": "errored", "error": {"error": {"type": "overloaded_error"}}}, {}, "rebatched", None),
        (
            {"type": "errored", "error": {"error": {"type": "api_error"}}},
            {"submissions": 3},
            "realtime",
            None,
        ),
        (
            {"type": "errored", "error": {"error": {"type": "api_error"}}},
            {"submissions": 3, "respond_by": NOW + 10},
            "deadletter",
            "retries_exhausted",
        ),
        (
            {"type": "errored", "error": {"error": {"type": "overloaded_error"}}},
            {"respond_by": NOW + 3600},
            "realtime",
            None,
        ),
        (
            {"type": "errored", "error": {"error": {"type": "invalid_request_error", "message": "bad"}}},
            {},
            "deadletter",
            "upstream_bad_request",
        ),
        ({"type": "expired"}, {}, "realtime", None),
        ({"type": "expired"}, {"respond_by": NOW + 10}, "deadletter", "batch_expired"),
        ({"type": "canceled"}, {"respond_by": NOW + 10}, "deadletter", "batch_canceled"),
        ({"type": "canceled"}, {"respond_by": NOW + 400}, "realtime", None),
    ],
)
def test_what_each_unbilled_result_becomes(
    result: dict[str, object], handoff: dict[str, object], action: str, reason: str | None
) -> None:
    gs = _settings(realtime_reserve_s=300, max_submissions=3)
    d = decide(gs, Router(Turnaround(gs.batches)), _handoff(**handoff), result, "msgbatch_1", NOW)
    assert d.action == action
    assert d.cost is None, "nothing billed"
    if reason is None:
        assert d.needs_record
        assert d.handoff is not None
    else:
        doc = orjson.loads(d.messages[0].value)
        assert doc["reason"] == reason
        assert "msgbatch_1" in doc["detail"]


TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("result", "respond_by", "action"),
    [
        ({"type": "succeeded", "message": {"id": "m", "usage": {"input_tokens": 1}}}, None, "response"),
        ({"type": "expired"}, NOW + 10, "deadletter"),
        ({"type": "errored", "error": {"error": {"type": "invalid_request_error"}}}, None, "deadletter"),
    ],
)
def test_a_batch_outcome_carries_the_requests_trace_context(
    result: dict[str, object], respond_by: float | None, action: str
) -> None:
    """As a real-time outcome does (docs/operations.md, tracing): found missing by the chaos
    suite's traced traffic, every batch-served response had lost it."""
    headers = (("x-other", b"\xff" * 20), ("traceparent", TRACEPARENT), ("tracestate", b"a=1,b=2"))
    rec = Record("claude.requests.acme", 2, 41, 1, b"k", b"{}", headers)
    msg = handoff_message("pending", rec, _handoff(respond_by=respond_by))
    assert b"trace" not in dict(msg.headers)[HEADER], "the record's own headers carry it"
    handoff, _ = read_handoff(Record("pending", 0, 7, 2, msg.key, msg.value, msg.headers))
    assert handoff.trace == (("traceparent", TRACEPARENT), ("tracestate", b"a=1,b=2"))
    gs = _settings()
    d = decide(gs, Router(Turnaround(gs.batches)), handoff, result, "msgbatch_1", NOW)
    assert d.action == action
    outcome = d.messages[0]
    assert outcome.topic == (
        gs.response_topic("acme") if action == "response" else gs.deadletter_topic("acme")
    )
    assert [v for k, v in outcome.headers if k == "traceparent"] == [TRACEPARENT]
    assert [v for k, v in outcome.headers if k == "tracestate"] == [b"a=1,b=2"]
    assert all(k != "x-other" for k, _ in outcome.headers), "only the trace context is copied"
    untraced, _ = read_handoff(
        Record("pending", 0, 8, 2, None, b"{}", ((HEADER, dict(msg.headers)[HEADER]),))
    )
    plain = decide(gs, Router(Turnaround(gs.batches)), untraced, result, "msgbatch_1", NOW)
    assert all(k not in ("traceparent", "tracestate") for k, _ in plain.messages[0].headers)


def _succeeded(gs: GatewaySettings, message: dict[str, object]) -> Decision:
    return decide(
        gs,
        Router(Turnaround(gs.batches)),
        _handoff(),
        {"type": "succeeded", "message": message},
        "msgbatch_1",
        NOW,
    )


def test_a_result_the_gateway_cannot_write_is_dead_lettered_and_metered() -> None:
    """A succeeded result nested deeper than orjson writes (a tool input 300 levels deep, read
    from the results JSONL): billed at batch price, so a dead letter `internal_error` and its
    metering record, instead of an error out of the worker at every try of that batch."""
    deep: list[object] = []
    for _ in range(300):
        deep = [deep]
    use = {"type": "tool_use", "id": "toolu_1", "name": "t", "input": {"x": deep}}
    message = {"id": "msg_1", "model": "claude-haiku-4-5", "content": [use], "usage": {"input_tokens": 9}}
    gs = _settings()
    d = _succeeded(gs, message)
    assert (d.action, d.kind) == ("deadletter", "succeeded")
    assert d.cost is not None  # settled as billed
    assert [m.topic for m in d.messages] == [gs.deadletter_topic("acme"), gs.kafka.usage_topic]
    dead = orjson.loads(d.messages[0].value)
    assert (dead["reason"], dead["detail"]) == ("internal_error", "gateway error: TypeError")
    assert orjson.loads(d.messages[1].value)["request_id"] == "r-1"


def test_a_result_that_cannot_be_decided_ends_that_member_and_not_the_batch() -> None:
    """A usage whose cost is beyond 64 bits (a simulator billing a PDF that claimed 10**15
    pages): its dead letter and metering record raised too, the exception left `decide`, and
    the whole batch was retried every few seconds forever, its other members never answered."""
    message = {"id": "msg_1", "model": "claude-haiku-4-5", "content": [], "usage": {"input_tokens": 10**20}}
    gs = _settings()
    d = _succeeded(gs, message)
    assert (d.action, d.kind) == ("deadletter", "succeeded")
    dead = orjson.loads(d.messages[0].value)
    assert dead["reason"] == "internal_error"
    assert dead["request_id"] == "r-1"
