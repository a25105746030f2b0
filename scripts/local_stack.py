"""`make up` / `make down`: a local broker, the Claude simulator and the gateway, in the background.

    python scripts/local_stack.py up   [--dir .run/up] [--bootstrap HOST:PORT] [--http-port 9464]
    python scripts/local_stack.py down [--dir .run/up]

`up` starts the local Apache Kafka (`scripts/kafka_local.py`, into `<dir>/kafka`) unless
`--bootstrap` names a running broker, writes an Anthropic key per partner and an admin
token under `<dir>`, starts the simulator accepting those keys, renders `config.example.yaml`
into `<dir>/config.yaml` (the broker, the simulator, the key files), creates the partners'
topics (`claude-gateway topics ensure`), starts the gateway, and waits until `/readyz`
answers 200. It prints what it started as one JSON line. `GATEWAY_*` variables in the
environment reach the gateway as usual (e.g. other topic prefixes). Logs and pid files stay
in `<dir>`. `down` stops what `up` started (the gateway first, so it drains) and is safe
to repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
READY_TIMEOUT_S = 90.0


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return proc.pid


def _wait_for_line(log: Path, prefix: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        time.sleep(0.1)
    raise SystemExit(f"local_stack: no {prefix!r} line in {log} after {timeout_s:.0f}s")


def _ready(port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"local_stack: the gateway is not ready after {timeout_s:.0f}s (see its log)")


def up(d: Path, bootstrap: str | None, http_port: int) -> dict[str, object]:
    d.mkdir(parents=True, exist_ok=True)
    if bootstrap is None:
        out = subprocess.run(  # noqa: S603
            [PY, "scripts/kafka_local.py", "start", "--dir", str(d / "kafka")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        bootstrap = out.stdout.strip().splitlines()[-1]
        (d / "kafka.owned").write_text("1")
    cfg = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    keys_dir = d / "keys"
    keys_dir.mkdir(exist_ok=True)
    keys: dict[str, str] = {}
    for p in cfg["partners"]:
        key = keys.setdefault(p["id"], f"sk-ant-local-{p['id']}-{secrets.token_hex(12)}")
        (keys_dir / f"{p['id']}.key").write_text(key)
        p["api_key"] = {"file": str(keys_dir / f"{p['id']}.key")}
    token = d / "admin.token"
    if not token.exists():
        token.write_text(secrets.token_urlsafe(24))
    cfg["admin"] = {"token": {"file": str(token)}}
    sim_log = d / "simulator.log"
    sim_log.write_text("")
    sim_args = [PY, "-m", "service", "simulator", "--port", "0"]
    for pid_, key in keys.items():
        sim_args += ["--api-key", f"{pid_}={key}"]
    (d / "simulator.pid").write_text(str(_spawn(sim_args, sim_log)))
    sim_url = _wait_for_line(sim_log, "SIMULATOR_URL=")
    cfg["kafka"]["bootstrap_servers"] = bootstrap
    cfg["anthropic"]["base_url"] = sim_url
    cfg["runtime"]["http_port"] = http_port
    config = d / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run(  # noqa: S603
        [PY, "-m", "service", "topics", "ensure", "--config", str(config)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    gw_log = d / "gateway.log"
    (d / "gateway.pid").write_text(str(_spawn([PY, "-m", "service", "run", "--config", str(config)], gw_log)))
    _ready(http_port)
    return {
        "bootstrap": bootstrap,
        "simulator": sim_url,
        "config": str(config),
        "console": f"http://127.0.0.1:{http_port}/admin",
        "admin_token_file": str(token),
        "logs": str(d),
    }


def _stop_pid(file: Path, timeout_s: float = 30.0) -> None:
    if not file.exists():
        return
    pid = int(file.read_text().strip() or 0)
    file.unlink()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def down(d: Path) -> None:
    _stop_pid(d / "gateway.pid")
    _stop_pid(d / "simulator.pid")
    if (d / "kafka.owned").exists():
        stop = [PY, "scripts/kafka_local.py", "stop", "--dir", str(d / "kafka")]
        subprocess.run(stop, cwd=ROOT, check=False)  # noqa: S603
        (d / "kafka.owned").unlink()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--dir", default=".run/up", type=Path)
    parser.add_argument("--bootstrap", help="a running broker (else the local one is started)")
    parser.add_argument("--http-port", type=int, default=9464)
    args = parser.parse_args()
    if args.command == "down":
        down(args.dir)
        return 0
    try:
        print(json.dumps(up(args.dir, args.bootstrap, args.http_port)), flush=True)
    except BaseException:
        down(args.dir)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
