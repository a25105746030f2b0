"""The chaos suite's traffic is what partners really send, and its verifier checks trace context.

`bench.chaos.traffic.build_requests` mixes content types (text, images, PDFs, tools) and Kafka
headers (W3C trace context, application headers of every size and kind of bytes) from their own
generators, so every request keeps the partner, id, prompt, model, max_tokens and urgency the
seed gave it before; every request passes the gateway's own admission. The verifier counts an
outcome that lost its request's trace id (`trace_context_lost`), and fails the run on it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
from collections import Counter
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition

import bench.chaos.traffic as traffic
from bench.chaos import passed
from bench.chaos.traffic import (
    BINARY_SIZES,
    MANY_HEADERS,
    PARTNERS,
    Header,
    Request,
    build_requests,
    produce_paced,
)
from bench.chaos.verify import Outcome, OutcomeReader, Tally, expected_trace_id, summarise
from service.admission.admit import Admission, Admitted, Record
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.telemetry.tracing import forwarded_headers

N = 2000
TRACE_HEADERS = ("traceparent", "tracestate")


def _prompt(params: dict[str, Any]) -> str:
    content = params["messages"][0]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def _core(r: Request) -> list[Any]:
    """What a request was before content and headers were mixed in (respond_by aside: a time)."""
    doc = orjson.loads(r.value)
    p = doc["params"]
    return [
        r.partner, r.request_id, r.urgency, doc.get("service_class"), "respond_by" in doc,
        doc["metadata"], p["model"], p["max_tokens"], _prompt(p), p["metadata"],
    ]  # fmt: skip


def _fingerprint(requests: list[Request]) -> str:
    return hashlib.sha256(orjson.dumps([_core(r) for r in requests])).hexdigest()


@pytest.fixture(scope="module")
def requests() -> list[Request]:
    return build_requests(N, 11, "s11", batch_share=0.25)


def test_the_draws_before_content_and_headers_are_unchanged() -> None:
    """Pinned from build_requests before content types and headers were added (same seeds)."""
    assert _fingerprint(build_requests(400, 1, "s1", 0.25)) == (
        "abe2acddfcf0b1583bcd3e53cd80e62ed07ae1e90d6e595f2bd1275a4c8274ad"
    )
    assert _fingerprint(build_requests(400, 7, "s7", 0.0)) == (
        "c6c5f57760086d304bc85c0cde3e00be0f3ecfb72a3ff3372fb3b3cbe10a8947"
    )


def test_content_and_headers_draw_from_their_own_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other content and headers for every request leave everything else as it was."""
    before = build_requests(300, 5, "s5", 0.25)
    monkeypatch.setattr(traffic, "CONTENT", (("image", 1.0),))
    monkeypatch.setattr(traffic, "TRACEPARENT_SHARE", 1.0)
    monkeypatch.setattr(traffic, "APP_HEADERS", (("many", 1.0),))
    after = build_requests(300, 5, "s5", 0.25)
    assert {r.content for r in after} == {"image"}
    assert all(len(r.headers) > MANY_HEADERS for r in after)
    assert [_core(r) for r in after] == [_core(r) for r in before]
    assert [r.content for r in before] != [r.content for r in after]


def test_build_requests_is_deterministic_per_seed() -> None:
    def comparable(r: Request) -> tuple[Any, ...]:
        doc = orjson.loads(r.value)
        doc.pop("respond_by", None)
        return r.partner, r.request_id, r.urgency, r.content, r.headers, doc

    a, b = build_requests(500, 3, "t", 0.25), build_requests(500, 3, "t", 0.25)
    assert [comparable(r) for r in a] == [comparable(r) for r in b]
    other = build_requests(500, 4, "t", 0.25)
    assert [r.headers for r in a] != [r.headers for r in other]
    assert [r.content for r in a] != [r.content for r in other]


def _close(count: int, share: float, n: int = N) -> bool:
    """Within four standard deviations of `share` of `n` draws."""
    return abs(count / n - share) <= 4 * math.sqrt(share * (1 - share) / n)


