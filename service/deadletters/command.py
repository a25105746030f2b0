"""`claude-gateway dlq show|replay` (alias `deadletters`): the command-line side of `replay.py`."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from datetime import datetime
from typing import Any

import orjson
from aiokafka.errors import KafkaError

from service.config.kafka import describe_failure
from service.config.secrets import SecretResolutionError
from service.config.settings import GatewaySettings
from service.contracts.reasons import Reason
from service.deadletters.replay import DEFAULT_REASONS, Selection, dead_letters, replay, summarize

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def when(text: str) -> int:
    """Unix ms from `2026-11-24T10:00:00Z` (ISO 8601) or an age: `90s`, `30m`, `2h`, `7d`."""
    rel = _RELATIVE.match(text.strip())
    if rel:
        return int((time.time() - float(rel.group(1)) * _UNITS[rel.group(2)]) * 1000)
    try:
        return int(datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither ISO 8601 nor an age like 30m, 2h, 7d"
        ) from None


def _reason(text: str) -> str:
    try:
        return Reason(text.strip().lower()).value
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dead-letter reason (one of: {', '.join(r.value for r in Reason)})"
        ) from None


def add_commands(sub: Any, config: argparse.ArgumentParser) -> None:
    """`dlq` and its alias `deadletters`, with `show` and `replay`. `config` is the parent
    parser that gives `--config`."""
    dlq = sub.add_parser(
        "dlq",
        aliases=["deadletters"],
        help="look at dead letters and replay them",
        description="Summarise dead-letter topics, and replay dead letters to their request topics.",
    )
    cmds = dlq.add_subparsers(dest="dlq_command", required=True, metavar="{show,replay}")
    common = argparse.ArgumentParser(add_help=False, parents=[config])
    common.add_argument("--partner", action="append", help="partner id, repeatable (default: every partner)")
    common.add_argument("--since", type=when, help="dead letters written since (ISO 8601, or an age: 2h, 7d)")
    common.add_argument("--until", type=when, help="dead letters written until (ISO 8601, or an age)")
    cmds.add_parser(
        "show",
        parents=[common],
        help="summarise the dead letters: by partner and reason, time range, replayable",
    )
    rp = cmds.add_parser(
        "replay",
        parents=[common],
        help="re-produce dead letters to their request topic, operator-signed",
        description=(
            "Re-produce the original bytes, key and headers of each selected dead letter to its "
            "request topic, signed with an operator_replay key so the gateway accepts it through "
            "its signature and replay checks. Never a request that has a response, never the same "
            "request twice. One JSON line per dead letter, then a summary."
        ),
    )
    default = ", ".join(sorted(r.value for r in DEFAULT_REASONS))
    rp.add_argument("--reason", action="append", type=_reason, help=f"repeatable (default: {default})")
    rp.add_argument("--request-id", action="append", help="only these request ids, repeatable")
    rp.add_argument("--dry-run", action="store_true", help="say what would be replayed; produce nothing")
    rp.add_argument("--key-id", help="operator_replay key id to sign with (default: the first)")


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    sys.stdout.flush()


def _selection(args: argparse.Namespace, settings: GatewaySettings) -> Selection:
    known = [p.id for p in settings.partners]
    partners = args.partner or known
    unknown = sorted(set(partners) - set(known))
    if unknown:
        raise ValueError(f"unknown partner(s) {', '.join(unknown)}; the config has {', '.join(known)}")
    reasons = getattr(args, "reason", None)
    return Selection(
        partners=partners,
        reasons=frozenset(reasons) if reasons else frozenset(r.value for r in DEFAULT_REASONS),
        since_ms=args.since,
        until_ms=args.until,
        request_ids=frozenset(getattr(args, "request_id", None) or ()),
    )


def run(args: argparse.Namespace, settings: GatewaySettings) -> int:
    """Exit status: 0 done, 1 Kafka failed (one JSON line on stderr), 2 a usage or
    configuration problem."""
    try:
        sel = _selection(args, settings)
    except ValueError as exc:
        print(f"claude-gateway dlq: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, settings, sel)
    except (KafkaError, SecretResolutionError) as exc:  # no broker, a refused login, TLS files
        sys.stderr.write(orjson.dumps(describe_failure(exc, settings.kafka)).decode() + "\n")
        return 1


def _run(args: argparse.Namespace, settings: GatewaySettings, sel: Selection) -> int:
    if args.dlq_command == "show":
        letters = asyncio.run(dead_letters(settings, sel))
        _emit(summarize(letters))
        return 0
    cfg = settings.operator_replay
    if cfg is None:
        print(
            "claude-gateway dlq replay: the config has no operator_replay section (keys that sign "
            "replays, so the gateway accepts them; see docs/operations.md#dead-letters-and-replay)",
            file=sys.stderr,
        )
        return 2
    key_id = args.key_id or next(iter(cfg.keys))
    ref = cfg.keys.get(key_id)
    if ref is None:
        print(
            f"claude-gateway dlq replay: --key-id {key_id!r} is not among operator_replay.keys",
            file=sys.stderr,
        )
        return 2
    try:
        secret = ref.resolve()
    except SecretResolutionError as exc:
        print(
            f"claude-gateway dlq replay: operator_replay.keys.{key_id} ({ref.describe()}): {exc}",
            file=sys.stderr,
        )
        return 2
    report = asyncio.run(
        replay(settings, sel, key_id=key_id, secret=secret, dry_run=args.dry_run, emit=_emit)
    )
    _emit(
        {
            "summary": {
                "dry_run": args.dry_run,
                "considered": report.considered,
                "replayed": report.replayed,
                "skipped": dict(report.skipped),
            }
        }
    )
    return 0
