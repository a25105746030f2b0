"""A graceful stop while the broker is away (a broker restart during a deploy). The calls in
flight finish; their answers are published once the broker is back within the drain, and the
gateway exits 0. If it does not come back in time, the stop says so: an error line with the
count and exit status 75, and the partition's next owner resolves those calls by policy.
Either way each call is made once and every request gets exactly one outcome.

The test runs its own broker (it stops it), as the chaos runs do."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import orjson
import pytest

from bench.chaos.procs import Broker
from service.cli import EXIT_LEFT_UNPUBLISHED
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, collect, make_world, produce, request
from tests.support.polling import until
from tests.support.process import exit_code, start_process

pytestmark = pytest.mark.integration

CALL_S = 4.0
"""Each call takes this long: in flight through the broker's stop and the SIGTERM."""


MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-1")


def _varied(world: World, prefix: str, n: int) -> list[tuple[str, bytes | None, bytes | None]]:
    """`n` requests as partners send them: three models, prompts of 5 B to 20 KB as plain
    text or content blocks, some with an 800 B to 1.6 KB system prompt, keyed or not."""
    out: list[tuple[str, bytes | None, bytes | None]] = []
    for i in range(n):
        text = "word " * (8 ** (i % 5))  # 5 B .. 20 KB
        blocks = [{"type": "text", "text": text}, {"type": "text", "text": "and?"}]
        content: object = text if i % 2 else blocks
        extra = {"system": "Answer briefly. " * ((i + 1) * 50)} if i % 3 == 0 else {}
        doc = request(f"{prefix}-{i}", model=MODELS[i % 3], max_tokens=16 << (i % 4))
        params = orjson.loads(doc)
        params["params"]["messages"] = [{"role": "user", "content": content}]
        params["params"].update(extra)
        out.append((world.request_topic("acme"), f"k{i}".encode() if i % 2 else None, orjson.dumps(params)))
    return out


async def _stop_during_an_outage(
    world: World, sim: SimulatorServer, broker: Broker, tmp: Path, name: str, prefix: str, n: int, **env: str
) -> subprocess.Popen[bytes]:
    """A gateway with `n` calls in flight; then the broker stops, then the gateway is SIGTERMed."""
    proc = start_process(world, sim.url, tmp, name, env=env)
    before = sim.stats()["calls_total"]
    await produce(world.bootstrap, _varied(world, prefix, n))
    await until(lambda: sim.stats()["calls_total"] - before >= n, timeout_s=60, interval_s=0.05)
    await broker.stop()  # every call in flight: no answer can be published now
    proc.send_signal(signal.SIGTERM)
    return proc


async def test_a_stop_during_a_broker_outage_publishes_or_says_it_could_not(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "kafka")
    procs: list[subprocess.Popen[bytes]] = []  # killed at the end if a stop hangs
    try:
        await broker.start()
        world = await make_world(broker.bootstrap, tmp_path, ["acme"], partitions=2)
        cfg = SimulatorConfig.model_validate(
            {"api_keys": world.keys, "seed": 8, "latency": {"distribution": "fixed", "fixed_s": CALL_S}}
        )
        async with SimulatorServer(cfg) as sim:
            n = 6
            # back within the drain (20 s): the answers go out once it is, and the stop is clean
            proc = await _stop_during_an_outage(world, sim, broker, tmp_path, "back", "b", n)
            procs.append(proc)
            await broker.resume()
            assert await exit_code(proc, 60) == 0
            out = await collect(world, n, timeout_s=30, settle_s=1.0)
            assert set(out.request_ids()) == {f"b-{i}" for i in range(n)}
            assert out.dead_letters == [], out.reasons()

            # away for the whole drain (3 s): the stop says what it left, and exits 75
            proc = await _stop_during_an_outage(
                world, sim, broker, tmp_path, "away", "a", n, GATEWAY_RUNTIME__DRAIN_TIMEOUT_S="3"
            )
            procs.append(proc)
            assert await exit_code(proc, 60) == EXIT_LEFT_UNPUBLISHED
            log = (tmp_path / "away.log").read_text()
            assert "stopped with claimed calls whose answers are not published" in log
            assert f'"count":{n}' in log.split("stopped with claimed calls")[1].splitlines()[0]
            await broker.resume()
            # the next owner: each call was made, its answer lost: `outcome_unknown` (the
            # default policy), never called again
            nxt = start_process(world, sim.url, tmp_path, "next")
            procs.append(nxt)
            try:
                out = await collect(world, 2 * n, timeout_s=90, settle_s=1.0)
            finally:
                nxt.send_signal(signal.SIGTERM)
                assert await exit_code(nxt, 60) == 0
            ids = out.request_ids()
            assert set(ids) == {f"{p}-{i}" for p in "ba" for i in range(n)}
            assert all(c == 1 for c in ids.values()), "two outcomes for one request"
            assert out.reasons() == {"outcome_unknown": n}
            assert sim.calls(min_ok=2)["calls_by_request"] == {}, "a request was called twice"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        broker.close(remove_data=True)