def _content_kind(r: Request) -> str:
    params = orjson.loads(r.value)["params"]
    content = params["messages"][0]["content"]
    if isinstance(content, str):
        return "tools" if params.get("tools") else "text"
    types = {block["type"] for block in content[:-1]}
    assert content[-1]["type"] == "text"
    assert len(types) == 1, types
    return "pdf" if types == {"document"} else types.pop()


def test_the_content_mix(requests: list[Request]) -> None:
    kinds = Counter(_content_kind(r) for r in requests)
    assert kinds.keys() == {"text", "image", "pdf", "tools"}
    assert [r.content for r in requests] == [_content_kind(r) for r in requests]
    for kind, share in traffic.CONTENT:
        assert _close(kinds[kind], share), (kind, kinds)
    media, pages = Counter[str](), Counter[int]()
    for r in requests:
        content = orjson.loads(r.value)["params"]["messages"][0]["content"]
        for block in content[:-1] if isinstance(content, list) else []:
            raw = base64.b64decode(block["source"]["data"])
            media[block["source"]["media_type"]] += 1
            if block["type"] == "document":
                pages[int(raw.split(b"/Count ", 1)[1].split(b" ", 1)[0])] += 1
    assert {"image/png", "image/jpeg", "image/webp", "application/pdf"} <= media.keys()
    assert set(pages) == {1, 2, 3, 4, 5}


def _app(headers: tuple[Header, ...]) -> list[Header]:
    return [(k, v) for k, v in headers if k not in TRACE_HEADERS]


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _header_kind(headers: tuple[Header, ...]) -> str:
    app = _app(headers)
    names = [k for k, _ in app]
    if not app:
        return "none"
    if len(app) == MANY_HEADERS:
        return "many"
    if len(set(names)) < len(names):
        return "repeated"
    if any(v is None for _, v in app):
        return "null_value"
    if names == ["x-app-blob"]:
        return "binary"
    if any(v is not None and not _utf8(v) for _, v in app):
        return "non_utf8"
    assert all(v is not None and v.isascii() and len(v) < 64 for _, v in app), app
    return "ascii"


def test_the_header_mix(requests: list[Request]) -> None:
    traced = [r for r in requests if any(k == "traceparent" for k, _ in r.headers)]
    with_state = [r for r in traced if any(k == "tracestate" for k, _ in r.headers)]
    assert _close(len(traced), traffic.TRACEPARENT_SHARE)
    assert _close(len(with_state), traffic.TRACESTATE_SHARE, len(traced))
    assert not any(k == "tracestate" for r in requests if r not in traced for k, _ in r.headers)
    flags = Counter(v[-2:] for r in traced for k, v in r.headers if k == "traceparent" and v)
    assert flags.keys() == {b"00", b"01"}
    members = Counter(v.count(b",") + 1 for r in with_state for k, v in r.headers if k == "tracestate" and v)
    assert set(members) == {1, 2, 3, 4, 5}
    # the trace context is not always first: partners' clients put it anywhere
    assert any(r.headers[0][0] not in TRACE_HEADERS for r in traced)

    kinds = Counter(_header_kind(r.headers) for r in requests)
    assert kinds.keys() == dict(traffic.APP_HEADERS).keys()
    for kind, share in traffic.APP_HEADERS:
        assert _close(kinds[kind], share), (kind, kinds)
    blobs = Counter(len(v or b"") for r in requests for k, v in _app(r.headers) if k == "x-app-blob")
    assert blobs.keys() == set(BINARY_SIZES)
    assert min(blobs.values()) > kinds["binary"] / len(BINARY_SIZES) / 2
    for r in requests:
        assert all(isinstance(k, str) for k, _ in r.headers), "a name that is not UTF-8 is dead-lettered"
        assert not any(k.lower().startswith(("x-gateway-", "gateway-")) for k, _ in r.headers)
        if _header_kind(r.headers) == "non_utf8":
            assert any(v is not None and not _utf8(v) for _, v in _app(r.headers))


