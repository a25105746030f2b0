"""Command line: `claude-gateway run --config FILE` and `claude-gateway config check FILE`.

The environment is read here and only here (`GATEWAY_CONFIG`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from service.admission.registry import Registry, RegistryError
from service.config.loader import ConfigError, load_config
from service.telemetry.logs import configure_logging

log = logging.getLogger("service")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="claude-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument(
        "--config", default=os.environ.get("GATEWAY_CONFIG"), help="config file (GATEWAY_CONFIG)"
    )
    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a config file without starting")
    check.add_argument("file")
    check.add_argument("--no-secrets", action="store_true", help="do not try to resolve secret references")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        return _config_check(args.file, resolve=not args.no_secrets)
    if not args.config:
        print("claude-gateway run: --config FILE or GATEWAY_CONFIG is required", file=sys.stderr)
        return 2
    return _run(args.config)


def _config_check(path: str, *, resolve: bool) -> int:
    try:
        settings = load_config(path)
        if resolve:
            Registry.build(settings)
    except (ConfigError, RegistryError) as exc:
        print(f"config check failed: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(settings.partners)} partners)")
    return 0


def _run(path: str) -> int:
    try:
        settings = load_config(path)
    except ConfigError as exc:
        print(f"claude-gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.runtime.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        pass
    try:
        asyncio.run(_serve(path))
    except (ConfigError, RegistryError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return 2
    return 0


async def _serve(path: str) -> None:
    from service.app import Gateway

    gateway = Gateway(load_config(path))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(signame: str) -> None:
        log.info("stop requested", extra={"signal": signame})
        stop.set()

    def request_reload() -> None:
        try:
            gateway.reload(load_config(path))
        except (ConfigError, RegistryError) as exc:
            log.error("reload rejected; keeping the current configuration", extra={"error": str(exc)})

    loop.add_signal_handler(signal.SIGTERM, request_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, request_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, request_reload)
    await gateway.run(stop)
