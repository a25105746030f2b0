"""The gateway as a real process, for tests that kill it (kill -9, SIGSTOP) or signal it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.gateway import World

ROOT = Path(__file__).resolve().parents[2]


def start_process(
    world: World,
    sim_url: str,
    tmp: Path,
    name: str = "gateway",
    env: dict[str, str] | None = None,
    **overrides: object,
) -> subprocess.Popen[bytes]:
    """`python -m service run` with the world's settings (plus `overrides`); its config and
    log are `<tmp>/<name>.yaml` and `<tmp>/<name>.log`."""
    cfg = world.settings_dict(sim_url, runtime={"http_port": 0, "drain_timeout_s": 20}, **overrides)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with (tmp / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--config", str(path)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


async def exit_code(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Wait for the process to end (without blocking the event loop); its exit code."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(timeout=timeout_s))


async def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it has not exited within `timeout_s`."""
    proc.terminate()
    try:
        await exit_code(proc, timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
