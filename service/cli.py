"""Command line: `claude-gateway run --config FILE` and `claude-gateway config check FILE`.

The environment is read here and only here (`GATEWAY_CONFIG`, and the standard
`OTEL_*` tracing variables, see `service.telemetry.tracing.provider_from_env`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence

from opentelemetry.trace import TracerProvider

from service.admission.registry import Registry, RegistryError
from service.config.loader import ConfigError, load_config
from service.config.reload import ConfigWatcher
from service.config.secrets import SecretRef, SecretResolutionError
from service.config.settings import GatewaySettings
from service.telemetry.logs import configure_logging
from service.telemetry.tracing import TracingConfigError, provider_from_env, shutdown_provider

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
    """Validate the file and (unless `--no-secrets`) read every secret it references."""
    try:
        settings = load_config(path)
        if resolve:
            Registry.build(settings)
            _resolve_service_secrets(settings)
    except (ConfigError, RegistryError) as exc:
        print(f"config check failed: {exc}", file=sys.stderr)
        return 1
    disabled = sum(1 for p in settings.partners if not p.enabled)
    signed = sum(1 for p in settings.partners if p.signing.required)
    note = "" if resolve else "; secrets not checked"
    print(
        f"{path}: ok ({len(settings.partners)} partners, {disabled} disabled, "
        f"{signed} with required signatures{note})"
    )
    return 0


def _resolve_service_secrets(settings: GatewaySettings) -> None:
    """The service's own secrets (Kafka SASL, Redis); raises `ConfigError` naming the setting."""
    refs: list[tuple[str, SecretRef | None]] = [
        ("kafka.sasl_password", settings.kafka.sasl_password),
        ("kafka.sasl_oauth_token", settings.kafka.sasl_oauth_token),
        ("redis.password", settings.redis.password if settings.redis else None),
    ]
    errors = []
    for name, ref in refs:
        if ref is not None:
            try:
                ref.resolve()
            except SecretResolutionError as exc:
                errors.append(f"{name} ({ref.describe()}): {exc}")
    if errors:
        raise ConfigError("cannot load service secrets:\n  " + "\n  ".join(errors))


def _run(path: str) -> int:
    try:
        settings = load_config(path)
    except ConfigError as exc:
        print(f"claude-gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.runtime.log_level)
    try:
        tracer_provider = provider_from_env(os.environ)  # OTEL_*; none set: no tracing
    except TracingConfigError as exc:
        print(f"claude-gateway: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        pass
    try:
        asyncio.run(_serve(path, tracer_provider))
    except (ConfigError, RegistryError, SecretResolutionError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return 2
    finally:
        shutdown_provider(tracer_provider)  # flushes the spans still batched
    return 0


def _tune_gc() -> None:
    """Move everything built at start-up out of the collector's sight, and collect less often.

    A request in flight is a few dozen short-lived objects; with up to `max_queue` of
    them per partner the default thresholds ran full collections every few hundred
    messages, about a quarter of the service's CPU (measured with `make bench`).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def _serve(path: str, tracer_provider: TracerProvider | None = None) -> None:
    from service.app import Gateway

    gateway = Gateway(load_config(path), tracer_provider=tracer_provider)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # config file and partner secret files: polled every 2 s, and reloaded at once on SIGHUP
    watcher = ConfigWatcher(path, gateway.reload, gateway.settings)

    def request_stop(signame: str) -> None:
        log.info("stop requested", extra={"signal": signame})
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, request_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, request_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, watcher.request)
    watching = asyncio.create_task(watcher.run(stop))
    _tune_gc()
    try:
        await gateway.run(stop)
    finally:
        stop.set()
        await watching
