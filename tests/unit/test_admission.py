"""Admission: each kind of bad input gets its own dead-letter reason; good input passes."""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
import pytest

from service.admission.admit import IN_THREAD_BYTES, Admission, Admitted, Record, Rejected
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.contracts.reasons import Reason
from service.contracts.shape import MAX_DEPTH, MAX_REQUEST_HEADERS
from service.simulator.tokens import count_input_tokens

ENV = {"ACME_KEY": "sk-acme-secret", "GLOBEX_KEY": "sk-globex-secret"}


def _settings(**acme: object):
    return parse_config(
        {
            "partners": [
                {"id": "acme", "api_key": {"env": "ACME_KEY"}, "max_request_bytes": 4096, **acme},
                {"id": "globex", "api_key": {"env": "GLOBEX_KEY"}, "enabled": False},
            ]
        }
    )


def _admission(**acme: object) -> Admission:
    return Admission(Registry.build(_settings(**acme), environ=ENV))


def _rec(value: bytes | None, topic: str = "claude.requests.acme") -> Record:
    return Record(topic, 0, 1, 1_700_000_000_000, b"k", value, ())


def _req(**params: object) -> bytes:
    p = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    p.update(params)
    return orjson.dumps({"request_id": "r-1", "params": p})


def test_good_request_is_admitted_with_conservative_estimate() -> None:
    value = _req()
    verdict = _admission().admit(_rec(value))
    assert isinstance(verdict, Admitted)
    assert (verdict.partner.id, verdict.request_id, verdict.model, verdict.max_tokens) == (
        "acme",
        "r-1",
        "claude-haiku-4-5",
        100,
    )
    # block by block, at least what is billed (here the simulator's count), never the JSON's bytes
    assert count_input_tokens(verdict.params) <= verdict.est_input_tokens < len(value) // 4


@pytest.mark.parametrize(
    ("value", "topic", "reason"),
    [
        (b"{not json", "claude.requests.acme", Reason.MALFORMED_JSON),
        (b"", "claude.requests.acme", Reason.MALFORMED_JSON),
        (None, "claude.requests.acme", Reason.MALFORMED_JSON),
        (b'{"request_id": "\xff\xfe"}', "claude.requests.acme", Reason.INVALID_ENCODING),
        (b"x" * 5000, "claude.requests.acme", Reason.OVERSIZE),
        (orjson.dumps({"request_id": "r", "params": {}}), "claude.requests.acme", Reason.SCHEMA_VIOLATION),
        (orjson.dumps({"params": {}}), "claude.requests.acme", Reason.SCHEMA_VIOLATION),
        (_req(max_tokens="many"), "claude.requests.acme", Reason.SCHEMA_VIOLATION),
        (_req().replace(b"{", b'{"schema_version":1.0,', 1), "claude.requests.acme", Reason.SCHEMA_VIOLATION),
        (
            _req().replace(b"{", b'{"schema_version":true,', 1),
            "claude.requests.acme",
            Reason.SCHEMA_VIOLATION,
        ),
        (_req(model="gpt-4"), "claude.requests.acme", Reason.UNKNOWN_MODEL),
        (_req(), "claude.requests.globex", Reason.PARTNER_DISABLED),
        (_req(), "claude.requests.initech", Reason.UNKNOWN_PARTNER),
    ],
)
def test_bad_input_is_rejected_with_its_reason(value: bytes | None, topic: str, reason: Reason) -> None:
    verdict = _admission().admit(_rec(value, topic))
    assert isinstance(verdict, Rejected)
    assert verdict.reason is reason, verdict.detail
    assert verdict.detail
    assert verdict.partner_id == topic.rsplit(".", 1)[1]


@pytest.mark.parametrize("topic", ["claude.requests.globex", "claude.requests.initech"])
def test_a_request_refused_before_it_is_read_still_names_its_request_id(topic: str) -> None:
    """A disabled or unknown partner's dead letters carry the request's id when its value has a
    valid one, so that the partner (or its operator) can match them; none from a bad value."""
    adm = _admission()
    assert adm.admit(_rec(_req(), topic)).request_id == "r-1"  # type: ignore[union-attr]
    for value in (b"{not json", b"[1]", orjson.dumps({"request_id": 7}), None, b" " * (2 << 20)):
        verdict = adm.admit(_rec(value, topic))
        assert isinstance(verdict, Rejected)
        assert verdict.request_id is None


def test_identity_claim_of_another_partner() -> None:
    value = orjson.dumps({"request_id": "r-9", "partner": "globex", "params": orjson.loads(_req())["params"]})
    verdict = _admission().admit(_rec(value))
    assert isinstance(verdict, Rejected)
    assert (verdict.reason, verdict.request_id) == (Reason.IDENTITY_MISMATCH, "r-9")


def test_model_allow_list_and_max_tokens_policy() -> None:
    adm = _admission(allowed_models=["claude-haiku-4-5"], max_tokens_cap=50)
    v = adm.admit(_rec(_req(model="claude-opus-4-1")))
    assert isinstance(v, Rejected)
    assert v.reason is Reason.MODEL_NOT_ALLOWED
    v = adm.admit(_rec(_req(max_tokens=51)))
    assert isinstance(v, Rejected)
    assert v.reason is Reason.MAX_TOKENS_EXCEEDED
    clamp = _admission(max_tokens_cap=50, max_tokens_policy="clamp").admit(_rec(_req(max_tokens=51)))
    assert isinstance(clamp, Admitted)
    assert clamp.max_tokens == 50


