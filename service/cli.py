"""Command line of the gateway: `claude-gateway --help`.

The environment is read here and only here: `GATEWAY_CONFIG` (the config file,
for every command), `GATEWAY_<SECTION>__<SETTING>` overrides of the file
(`service.config.loader`), and the standard `OTEL_*` tracing variables
(`service.telemetry.tracing.provider_from_env`).

`run` reports every start-up failure as one JSON log line on stderr (the format of
the service's logs) and exits 2; tools (`config check`, `dlq`) answer people in text.
A stop whose drain left claimed calls without a published answer (the drain timed out, or
the brokers stayed away) exits `EXIT_LEFT_UNPUBLISHED` (75, EX_TEMPFAIL), after an error
log line with their count: the partitions' next owners resolve them by policy.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from service import gc_policy
from service.admission.registry import Registry, RegistryError
from service.config import advice
from service.config.kafka import client_kwargs
from service.config.loader import ConfigError, env_overrides, load_config
from service.config.redis import redis_client
from service.config.reload import ConfigWatcher
from service.config.secrets import SecretRef, SecretResolutionError
from service.config.settings import GatewaySettings
from service.deadletters.command import add_commands as add_dlq_commands
from service.deadletters.command import run as run_dlq
from service.lifecycle import report_slow_stop
from service.telemetry.logs import configure_logging
from service.topics import add_commands as add_topics_commands
from service.topics import run as run_topics
from service.version import version

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

EXIT_LEFT_UNPUBLISHED = 75

log = logging.getLogger("service")


DESCRIPTION = """\
Claude Partner Gateway: partners produce Claude requests to Kafka; the gateway
enforces their limits and budgets, shares the organisation's Claude rate limits
fairly, and publishes exactly one response or dead letter per request.
"""
EPILOG = """\
environment:
  GATEWAY_CONFIG                   the config file, when --config is not given
  GATEWAY_<SECTION>__<SETTING>     override a setting of the file, e.g.
                                   GATEWAY_KAFKA__BOOTSTRAP_SERVERS=broker:9092,
                                   GATEWAY_RUNTIME__LOG_LEVEL=debug
  OTEL_*                           tracing (none set: no tracing)

