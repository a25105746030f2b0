"""Key rotation without a restart, while a partner keeps sending: real broker, real simulator.

The config file and the secret files change on disk; the gateway's `ConfigWatcher` (as run by
`claude-gateway run`) picks them up. A new signing key and a new Anthropic key take effect, the
removed signing key stops working at once, the revoked Anthropic key is no longer used, and every
message sent meanwhile gets exactly one outcome. The last test runs `python -m service run` as a
process and reloads it with SIGHUP and by changing its config file.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from service.app import Gateway
from service.config.loader import load_config
from service.config.reload import ConfigWatcher
from service.simulator import SimulatorConfig, SimulatorServer
from tests.support.gateway import World, collect, committed_offsets, make_world, produce, request
from tests.support.polling import until
from tests.support.trust import produce_messages, signed

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {"k1": "sig-old-" + uuid.uuid4().hex, "k2": "sig-new-" + uuid.uuid4().hex}


@pytest.fixture
async def world(kafka_bootstrap: str, tmp_path: Path) -> World:
    return await make_world(kafka_bootstrap, tmp_path, ["acme", "globex"])


class Partner:
    """A partner producing signed requests continuously with its current key id."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.key_id = "k1"
        self.sent: list[tuple[str, str]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        topic = self.world.request_topic("acme")
        while not self.stop.is_set():
            rid = f"m-{len(self.sent)}"
            await produce_messages(
                self.world.bootstrap, [signed(topic, rid, self.key_id, SECRETS[self.key_id])]
            )
            self.sent.append((rid, self.key_id))
            await asyncio.sleep(0.03)


async def test_signing_and_anthropic_keys_rotate_without_restart_or_loss(
    world: World, tmp_path: Path
) -> None:
    for kid, secret in SECRETS.items():
        (tmp_path / f"acme.{kid}").write_text(secret)
    new_anthropic_key = f"sk-ant-acme-new-{uuid.uuid4().hex}"
    sim_cfg = SimulatorConfig.model_validate(
        {
            "api_keys": world.keys,
            "seed": 3,
            "latency": {"distribution": "fixed", "fixed_s": 0.02},
            "faults": {},
        }
    )
    async with SimulatorServer(sim_cfg) as sim:
        cfg = world.settings_dict(sim.url)
        cfg["partners"][0]["signing"] = {
            "required": True,
            "keys": {"k1": {"file": str(tmp_path / "acme.k1")}},
        }
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump(cfg))
        gateway = Gateway(load_config(config), serve_http=False)
        watcher = ConfigWatcher(config, gateway.reload, gateway.settings, interval_s=0.2)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(gateway.run(stop)), asyncio.create_task(watcher.run(stop))]
        partner = Partner(world)
        sending = asyncio.create_task(partner.run())
        try:
            await asyncio.sleep(1.0)

            # 1. a second signing key: both accepted; the partner switches to it
            cfg["partners"][0]["signing"]["keys"]["k2"] = {"file": str(tmp_path / "acme.k2")}
            config.write_text(yaml.safe_dump(cfg))
            await until(lambda: watcher.reloads == 1, 15)
            partner.key_id = "k2"
            await asyncio.sleep(1.0)

            # 2. a new Anthropic key: valid upstream first, then written to the mounted file
            # (the simulator's api_keys is replaced as a whole, not merged)
            sim.update_config({"api_keys": {**world.keys, "acme-new": new_anthropic_key}})
            (world.key_dir / "acme.key").write_text(new_anthropic_key)
            await until(lambda: watcher.reloads == 2, 15)
            await asyncio.sleep(1.0)  # calls started with the old key finish
            others = {name: key for name, key in world.keys.items() if name != "acme"}
            sim.update_config(
                {"api_keys": {**others, "acme-new": new_anthropic_key}}
            )  # the old key is revoked
            old_key_calls = sim.stats()["calls_by_key"].get("acme", 0)
            await asyncio.sleep(1.0)
            partner.stop.set()
            await sending
            rotated = len(partner.sent)
            out = await collect(world, rotated, timeout_s=60)
            assert len(out.responses) == rotated, out.reasons()

            # 3. the old signing key is removed: it stops working for the next message
            del cfg["partners"][0]["signing"]["keys"]["k1"]
            config.write_text(yaml.safe_dump(cfg))
            await until(lambda: watcher.reloads == 3, 15)
            topic = world.request_topic("acme")
            late = [signed(topic, f"late-{i}", kid, SECRETS[kid]) for i, kid in enumerate(["k1", "k2"] * 5)]
            await produce_messages(world.bootstrap, late)
            out = await collect(world, rotated + len(late), timeout_s=60, settle_s=1.0)
        finally:
            partner.stop.set()
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, sending), 60)
        stats = sim.stats()

    assert watcher.failures == 0
    sent_by_k = {k: sum(1 for _, kid in partner.sent if kid == k) for k in ("k1", "k2")}
    assert sent_by_k["k1"] > 5
    assert sent_by_k["k2"] > 5
    # nothing lost, nothing doubled: every message exactly one outcome
    ids = out.request_ids()
    assert out.total == rotated + len(late)
    assert all(n == 1 for n in ids.values())
    responded = {d["request_id"] for d in out.responses}
    assert {rid for rid, _ in partner.sent} <= responded
    late_dead = {d["request_id"]: d["reason"] for d in out.dead_letters}
    assert late_dead == {f"late-{i}": "unknown_signing_key" for i in range(0, 10, 2)}
    assert {f"late-{i}" for i in range(1, 10, 2)} <= responded
    # the new Anthropic key took over; the revoked one was never used again, never refused
    assert stats["calls_by_key"]["acme-new"] > 0
    assert stats["calls_by_key"].get("acme", 0) == old_key_calls
    assert "401" not in stats["status_counts"]
    committed = await committed_offsets(world, f"{world.tag}-gateway")
    assert sum(committed.values()) == rotated + len(late)
    events = [(e, f.get("key_id")) for e, f in gateway.audit.emitted if f.get("partner") == "acme"]
    assert ("signing_key_added", "k2") in events
    assert ("anthropic_key_rotated", None) in events
    assert ("signing_key_removed", "k1") in events