def test_missing_secret_is_named_without_its_value() -> None:
    from service.admission.registry import RegistryError

    with pytest.raises(RegistryError, match=r"partners\[acme\]\.api_key \(env:ACME_KEY\)"):
        Registry.build(_settings(), environ={"GLOBEX_KEY": "x"})


async def test_a_large_value_is_admitted_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking a large document of many small blocks is pure Python (half a second for 1 MB):
    on the event loop it would hold every partner's requests meanwhile."""
    admission = _admission(max_request_bytes=1 << 20)
    threads: list[int] = []
    admit = admission.admit

    def recording(rec: Record, *, verified: bool = False) -> Admitted | Rejected:
        threads.append(threading.get_ident())
        return admit(rec, verified=verified)

    monkeypatch.setattr(admission, "admit", recording)
    blocks = [{"type": "text", "text": "x"}] * 3000  # about 80 KB
    large = _req(messages=[{"role": "user", "content": blocks}])
    assert len(large) >= IN_THREAD_BYTES
    assert isinstance(await admission.admit_checked(_rec(large)), Admitted)
    assert isinstance(await admission.admit_checked(_rec(_req())), Admitted)
    loop_thread = threading.get_ident()
    assert threads[0] != loop_thread
    assert threads[1] == loop_thread  # a small one: a thread would cost more than the check


async def test_records_behind_a_large_one_wait_for_it_in_their_partition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partition's requests reach the scheduler in offset order even when one is checked in a
    thread; another partition's do not wait for it."""
    admission = _admission(max_request_bytes=1 << 20)
    finished: list[str] = []
    admit = admission.admit

    def slow_when_large(rec: Record, *, verified: bool = False) -> Admitted | Rejected:
        if rec.value is not None and len(rec.value) >= IN_THREAD_BYTES:
            time.sleep(0.3)  # in the worker thread
        verdict = admit(rec, verified=verified)
        finished.append(f"{rec.partition}:{rec.offset}")
        return verdict

    monkeypatch.setattr(admission, "admit", slow_when_large)
    large = _req(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}] * 3000}])
    small = orjson.dumps({**orjson.loads(_req()), "request_id": "r-2"})
    other = orjson.dumps({**orjson.loads(_req()), "request_id": "r-3"})
    topic = "claude.requests.acme"
    verdicts = await asyncio.gather(
        admission.admit_checked(Record(topic, 0, 1, None, b"k", large, ())),
        admission.admit_checked(Record(topic, 0, 2, None, b"k", small, ())),
        admission.admit_checked(Record(topic, 1, 1, None, b"k", other, ())),
    )
    assert all(isinstance(v, Admitted) for v in verdicts)
    assert finished == ["1:1", "0:1", "0:2"]


def _nested(depth: int, where: str) -> bytes:
    """A request whose tool schema or tool input holds arrays nested `depth` deep."""
    deep = "[" * depth + "]" * depth
    params: dict[str, object] = {"model": "claude-haiku-4-5", "max_tokens": 10}
    if where == "tool_schema":
        params["messages"] = [{"role": "user", "content": "hi"}]
        params["tools"] = [{"name": "t", "input_schema": {"type": "object", "x": "DEEP"}}]
    else:
        use = {"type": "tool_use", "id": "toolu_1", "name": "t", "input": {"x": "DEEP"}}
        params["messages"] = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]},
        ]
        params["tools"] = [{"name": "t", "input_schema": {"type": "object"}}]
    return orjson.dumps({"request_id": "r-deep", "params": params}).replace(b'"DEEP"', deep.encode())


@pytest.mark.parametrize(
    ("where", "above"),
    [("tool_schema", 5), ("tool_input", 7)],  # levels above the nested arrays
)
def test_nesting_beyond_the_limit_is_refused_naming_the_place(where: str, above: int) -> None:
    """orjson reads 1,024 levels but writes about 254, and admission writes each tool again (the
    estimate): a request 253 levels deep raised there, and stopped its partition at every start."""
    adm = _admission(max_request_bytes=64 * 1024)
    fits = adm.admit(_rec(_nested(MAX_DEPTH - above, where)))
    assert isinstance(fits, Admitted), fits
    for depth in (MAX_DEPTH - above + 1, 253, 1_000):
        verdict = adm.admit(_rec(_nested(depth, where)))
        assert isinstance(verdict, Rejected)
        assert (verdict.reason, verdict.request_id) == (Reason.SCHEMA_VIOLATION, "r-deep")
        place = "tools[0].input_schema.x[0]" if where == "tool_schema" else "messages[1].content[0].input"
        assert f"nested more than {MAX_DEPTH} levels deep at params.{place}" in verdict.detail


class _Unread(tuple[tuple[str, bytes | None], ...]):
    """Headers that must not be read through (only counted)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the headers were read through")


def test_more_headers_than_the_limit_are_refused_before_anything_reads_them() -> None:
    """320,000 empty headers (a 0.9 MB record the broker takes) held the event loop ~350 ms:
    the size check, the signature and the operator replay each read them through."""
    value = _req()
    fits = _admission().admit(
        Record("claude.requests.acme", 0, 1, 1, b"k", value, (("a", None),) * MAX_REQUEST_HEADERS)
    )
    assert isinstance(fits, Admitted)
    for n in (MAX_REQUEST_HEADERS + 1, 320_000):
        headers = _Unread((("a", None),) * n)
        verdict = _admission().admit(Record("claude.requests.acme", 0, 1, 1, b"k", value, headers))
        assert isinstance(verdict, Rejected)
        assert (verdict.reason, verdict.detail) == (
            Reason.OVERSIZE,
            f"message has {n:,} headers; at most {MAX_REQUEST_HEADERS:,}",
        )
