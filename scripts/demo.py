#!/usr/bin/env python3
"""`make demo`: the whole gateway on one machine, with three partners sending traffic.

What it does, in order (all files under `.run/`):

1. starts a fresh local Apache Kafka broker (`scripts/kafka_local.py`, files in `.run/demo-kafka`);
2. creates the request, response and dead-letter topics of three partners (3 partitions each)
   and the usage topic (`claude.usage`, metering records);
3. starts the Claude API simulator as a process (`python -m service.simulator`): one API key per
   partner, lognormal latency (median 0.3 s), injected faults (5% 529, 3% 500, 1% dropped
   connections) and a modest org RPM limit, so some calls get 429 and are retried;
4. writes the gateway config (`.run/demo/gateway.yaml`, keys as files in `.run/demo/keys/`) and
   starts the gateway as a process (`python -m service run`, JSON logs in `.run/demo/gateway.log`);
5. sends a few hundred requests from the three partners, a handful of them malformed on purpose
   (bad JSON, schema violations, unknown model, a claim to be another partner, oversize);
6. waits until every request has exactly one outcome (a response or a dead letter), prints a
   per-partner summary, and stops everything: gateway (SIGTERM, must exit 0), simulator, broker.

Exit status: 0 only when every request got exactly one outcome and the gateway stopped cleanly.
Ctrl-C stops everything too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import kafka_local  # scripts/ is on sys.path: this file runs as a script
import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from demo_report import (
    Collected,
    Outcome,
    Sent,
    dropped_after_work,
    outcome_key,
    print_metrics,
    print_simulator_stats,
    summarise,
)

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / ".run"
KAFKA_DIR = RUN / "demo-kafka"
DEMO_DIR = RUN / "demo"
KEY_DIR = DEMO_DIR / "keys"
PARTITIONS = 3
USAGE_TOPIC = "claude.usage"  # kafka.usage_topic's default: metering records
HOST = "127.0.0.1"

OUTCOME_TIMEOUT_S = 75.0  # after the last message is sent
SETTLE_S = 1.5  # keep reading this long after the last outcome, to catch duplicates
GATEWAY_READY_TIMEOUT_S = 30.0
GATEWAY_STOP_TIMEOUT_S = 40.0


@dataclass(frozen=True)
class PartnerPlan:
    """One demo partner: its policy in the gateway and how much it sends."""

    id: str
    weight: float
    max_concurrency: int
    rpm: int
    max_request_bytes: int
    valid: int
    allowed_models: list[str] | None = None


PARTNERS = (
    PartnerPlan("acme", weight=3, max_concurrency=32, rpm=600, max_request_bytes=256 * 1024, valid=170),
    PartnerPlan("globex", weight=2, max_concurrency=16, rpm=300, max_request_bytes=128 * 1024, valid=120),
    PartnerPlan(
        "initech",
        weight=1,
        max_concurrency=8,
        rpm=150,
        max_request_bytes=64 * 1024,
        valid=60,
        allowed_models=["claude-haiku-4-5", "claude-sonnet-4-5"],
    ),
)
MODELS = ("claude-haiku-4-5", "claude-haiku-4-5", "claude-sonnet-4-5")
PROMPTS = (
    "Summarise this support ticket in one sentence.",
    "Translate 'the invoice is overdue' into French and German.",
    "Write a haiku about Kafka consumer groups.",
    "Classify the sentiment of: 'the parcel arrived broken, again'.",
    "List three risks of sharing one API key between teams.",
    "Draft a polite reply declining a meeting invitation.",
)

# The simulator: one organisation shared by the three partners' keys.
SIM_MEDIAN_LATENCY_S = 0.3
SIM_LATENCY_SIGMA = 0.6
SIM_RPM = 300  # the org limit, below what the partners send: the gateway's limiter shares it by weight
SIM_FAULTS = {"--overloaded-rate": 0.05, "--api-error-rate": 0.03, "--drop-rate": 0.01}


class DemoError(RuntimeError):
    """Something the demo cannot continue without; the message says what."""


# --------------------------------------------------------------------------- output helpers

_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no {path.name})"
    return "\n".join(f"    {t}" for t in text) or f"    ({path.name} is empty)"


def topic(kind: str, partner: str) -> str:
    return f"claude.{kind}.{partner}"


# --------------------------------------------------------------------------- traffic


def _request(request_id: str, rng: random.Random, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "request_id": request_id,
        "params": {
            "model": rng.choice(MODELS),
            "max_tokens": rng.choice((64, 128, 256)),
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        },
        "metadata": {"source": "make-demo"},
    }
    doc.update(extra)
    return doc


def build_traffic(seed: int = 2024) -> list[Sent]:
    """Every partner's valid requests plus a few malformed ones, interleaved like real traffic."""
    rng = random.Random(seed)
    per_partner: dict[str, list[Sent]] = {}
    for p in PARTNERS:
        msgs = [
            Sent(p.id, f"{p.id}-{i:04d}", orjson.dumps(_request(f"{p.id}-{i:04d}", rng)), "response")
            for i in range(p.valid)
        ]
        other = next(o.id for o in PARTNERS if o.id != p.id)
        bad: list[tuple[str, bytes, str]] = [
            ("bad-json-1", b'{"request_id": "oops", "params": {', "malformed_json"),
            ("bad-json-2", b"not json at all", "malformed_json"),
            (
                "no-max-tokens",
                orjson.dumps({"request_id": f"{p.id}-nmt", "params": {"model": MODELS[0], "messages": []}}),
                "schema_violation",
            ),
            (
                "unknown-field",
                orjson.dumps({**_request(f"{p.id}-uf", rng), "priority": "urgent"}),
                "schema_violation",
            ),
            (
                "unknown-model",
                orjson.dumps(_request(f"{p.id}-um", rng, params={
                    "model": "gpt-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}],
                })),
                "unknown_model",
            ),
            (
                "impostor",
                orjson.dumps(_request(f"{p.id}-imp", rng, partner=other)),
                "identity_mismatch",
            ),
            (
                "oversize",
                orjson.dumps(_request(f"{p.id}-big", rng, params={
                    "model": MODELS[0], "max_tokens": 64,
                    "messages": [{"role": "user", "content": "x" * (p.max_request_bytes + 1024)}],
                })),
                "oversize",
            ),
        ]  # fmt: skip
        msgs += [Sent(p.id, f"{p.id}-{name}", value, reason) for name, value, reason in bad]
        rng.shuffle(msgs)
        per_partner[p.id] = msgs
    # interleave the partners in proportion to their volume
    out: list[Sent] = []
    queues = {pid: list(msgs) for pid, msgs in per_partner.items()}
    while any(queues.values()):
        pid = rng.choices(list(queues), weights=[len(q) for q in queues.values()])[0]
        out.append(queues[pid].pop())
    return out