def _start(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--config", str(config)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip


async def test_running_process_reloads_on_sighup_and_on_file_change(world: World, tmp_path: Path) -> None:
    sim_cfg = SimulatorConfig.model_validate(
        {"api_keys": world.keys, "latency": {"distribution": "fixed", "fixed_s": 0.01}}
    )
    async with SimulatorServer(sim_cfg) as sim:
        cfg = world.settings_dict(sim.url)
        cfg["partners"][0]["enabled"] = False
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump(cfg))
        log_path = tmp_path / "gateway.log"
        proc = _start(config, log_path)
        try:
            topic = world.request_topic("acme")
            await produce(world.bootstrap, [(topic, b"d", request("while-disabled"))])
            out = await collect(world, 1, timeout_s=60)
            assert out.reasons() == {"partner_disabled": 1}

            proc.send_signal(signal.SIGHUP)  # nothing changed: reloads all the same
            await until(lambda: '"trigger":"signal"' in log_path.read_text(), 10)
            # and applied: a file written before that reload read it would ride in it
            await until(lambda: '"event":"configuration reloaded"' in log_path.read_text(), 10)

            cfg["partners"][0]["enabled"] = True
            config.write_text(yaml.safe_dump(cfg))  # no signal: the watcher notices the file
            await until(lambda: '"audit_event":"partner_enabled"' in log_path.read_text(), 10)
            await produce(world.bootstrap, [(topic, b"e", request("while-enabled"))])
            out = await collect(world, 2, timeout_s=60)
            assert [d["request_id"] for d in out.responses] == ["while-enabled"]
        finally:
            proc.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            code = await loop.run_in_executor(None, lambda: proc.wait(timeout=60))
        assert code == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    triggers = [e.get("trigger") for e in lines if e["event"] == "reloading configuration"]
    assert triggers[:2] == ["signal", "file change"]
    for key in world.keys.values():
        assert key not in log_path.read_text()
