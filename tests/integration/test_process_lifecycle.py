"""The gateway as a real process: killed mid-run it loses nothing; stopped with SIGTERM it
drains, commits what finished, and a restart neither loses nor repeats work."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import (
    Outcomes,
    World,
    collect,
    committed_offsets,
    make_world,
    produce,
    spread,
    trace_context_lost,
)
from tests.support.process import exit_code, start_process

pytestmark = pytest.mark.integration


async def _wait_for(world: World, n: int, timeout_s: float = 60) -> int:
    out = await collect(world, n, timeout_s=timeout_s)
    return out.total


async def _restart_until_done(world: World, sim_url: str, tmp: Path, n: int) -> Outcomes:
    """Start the gateway again, collect all `n` outcomes (and any duplicates), stop it cleanly."""
    restarted = start_process(world, sim_url, tmp)
    try:
        return await collect(world, n, timeout_s=120, settle_s=2.0)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert await exit_code(restarted, 60) == 0


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "globex", "initech"])


async def test_killed_mid_run_and_restarted_gives_exactly_one_outcome_and_bills_once(
    world: World, tmp_path: Path
) -> None:
    """kill -9 twice mid-run (calls in flight, ticks committing), then restart: every request
    has exactly one outcome, nothing finished is redone, no request is billed twice. Calls
    in flight at a kill are `outcome_unknown` (the default policy), never called again."""
    n = 600
    cfg = SimulatorConfig.model_validate(
        {
            "api_keys": world.keys,
            "seed": 3,
            "latency": {"distribution": "lognormal", "median_s": 0.08, "sigma": 0.8, "max_s": 2},
        }
    )
    async with SimulatorServer(cfg) as sim:
        sent = spread(world, n, "k")
        await produce(world.bootstrap, sent)
        for target in (120, 300):
            proc = start_process(world, sim.url, tmp_path)
            try:
                seen = await _wait_for(world, target)
                assert 0 < seen < n, "the kill must land mid-run"
            finally:
                proc.send_signal(signal.SIGKILL)
                await exit_code(proc, 10)
        out = await _restart_until_done(world, sim.url, tmp_path, n)
        calls = sim.calls(min_billed=2)
    ids = out.request_ids()
    missing = {f"k-{i}" for i in range(n)} - set(ids)
    duplicates = {rid: c for rid, c in ids.items() if c > 1}
    unknown = out.reasons().get("outcome_unknown", 0)
    print(f"\nkill -9 x2 mid-run: {n} requests, {len(duplicates)} duplicates, {unknown} outcome_unknown")
    assert not missing, f"lost {len(missing)} requests"
    assert not duplicates, f"{len(duplicates)} requests got two outcomes"
    assert calls["calls_by_request"] == {}, "a request was billed twice"
    assert set(out.reasons()) <= {"outcome_unknown"}
    assert trace_context_lost(sent, out) == [], "an outcome lost its request's trace context"
    for d in out.dead_letters:  # the claim that made it unknown is reported
        assert {"claimed_at", "attempts", "owner"} <= set(d["claim"]), d


async def test_sigterm_drains_commits_finished_work_and_restart_repeats_none(
    world: World, tmp_path: Path
) -> None:
    n = 400
    cfg = SimulatorConfig.model_validate(
        {"api_keys": world.keys, "seed": 4, "latency": {"distribution": "fixed", "fixed_s": 0.3}}
    )
    async with SimulatorServer(cfg) as sim:
        await produce(
            world.bootstrap,
            spread(world, n, "g"),
        )
        # few slots: at SIGTERM most fetched requests are still waiting for a turn
        few = {"partners": [{**p, "max_concurrency": 4} for p in world.settings_dict(sim.url)["partners"]]}
        proc = start_process(world, sim.url, tmp_path, **few)
        seen = await _wait_for(world, 50)
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, 60) == 0
        first = await collect(world, n, timeout_s=3)
        committed = await committed_offsets(world, f"{world.tag}-gateway")
        # everything in flight at SIGTERM was drained and committed; nothing else was
        assert seen <= first.total < n
        assert sum(committed.values()) == first.total
        assert all(c == 1 for c in first.request_ids().values())
        out = await _restart_until_done(world, sim.url, tmp_path, n)
    ids = out.request_ids()
    assert set(ids) == {f"g-{i}" for i in range(n)}
    assert all(c == 1 for c in ids.values()), "a graceful stop must not cause duplicates"