def test_every_trace_context_is_one_the_gateway_copies_whole(requests: list[Request]) -> None:
    """With tracing off the gateway copies what it takes for valid: here all of it."""
    for r in requests:
        sent = tuple((k, v) for k, v in r.headers if k in TRACE_HEADERS)
        assert forwarded_headers(r.headers) == sent
        assert (expected_trace_id(r) is None) == (not sent)


async def test_every_request_is_admitted_by_the_gateway(requests: list[Request]) -> None:
    """The partners as the chaos gateways configure them (default limits: 1 MiB a record)."""
    settings = parse_config(
        {
            "partners": [
                {"id": p.id, "weight": p.weight, "on_unknown": p.on_unknown, "api_key": {"env": "K"}}
                for p in PARTNERS
            ]
        }
    )
    admission = Admission(Registry.build(settings, environ={"K": "sk-chaos"}))
    for offset, r in enumerate(requests):
        rec = Record(
            f"claude.requests.{r.partner}", 0, offset, None, r.request_id.encode(), r.value, r.headers
        )
        verdict = await admission.admit_checked(rec)
        assert isinstance(verdict, Admitted), (r.request_id, r.content, verdict)
        assert verdict.params["metadata"] == {"user_id": r.key}
    largest = max(len(r.value) + sum(len(k) + len(v or b"") for k, v in r.headers) for r in requests)
    assert largest < 512 * 1024, largest


async def test_the_producer_sends_each_requests_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, bytes, bytes, list[Header]]] = []

    class FakeProducer:
        def __init__(self, **config: Any) -> None:
            assert config["max_request_size"] >= 1024 * 1024

        async def start(self) -> None: ...
        async def flush(self) -> None: ...
        async def stop(self) -> None: ...

        async def send(
            self, topic: str, value: bytes, *, key: bytes, headers: list[Header]
        ) -> asyncio.Future[None]:
            sent.append((topic, value, key, headers))
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    monkeypatch.setattr(traffic, "AIOKafkaProducer", FakeProducer)
    reqs = build_requests(50, 2, "p")
    production = await produce_paced("x:1", lambda p: f"claude.requests.{p}", reqs, None, lambda _: None)
    assert len(production.acked) == 50
    assert [(t, v, k, tuple(h)) for t, v, k, h in sent] == [
        (f"claude.requests.{r.partner}", r.value, r.request_id.encode(), r.headers) for r in reqs
    ]


# -- the verifier -------------------------------------------------------------------------------

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _tp(trace_id: str = TRACE, span: str = "00f067aa0ba902b7", flags: str = "01") -> bytes:
    return f"00-{trace_id}-{span}-{flags}".encode()


def _trace_id(n: int) -> str:
    return f"{n:032x}"


