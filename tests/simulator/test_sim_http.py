"""The HTTP behaviour: response shape, headers, rate limiting, latency, stats, control routes."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from service.simulator import SimulatorConfig, SimulatorServer, count_input_tokens
from service.simulator import handlers as sim_handlers
from service.simulator.buckets import UNLIMITED_HEADER_VALUE
from tests.simulator.conftest import SimFactory
from tests.simulator.simkit import MODEL, FakeClock, body, headers

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
RATELIMIT_HEADERS = [
    f"anthropic-ratelimit-{kind}-{field}"
    for kind in ("requests", "tokens", "input-tokens", "output-tokens")
    for field in ("limit", "remaining", "reset")
]
WALL = 1_750_000_000.0  # 2025-06-15T15:06:40Z


async def post(
    http: aiohttp.ClientSession, sim: SimulatorServer, doc: dict[str, Any], **hdrs: str
) -> tuple[int, CIMultiDict[str], Any]:
    async with http.post(f"{sim.url}/v1/messages", json=doc, headers=headers(**hdrs)) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.json()


async def test_success_shape(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(SimulatorConfig(output={"fixed_tokens": 42}))
    doc = body()
    status, hdrs, data = await post(http, sim, doc)
    assert status == 200
    assert hdrs["Content-Type"].startswith("application/json")
    assert data["id"].startswith("msg_")
    assert data["type"] == "message"
    assert data["role"] == "assistant"
    assert data["model"] == MODEL
    assert data["stop_reason"] == "end_turn"
    assert data["stop_sequence"] is None
    assert [b["type"] for b in data["content"]] == ["text"]
    assert len(data["content"][0]["text"]) == 42 * 4 - 1
    assert data["usage"] == {
        "input_tokens": count_input_tokens(doc),
        "output_tokens": 42,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "service_tier": "standard",
        "speed": "standard",
    }


async def test_output_is_capped_by_max_tokens(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(SimulatorConfig(output={"fixed_tokens": 500}))
    _, _, data = await post(http, sim, body(max_tokens=30))
    assert data["stop_reason"] == "max_tokens"
    assert data["usage"]["output_tokens"] == 30


async def test_stop_sequence(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(SimulatorConfig(output={"fixed_tokens": 10, "stop_sequence_rate": 1.0}))
    _, _, data = await post(http, sim, body(stop_sequences=["END", "STOP"]))
    assert data["stop_reason"] == "stop_sequence"
    assert data["stop_sequence"] == "END"
    _, _, data = await post(http, sim, body())  # no stop_sequences sent
    assert data["stop_reason"] == "end_turn"


@pytest.mark.parametrize(
    ("output", "low", "high"),
    [
        ({"distribution": "uniform", "min_tokens": 5, "max_tokens": 9}, 5, 9),
        ({"distribution": "lognormal", "median_tokens": 50, "sigma": 0.5}, 1, 2_000),
    ],
)
async def test_output_distributions(
    make_sim: SimFactory, http: aiohttp.ClientSession, output: dict[str, Any], low: int, high: int
) -> None:
    sim = await make_sim(SimulatorConfig(seed=3, output=output))
    seen = set()
    for _ in range(30):
        _, _, data = await post(http, sim, body(max_tokens=4_000))
        seen.add(data["usage"]["output_tokens"])
    assert all(low <= n <= high for n in seen)
    assert len(seen) > 2


async def test_all_headers_on_every_kind_of_answer(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(SimulatorConfig(api_keys={"a": "sk-a"}, limits={"rpm": 1}))
    answers = [
        await post(http, sim, body(), key="sk-a"),  # 200
        await post(http, sim, body(), key="sk-a"),  # 429
        await post(http, sim, body(), key="sk-b"),  # 401
        await post(http, sim, body(max_tokens=-1), key="sk-a"),  # 400
        await post(http, sim, body(model="nope"), key="sk-a"),  # 404
    ]
    assert [status for status, _, _ in answers] == [200, 429, 401, 400, 404]
    request_ids = set()
    for _, hdrs, _ in answers:
        for name in RATELIMIT_HEADERS:
            assert name in hdrs, name
        request_ids.add(hdrs["request-id"])
    assert len(request_ids) == len(answers)


async def test_header_values_and_rfc3339_resets(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    sim = await make_sim(
        SimulatorConfig(limits={"rpm": 60, "itpm": 600_000, "otpm": 60_000}, output={"fixed_tokens": 20}),
        clock=clock,
        wall_clock=lambda: WALL,
    )
    doc = body(max_tokens=1_000)
    _, hdrs, data = await post(http, sim, doc)
    p = "anthropic-ratelimit-"
    assert hdrs[p + "requests-limit"] == "60"
    assert hdrs[p + "requests-remaining"] == "59"
    assert hdrs[p + "input-tokens-limit"] == "600000"
    assert hdrs[p + "output-tokens-limit"] == "60000"
    # Remaining tokens are rounded to the nearest thousand.
    assert hdrs[p + "input-tokens-remaining"] == "600000"
    assert hdrs[p + "output-tokens-remaining"] == "60000"
    # The tokens-* trio is the one with the fewest tokens remaining (output here).
    assert hdrs[p + "tokens-limit"] == "60000"
    assert hdrs[p + "tokens-remaining"] == hdrs[p + "output-tokens-remaining"]
    for name in RATELIMIT_HEADERS:
        if name.endswith("-reset"):
            assert RFC3339.match(hdrs[name]), hdrs[name]
            datetime.fromisoformat(hdrs[name])
    # One request at 1/s refills in 1 s; 20 output tokens at 1000/s in 0.02 s (rounded up).
    assert hdrs[p + "requests-reset"] == "2025-06-15T15:06:41Z"
    assert hdrs[p + "output-tokens-reset"] == "2025-06-15T15:06:41Z"
    used = data["usage"]["input_tokens"]
    reset = datetime.fromisoformat(hdrs[p + "input-tokens-reset"])
    assert reset == datetime.fromtimestamp(WALL + 1 if used else WALL, UTC)


async def test_exact_remaining_when_rounding_is_off(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(
        SimulatorConfig(
            limits={"itpm": 100_000, "otpm": 50_000}, output={"fixed_tokens": 7}, round_remaining=False
        ),
        clock=FakeClock(),
    )
    doc = body(max_tokens=300)
    _, hdrs, data = await post(http, sim, doc)
    assert hdrs["anthropic-ratelimit-input-tokens-remaining"] == str(100_000 - data["usage"]["input_tokens"])
    assert hdrs["anthropic-ratelimit-output-tokens-remaining"] == str(50_000 - 7)


async def test_unlimited_buckets_report_a_huge_limit(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(SimulatorConfig(limits={"rpm": None, "itpm": 0, "otpm": None}))
    _, hdrs, _ = await post(http, sim, body())
    assert hdrs["anthropic-ratelimit-requests-limit"] == str(UNLIMITED_HEADER_VALUE)
    assert hdrs["anthropic-ratelimit-tokens-remaining"] == str(UNLIMITED_HEADER_VALUE)


async def test_429_with_retry_after_then_admitted(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    sim = await make_sim(SimulatorConfig(limits={"rpm": 2, "itpm": None, "otpm": None}), clock=clock)
    assert (await post(http, sim, body()))[0] == 200
    assert (await post(http, sim, body()))[0] == 200
    status, hdrs, data = await post(http, sim, body())
    assert status == 429
    assert data["error"]["type"] == "rate_limit_error"
    assert hdrs["retry-after"] == "30"  # 2 RPM refills one request every 30 s
    assert hdrs["anthropic-ratelimit-requests-remaining"] == "0"
    clock.advance(29)
    assert (await post(http, sim, body()))[0] == 429
    clock.advance(1)
    assert (await post(http, sim, body()))[0] == 200
    assert sim.stats()["rate_limited_429"] == 2


async def test_itpm_and_otpm_429(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    sim = await make_sim(
        SimulatorConfig(limits={"rpm": None, "itpm": 600, "otpm": 6_000}, output={"fixed_tokens": 10}),
        clock=clock,
    )
    big = body(messages=[{"role": "user", "content": "x" * 2_000}])  # 503 input tokens
    assert (await post(http, sim, big))[0] == 200
    status, hdrs, data = await post(http, sim, big)
    assert status == 429
    assert "input_tokens" in data["error"]["message"]
    assert int(hdrs["retry-after"]) == 41  # 406 missing tokens at 10/s, rounded up
    # OTPM: max_tokens is reserved up front; more than the whole bucket can never pass.
    status, hdrs, data = await post(http, sim, body(max_tokens=7_000))
    assert status == 429
    assert "output_tokens" in data["error"]["message"]


async def test_otpm_is_settled_to_the_real_output(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    sim = await make_sim(
        SimulatorConfig(limits={"rpm": None, "itpm": None, "otpm": 1_000}, output={"fixed_tokens": 10}),
        clock=clock,
    )
    for _ in range(5):  # 5 x 900 reserved would exceed 1000 without settlement
        assert (await post(http, sim, body(max_tokens=900)))[0] == 200
    level = sim.stats()["buckets"]["default"]["output_tokens"]["level"]
    assert level == 950


async def test_model_class_limits(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(
        SimulatorConfig(limits={"rpm": 100}, model_limits={"opus": {"rpm": 1}}), clock=FakeClock()
    )
    assert (await post(http, sim, body(model="claude-opus-4-7")))[0] == 200
    status, hdrs, _ = await post(http, sim, body(model="claude-opus-4-7"))
    assert status == 429
    assert hdrs["anthropic-ratelimit-requests-limit"] == "1"
    status, hdrs, _ = await post(http, sim, body(model=MODEL))
    assert status == 200
    assert hdrs["anthropic-ratelimit-requests-limit"] == "100"


async def test_zero_latency_never_sleeps(
    make_sim: SimFactory, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(sim_handlers, "_sleep", fake_sleep)
    sim = await make_sim(SimulatorConfig())
    await post(http, sim, body())
    assert slept == []
    sim.update_config(
        {"latency": {"fixed_s": 0.25, "per_output_token_s": 0.01}, "output": {"fixed_tokens": 5}}
    )
    await post(http, sim, body())
    assert slept == [pytest.approx(0.30)]
    sim.update_config({"latency": {"distribution": "lognormal", "median_s": 1.0, "sigma": 0.5, "max_s": 2.0}})
    for _ in range(20):
        await post(http, sim, body())
    assert all(0 < s <= 2.0 for s in slept[1:])
    assert len(set(slept[1:])) > 1


async def test_count_tokens_matches_usage(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    doc = body(system="You are terse.", tools=[{"name": "t", "input_schema": {"type": "object"}}])
    count_doc = {k: v for k, v in doc.items() if k != "max_tokens"}
    async with http.post(f"{sim.url}/v1/messages/count_tokens", json=count_doc, headers=headers()) as resp:
        counted = (await resp.json())["input_tokens"]
        assert "anthropic-ratelimit-requests-limit" in resp.headers
    _, _, data = await post(http, sim, doc)
    assert data["usage"]["input_tokens"] == counted


async def test_count_tokens_has_its_own_rpm(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(SimulatorConfig(count_tokens_rpm=1, limits={"rpm": 100}), clock=FakeClock())
    doc = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    url = f"{sim.url}/v1/messages/count_tokens"
    async with http.post(url, json=doc, headers=headers()) as resp:
        assert resp.status == 200
    async with http.post(url, json=doc, headers=headers()) as resp:
        assert resp.status == 429
        assert resp.headers["retry-after"] == "60"
    assert (await post(http, sim, body()))[0] == 200  # messages are not affected


async def test_stats_counts_and_never_shows_keys(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(
        SimulatorConfig(api_keys={"alice": "sk-alice-secret", "bob": "sk-bob-secret"}, limits={"rpm": 3}),
        clock=FakeClock(),
    )
    await post(http, sim, body(), key="sk-alice-secret")  # 200
    await post(http, sim, body(), key="sk-alice-secret")  # 200
    await post(http, sim, body(model="claude-sonnet-4-6"), key="sk-bob-secret")  # 200
    await post(http, sim, body(), key="sk-bob-secret")  # 429
    await post(http, sim, body(max_tokens=-1), key="sk-bob-secret")  # 400
    await post(http, sim, body(model="nope"), key="sk-bob-secret")  # 404
    await post(http, sim, body(), key="sk-mallory")  # 401
    async with http.get(f"{sim.url}/_sim/stats") as resp:
        raw = await resp.read()
    stats = orjson.loads(raw)
    assert b"secret" not in raw
    assert stats == {**stats, **sim.stats(), "uptime_s": stats["uptime_s"]}
    assert stats["calls_total"] == 7
    assert stats["calls_by_endpoint"] == {"messages": 7}
    assert stats["calls_by_key"] == {"alice": 2, "bob": 4}
    assert stats["calls_by_model"] == {MODEL: 4, "claude-sonnet-4-6": 1, "nope": 1}
    assert stats["status_counts"] == {"200": 3, "429": 1, "400": 1, "404": 1, "401": 1}
    assert stats["rate_limited_429"] == 1
    assert stats["in_flight"] == 0
    assert stats["input_tokens_total"] == 3 * count_input_tokens(body())
    assert stats["output_tokens_total"] == 3 * 64
    assert stats["buckets"]["default"]["requests"]["limit"] == 3
    assert stats["buckets"]["default"]["requests"]["level"] == 0


async def test_unconfigured_keys_are_reported_by_fingerprint(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim()
    await post(http, sim, body(), key="sk-anything-goes")
    (name,) = sim.stats()["calls_by_key"]
    assert re.fullmatch(r"key-[0-9a-f]{8}", name)


async def test_reset_route(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(SimulatorConfig(limits={"rpm": 1}), clock=FakeClock())
    await post(http, sim, body())
    assert (await post(http, sim, body()))[0] == 429
    async with http.post(f"{sim.url}/_sim/reset") as resp:
        assert resp.status == 200
    stats = sim.stats()
    assert stats["calls_total"] == 0
    assert stats["status_counts"] == {}
    assert (await post(http, sim, body()))[0] == 200  # buckets are full again


async def test_config_route(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(SimulatorConfig(api_keys={"a": "sk-a"}))
    async with http.post(f"{sim.url}/_sim/config", json={"faults": {"overloaded_rate": 1.0}}) as resp:
        assert resp.status == 200
        shown = await resp.json()
    assert shown["faults"]["overloaded_rate"] == 1.0
    assert "sk-a" not in orjson.dumps(shown).decode()
    assert (await post(http, sim, body(), key="sk-a"))[0] == 529
    async with http.post(f"{sim.url}/_sim/config", json={"faults": {"overloaded_rate": 2}}) as resp:
        assert resp.status == 400
        assert "faults.overloaded_rate" in (await resp.json())["error"]["message"]
    async with http.post(f"{sim.url}/_sim/config", json={"port": 1}) as resp:
        assert resp.status == 400
    async with http.post(f"{sim.url}/_sim/config", json={"limits": {"rpm": 7}}) as resp:
        assert resp.status == 200
    async with http.get(f"{sim.url}/_sim/config") as resp:
        assert (await resp.json())["limits"]["rpm"] == 7
    assert sim.stats()["buckets"]["default"]["requests"]["limit"] == 7


async def seeded_run(sim: SimulatorServer, http: aiohttp.ClientSession) -> list[tuple[int, int | None]]:
    outcomes = []
    for _ in range(40):
        status, _, data = await post(http, sim, body(max_tokens=1_000))
        outcomes.append((status, data["usage"]["output_tokens"] if status == 200 else None))
    return outcomes


async def test_seed_reproduces_a_run(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    def config(seed: int) -> SimulatorConfig:
        return SimulatorConfig(
            seed=seed,
            output={"distribution": "lognormal", "median_tokens": 100, "sigma": 1.0},
            faults={"api_error_rate": 0.2, "overloaded_rate": 0.2},
        )

    first = await seeded_run(await make_sim(config(7)), http)
    again = await seeded_run(await make_sim(config(7)), http)
    other = await seeded_run(await make_sim(config(8)), http)
    assert first == again
    assert first != other
    assert {status for status, _ in first} == {200, 500, 529}
    # A reset re-seeds too.
    sim = await make_sim(config(7))
    await seeded_run(sim, http)
    sim.reset()
    assert await seeded_run(sim, http) == first


async def test_lifecycle(make_sim: SimFactory) -> None:
    sim = SimulatorServer(SimulatorConfig())
    with pytest.raises(RuntimeError, match="not started"):
        _ = sim.url
    async with sim:
        assert sim.url.startswith("http://127.0.0.1:")
        assert sim.port > 0
    await sim.stop()  # a second stop is fine
    with pytest.raises(RuntimeError, match="already"):
        await sim.start()


async def test_many_concurrent_calls(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(SimulatorConfig(latency={"fixed_s": 0.01}, limits={"rpm": None}))

    async def one() -> int:
        async with http.post(f"{sim.url}/v1/messages", json=body(), headers=headers()) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses == [200] * 200
    stats = sim.stats()
    assert stats["status_counts"] == {"200": 200}
    assert stats["in_flight"] == 0