async def create_topics(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                *(
                    NewTopic(topic(kind, p.id), num_partitions=PARTITIONS, replication_factor=1)
                    for p in PARTNERS
                    for kind in ("requests", "responses", "deadletter")
                ),
                NewTopic(USAGE_TOPIC, num_partitions=PARTITIONS, replication_factor=1),
            ]
        )
    finally:
        await admin.close()


async def send_traffic(bootstrap: str, traffic: list[Sent], duration_s: float) -> None:
    """Produce `traffic` spread over about `duration_s` (in small bursts), acknowledged by the broker."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    try:
        bursts = 20
        per_burst = max(1, -(-len(traffic) // bursts))
        futures = []
        for start in range(0, len(traffic), per_burst):
            for s in traffic[start : start + per_burst]:
                futures.append(await producer.send(topic("requests", s.partner), s.value, key=s.key.encode()))
            await asyncio.sleep(duration_s / bursts)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def collect(bootstrap: str, traffic: list[Sent], send_task: asyncio.Task[None]) -> Collected:
    """Read every response and dead-letter topic until each sent key has an outcome (then settle
    briefly, to catch duplicates) or the timeout passes."""
    keys = {s.key for s in traffic}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    got = Collected()
    try:
        tps = [
            TopicPartition(topic(kind, p.id), i)
            for p in PARTNERS
            for kind in ("responses", "deadletter")
            for i in range(PARTITIONS)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline: float | None = None
        settle_until: float | None = None
        next_progress = time.monotonic() + 2.0
        while True:
            now = time.monotonic()
            if deadline is None and send_task.done():
                send_task.result()  # raise if sending failed
                deadline = now + OUTCOME_TIMEOUT_S
            if deadline is not None and now >= deadline:
                say(f"timed out waiting for outcomes ({got.total} of {len(traffic)})")
                break
            if settle_until is None and send_task.done() and keys.issubset(got.by_key):
                settle_until = now + SETTLE_S
            if settle_until is not None and now >= settle_until:
                break
            if now >= next_progress:
                next_progress = now + 2.0
                say(f"  ... {got.total} of {len(traffic)} outcomes so far")
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                kind = "deadletter" if ".deadletter." in tp.topic else "response"
                partner = tp.topic.rsplit(".", 1)[-1]
                for r in records:
                    outcome = Outcome(partner, kind, orjson.loads(r.value))
                    key = outcome_key(kind, outcome.doc)
                    if key in keys:
                        got.by_key[key].append(outcome)
                    else:
                        got.unmatched.append(outcome)
    finally:
        await consumer.stop()
    return got


# --------------------------------------------------------------------------- processes


def _start_logged(
    cmd: list[str], log_path: Path, stdout: int | IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    try:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and modules
            cmd,
            cwd=ROOT,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops the children in order
        )
    finally:
        log.close()


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM, wait, SIGKILL after `timeout_s`; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


class Demo:
    def __init__(self) -> None:
        self.bootstrap: str | None = None
        self.broker_touched = False
        self.sim: subprocess.Popen[bytes] | None = None
        self.sim_url: str | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.gateway_exit: int | None = None
        self.http_port = free_port()
        self.metrics_url = f"http://{HOST}:{self.http_port}/metrics"

    # -- setup ---------------------------------------------------------------

    def prepare(self) -> None:
        shutil.rmtree(DEMO_DIR, ignore_errors=True)
        KEY_DIR.mkdir(parents=True)

    def start_broker(self) -> None:
        say(f"starting a fresh Kafka broker (files in {KAFKA_DIR.relative_to(ROOT)}) ...")
        self.broker_touched = True
        kafka_local.stop(KAFKA_DIR)  # a broker left over from an interrupted run: start afresh
        began = time.monotonic()
        for attempt in (1, 2):
            try:
                self.bootstrap = kafka_local.start(KAFKA_DIR)
                break
            except kafka_local.KafkaLocalError as exc:
                # the storage format step fails when the random cluster id starts with '-': try again
                if attempt == 1 and "formatting the KRaft storage failed" in str(exc):
                    continue
                raise DemoError(f"the Kafka broker did not start:\n{exc}") from exc
        say(f"Kafka serving on {self.bootstrap} ({time.monotonic() - began:.1f}s)")

    def start_simulator(self) -> None:
        keys = {p.id: f"sk-ant-demo-{p.id}-{os.urandom(8).hex()}" for p in PARTNERS}
        for pid, key in keys.items():
            path = KEY_DIR / f"{pid}.key"
            path.write_text(key + "\n")
            path.chmod(0o600)
        cmd = [
            sys.executable, "-m", "service.simulator", "--host", HOST, "--port", "0", "--seed", "7",
            *(a for pid, key in keys.items() for a in ("--api-key", f"{pid}={key}")),
            "--latency-median-s", str(SIM_MEDIAN_LATENCY_S), "--latency-sigma", str(SIM_LATENCY_SIGMA),
            "--output-distribution", "uniform", "--output-min-tokens", "20", "--output-max-tokens", "200",
            "--rpm", str(SIM_RPM),
            *(a for flag, rate in SIM_FAULTS.items() for a in (flag, str(rate))),
        ]  # fmt: skip
        self.sim = _start_logged(cmd, DEMO_DIR / "simulator.log", stdout=subprocess.PIPE)
        assert self.sim.stdout is not None
        deadline = time.monotonic() + 20
        buffer = b""
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.sim.poll() is not None:
                raise DemoError(
                    f"the simulator did not start (see {DEMO_DIR / 'simulator.log'}):\n"
                    + tail(DEMO_DIR / "simulator.log")
                )
            ready, _, _ = select.select([self.sim.stdout], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(self.sim.stdout.fileno(), 4096)
                if not chunk:
                    continue
                buffer += chunk
        line = buffer.decode().splitlines()[0].strip()
        if not line.startswith("SIMULATOR_URL="):
            raise DemoError(f"unexpected first line from the simulator: {line!r}")
        self.sim_url = line.partition("=")[2]
        faults = ", ".join(
            f"{rate:.0%} {flag[2:].removesuffix('-rate')}" for flag, rate in SIM_FAULTS.items()
        )
        say(
            f"Claude API simulator on {self.sim_url}: lognormal latency (median {SIM_MEDIAN_LATENCY_S}s), "
            f"org limit {SIM_RPM} RPM, faults {faults}"
        )

    def write_config(self) -> Path:
        assert self.bootstrap is not None
        assert self.sim_url is not None
        cfg: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "group_id": "demo-gateway",
                "client_id": "demo-gateway",
                "metadata_max_age_ms": 5_000,
                "session_timeout_ms": 10_000,
            },
            "anthropic": {"base_url": self.sim_url, "timeout_s": 30},
            # the organisation's Claude limits, as the simulator enforces them: the limiter keeps
            # the calls within them, so the simulator should answer (almost) no 429s
            "org_limits": {"rpm": SIM_RPM},
            "retry": {"max_attempts": 12, "base_delay_s": 0.2, "max_delay_s": 2.0, "max_elapsed_s": 90},
            "runtime": {
                "http_host": HOST,
                "http_port": self.http_port,
                "drain_timeout_s": 15,
                "commit_interval_s": 0.5,
                "log_level": "INFO",
            },
            "partners": [
                {
                    "id": p.id,
                    "weight": p.weight,
                    "max_concurrency": p.max_concurrency,
                    "max_queue": 200,
                    "limits": {"rpm": p.rpm},
                    "max_request_bytes": p.max_request_bytes,
                    "api_key": {"file": str(KEY_DIR / f"{p.id}.key")},
                    **({"allowed_models": p.allowed_models} if p.allowed_models else {}),
                }
                for p in PARTNERS
            ],
        }
        path = DEMO_DIR / "gateway.yaml"
        path.write_text(
            "# Written by scripts/demo.py (make demo): three partners against the local simulator.\n"
            + yaml.safe_dump(cfg, sort_keys=False)
        )
        return path

    def start_gateway(self, config: Path) -> None:
        cmd = [sys.executable, "-m", "service", "run", "--config", str(config)]
        self.gateway = _start_logged(cmd, DEMO_DIR / "gateway.log")
        say(f"gateway started (pid {self.gateway.pid}), config {config.relative_to(ROOT)}, "
            f"JSON logs in {(DEMO_DIR / 'gateway.log').relative_to(ROOT)}")  # fmt: skip
        say(f"gateway metrics: {self.metrics_url}  (health: http://{HOST}:{self.http_port}/readyz)")

    async def wait_ready(self) -> None:
        assert self.gateway is not None
        url = f"http://{HOST}:{self.http_port}/readyz"
        deadline = time.monotonic() + GATEWAY_READY_TIMEOUT_S
        reason = "not answering yet"
        while time.monotonic() < deadline:
            if self.gateway.poll() is not None:
                raise DemoError(
                    f"the gateway exited with code {self.gateway.returncode}:\n"
                    + tail(DEMO_DIR / "gateway.log")
                )
            try:
                body = await asyncio.to_thread(_get, url)
                if orjson.loads(body).get("ready"):
                    say("gateway ready (partitions assigned)")
                    return
            except urllib.error.HTTPError as exc:
                with contextlib.suppress(ValueError):
                    reason = str(orjson.loads(exc.read()).get("reason"))
            except OSError:
                pass
            await asyncio.sleep(0.3)
        raise DemoError(
            f"the gateway was not ready within {GATEWAY_READY_TIMEOUT_S:.0f}s ({reason}):\n"
            + tail(DEMO_DIR / "gateway.log")
        )

    # -- the run ---------------------------------------------------------------

    async def run_async(self) -> bool:
        assert self.bootstrap is not None
        await create_topics(self.bootstrap)
        names = ",".join(p.id for p in PARTNERS)
        say(
            f"topics created: claude.{{requests,responses,deadletter}}.{{{names}}}, "
            f"{PARTITIONS} partitions each"
        )
        self.start_simulator()
        self.start_gateway(self.write_config())
        await self.wait_ready()

        traffic = build_traffic()
        bad = sum(1 for s in traffic if s.expect != "response")
        mix = ", ".join(f"{p.id} {sum(1 for s in traffic if s.partner == p.id)}" for p in PARTNERS)
        say(f"sending {len(traffic)} requests ({mix}); {bad} of them malformed on purpose")
        began = time.monotonic()
        send_task = asyncio.create_task(send_traffic(self.bootstrap, traffic, duration_s=4.0))
        got = await collect(self.bootstrap, traffic, send_task)
        say(f"{got.total} outcomes read in {time.monotonic() - began:.1f}s")
        assert self.sim_url is not None
        ok = summarise(traffic, got, [p.id for p in PARTNERS], dropped_after_work(self.sim_url))
        print()
        print_simulator_stats(self.sim_url)
        print_metrics(self.metrics_url)
        print()
        return ok

    def run(self) -> bool:
        self.prepare()
        self.start_broker()
        ok = asyncio.run(self.run_async())
        self.stop_gateway()
        return ok and self.gateway_exit == 0

    # -- teardown ----------------------------------------------------------------

    def stop_gateway(self) -> None:
        if self.gateway is None or self.gateway_exit is not None:
            return
        say("stopping the gateway (SIGTERM: drain, commit, exit) ...")
        self.gateway_exit = _terminate(self.gateway, GATEWAY_STOP_TIMEOUT_S)
        if self.gateway_exit == 0:
            say("gateway exited 0")
        else:
            say(f"gateway exited {self.gateway_exit} (log: {DEMO_DIR / 'gateway.log'}):")
            print(tail(DEMO_DIR / "gateway.log"))

    def shutdown(self) -> None:
        """Stop whatever runs, gateway first. Safe to call at any point, and twice."""
        with contextlib.suppress(Exception):
            self.stop_gateway()
        if self.sim is not None and self.sim.poll() is None:
            code = _terminate(self.sim, 10)
            say(f"simulator stopped (exit {code})")
        if self.sim is not None and self.sim.stdout is not None:
            self.sim.stdout.close()
        if self.broker_touched:  # also when interrupted while it was starting
            kafka_local.stop(KAFKA_DIR)
            say("Kafka broker stopped")
            self.broker_touched = False
            self.bootstrap = None


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback only
        body: bytes = resp.read()
        return body


def main() -> int:
    print("Claude Partner Gateway demo: Kafka + Claude API simulator + gateway, three partners\n", flush=True)
    demo = Demo()
    ok = False
    try:
        ok = demo.run()
    except KeyboardInterrupt:
        print(flush=True)
        say("interrupted: stopping everything")
        return 130
    except DemoError as exc:
        say(f"error: {exc}")
        return 1
    finally:
        # a second Ctrl-C while stopping must not leave the broker behind
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            demo.shutdown()
        finally:
            signal.signal(signal.SIGINT, previous)
    if ok:
        say("done: every request got exactly one outcome; everything stopped cleanly")
        return 0
    say("done, but not every request got exactly one outcome or the gateway did not stop cleanly")
    return 1


if __name__ == "__main__":
    sys.exit(main())
