"""Issue 12, a newcomer's path end to end: `make up` (scripts/local_stack.py), a partner request
through the partner client, the admin console, `make down`.

It runs the same script as `make up`, on the session's broker (`--bootstrap`) and with this
test's own topic prefixes and group through `GATEWAY_*` overrides, so it neither starts a
second broker nor meets other tests' topics. The example config is `config.example.yaml`,
which `config check` accepts as it is.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from claude_gateway_client import PartnerClient

from service.cli import main as cli_main
from tests.support.redis import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_the_example_config_passes_config_check() -> None:
    assert cli_main(["config", "check", "--config", str(ROOT / "config.example.yaml"), "--no-secrets"]) == 0


def _stack(command: str, d: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/local_stack.py", command, "--dir", str(d), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


async def test_up_a_request_through_the_client_and_down(kafka_bootstrap: str, tmp_path: Path) -> None:
    tag = f"t{uuid.uuid4().hex[:10]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "GATEWAY_KAFKA__REQUEST_TOPIC_PREFIX": f"{tag}.requests.",
        "GATEWAY_KAFKA__RESPONSE_TOPIC_PREFIX": f"{tag}.responses.",
        "GATEWAY_KAFKA__DEADLETTER_TOPIC_PREFIX": f"{tag}.deadletter.",
        "GATEWAY_KAFKA__GROUP_ID": f"{tag}-gateway",
    }
    d = tmp_path / "up"
    port = free_port()
    started = await asyncio.to_thread(
        _stack, "up", d, env, "--bootstrap", kafka_bootstrap, "--http-port", str(port)
    )
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        info = json.loads(started.stdout.strip().splitlines()[-1])
        assert info["console"] == f"http://127.0.0.1:{port}/admin"
        pids = [int((d / f).read_text()) for f in ("gateway.pid", "simulator.pid")]
        assert all(_alive(p) for p in pids)

        async with PartnerClient(kafka_bootstrap, "acme", topic_prefix=f"{tag}.") as client:
            response = await asyncio.wait_for(
                client.request(
                    {
                        "model": "claude-haiku-4-5",
                        "max_tokens": 64,
                        "messages": [{"role": "user", "content": "Hello from a newcomer"}],
                    }
                ),
                60,
            )
        assert response["partner"] == "acme"
        assert response["message"]["content"][0]["type"] == "text"

        token = (await asyncio.to_thread(Path(info["admin_token_file"]).read_text)).strip()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/admin/api/state", headers={"Authorization": f"Bearer {token}"}
        )
        state = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=10).read()))
        assert [p["id"] for p in state["partners"]] == ["acme", "globex"]
    finally:
        stopped = await asyncio.to_thread(_stack, "down", d, env)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(_alive(p) for p in pids)
    assert not (d / "gateway.pid").exists()
    again = await asyncio.to_thread(_stack, "down", d, env)  # safe to repeat
    assert again.returncode == 0
