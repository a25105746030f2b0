"""CLI: `python -m service.simulator [--config sim.yaml] [flags]`.

Flags override the YAML file. Once listening it prints one line,
`SIMULATOR_URL=http://127.0.0.1:PORT`, on stdout (flushed), and it stops
cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from service.simulator.config import SimulatorConfigError, load_config
from service.simulator.server import SimulatorServer

log = logging.getLogger("service.simulator")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every flag optional; unset flags leave the file's value)."""
    p = argparse.ArgumentParser(prog="python -m service.simulator", description=__doc__)
    p.add_argument("--config", help="YAML config file (see service/simulator/config.py)")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="0 = a free port")
    p.add_argument(
        "--api-key",
        action="append",
        metavar="NAME=KEY",
        help="accepted key, repeatable (no keys configured = any key accepted)",
    )
    p.add_argument("--model", action="append", help="known model id, repeatable (replaces the list)")
    p.add_argument("--rpm", type=int, help="requests per minute, 0 = unlimited")
    p.add_argument("--itpm", type=int, help="input tokens per minute, 0 = unlimited")
    p.add_argument("--otpm", type=int, help="output tokens per minute, 0 = unlimited")
    p.add_argument("--count-tokens-rpm", type=int, help="count_tokens requests per minute, 0 = unlimited")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens accepted")
    p.add_argument("--latency-s", type=float, help="fixed latency in seconds")
    p.add_argument("--latency-median-s", type=float, help="lognormal latency median (implies lognormal)")
    p.add_argument("--latency-sigma", type=float, help="lognormal latency sigma")
    p.add_argument("--latency-per-output-token-s", type=float, help="extra seconds per output token")
    p.add_argument("--output-distribution", choices=("fixed", "uniform", "lognormal"))
    p.add_argument("--output-tokens", type=int, help="fixed output tokens (implies fixed)")
    p.add_argument("--output-min-tokens", type=int)
    p.add_argument("--output-max-tokens", type=int)
    p.add_argument("--output-median-tokens", type=float)
    p.add_argument("--output-sigma", type=float)
    p.add_argument("--api-error-rate", type=float, help="share of calls answered 500 api_error")
    p.add_argument("--overloaded-rate", type=float, help="share of calls answered 529 overloaded_error")
    p.add_argument("--spend-limit-rate", type=float, help="share of calls answered 429 spend limit")
    p.add_argument("--drop-rate", type=float, help="share of calls whose connection is dropped")
    p.add_argument("--batch-processing-s", type=float, help="a Message Batch's processing time (s = hours)")
    p.add_argument("--batch-processing-max-s", type=float, help="draw each batch's time up to this")
    p.add_argument("--batch-expiry-s", type=float, help="a batch's expiry (Anthropic's 24 h), seconds")
    p.add_argument("--batch-max-queued-requests", type=int, help="batch entries queued org-wide before 429")
    p.add_argument("--seed", type=int, help="seed for every random draw")
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--max-tracked-requests", type=int, help="requests counted one by one in /_sim/calls")
    p.add_argument(
        "--round-remaining",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="round remaining tokens in headers to the nearest thousand (default on)",
    )
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    return p


def _set(target: dict[str, Any], path: str, value: Any) -> None:
    if value is None:
        return
    *parents, leaf = path.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides the flags ask for, as a nested mapping."""
    o: dict[str, Any] = {}
    for name in (
        "host",
        "port",
        "count_tokens_rpm",
        "max_tokens_limit",
        "seed",
        "max_body_bytes",
        "max_tracked_requests",
    ):
        _set(o, name, getattr(args, name))
    _set(o, "round_remaining", args.round_remaining)
    if args.api_key:
        keys: dict[str, str] = {}
        for item in args.api_key:
            name, sep, key = item.partition("=")
            if not sep or not name or not key:
                raise SimulatorConfigError(f"--api-key wants NAME=KEY, got {item.split('=')[0]!r}=...")
            keys[name] = key
        o["api_keys"] = keys
    if args.model:
        o["models"] = list(args.model)
    for name in ("rpm", "itpm", "otpm"):
        _set(o, f"limits.{name}", getattr(args, name))
    if args.latency_s is not None:
        _set(o, "latency.distribution", "fixed")
        _set(o, "latency.fixed_s", args.latency_s)
    if args.latency_median_s is not None:
        _set(o, "latency.distribution", "lognormal")
        _set(o, "latency.median_s", args.latency_median_s)
    _set(o, "latency.sigma", args.latency_sigma)
    _set(o, "latency.per_output_token_s", args.latency_per_output_token_s)
    if args.output_tokens is not None:
        _set(o, "output.distribution", "fixed")
        _set(o, "output.fixed_tokens", args.output_tokens)
    _set(o, "output.distribution", args.output_distribution)
    _set(o, "output.min_tokens", args.output_min_tokens)
    _set(o, "output.max_tokens", args.output_max_tokens)
    _set(o, "output.median_tokens", args.output_median_tokens)
    _set(o, "output.sigma", args.output_sigma)
    for name in ("api_error_rate", "overloaded_rate", "spend_limit_rate", "drop_rate"):
        _set(o, f"faults.{name}", getattr(args, name))
    for name in ("processing_s", "processing_max_s", "expiry_s", "max_queued_requests"):
        _set(o, f"batches.{name}", getattr(args, f"batch_{name}"))
    return o


async def serve(server: SimulatorServer) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        print(f"SIMULATOR_URL={server.url}", flush=True)
        await stop.wait()
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = load_config(args.config, overrides_from_args(args))
    except SimulatorConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = SimulatorServer(config)
    uvloop: Any = None
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop
    if uvloop is not None:
        uvloop.run(serve(server))
    else:
        asyncio.run(serve(server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
