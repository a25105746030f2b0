"""Exactly-once on the real broker, with the gateway as real processes killed at awkward moments.

Each test forbids duplicates (never counts them) and reads the simulator's calls per request,
so a request billed twice fails it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import orjson
import pytest

from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import (
    Message,
    Outcomes,
    collect,
    committed_offsets,
    make_world,
    produce,
    request,
    spread,
    trace_context_lost,
)
from tests.support.process import exit_code, start_process

pytestmark = pytest.mark.integration


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, 60) == 0


def _exactly_once(out: Outcomes, sent: list[Message], sim: SimulatorServer) -> None:
    ids = {orjson.loads(m[2] or b"{}")["request_id"] for m in sent}
    got = out.request_ids()
    assert set(got) == ids, f"lost {len(ids - set(got))} requests"
    twice = {rid: n for rid, n in got.items() if n > 1}
    assert not twice, f"{len(twice)} requests got more than one outcome"
    assert sim.calls(min_billed=2)["calls_by_request"] == {}, "a request was billed twice"
    assert set(out.reasons()) <= {"outcome_unknown"}, out.reasons()
    assert trace_context_lost(sent, out) == [], "an outcome lost its request's trace context"


@pytest.mark.parametrize("failpoint", ["tick.sent:20", "tick.committed:20"])
async def test_a_crash_inside_a_tick_neither_loses_nor_repeats(
    kafka_bootstrap: str, tmp_path: Path, failpoint: str
) -> None:
    """The process dies inside its 20th transaction: after its outcomes were sent but
    before the commit (they must be aborted and redone once), or right after the commit
    (they must not be redone)."""
    world = await make_world(kafka_bootstrap, tmp_path, ["acme", "globex"])
    n = 300
    cfg = SimulatorConfig.model_validate(
        {"api_keys": world.keys, "seed": 21, "latency": {"distribution": "fixed", "fixed_s": 0.02}}
    )
    sent = spread(world, n, "t")  # the partners in turn
    async with SimulatorServer(cfg) as sim:
        await produce(world.bootstrap, sent)
        crashing = start_process(world, sim.url, tmp_path, "crashing", env={"GATEWAY_FAILPOINT": failpoint})
        assert await exit_code(crashing, 120) == 137, "the failpoint must have fired"
        first = await collect(world, n, timeout_s=2)
        print(f"\ncrash at {failpoint}: {first.total} of {n} outcomes published before it")
        assert 0 < first.total < n, "the crash must land mid-run"
        restarted = start_process(world, sim.url, tmp_path, "restarted")
        try:
            out = await collect(world, n, timeout_s=120, settle_s=2.0)
        finally:
            await _stop(restarted)
    _exactly_once(out, sent, sim)


@pytest.mark.parametrize("fast", [1_000, pytest.param(5_000, marks=pytest.mark.long)])
async def test_a_slow_head_with_thousands_finished_behind_it_is_not_redone_after_kill(
    kafka_bootstrap: str, tmp_path: Path, fast: int
) -> None:
    """One partition: a long generation at its head holds the commit point while thousands
    of records behind it finish (5,000 in `make chaos`). kill -9, restart: none of them is
    called again."""
    world = await make_world(kafka_bootstrap, tmp_path, ["acme"], partitions=1)
    cfg = SimulatorConfig.model_validate(
        {
            "api_keys": world.keys,
            "seed": 22,
            "limits": {"rpm": None, "itpm": None, "otpm": None},
            "latency": {"distribution": "fixed", "fixed_s": 0.0, "per_output_token_s": 0.01},
            "output": {"distribution": "fixed", "fixed_tokens": 2 * fast},
        }
    )
    topic = world.request_topic("acme")
    # the head generates for 2 * fast * 10 ms (20 s for 1,000): longer than the rest take,
    # short enough that the simulator's shutdown does not wait long for the killed call
    messages = [(topic, None, request("head", max_tokens=2 * fast))]
    messages += [(topic, None, request(f"f-{i}", max_tokens=1)) for i in range(fast)]
    partners = [{**p, "max_concurrency": 64} for p in world.settings_dict("x")["partners"]]
    async with SimulatorServer(cfg) as sim:
        await produce(world.bootstrap, messages)
        proc = start_process(
            world, sim.url, tmp_path, "first", partners=partners, anthropic={"timeout_s": 300}
        )
        try:
            done = await collect(world, fast, timeout_s=180)
            assert done.total >= fast
            assert "head" not in done.request_ids(), "the head must still be in its call"
        finally:
            proc.send_signal(signal.SIGKILL)
            await exit_code(proc, 10)
        committed = await committed_offsets(world, f"{world.tag}-gateway")
        assert sum(committed.values()) == 0, "the head holds the commit point"
        restarted = start_process(world, sim.url, tmp_path, "second", partners=partners)
        try:
            out = await collect(world, fast + 1, timeout_s=120, settle_s=2.0)
        finally:
            await _stop(restarted)
        calls = sim.calls()["calls_by_request"]
    _exactly_once(out, messages, sim)
    assert out.reasons() == {"outcome_unknown": 1}
    assert all(calls[f"acme:f-{i}"]["all"] == 1 for i in range(fast)), "finished work was redone"


async def test_a_zombie_replica_is_fenced(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Replica A is frozen (SIGSTOP) with calls in flight; B takes its partitions over. When A
    wakes and its calls return, it cannot publish: every request still has one outcome."""
    world = await make_world(kafka_bootstrap, tmp_path, ["acme"], partitions=2)
    n = 40
    cfg = SimulatorConfig.model_validate(
        {"api_keys": world.keys, "seed": 23, "latency": {"distribution": "fixed", "fixed_s": 6.0}}
    )
    sent = spread(world, n, "z")
    async with SimulatorServer(cfg) as sim:
        a = start_process(world, sim.url, tmp_path, "a")
        b: subprocess.Popen[bytes] | None = None
        try:
            await produce(world.bootstrap, sent)
            for _ in range(300):  # A alone took both partitions and started every call, none answered yet
                if sim.stats()["calls_total"] >= n:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"A started {sim.stats()['calls_total']} of {n} calls")
            a.send_signal(signal.SIGSTOP)
            b = start_process(world, sim.url, tmp_path, "b")
            before = await collect(world, n, timeout_s=90, settle_s=1.0)
            assert before.total == n, "B resolved every request A held"
            a.send_signal(signal.SIGCONT)  # A's calls return now; it must not publish them
            await asyncio.sleep(6)  # their answers are waiting in A's sockets: read at once
            out = await collect(world, n, timeout_s=5, settle_s=1.0)
        finally:
            a.send_signal(signal.SIGCONT)
            a.send_signal(signal.SIGKILL)
            await exit_code(a, 10)
            if b is not None:
                await _stop(b)
    _exactly_once(out, sent, sim)
    assert out.total == before.total, "the zombie published"
