"""The simulator takes what the request contract admits, through the real SDK over HTTP, and
validates like the API: unknown fields 400, types checked, `max_tokens` from 0 to the limit;
`usage` says which tier and speed served the request and which server tools it used.

ANTHROPIC.md: the body is the SDK's `MessageCreateParams`; `usage` carries `service_tier`
(standard | priority | batch), `speed`, `inference_geo` and `server_tool_use`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anthropic
import pytest

from service.simulator import SimulatorConfig, SimulatorServer
from tests.simulator.conftest import SimFactory
from tests.simulator.simkit import body, headers
from tests.support.params import (
    BASE,
    SAMPLES,
    every_block_conversation,
    tool_groups,
    tool_variants,
    with_field,
)

ClientFactory = Callable[[SimulatorServer], anthropic.AsyncAnthropic]


@pytest.fixture
async def client() -> AsyncIterator[ClientFactory]:
    clients: list[anthropic.AsyncAnthropic] = []

    def factory(sim: SimulatorServer) -> anthropic.AsyncAnthropic:
        c = anthropic.AsyncAnthropic(api_key="sk-test", base_url=sim.url, max_retries=0)
        clients.append(c)
        return c

    yield factory
    for c in clients:
        await c.close()


async def _create(c: anthropic.AsyncAnthropic, params: dict[str, Any]) -> anthropic.types.Message:
    return await c.messages.create(**params)


@pytest.mark.parametrize("name", sorted(SAMPLES))
async def test_each_admitted_field_is_answered(
    make_sim: SimFactory, client: ClientFactory, name: str
) -> None:
    sim = await make_sim()
    message = await _create(client(sim), with_field(name))
    assert message.type == "message"
    assert sim.stats()["status_counts"] == {"200": 1}


async def test_every_field_at_once_every_tool_and_every_content_block(
    make_sim: SimFactory, client: ClientFactory
) -> None:
    sim = await make_sim()
    c = client(sim)
    groups = tool_groups([*SAMPLES["tools"], *tool_variants()])  # tool names are unique in a request
    for tools in groups:
        await _create(c, {**SAMPLES, "tools": tools})
    await _create(c, {**BASE, "messages": every_block_conversation()})
    assert sim.stats()["status_counts"] == {"200": len(groups) + 1}


async def test_a_field_of_the_old_contract_is_400_naming_it(
    make_sim: SimFactory, client: ClientFactory
) -> None:
    sim = await make_sim()
    with pytest.raises(anthropic.BadRequestError) as info:
        await _create(client(sim), {**BASE, "extra_body": {"temperature": 0.5}})
    assert "temperature: Extra inputs are not permitted" in str(info.value)


@pytest.mark.parametrize(
    ("max_tokens", "status"),
    [(0, 200), (1, 200), (128_000, 200), (128_001, 400), (-1, 400), (1.0, 400), ("1", 400), (None, 400)],
)
async def test_max_tokens_range(
    make_sim: SimFactory, http: aiohttp.ClientSession, max_tokens: Any, status: int
) -> None:
    sim = await make_sim(SimulatorConfig(output={"fixed_tokens": 3}))
    async with http.post(
        f"{sim.url}/v1/messages", json=body(max_tokens=max_tokens), headers=headers()
    ) as resp:
        assert resp.status == status, await resp.text()
        data = await resp.json()
    if status == 400:
        assert "max_tokens" in data["error"]["message"]
    elif max_tokens == 0:  # pre-warming the cache: nothing generated
        assert (data["content"], data["stop_reason"], data["usage"]["output_tokens"]) == ([], "max_tokens", 0)


@pytest.mark.parametrize(
    ("fields", "tier", "speed"),
    [
        ({}, "standard", "standard"),
        ({"service_tier": "auto"}, "standard", "standard"),
        ({"service_tier": "standard_only", "speed": "fast"}, "standard", "fast"),
        ({"speed": "standard"}, "standard", "standard"),
        ({"speed": None}, "standard", "standard"),
    ],
)
async def test_usage_reflects_service_tier_and_speed(
    make_sim: SimFactory, client: ClientFactory, fields: dict[str, Any], tier: str, speed: str
) -> None:
    sim = await make_sim()
    message = await _create(client(sim), {**BASE, **fields})
    assert (message.usage.service_tier, message.usage.speed) == (tier, speed)
    assert message.usage.inference_geo is None


async def test_priority_capacity_serves_auto_as_priority(make_sim: SimFactory, client: ClientFactory) -> None:
    sim = await make_sim(SimulatorConfig(priority_tier=True))
    c = client(sim)
    assert (await _create(c, {**BASE, "service_tier": "auto"})).usage.service_tier == "priority"
    assert (await _create(c, {**BASE, "service_tier": "standard_only"})).usage.service_tier == "standard"
    assert (await _create(c, BASE)).usage.service_tier == "standard"


async def test_usage_counts_server_tools_and_echoes_the_geo(
    make_sim: SimFactory, client: ClientFactory
) -> None:
    sim = await make_sim()
    tools = [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"name": "lookup", "input_schema": {"type": "object"}},
    ]
    message = await _create(client(sim), {**BASE, "tools": tools, "inference_geo": "us"})
    assert message.usage.server_tool_use is not None
    assert (
        message.usage.server_tool_use.web_search_requests,
        message.usage.server_tool_use.web_fetch_requests,
    ) == (
        1,
        1,
    )
    assert message.usage.inference_geo == "us"
    plain = await _create(client(sim), {**BASE, "tools": tools[2:]})
    assert plain.usage.server_tool_use is None