docs: README.md, docs/configuration.md, docs/operations.md
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="claude-gateway",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"claude-gateway {version()}")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config",
        default=os.environ.get("GATEWAY_CONFIG"),
        metavar="FILE",
        help="the config file (default: $GATEWAY_CONFIG)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[config], help="run the gateway", description="Run the gateway.")
    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="{check}")
    check = cfg_sub.add_parser(
        "check",
        parents=[config],
        help="validate a config file without starting",
        description="Validate the config file (and read every secret it names) without starting.",
    )
    check.add_argument("file", nargs="?", help=argparse.SUPPRESS)  # before --config existed here
    check.add_argument("--no-secrets", action="store_true", help="do not try to resolve secret references")
    add_dlq_commands(sub, config)
    add_topics_commands(sub, config)
    sub.add_parser(
        "simulator",
        help="run the Claude API simulator (claude-gateway simulator --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["simulator"]:
        from service.simulator.__main__ import main as simulator_main

        return simulator_main(args_list[1:])
    args = _parser().parse_args(args_list)
    path = getattr(args, "file", None) or args.config
    if not path:
        print(f"claude-gateway {args.command}: --config FILE or GATEWAY_CONFIG is required", file=sys.stderr)
        return 2
    if args.command == "config":
        return _config_check(path, resolve=not args.no_secrets)
    if args.command in ("dlq", "deadletters", "topics"):
        try:
            settings = load_config(path, os.environ)
        except ConfigError as exc:
            print(f"claude-gateway {args.command}: {exc}", file=sys.stderr)
            return 2
        return run_topics(args, settings) if args.command == "topics" else run_dlq(args, settings)
    return _run(path)


def _config_check(path: str, *, resolve: bool) -> int:
    """Validate the file and (unless `--no-secrets`) read every secret it references."""
    try:
        settings = load_config(path, os.environ)
        if resolve:
            Registry.build(settings)
            _resolve_service_secrets(settings)
            _load_tls_files(settings)
    except (ConfigError, RegistryError) as exc:
        print(f"config check failed: {exc}", file=sys.stderr)
        return 1
    for warning in [*env_overrides(os.environ)[1], *advice.warnings(settings)]:
        print(f"warning: {warning}", file=sys.stderr)
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
        ("admin.token", settings.admin.token if settings.admin else None),
        *[(f"operator_replay.keys.{k}", ref) for k, ref in _operator_keys(settings).items()],
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


def _load_tls_files(settings: GatewaySettings) -> None:
    """The Kafka and Redis TLS files load (CA, certificate, key); raises `ConfigError` naming
    them."""
    try:
        if settings.kafka.security_protocol in ("SSL", "SASL_SSL"):
            client_kwargs(settings.kafka)
        if settings.redis is not None:
            redis_client(settings.redis)  # reads nothing but its TLS files: no connection yet
    except SecretResolutionError as exc:
        raise ConfigError(str(exc)) from exc


def _operator_keys(settings: GatewaySettings) -> dict[str, SecretRef]:
    return dict(settings.operator_replay.keys) if settings.operator_replay is not None else {}


def _cannot_start(exc: BaseException) -> int:
    """Every start-up failure of `run`: one JSON log line on stderr, exit status 2."""
    log.error("cannot start", extra={"error": str(exc), "error_class": type(exc).__name__})
    return 2


def _run(path: str) -> int:
    # here, not at the top: it imports the anthropic SDK (1-2 s), which `run` needs and the
    # operator commands (`dlq`, `topics`, `config check`) do not
    from service.telemetry.tracing import TracingConfigError, provider_from_env, shutdown_provider

    configure_logging("INFO")  # JSON from the first line, before the config says the level
    try:
        settings = load_config(path, os.environ)
    except ConfigError as exc:
        return _cannot_start(exc)
    configure_logging(settings.runtime.log_level)
    for warning in [*env_overrides(os.environ)[1], *advice.warnings(settings)]:
        log.warning(warning)
    try:
        tracer_provider = provider_from_env(os.environ)  # OTEL_*; none set: no tracing
    except TracingConfigError as exc:
        return _cannot_start(exc)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        pass
    try:
        left = asyncio.run(_serve(path, tracer_provider))
    except (ConfigError, RegistryError, SecretResolutionError) as exc:
        return _cannot_start(exc)
    finally:
        shutdown_provider(tracer_provider)  # flushes the spans still batched
    return EXIT_LEFT_UNPUBLISHED if left else 0


async def _serve(path: str, tracer_provider: TracerProvider | None = None) -> int:
    """Serve until a stop signal; returns how many claimed calls the drain left unpublished."""
    from service.app import Gateway

    environ = dict(os.environ)
    settings = load_config(path, environ)
    client_kwargs(settings.kafka)  # the Kafka TLS files and SASL password load, before anything starts
    gateway = Gateway(settings, tracer_provider=tracer_provider)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # config file and partner secret files: polled every 2 s, and reloaded at once on SIGHUP
    watcher = ConfigWatcher(path, gateway.reload, gateway.settings, load=lambda p: load_config(p, environ))

    def request_stop(signame: str) -> None:
        log.info("stop requested", extra={"signal": signame})
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, request_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, request_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, watcher.request)
    watching = asyncio.create_task(watcher.run(stop))
    # start-up objects frozen, young collections rare, a full collection on a clock
    gc_policy.apply()
    collecting = asyncio.create_task(gc_policy.collect_periodically(stop))
    # past the drain: say what the stop waits on, before the orchestrator kills the process
    slow = asyncio.create_task(report_slow_stop(stop, gateway.settings.runtime.drain_timeout_s + 5))
    try:
        await gateway.run(stop)
    finally:
        stop.set()
        await watching
        await collecting
        slow.cancel()
    return gateway.ingest.left_unpublished
