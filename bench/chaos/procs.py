"""Child processes of a chaos run: the broker, Redis and the simulator, each logging under the run dir.

Every child is started from the harness's main thread with a parent-death signal (Linux), so a
harness killed by SIGKILL leaves none behind; `close()` of each stops it for good, and the
harness calls them in a `finally`. The broker is driven through `scripts/kafka_local.py` from one
dedicated thread (its parent-death signal follows the thread that started it, and a start or
restart blocks for seconds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


class ChaosSetupError(RuntimeError):
    """A service the run needs did not start; the message says which and shows its log."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def _parent_death_signal() -> None:
    """In the child before exec: SIGKILL me when the harness dies (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def spawn(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `cmd` in the repository root, stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C at the terminal goes to the harness only
            preexec_fn=_parent_death_signal if sys.platform == "linux" else None,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL; the exit code. Safe when already gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def http_json(url: str, timeout_s: float = 5.0) -> Any:
    """GET `url` and parse its JSON body (blocking; loopback only)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return orjson.loads(resp.read())


def http_text(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        body: bytes = resp.read()
        return body.decode()


# --------------------------------------------------------------------------- Redis


class Redis:
    """Debian's redis-server on a free loopback port, no persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 10.0) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ChaosSetupError("redis-server is not installed (make redis-server-install)")
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / "redis.log"
        for _attempt in range(3):  # the free port can be taken before redis binds it
            port = free_port()
            self.proc = spawn(
                [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", str(self.directory), "--loglevel", "warning"],
                log,
            )  # fmt: skip
            deadline = time.monotonic() + timeout_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                if _pong(port):
                    self.url = f"redis://{HOST}:{port}/0"
                    return self.url
                time.sleep(0.05)
            self.close()
        raise ChaosSetupError(f"redis-server did not answer PING:\n{tail(log)}")

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)
            self.proc = None


def _pong(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# --------------------------------------------------------------------------- the simulator


class Simulator:
    """`python -m service.simulator` on a free port, its config from `args`."""

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> str:
        for _attempt in range(3):
            port = free_port()
            cmd = [sys.executable, "-m", "service.simulator", "--host", HOST, "--port", str(port), *self.args]
            self.proc = spawn(cmd, self.log_path)
            url = f"http://{HOST}:{port}"
            deadline = time.monotonic() + timeout_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError, ValueError):
                    http_json(f"{url}/_sim/stats", 1.0)
                    self.url = url
                    return url
                time.sleep(0.1)
            self.close()
        raise ChaosSetupError(f"the simulator did not start:\n{tail(self.log_path)}")

    def calls(self) -> dict[str, Any]:
        """`GET /_sim/calls`: per-request ok / billed / all counts."""
        data: dict[str, Any] = http_json(f"{self.url}/_sim/calls", 60.0)
        return data

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = http_json(f"{self.url}/_sim/stats", 10.0)
        return data

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
            self.proc = None


# --------------------------------------------------------------------------- the broker


def kafka_local() -> ModuleType:
    """`scripts/kafka_local.py` (a stdlib-only script) as a module, loaded once."""
    name = "_chaos_kafka_local"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "kafka_local.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


class Broker:
    """The run's own local Kafka broker, its files (data kept across restarts) in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.kl = kafka_local()
        # One long-lived thread: the broker's parent-death signal follows the thread that started it.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chaos-broker")
        self.bootstrap = ""
        self.started = False

    async def start(self) -> str:
        self.started = True
        try:
            bootstrap: str = await self._run(self.kl.start, self.directory, die_with_parent=True)
        except self.kl.KafkaLocalError as exc:
            raise ChaosSetupError(f"the Kafka broker did not start: {exc}") from exc
        self.bootstrap = bootstrap
        return bootstrap

    async def restart(self) -> float:
        """Stop (SIGTERM, a clean shutdown) and start again with the data kept; seconds it took."""
        began = time.monotonic()
        bootstrap: str = await self._run(self.kl.restart, self.directory, die_with_parent=True)
        if bootstrap != self.bootstrap:
            raise RuntimeError(f"the broker came back on {bootstrap}, not {self.bootstrap}")
        return time.monotonic() - began

    async def stop(self) -> None:
        """Stop it (SIGTERM, a clean shutdown), its data kept: an outage until `resume`."""
        await self._run(self.kl.stop, self.directory)

    async def resume(self) -> None:
        """Start it again after `stop`, with its data, on the same bootstrap."""
        bootstrap = await self._run(self.kl.start, self.directory, die_with_parent=True, keep_data=True)
        if bootstrap != self.bootstrap:
            raise RuntimeError(f"the broker came back on {bootstrap}, not {self.bootstrap}")

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    def close(self, remove_data: bool = False) -> None:
        """Stop the broker (blocking) and end its thread; `remove_data` deletes its log dirs."""
        if self.started:
            self._thread.submit(self.kl.stop, self.directory).result()
            self.started = False
        self._thread.shutdown(wait=True)
        if remove_data:
            shutil.rmtree(self.directory / "data", ignore_errors=True)
