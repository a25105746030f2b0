"""Shared benchmark helpers: Kafka broker, simulator process, topics, requests, CPU and outcome counting.

- `kafka()`: the broker at `KAFKA_BOOTSTRAP_SERVERS` when set, else a fresh local broker
  (`scripts/kafka_local.py`, files in `.run/bench-kafka/<pid>`), stopped and removed on exit.
- `Simulator`: the Claude API simulator as a separate process, so its CPU is never counted
  against a contender.
- `cpu_seconds(pid)`: user + system CPU of one process (psutil); `cpu_quiet`: NaN if it is gone.
- `OutcomeCounter`: how many outcomes are visible on some output topics, from the partitions'
  end offsets (a cheap ListOffsets call: no record is fetched or decoded by the bench). Not for
  transactional output: end offsets count the transactions' commit markers too.
- `CommittedCounter`: how many outcomes a `read_committed` consumer has read (records only).
- `measure()`: run a contender process until N outcomes are visible, timing and charging CPU
  from its first visible outcome (so interpreter start-up and group join are excluded) to the N-th.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any, Protocol

import orjson
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / ".run"
BENCH_DIR = RUN / "bench"
KAFKA_ROOT = RUN / "bench-kafka"
KAFKA_DIR = KAFKA_ROOT / str(os.getpid())  # one broker per bench process: benches may run side by side
BROKER_HEAP = "2g"
"""The benches' broker heap (tests keep kafka_local's 512 MB). Kafka's start script gives 1 GB,
its production guidance 6 GB. On 512 MB, G1 sized the young generation to a few tens of MB and
collected it every 0.5-2 s at 200 transactions/s, pausing every broker thread 10-30 ms on two
cores: 2-4% of the response-cache bench's hits overlapped a pause, which is where its p99 lies.
On 2 GB the pauses came 2-4x less often (0.6-1.1% of hits overlapped one)."""
MODEL = "claude-haiku-4-5"


def log(message: str) -> None:
    """Human progress, on stderr (stdout is for the JSON results)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _kafka_local() -> ModuleType:
    """`scripts/kafka_local.py` (stdlib only, not a package): loaded by path."""
    path = ROOT / "scripts" / "kafka_local.py"
    spec = importlib.util.spec_from_file_location("kafka_local", path)
    assert spec is not None
    assert spec.loader is not None
    module = sys.modules.get("kafka_local")
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["kafka_local"] = module
        spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def kafka() -> Iterator[str]:
    """Yield a bootstrap address: `KAFKA_BOOTSTRAP_SERVERS` if set, else a fresh local broker."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        log(f"using the Kafka broker at {external} (KAFKA_BOOTSTRAP_SERVERS)")
        yield external
        return
    kl = _kafka_local()
    _sweep_stale_brokers(kl)
    began = time.monotonic()
    try:
        for attempt in (1, 2):
            try:
                bootstrap: str = kl.start(KAFKA_DIR, heap=BROKER_HEAP)
                break
            except kl.KafkaLocalError as exc:
                # the storage format fails when the random cluster id starts with '-': try again
                if attempt == 2 or "formatting the KRaft storage failed" not in str(exc):
                    raise
        log(f"local Kafka broker on {bootstrap} ({time.monotonic() - began:.1f}s, files in {KAFKA_DIR})")
        yield bootstrap
    finally:
        kl.stop(KAFKA_DIR)
        shutil.rmtree(KAFKA_DIR, ignore_errors=True)
        log("local Kafka broker stopped")


def _sweep_stale_brokers(kl: ModuleType) -> None:
    """Stop and remove the brokers of bench processes that are gone (killed without cleanup)."""
    if not KAFKA_ROOT.is_dir():
        return
    for d in KAFKA_ROOT.iterdir():
        if d == KAFKA_DIR or not d.name.isdigit() or psutil.pid_exists(int(d.name)):
            continue
        kl.stop(d)
        shutil.rmtree(d, ignore_errors=True)


def broker_pid() -> int | None:
    """The pid of the local broker started by `kafka()` (None for an external broker)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return None
    try:
        return int((KAFKA_DIR / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- processes


def spawn(
    cmd: Sequence[str], log_path: Path, stdout: int | IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """Start a process in the repository root, its stderr (and stdout unless given) to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            stdout=stdout if stdout is not None else out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM, wait, SIGKILL after `timeout_s`; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process `pid` (its threads included, children not)."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


class Simulator:
    """`python -m service.simulator` as a separate process; `url` once started."""

    def __init__(self, args: Sequence[str], name: str = "simulator") -> None:
        self.args = list(args)
        self.log_path = BENCH_DIR / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> Simulator:
        cmd = [sys.executable, "-m", "service.simulator", "--host", "127.0.0.1", "--port", "0", *self.args]
        self.proc = spawn(cmd, self.log_path, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + 30
        buffer = b""
        while b"\n" not in buffer:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"the simulator did not start:\n{tail(self.log_path)}")
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                buffer += os.read(fd, 4096)
        line = buffer.decode().splitlines()[0].strip()
        if not line.startswith("SIMULATOR_URL="):
            self.__exit__()
            raise RuntimeError(f"unexpected first line from the simulator: {line!r}")
        self.url = line.partition("=")[2]
        log(f"simulator on {self.url} (pid {self.proc.pid}): {' '.join(self.args)}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            terminate(self.proc, 10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None

    def stats(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/_sim/stats", timeout=5) as resp:
            data: dict[str, Any] = orjson.loads(resp.read())
            return data


# --------------------------------------------------------------------------- the host


HOST_LOOP = """import time
t = time.perf_counter()
s = 0
for i in range(10_000_000):
    s += i
print(time.perf_counter() - t)
"""


def host_loop_s() -> float:
    """Seconds a plain Python loop of ten million additions takes (in a fresh interpreter): how
    fast the host is right now. A latency figure measured while it is slow is not comparable
    with one measured while it is calm (the 2-core development machine: 0.40 s calm, 0.7-1.2 s
    when its host is shared)."""
    out = subprocess.run([sys.executable, "-c", HOST_LOOP], check=True, capture_output=True, text=True)
    return round(float(out.stdout), 2)


# --------------------------------------------------------------------------- Kafka data


def tag(name: str) -> str:
    """A unique topic/group prefix for one run."""
    return f"bench-{name}-{uuid.uuid4().hex[:8]}"


async def create_topics(bootstrap: str, topics: Sequence[str], partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics]
        )
    finally:
        await admin.close()


def request_value(request_id: str, max_tokens: int = 64) -> bytes:
    """A valid request.v1 document, as a partner would produce it."""
    return orjson.dumps(
        {
            "request_id": request_id,
            "params": {
                "model": MODEL,
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}],
            },
        }
    )


async def produce_requests(bootstrap: str, topic: str, n: int, prefix: str) -> None:
    """Produce `n` request messages to `topic` (key = request id), all acknowledged."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        futures = []
        for i in range(n):
            rid = f"{prefix}-{i}"
            futures.append(await producer.send(topic, request_value(rid), key=rid.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class OutcomeCounter:
    """Outcomes visible on some topics = the sum of their partitions' end offsets."""

    def __init__(self, bootstrap: str, topics: Sequence[str], partitions: int = 3) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._tps = [TopicPartition(t, i) for t in topics for i in range(partitions)]

    async def __aenter__(self) -> OutcomeCounter:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def count(self) -> int:
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(self._tps)
        return sum(ends.values())


class CommittedCounter:
    """Outcomes visible to a `read_committed` consumer: the records it has read from the
    beginning of some topics (control records and aborted transactions are not counted)."""

    def __init__(self, bootstrap: str, topics: Sequence[str], partitions: int = 3) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        self._tps = [TopicPartition(t, i) for t in topics for i in range(partitions)]
        self._seen = 0

    async def __aenter__(self) -> CommittedCounter:
        await self._consumer.start()
        self._consumer.assign(self._tps)
        await self._consumer.seek_to_beginning(*self._tps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def count(self) -> int:
        batches = await self._consumer.getmany(timeout_ms=0, max_records=100_000)
        self._seen += sum(len(records) for records in batches.values())
        return self._seen


class Counter(Protocol):
    async def count(self) -> int: ...


# --------------------------------------------------------------------------- measurement


@dataclass
class Measurement:
    """One contender run: from its first visible outcome to the N-th."""

    n: int
    outcomes_at_first: int
    steady_s: float
    steady_cpu_s: float
    from_spawn_s: float
    cpu_total_s: float
    exit_code: int | None
    watched: dict[str, float] = field(default_factory=dict)
    """CPU seconds of other processes (simulator, broker) over the same window."""

    @property
    def steady_msgs(self) -> int:
        return self.n - self.outcomes_at_first

    @property
    def msgs_per_s(self) -> float:
        return self.steady_msgs / self.steady_s if self.steady_s > 0 else float("nan")

    @property
    def cpu_ms_per_msg(self) -> float:
        return 1000 * self.steady_cpu_s / self.steady_msgs if self.steady_msgs > 0 else float("nan")


class _Cpu:
    """CPU seconds of a contender, alive or just exited (then reaped with its rusage, never via
    `Popen.poll`, which would drop the rusage)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.final: float | None = None

    def exited(self) -> bool:
        if self.final is not None:
            return True
        try:
            if psutil.Process(self.proc.pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.final = float(usage.ru_utime + usage.ru_stime)
        return True

    def seconds(self) -> float:
        if self.final is None:
            try:
                return cpu_seconds(self.proc.pid)
            except psutil.Error:
                self.exited()
        assert self.final is not None
        return self.final


async def measure(
    start: Callable[[], subprocess.Popen[bytes]],
    counter: Counter,
    n: int,
    *,
    log_path: Path,
    timeout_s: float = 180.0,
    poll_s: float = 0.01,
    stop: Callable[[subprocess.Popen[bytes]], int | None] | None = None,
    watch: Mapping[str, int] | None = None,
) -> Measurement:
    """Start a contender, poll outcomes until `n` are visible; stop it (`stop`, default SIGTERM).
    `watch`: other processes (name -> pid) whose CPU over the same window is reported too."""
    others = dict(watch or {})
    others_first: dict[str, float] = {}
    began = time.perf_counter()
    proc = start()
    cpu = _Cpu(proc)
    first: tuple[float, float, int] | None = None
    try:
        deadline = began + timeout_s
        while True:
            exited = cpu.exited()  # checked before counting: an exit after the N-th outcome is fine
            seen = await counter.count()
            now = time.perf_counter()
            if seen > 0 and first is None:
                first = (now, cpu.seconds(), seen)
                others_first = {k: cpu_quiet(pid) for k, pid in others.items()}
            if seen >= n:
                cpu_end = cpu.seconds()
                others_used = {k: cpu_quiet(pid) - others_first[k] for k, pid in others.items()}
                break
            if exited:
                raise RuntimeError(
                    f"the contender exited ({proc.returncode}) after {seen} of {n} outcomes:\n"
                    + tail(log_path)
                )
            if now > deadline:
                raise RuntimeError(f"only {seen} of {n} outcomes within {timeout_s:.0f}s:\n{tail(log_path)}")
            await asyncio.sleep(poll_s)
    finally:
        code = await asyncio.to_thread(stop or terminate, proc)
    assert first is not None
    t_first, cpu_first, at_first = first
    return Measurement(
        n=n,
        outcomes_at_first=at_first,
        steady_s=now - t_first,
        steady_cpu_s=cpu_end - cpu_first,
        from_spawn_s=now - began,
        cpu_total_s=cpu_end,
        exit_code=code,
        watched=others_used,
    )


def cpu_quiet(pid: int | None) -> float:
    """`cpu_seconds(pid)`, or NaN when there is no such process (None: none known)."""
    if pid is None:
        return float("nan")
    try:
        return cpu_seconds(pid)
    except psutil.Error:
        return float("nan")
