"""A real Redis for the tests: `REDIS_URL` if set, else Debian's redis-server on a free loopback port."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = (
    "redis-server is not installed; `make test` installs it "
    "(or: apt-get install -y --no-install-recommends redis-server)"
)


def _parent_death_signal() -> None:
    """In the child before exec: SIGTERM me when pytest dies, even by SIGKILL (no orphan server)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(workdir: Path, timeout_s: float = 10.0, port: int | None = None) -> Iterator[str]:
    """Yield `redis://127.0.0.1:PORT/0` of a throwaway redis-server (no persistence), stopped on exit.

    `port` pins the port (to restart a server where clients expect it)."""
    configured = os.environ.get("REDIS_URL")
    if configured and port is None:
        yield configured
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    wanted = port
    for _attempt in range(3):  # a free port can be taken between the probe and the bind
        port = wanted or free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(workdir), "--logfile", str(log), "--loglevel", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_parent_death_signal if sys.platform == "linux" else None,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline and not _pong(port):
            time.sleep(0.02)
        if proc.poll() is None and _pong(port):
            break
        proc.kill()
        proc.wait()
    else:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        pytest.fail(f"redis-server did not answer PING within {timeout_s}s:\n{tail}", pytrace=False)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's Redis: `redis://127.0.0.1:PORT/0`."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
