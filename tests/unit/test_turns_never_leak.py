"""Nothing leaks: every way an upstream attempt can end gives its turn back (the partner's
and the service's concurrency slots) and settles its limiter reservation as it should
(issue 10: two non-JSON 200 bodies with `max_concurrency: 2` starved a partner forever
while `gateway_in_flight` showed 0).

The pipeline runs whole (admission, scheduler, limiter, Claude client, egress) with the
HTTP layer faked by httpx2.MockTransport and a sink that keeps what is published.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx2
import orjson
import pytest

from service.admission.admit import Admission, Record
from service.admission.registry import Registry
from service.config.loader import parse_config
from service.config.settings import GatewaySettings
from service.pipeline import Pipeline
from service.scheduling.limiter import Decision, LocalLimiter
from service.scheduling.pools import LimitConfig
from service.scheduling.scheduler import Cost, Scheduler
from service.telemetry.metrics import Metrics
from service.upstream.client import ClaudeClient
from tests.support.sink import MemorySink

BODY = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
    "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 1},
}  # fmt: skip
JSON = {"content-type": "application/json"}
Handler = Callable[[httpx2.Request], Any]


def _settings() -> GatewaySettings:
    return parse_config(
        {
            "org_limits": {"rpm": 600, "itpm": 1_000_000, "otpm": 100_000},
            "retry": {"max_attempts": 2, "base_delay_s": 0.001, "max_delay_s": 0.001},
            "partners": [{"id": "acme", "api_key": {"env": "K"}, "max_concurrency": 2}],
        }
    )


def FROZEN() -> float:
    return 1000.0


def _pipeline(handler: Handler) -> tuple[Pipeline, Scheduler]:
    settings = _settings()
    registry = Registry.build(settings, environ={"K": "sk-acme"})
    scheduler = Scheduler(settings, clock=FROZEN)  # levels do not refill: every token is accounted
    claude = ClaudeClient(
        settings.anthropic, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    )
    claude.sync_keys(registry.api_keys())
    return Pipeline(settings, Admission(registry), scheduler, claude, Metrics()), scheduler


def _record(i: int) -> Record:
    params = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    value = orjson.dumps({"request_id": f"r-{i}", "params": params})
    return Record("claude.requests.acme", 0, i, None, f"r-{i}".encode(), value)


def _levels(s: Scheduler) -> dict[tuple[str, str], float]:
    return {k: round(v, 3) for k, v in s.limiter.levels().items()}


def _outcome(sink: MemorySink) -> str:
    """The one outcome published (besides a billed response's metering record)."""
    outcomes = [m for m in sink.published if m.topic != "claude.usage"]
    assert len(outcomes) == 1, sink.published
    doc = orjson.loads(outcomes[0].value)
    return "response" if ".responses." in outcomes[0].topic else str(doc["reason"])


async def _ok_handler(_: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, content=orjson.dumps(BODY), headers=JSON)


async def _no_json(_: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, content=b"<html>upstream proxy error</html>", headers=JSON)


async def _status(status: int) -> Handler:
    async def handler(_: httpx2.Request) -> httpx2.Response:
        body = {"type": "error", "error": {"type": "api_error", "message": "boom"}}
        return httpx2.Response(status, content=orjson.dumps(body), headers=JSON)

    return handler


async def _refused(request: httpx2.Request) -> httpx2.Response:
    raise httpx2.ConnectError("refused", request=request)


async def _dropped(request: httpx2.Request) -> httpx2.Response:
    raise httpx2.ReadError("connection reset after sending", request=request)


@pytest.mark.parametrize(
    ("name", "handler", "reason"),
    [
        ("non-JSON 200 body", _no_json, "internal_error"),
        ("500 twice", None, "retries_exhausted"),
        ("connection refused twice", _refused, "retries_exhausted"),
        ("dropped after sending", _dropped, "outcome_unknown"),
    ],
)
async def test_each_failure_gives_the_turn_back(name: str, handler: Handler | None, reason: str) -> None:
    pipeline, scheduler = _pipeline(handler or await _status(500))
    for i in range(3):  # more than max_concurrency: a leaked slot would hang the third
        sink = MemorySink(i)
        await asyncio.wait_for(pipeline.handle(_record(i), sink), 5)
        assert _outcome(sink) == reason, name
    assert scheduler.in_flight("acme") == 0
    assert scheduler.in_flight() == 0
    assert scheduler.queued("acme") == 0
    await scheduler.aclose()


async def test_two_broken_bodies_do_not_starve_the_partner() -> None:
    calls = 0

    async def handler(request: httpx2.Request) -> httpx2.Response:
        nonlocal calls
        calls += 1
        if calls <= 2:
            return await _no_json(request)
        return httpx2.Response(200, content=orjson.dumps(BODY), headers=JSON)

    pipeline, scheduler = _pipeline(handler)
    sinks = [MemorySink(i) for i in range(3)]
    for i, sink in enumerate(sinks):
        await asyncio.wait_for(pipeline.handle(_record(i), sink), 5)
    assert [_outcome(s) for s in sinks] == ["internal_error", "internal_error", "response"]
    assert scheduler.in_flight("acme") == 0
    await scheduler.aclose()


async def test_cancelled_mid_call_gives_the_turn_back_and_keeps_the_reservation() -> None:
    started = asyncio.Event()

    async def hang(_: httpx2.Request) -> httpx2.Response:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    pipeline, scheduler = _pipeline(hang)
    before = _levels(scheduler)
    task = asyncio.create_task(pipeline.handle(_record(0), MemorySink(0)))
    await asyncio.wait_for(started.wait(), 5)
    assert scheduler.in_flight("acme") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert scheduler.in_flight("acme") == 0
    assert scheduler.in_flight() == 0
    after = _levels(scheduler)
    # it may have reached Claude: the reservation is kept (budgets and limits err on the bill)
    assert after[("org", "rpm")] == before[("org", "rpm")] - 1
    await scheduler.aclose()


class Hooked:
    """The real local limiter on a frozen clock, calling `hook` before each acquisition."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.inner = LocalLimiter(LimitConfig.of(settings), clock=FROZEN)
        self.hook: Callable[[], None] = lambda: None

    async def acquire(self, partner_id: str, cost: Cost) -> Decision:
        self.hook()
        return self.inner.try_acquire(partner_id, cost)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_waiter_cancelled_in_the_queue_or_just_granted_leaves_nothing_behind() -> None:
    settings = _settings()
    limiter = Hooked(settings)
    scheduler = Scheduler(settings, limiter, clock=FROZEN)  # type: ignore[arg-type]
    before = _levels(scheduler)
    cost = Cost(100, 64)
    held = [await scheduler.acquire("acme", cost) for _ in range(2)]  # max_concurrency 2
    in_queue = asyncio.create_task(scheduler.acquire("acme", cost))
    await asyncio.sleep(0.01)
    assert scheduler.queued("acme") == 1
    in_queue.cancel()
    with pytest.raises(asyncio.CancelledError):
        await in_queue
    assert scheduler.queued("acme") == 0

    # A is granted; before it resumes, B's acquisition cancels it: its grant must come back
    first = asyncio.create_task(scheduler.acquire("acme", cost))
    second = asyncio.create_task(scheduler.acquire("acme", cost))
    await asyncio.sleep(0.01)
    limiter.hook = first.cancel  # runs while the dispatcher asks for B, after A was granted
    scheduler.release(held.pop(), None)
    scheduler.release(held.pop(), None)
    with pytest.raises(asyncio.CancelledError):
        await first
    limiter.hook = lambda: None
    scheduler.release(await second, None)
    assert scheduler.in_flight("acme") == 0
    assert scheduler.in_flight() == 0
    after = _levels(scheduler)
    # three calls were (maybe) made and keep their reservations; the cancelled two took nothing
    assert after[("org", "rpm")] == before[("org", "rpm")] - 3
    assert after[("org", "otpm")] == before[("org", "otpm")] - 3 * 64
    await scheduler.aclose()


async def test_itpm_is_settled_with_cache_creation_and_without_cache_reads() -> None:
    """ANTHROPIC.md: ITPM counts input_tokens + cache_creation_input_tokens; on current models
    cache reads do not count."""
    usage = {
        "input_tokens": 50,
        "output_tokens": 10,
        "cache_creation_input_tokens": 400,
        "cache_read_input_tokens": 9000,
    }

    async def handler(_: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=orjson.dumps({**BODY, "usage": usage}), headers=JSON)

    pipeline, scheduler = _pipeline(handler)
    before = _levels(scheduler)
    sink = MemorySink(0)
    await asyncio.wait_for(pipeline.handle(_record(0), sink), 5)
    assert _outcome(sink) == "response"
    after = _levels(scheduler)
    assert before[("org", "itpm")] - after[("org", "itpm")] == 50 + 400
    assert before[("org", "otpm")] - after[("org", "otpm")] == 10
    await scheduler.aclose()


async def test_a_fault_while_admitting_is_dead_lettered_and_the_next_record_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No record can stop the service: admission raising (a bug, say an encoder refusing what the
    parser took) dead-letters that record `internal_error`, counted by stage, and the next one is
    answered. Before, the exception reached the ingest loop, which stopped without committing, so
    the same record stopped every restart."""
    pipeline, scheduler = _pipeline(_ok_handler)
    admit = pipeline.admission.admit

    def faulty(rec: Any, *, verified: bool = False) -> Any:
        if rec.offset == 0:
            raise TypeError("Recursion limit reached")
        return admit(rec, verified=verified)

    monkeypatch.setattr(pipeline.admission, "admit", faulty)
    outcomes, sinks = [], []
    for i in range(2):
        sink = MemorySink(i)
        await asyncio.wait_for(pipeline.handle(_record(i), sink), 5)
        outcomes.append(_outcome(sink))
        sinks.append(sink)
    assert outcomes == ["internal_error", "response"]
    # the partner can match it: the request id is read from the record (it was null)
    assert orjson.loads(sinks[0].published[0].value)["request_id"] == "r-0"
    faults = pipeline.metrics.registry.get_sample_value(
        "gateway_internal_errors_total", {"partner": "acme", "where": "admission"}
    )
    assert faults == 1
    await scheduler.aclose()


async def test_an_answer_the_gateway_cannot_write_is_dead_lettered_with_its_metering() -> None:
    """Claude's answer nested deeper than orjson writes (a tool input 300 levels deep): the call
    was billed, so the record is dead-lettered `internal_error` with its metering record, and the
    partition goes on (before, the encoder's error stopped the service at that record)."""
    deep = b"[" * 300 + b"]" * 300
    use = orjson.dumps(
        {**BODY, "content": [{"type": "tool_use", "id": "toolu_1", "name": "t", "input": {"x": "D"}}]}
    )
    calls = 0

    async def handler(_: httpx2.Request) -> httpx2.Response:
        nonlocal calls
        calls += 1
        content = use.replace(b'"D"', deep) if calls == 1 else orjson.dumps(BODY)
        return httpx2.Response(200, content=content, headers=JSON)

    pipeline, scheduler = _pipeline(handler)
    sinks = [MemorySink(i) for i in range(2)]
    for i, sink in enumerate(sinks):
        await asyncio.wait_for(pipeline.handle(_record(i), sink), 5)
    assert [_outcome(s) for s in sinks] == ["internal_error", "response"]
    assert [m.topic for m in sinks[0].published].count("claude.usage") == 1  # billed: metered
    faults = pipeline.metrics.registry.get_sample_value(
        "gateway_internal_errors_total", {"partner": "acme", "where": "respond"}
    )
    assert (faults, calls) == (1, 2)
    await scheduler.aclose()
