"""Calls per request (`GET /_sim/calls`): what the chaos suite counts double billing with."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from anthropic import AsyncAnthropic

from service.simulator import SimulatorConfig, SimulatorServer
from service.simulator.__main__ import build_parser, overrides_from_args
from service.simulator.calls import HEADER, MAX_KEY_CHARS, RequestCalls, request_key
from tests.simulator.conftest import SimFactory
from tests.simulator.simkit import MODEL, body, headers
from tests.support.polling import until


async def post(
    http: aiohttp.ClientSession, sim: SimulatorServer, doc: dict[str, Any], rid: str | None = None
) -> int:
    extra = {HEADER: rid} if rid is not None else {}
    async with http.post(f"{sim.url}/v1/messages", json=doc, headers={**headers(), **extra}) as resp:
        await resp.read()
        return resp.status


async def calls(http: aiohttp.ClientSession, sim: SimulatorServer, query: str = "") -> dict[str, Any]:
    async with http.get(f"{sim.url}/_sim/calls{query}") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
    return data


async def test_counts_per_gateway_header(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    for _ in range(3):
        assert await post(http, sim, body(), "acme:r-1") == 200
    assert await post(http, sim, body(), "acme:r-2") == 200
    assert await post(http, sim, body(max_tokens=-1), "acme:r-2") == 400  # counted in `all` only
    data = await calls(http, sim)
    assert data["calls_by_request"] == {
        "acme:r-1": {"ok": 3, "billed": 3, "all": 3},
        "acme:r-2": {"ok": 1, "billed": 1, "all": 2},
    }
    assert data["tracked"] == 2
    assert data["ok_more_than_once"] == 1
    assert data["billed_more_than_once"] == 1
    assert data == sim.calls()


async def test_metadata_user_id_is_the_fallback(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    assert await post(http, sim, body(metadata={"user_id": "globex:r-9"})) == 200
    # the header wins over the body when both are there
    assert await post(http, sim, body(metadata={"user_id": "globex:r-9"}), "globex:other") == 200
    assert await post(http, sim, body()) == 200  # neither: unkeyed
    data = await calls(http, sim)
    assert data["calls_by_request"] == {
        "globex:r-9": {"ok": 1, "billed": 1, "all": 1},
        "globex:other": {"ok": 1, "billed": 1, "all": 1},
    }
    assert data["unkeyed_calls"] == 1


async def test_the_sdk_header_and_metadata_are_seen(make_sim: SimFactory) -> None:
    """As the gateway calls: the SDK with an extra header, or the partner's metadata.user_id."""
    sim = await make_sim()
    async with AsyncAnthropic(api_key="sk-x", base_url=sim.url, max_retries=0) as client:
        await client.messages.create(
            model=MODEL,
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={HEADER: "initech:a"},
        )
        await client.messages.create(
            model=MODEL,
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            metadata={"user_id": "initech:b"},
        )
    assert set(sim.calls()["calls_by_request"]) == {"initech:a", "initech:b"}


async def test_faults_are_counted_but_not_ok(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(SimulatorConfig(faults={"api_error_rate": 0.5, "overloaded_rate": 0.5}))
    for _ in range(4):
        assert await post(http, sim, body(), "p:failing") in (500, 529)
    assert sim.calls()["calls_by_request"] == {"p:failing": {"ok": 0, "billed": 0, "all": 4}}


async def test_a_dropped_connection_is_billed_but_not_ok(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    sim = await make_sim(SimulatorConfig(faults={"drop_rate": 1.0}))
    with pytest.raises(aiohttp.ClientError):
        await post(http, sim, body(), "p:dropped")
    await until(lambda: sim.calls()["calls_by_request"], timeout_s=5)  # bookkeeping follows the abort
    assert sim.calls()["calls_by_request"] == {"p:dropped": {"ok": 0, "billed": 1, "all": 1}}
    assert sim.stats()["request_calls"]["billed_more_than_once"] == 0


async def test_a_call_whose_client_went_away_is_still_ok(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    """A gateway killed mid-call has still been billed: the work finishes and counts."""
    sim = await make_sim(SimulatorConfig(latency={"fixed_s": 0.3}))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await post(http, sim, body(), "p:abandoned")
    for _ in range(50):
        if sim.stats()["in_flight"] == 0:
            break
        await asyncio.sleep(0.05)
    assert sim.calls()["calls_by_request"] == {"p:abandoned": {"ok": 1, "billed": 1, "all": 1}}


async def test_filters_and_stats_summary(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim()
    for rid, n in (("a", 1), ("b", 2), ("c", 3)):
        for _ in range(n):
            await post(http, sim, body(), f"p:{rid}")
    assert set((await calls(http, sim, "?min_ok=2"))["calls_by_request"]) == {"p:b", "p:c"}
    assert set((await calls(http, sim, "?min_all=3"))["calls_by_request"]) == {"p:c"}
    async with http.get(f"{sim.url}/_sim/calls?min_ok=two") as resp:
        assert resp.status == 400
    async with http.get(f"{sim.url}/_sim/stats") as resp:
        summary = (await resp.json())["request_calls"]
    assert summary == {
        "tracked": 3,
        "max_tracked": 1_000_000,
        "ok_more_than_once": 2,
        "billed_more_than_once": 2,
        "unkeyed_calls": 0,
        "untracked_calls": 0,
    }
    async with http.post(f"{sim.url}/_sim/reset") as resp:
        assert resp.status == 200
    assert (await calls(http, sim))["calls_by_request"] == {}
    assert sim.calls()["max_tracked"] == 1_000_000


async def test_memory_is_bounded_by_the_cap(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(SimulatorConfig(max_tracked_requests=2))
    for rid in ("a", "b", "c", "a"):
        await post(http, sim, body(), f"p:{rid}")
    data = await calls(http, sim)
    assert data["calls_by_request"] == {
        "p:a": {"ok": 2, "billed": 2, "all": 2},  # a tracked key keeps counting
        "p:b": {"ok": 1, "billed": 1, "all": 1},
    }
    assert data["untracked_calls"] == 1
    sim.update_config({"max_tracked_requests": 3})  # the cap can change at runtime
    await post(http, sim, body(), "p:c")
    assert sim.calls()["tracked"] == 3


def test_long_keys_are_digested() -> None:
    key = request_key({HEADER: "x" * (MAX_KEY_CHARS + 1)}, None)
    assert key is not None
    assert key.startswith("sha256:")
    assert len(key) == 7 + 64
    assert request_key({}, {"metadata": {"user_id": 5}}) is None
    assert request_key({}, ["not", "a", "mapping"]) is None


def test_packed_counts_do_not_bleed() -> None:
    calls_ = RequestCalls()
    for _ in range(70_000):
        calls_.record("k", ok=False, billed=False)
    calls_.record("k", ok=True, billed=True)
    assert calls_.get("k") == {"ok": 1, "billed": 1, "all": 70_001}
    assert calls_.get("missing") is None


def test_cli_flag() -> None:
    args = build_parser().parse_args(["--max-tracked-requests", "10"])
    assert overrides_from_args(args)["max_tracked_requests"] == 10
