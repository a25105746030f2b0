"""Prompt caching in the simulator: cache writes and reads by TTL, as `usage` reports them.

Anthropic's prompt caching: a block with `cache_control` is a breakpoint (`ttl` 5m by default,
or 1h); the top-level `cache_control` puts one on the last block; the prefix is cached in the
order tools, system, messages; a read costs 0.1x, a write 1.25x (5m) or 2x (1h); prefixes under
1,024 tokens are not cached. `usage` splits writes in `cache_creation.ephemeral_{5m,1h}_input_tokens`.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from service.simulator import SimulatorConfig, SimulatorServer, count_input_tokens
from service.simulator.caching import MIN_CACHEABLE_TOKENS
from tests.simulator.conftest import SimFactory
from tests.simulator.simkit import FakeClock, body, headers

EPHEMERAL = {"type": "ephemeral"}
ONE_HOUR = {"type": "ephemeral", "ttl": "1h"}
LONG = "cache me " * 800  # 7,200 characters: 1,800 tokens, over the minimum
TOOL = {
    "name": "lookup",
    "description": "Look a word up. " + "word " * 1200,
    "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}},
}


async def usage(http: aiohttp.ClientSession, sim: SimulatorServer, doc: dict[str, Any]) -> dict[str, Any]:
    async with http.post(f"{sim.url}/v1/messages", json=doc, headers=headers()) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = (await resp.json())["usage"]
    whole = count_input_tokens(doc)
    parts = data["input_tokens"] + data["cache_read_input_tokens"] + data["cache_creation_input_tokens"]
    assert parts == whole, "the three input figures add up to the prompt"
    split = data["cache_creation"]
    assert (
        split["ephemeral_5m_input_tokens"] + split["ephemeral_1h_input_tokens"]
        == (data["cache_creation_input_tokens"])
    )
    return data


def _system(cache_control: dict[str, str] | None = EPHEMERAL, text: str = LONG) -> list[dict[str, Any]]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if cache_control is not None:
        block["cache_control"] = cache_control
    return [block]


@pytest.fixture
async def sim(make_sim: SimFactory) -> tuple[SimulatorServer, FakeClock]:
    clock = FakeClock()
    return await make_sim(SimulatorConfig(output={"fixed_tokens": 10}), clock=clock), clock


async def test_a_block_breakpoint_writes_then_reads(
    sim: tuple[SimulatorServer, FakeClock], http: aiohttp.ClientSession
) -> None:
    server, _ = sim
    doc = body(system=_system())
    first = await usage(http, server, doc)
    assert first["cache_read_input_tokens"] == 0
    assert first["cache_creation_input_tokens"] >= MIN_CACHEABLE_TOKENS
    assert first["cache_creation"]["ephemeral_5m_input_tokens"] == first["cache_creation_input_tokens"]
    assert first["input_tokens"] > 0  # the message after the breakpoint
    second = await usage(http, server, doc)
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    assert second["input_tokens"] == first["input_tokens"]
    other_question = body(system=_system(), messages=[{"role": "user", "content": "Something else?"}])
    assert (await usage(http, server, other_question))["cache_read_input_tokens"] == (
        first["cache_creation_input_tokens"]
    )


async def test_ttls_split_the_writes_and_expire_on_their_own(
    sim: tuple[SimulatorServer, FakeClock], http: aiohttp.ClientSession
) -> None:
    server, clock = sim
    doc = body(tools=[{**TOOL, "cache_control": ONE_HOUR}], system=_system(EPHEMERAL))
    first = await usage(http, server, doc)
    one_hour = first["cache_creation"]["ephemeral_1h_input_tokens"]
    five_minutes = first["cache_creation"]["ephemeral_5m_input_tokens"]
    assert one_hour >= MIN_CACHEABLE_TOKENS  # the tools
    assert five_minutes > 0  # the system prompt after them
    clock.advance(301)  # the 5-minute entry is gone, the 1-hour one is not
    later = await usage(http, server, doc)
    assert later["cache_read_input_tokens"] == one_hour
    assert later["cache_creation"] == {
        "ephemeral_5m_input_tokens": five_minutes,
        "ephemeral_1h_input_tokens": 0,
    }
    clock.advance(3_601)
    assert (await usage(http, server, doc))["cache_read_input_tokens"] == 0


async def test_automatic_caching_follows_a_growing_conversation(
    sim: tuple[SimulatorServer, FakeClock], http: aiohttp.ClientSession
) -> None:
    server, _ = sim
    turns: list[dict[str, Any]] = [{"role": "user", "content": LONG}]
    first = await usage(http, server, body(messages=turns, cache_control=EPHEMERAL))
    assert first["cache_creation_input_tokens"] == count_input_tokens(body(messages=turns))
    assert first["input_tokens"] == 0
    turns += [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": "And then?"}]
    second = await usage(http, server, body(messages=turns, cache_control=ONE_HOUR))
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]  # looked back
    assert second["cache_creation"]["ephemeral_1h_input_tokens"] == second["cache_creation_input_tokens"] > 0


async def test_what_is_not_cached(
    sim: tuple[SimulatorServer, FakeClock], http: aiohttp.ClientSession
) -> None:
    server, _ = sim
    short = body(system=_system(text="Be brief."))
    for _ in range(2):  # under the minimum: never written, never read
        assert (await usage(http, server, short))["cache_creation_input_tokens"] == 0
    plain = body(system=_system(None))
    await usage(http, server, body(system=_system()))
    assert (await usage(http, server, plain))["cache_read_input_tokens"] == 0  # no breakpoint: no read
    other_model = body(system=_system(), model="claude-sonnet-4-5")
    assert (await usage(http, server, other_model))["cache_read_input_tokens"] == 0  # one cache per model