def test_the_verifier_counts_outcomes_that_lost_the_trace_context() -> None:
    ok_calls = {"ok": 1, "billed": 1, "all": 1}
    cases: list[tuple[Request, list[tuple[str, dict[str, Any], list[Header]]]]] = []

    def case(rid: str, headers: list[Header], *outcomes: tuple[str, dict[str, Any], list[Header]]) -> None:
        cases.append((Request("alpha", rid, b"{}", "realtime", tuple(headers)), list(outcomes)))

    def response(headers: list[Header], path: str | None = None) -> tuple[str, dict[str, Any], list[Header]]:
        return "response", ({"served_by": {"path": path}} if path else {}), headers

    def dead_letter(reason: str, headers: list[Header]) -> tuple[str, dict[str, Any], list[Header]]:
        return "deadletter", {"reason": reason}, headers

    json_ct: Header = ("content-type", b"application/json")
    # judged and kept: the same traceparent, or a child span (tracing on) of the same trace
    case("copied", [("x-app", b"1"), ("traceparent", _tp(_trace_id(1)))],
         response([json_ct, ("traceparent", _tp(_trace_id(1)))]))  # fmt: skip
    case("child-span", [("traceparent", _tp(_trace_id(2), flags="00"))],
         response([("traceparent", _tp(_trace_id(2), span="1111111111111111", flags="00"))]))  # fmt: skip
    case("dead-letter-kept", [("traceparent", _tp(_trace_id(3)))],
         dead_letter("retries_exhausted", [("gateway-reason", b"x"), ("traceparent", _tp(_trace_id(3)))]),
    )  # fmt: skip
    # judged and lost
    case("other-trace", [("traceparent", _tp(_trace_id(4)))],
         response([("traceparent", _tp(_trace_id(5)))]))  # fmt: skip
    case("missing", [("traceparent", _tp(_trace_id(6))), ("tracestate", b"k=v")],
         response([json_ct], path="batch"))  # fmt: skip
    case("dead-letter-missing", [("traceparent", _tp(_trace_id(7)))],
         dead_letter("outcome_unknown", [json_ct]))  # fmt: skip
    case("not-w3c-on-the-outcome", [("traceparent", _tp(_trace_id(8)))],
         response([("traceparent", _tp(_trace_id(8)).upper())]))  # fmt: skip
    case("one-of-two", [("traceparent", _tp(_trace_id(9)))],
         response([("traceparent", _tp(_trace_id(9)))]), response([json_ct]))  # fmt: skip
    # not judged: no traceparent, or one the gateway does not take (so does not copy)
    case("no-trace-context", [("x-app", b"1")], response([json_ct]))
    case("no-headers", [], response([("traceparent", _tp(_trace_id(10)))]))
    case("invalid-traceparent", [("traceparent", _tp(_trace_id(11)).upper())], response([json_ct]))
    case("null-traceparent", [("traceparent", None)], response([json_ct]))
    case("lost", [("traceparent", _tp(_trace_id(12)))])  # `lost` counts it, not this

    tally = Tally()
    calls: dict[str, dict[str, int]] = {}
    for req, outcomes in cases:
        calls[req.key] = ok_calls
        for kind, doc, headers in outcomes:
            tally.add(kind, orjson.dumps({"request_id": req.request_id, **doc}), headers)
    figures = summarise([r for r, _ in cases], tally, calls, set())
    assert figures["traced_requests"] == 8
    assert figures["trace_context_lost"] == 5
    assert [e["request_id"] for e in figures["failures"]["trace_context_lost"]] == [
        "other-trace",
        "missing",
        "dead-letter-missing",
        "not-w3c-on-the-outcome",
        "one-of-two",
    ]
    example = figures["failures"]["trace_context_lost"][0]
    assert (example["trace_id"], example["outcome_trace_ids"]) == (_trace_id(4), [_trace_id(5)])
    assert figures["trace_context_lost_by_outcome"] == {
        "deadletter/outcome_unknown": 1,
        "response/batch": 1,
        "response/realtime": 3,
    }
    assert (figures["lost"], figures["duplicate_outcomes"]) == (1, 1)


def test_outcomes_without_headers_are_not_taken_for_traced() -> None:
    tally = Tally()
    tally.add("response", b'{"request_id": "r"}')
    assert tally.by_request["r"] == [Outcome("response", None, False)]


@pytest.mark.parametrize("mode", ["chaos", "rebalance"])
def test_a_lost_trace_context_fails_the_run(mode: str) -> None:
    clean = {"lost": 0, "duplicate_outcomes": 0, "called_twice_unexplained": 0, "called_twice": 0}
    good: dict[str, Any] = clean | {"mode": mode, "requests": 10, "trace_context_lost": 0}
    assert passed(good)
    assert not passed(good | {"trace_context_lost": 1})


async def test_the_verifier_reads_the_outcome_headers() -> None:
    """The background reader hands each record's headers to the tally."""
    tp = TopicPartition("claude.responses.alpha", 0)
    reader = OutcomeReader.__new__(OutcomeReader)  # no Kafka consumer: a fake one below
    reader.kinds, reader.tally = {tp.topic: "response"}, Tally()

    class Consumer:
        async def getmany(self, **_: Any) -> dict[TopicPartition, list[SimpleNamespace]]:
            value = orjson.dumps({"request_id": "r"})
            return {tp: [SimpleNamespace(value=value, headers=[("traceparent", _tp(_trace_id(1)))])]}

    reader._consumer = Consumer()  # type: ignore[assignment]
    await reader._read_once(0)
    assert reader.tally.by_request["r"][0].trace_id == _trace_id(1)
