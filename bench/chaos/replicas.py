"""Gateway replicas as separate processes (`python -m service run --config FILE`), and what a
supervisor does to them: start, kill -9 and restart, scale up, graceful stop, restart after an
exit nobody asked for (as Kubernetes would with `restartPolicy: Always`).

Each replica has its own config file (only `runtime.http_port` and `kafka.client_id` differ, so
its /metrics can be scraped) and one log, `gateway-<i>.log`, appended across its restarts with
a marker line before each start.

A start may be armed with a failpoint (`GATEWAY_FAILPOINT=<name>:<n>`, service/ingest/failpoints.py):
the process then ends itself with status 137, as kill -9 would, at the n-th passage through that
step. Such an exit is counted in `failpoint_exits`, not as unexpected, and restarted the same way.

Replicas run with `PYTHONFAULTHANDLER=1`: one still running `STOP_TIMEOUT_S` after its SIGTERM
gets SIGABRT, and the stack of each of its threads goes to its log (its exit code is then -6).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.chaos.procs import HOST, free_port, http_json, spawn, stop_process
from service.cli import EXIT_LEFT_UNPUBLISHED

STOP_TIMEOUT_S = 40.0
FAILPOINT_EXIT = 137
"""The status of a process that reached its failpoint (`os._exit(137)`)."""


class State(enum.Enum):
    RUNNING = "running"
    RESTARTING = "restarting"  # killed or exited; a restart is pending
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Replica:
    index: int
    config_path: Path
    log_path: Path
    http_port: int
    proc: subprocess.Popen[bytes] | None = None
    state: State = State.STOPPED
    starts: int = 0
    restart_task: asyncio.Task[None] | None = field(default=None, repr=False)
    failpoint: str | None = None
    """The failpoint this start of the replica is armed with, if any."""

    @property
    def name(self) -> str:
        return f"gateway-{self.index}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Fleet:
    """The replicas of one run. `config(i, http_port)` gives replica i's settings as a dict;
    `arm()`, asked at each start, a failpoint spec for it or None."""

    def __init__(
        self,
        run_dir: Path,
        config: Callable[[int, int], dict[str, Any]],
        rng: random.Random,
        event: Callable[[str], None],
        restart_delay_s: float = 1.0,
        arm: Callable[[], str | None] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self._config = config
        self._rng = rng
        self._event = event
        self.restart_delay_s = restart_delay_s
        self.replicas: list[Replica] = []
        self.kills = 0
        self.unexpected_exits = 0
        self.graceful_stops: list[int] = []  # exit codes
        self.ungraceful_pids: set[int] = set()
        """Processes that did not stop gracefully: killed, exited by themselves, aborted, or
        stopped saying they left claimed calls without a published answer (exit 75)."""
        self.stops_leaving_calls = 0
        """Graceful stops that exited `EXIT_LEFT_UNPUBLISHED` (a drain that ran out of time)."""
        self._arm = arm
        self.failpoint_exits: dict[str, int] = {}
        """By failpoint name: starts that ended at their failpoint."""

    # -- lifecycle ---------------------------------------------------------------

    def add(self) -> Replica:
        """A new replica (the next index), started at once."""
        index = len(self.replicas)
        port = free_port()
        path = self.run_dir / f"gateway-{index}.yaml"
        path.write_text(yaml.safe_dump(self._config(index, port), sort_keys=False))
        replica = Replica(index, path, self.run_dir / f"gateway-{index}.log", port)
        self.replicas.append(replica)
        self._start(replica)
        return replica

    def _start(self, replica: Replica) -> None:
        replica.starts += 1
        with replica.log_path.open("a") as log:
            log.write(f"=== chaos harness: start #{replica.starts} of {replica.name} at {time.time():.3f}\n")
        replica.failpoint = self._arm() if self._arm is not None else None
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        env.pop("GATEWAY_FAILPOINT", None)
        if replica.failpoint is not None:
            env["GATEWAY_FAILPOINT"] = replica.failpoint
        replica.proc = spawn(
            [sys.executable, "-m", "service", "run", "--config", str(replica.config_path)],
            replica.log_path,
            env,
        )
        replica.state = State.RUNNING
        armed = f", failpoint {replica.failpoint}" if replica.failpoint else ""
        self._event(f"{replica.name} started (pid {replica.proc.pid}, start #{replica.starts}{armed})")

    def live(self) -> list[Replica]:
        """Replicas that run or will run again (a killed one whose restart is pending)."""
        return [r for r in self.replicas if r.state in (State.RUNNING, State.RESTARTING)]

    def running(self) -> list[Replica]:
        return [r for r in self.replicas if r.state is State.RUNNING and r.alive]

    async def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Wait until every running replica answers /readyz 200; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pending = [r for r in self.running() if not await asyncio.to_thread(_ready, r.http_port)]
            if not pending:
                return True
            await asyncio.sleep(0.5)
        return False

    # -- chaos -----------------------------------------------------------------------

    async def kill_random(self, prefer: int | None = None) -> Replica | None:
        """kill -9 of a random running replica, preferring those that own partitions (so the
        kill hits work in flight; a ready standby owns none), or replica `prefer` when it
        runs; its restart follows after `restart_delay_s`."""
        running = self.running()
        chosen = [r for r in running if r.index == prefer]
        if chosen:
            replica = chosen[0]
        else:
            owning = [r for r in running if await asyncio.to_thread(_owns_partitions, r.http_port)]
            candidates = owning or running
            if not candidates:
                return None
            replica = self._rng.choice(candidates)
        if replica.state is not State.RUNNING or not replica.alive:  # changed while we asked
            return None
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGKILL)
        replica.proc.wait()
        self.ungraceful_pids.add(replica.proc.pid)
        self.kills += 1
        self._event(f"kill -9 {replica.name} (pid {replica.proc.pid}); kill #{self.kills}")
        self._restart_later(replica)
        return replica

    def _restart_later(self, replica: Replica) -> None:
        replica.state = State.RESTARTING

        async def restart() -> None:
            await asyncio.sleep(self.restart_delay_s)
            if replica.state is State.RESTARTING:
                self._start(replica)

        replica.restart_task = asyncio.create_task(restart(), name=f"restart-{replica.name}")

    def supervise(self) -> None:
        """Restart a running replica that exited by itself (called every fraction of a second)."""
        for replica in self.replicas:
            if (
                replica.state is State.RUNNING
                and replica.proc is not None
                and replica.proc.poll() is not None
            ):
                self.ungraceful_pids.add(replica.proc.pid)
                if replica.failpoint is not None and replica.proc.returncode == FAILPOINT_EXIT:
                    name = replica.failpoint.partition(":")[0]
                    self.failpoint_exits[name] = self.failpoint_exits.get(name, 0) + 1
                    self._event(f"{replica.name} ended at its failpoint {replica.failpoint}; restarting")
                else:
                    self.unexpected_exits += 1
                    self._event(
                        f"{replica.name} exited by itself with code {replica.proc.returncode}; restarting"
                    )
                self._restart_later(replica)

    async def stop(self, replicas: list[Replica], reason: str) -> list[int]:
        """Graceful stop (SIGTERM, drain) of `replicas`, concurrently; their exit codes."""
        for replica in replicas:
            if replica.restart_task is not None:
                replica.restart_task.cancel()
            replica.state = State.STOPPING
        self._event(f"stopping {', '.join(r.name for r in replicas)} ({reason})")
        codes = await asyncio.gather(*(asyncio.to_thread(self._stop_one, r) for r in replicas))
        self.graceful_stops.extend(c for c in codes if c is not None)
        self._event(f"stopped {', '.join(f'{r.name}={c}' for r, c in zip(replicas, codes, strict=True))}")
        return [c for c in codes if c is not None]

    def _stop_one(self, replica: Replica) -> int | None:
        code = None
        if replica.alive and replica.proc:
            proc = replica.proc
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # where is it stuck? faulthandler writes every stack
                self._event(f"{replica.name} still runs {STOP_TIMEOUT_S:g} s after SIGTERM: SIGABRT")
                self.ungraceful_pids.add(proc.pid)
                _abort(proc)
                code = stop_process(proc, 0.0)  # SIGKILL if even that did not end it
            if code == EXIT_LEFT_UNPUBLISHED:  # its log line counts them
                self.ungraceful_pids.add(proc.pid)
                self.stops_leaving_calls += 1
        replica.state = State.STOPPED
        return code

    async def scale_to(self, n: int) -> None:
        """Add replicas, or gracefully stop random ones, until `n` are live."""
        live = self.live()
        if n > len(live):
            self._event(f"scale {len(live)} -> {n}")
            for _ in range(n - len(live)):
                self.add()
        elif n < len(live):
            self._event(f"scale {len(live)} -> {n}")
            await self.stop(self._rng.sample(live, len(live) - n), "scale down")

    async def stop_all(self) -> None:
        await self.stop(self.live(), "end of run")

    def kill_all(self) -> None:
        """Last resort (the harness's `finally`): SIGKILL whatever still runs, reap it."""
        for replica in self.replicas:
            if replica.restart_task is not None:
                replica.restart_task.cancel()
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait()
            replica.state = State.STOPPED

    def metrics_urls(self) -> list[str]:
        return [f"http://{HOST}:{r.http_port}/metrics" for r in self.running()]


def _abort(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """SIGABRT (the replica's faulthandler dumps its threads' stacks into its log), then wait."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGABRT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout_s)


def _ready(port: int) -> bool:
    try:
        return bool(http_json(f"http://{HOST}:{port}/readyz", 1.0).get("ready"))
    except (OSError, ValueError):
        return False


def _owns_partitions(port: int) -> bool:
    try:
        return int(http_json(f"http://{HOST}:{port}/readyz", 1.0).get("partitions") or 0) > 0
    except (OSError, ValueError):
        return False


WORKER_STARTED = b'"event":"batch worker started"'
START_MARKER = b"=== chaos harness: start #"


class WorkerWatch:
    """Which replica is the batch worker, from the replicas' logs: the one whose current
    process wrote the most recent `batch worker started` of all (when that process is gone,
    no replica has taken the pending partition since: none). Reads only what the logs gained
    since the last look."""

    def __init__(self) -> None:
        self._read: dict[int, int] = {}
        self._current: dict[int, str] = {}
        """Replica index -> when its current process last started as the worker."""
        self._latest = ""
        """When any process last started as the worker (ISO timestamps compare as strings)."""

    def worker(self, replicas: list[Replica]) -> int | None:
        for replica in replicas:
            self._scan(replica)
        running = {r.index for r in replicas if r.state is State.RUNNING and r.alive}
        for index, ts in self._current.items():
            if ts == self._latest and index in running:
                return index
        return None

    def _scan(self, replica: Replica) -> None:
        try:
            with replica.log_path.open("rb") as f:
                f.seek(self._read.get(replica.index, 0))
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # a line being written waits for the next look
        self._read[replica.index] = self._read.get(replica.index, 0) + end
        for line in data[:end].splitlines():
            if line.startswith(START_MARKER):
                self._current.pop(replica.index, None)
            elif WORKER_STARTED in line:
                with contextlib.suppress(ValueError):
                    ts = str(orjson.loads(line).get("ts") or "")
                    self._current[replica.index] = ts
                    self._latest = max(self._latest, ts)
