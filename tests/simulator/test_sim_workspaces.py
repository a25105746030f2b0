"""Workspaces: a key in a workspace draws on its workspace's limits as well as the org's, and
its answers' headers show whichever has less left (ANTHROPIC.md: the most restrictive limit
in effect). Token billing per key is in the stats."""

from __future__ import annotations

import aiohttp

from service.simulator import SimulatorConfig
from tests.simulator.conftest import SimFactory
from tests.simulator.simkit import FakeClock, body
from tests.simulator.test_sim_http import post


async def test_a_workspace_limit_refuses_its_keys_only(
    make_sim: SimFactory, http: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    config = SimulatorConfig(
        api_keys={"alice": "sk-alice", "bob": "sk-bob"},
        limits={"rpm": 100, "itpm": None, "otpm": None},
        workspaces={"small": {"keys": ["alice"], "limits": {"rpm": 2}}},
    )
    sim = await make_sim(config, clock=clock)
    for _ in range(2):
        status, hdrs, _ = await post(http, sim, body(), key="sk-alice")
        assert status == 200
        assert hdrs["anthropic-ratelimit-requests-limit"] == "2"  # the workspace has less left
    status, hdrs, data = await post(http, sim, body(), key="sk-alice")
    assert status == 429
    assert "workspace" in data["error"]["message"]
    assert (hdrs["anthropic-ratelimit-requests-limit"], hdrs["anthropic-ratelimit-requests-remaining"]) == (
        "2",
        "0",
    )
    assert hdrs["retry-after"] == "30"
    status, hdrs, _ = await post(http, sim, body(), key="sk-bob")
    assert status == 200
    assert hdrs["anthropic-ratelimit-requests-limit"] == "100"
    assert sim.stats()["buckets"]["default"]["requests"]["level"] == 97  # the refused call took nothing
    billed = sim.stats()["billed_by_key"]
    assert billed["alice"]["requests"] == 2
    assert billed["bob"]["requests"] == 1
    assert billed["bob"]["input_tokens"] > 0
