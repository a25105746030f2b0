"""`claude-gateway topics ensure`: create the partners' topics the config names, when missing.

For every partner: its request topic (`--partitions`, by default 3), its response
topic and its dead-letter topic (as many partitions as the request topic; dead
letters kept `--deadletter-retention-days`, 30 by default: they are for replay).
Once: the usage topic (`kafka.usage_topic`, metering records keyed by partner; kept
`--usage-retention-days`, 30 by default: chargeback reads it). Existing topics are
left alone and reported (with their partition count, so a mismatch shows). One JSON
line per topic, then a summary.

The gateway itself creates the usage topic at start when it is missing
(`ensure_usage_topic`): every billed outcome's transaction writes to it, and a broker that
auto-creates it inside those first transactions held them ~40 s (NotEnoughReplicas, then
NotLeaderForPartition at the request timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from service.batches.store import batch_topics
from service.config.kafka import (
    client_kwargs,
    create_missing,
    create_topics,
    default_replication,
    describe_failure,
    running,
)
from service.config.secrets import SecretResolutionError
from service.config.settings import GatewaySettings

DAY_MS = 86_400_000


def add_commands(sub: Any, config: argparse.ArgumentParser) -> None:
    topics = sub.add_parser("topics", help="create the partners' topics")
    cmds = topics.add_subparsers(dest="topics_command", required=True, metavar="{ensure}")
    ensure = cmds.add_parser(
        "ensure",
        parents=[config],
        help="create each partner's request, response and dead-letter topics when missing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ensure.add_argument("--partitions", type=int, default=3, help="of each new request topic (default 3)")
    ensure.add_argument(
        "--replication-factor", type=int, help="of new topics (default: 3, or fewer brokers if fewer)"
    )
    ensure.add_argument("--deadletter-retention-days", type=float, default=30.0)
    ensure.add_argument("--usage-retention-days", type=float, default=30.0)
    ensure.add_argument("--dry-run", action="store_true", help="say what would be created")


def wanted(
    settings: GatewaySettings,
    partitions: int,
    replication: int,
    deadletter_retention_days: float,
    usage_retention_days: float = 30.0,
) -> list[NewTopic]:
    out: list[NewTopic] = []
    retention = {"retention.ms": str(int(deadletter_retention_days * DAY_MS))}
    for p in settings.partners:
        out.append(NewTopic(settings.request_topic(p), partitions, replication))
        out.append(NewTopic(settings.response_topic(p.id), partitions, replication))
        out.append(
            NewTopic(settings.deadletter_topic(p.id), partitions, replication, topic_configs=retention)
        )
    if settings.batches.enabled:
        out += batch_topics(settings, replication, partitions)
    out.append(usage_topic(settings, partitions, replication, usage_retention_days))
    return out


def usage_topic(
    settings: GatewaySettings, partitions: int, replication: int, retention_days: float = 30.0
) -> NewTopic:
    retention = {"retention.ms": str(int(retention_days * DAY_MS))}
    return NewTopic(settings.kafka.usage_topic, partitions, replication, topic_configs=retention)


async def ensure_usage_topic(settings: GatewaySettings, partitions: int = 3) -> bool:
    """Create the usage topic when missing (3 partitions, 3 replicas or fewer brokers, 30 days);
    True when it was created. Errors (no right to create topics, ...) raise: the caller's."""
    return bool(await create_missing(settings.kafka, lambda r: [usage_topic(settings, partitions, r)]))


async def ensure(
    settings: GatewaySettings,
    *,
    partitions: int = 3,
    replication_factor: int | None = None,
    deadletter_retention_days: float = 30.0,
    usage_retention_days: float = 30.0,
    dry_run: bool = False,
) -> list[dict[str, Any]]:
    """Create what is missing; one report row per topic."""
    async with running(AIOKafkaAdminClient(**client_kwargs(settings.kafka))) as admin:
        existing: dict[str, int] = {}
        for desc in await admin.describe_topics():
            if desc.get("error_code", 0) == 0:
                existing[desc["topic"]] = len(desc.get("partitions") or [])
        rows: list[dict[str, Any]] = []
        create: list[NewTopic] = []
        if replication_factor is None:
            brokers = (await admin.describe_cluster()).get("brokers") or []
            replication_factor = default_replication(len(brokers))
        for t in wanted(
            settings, partitions, replication_factor, deadletter_retention_days, usage_retention_days
        ):
            if t.name in existing:
                rows.append({"topic": t.name, "action": "exists", "partitions": existing[t.name]})
                continue
            create.append(t)
            rows.append(
                {
                    "topic": t.name,
                    "action": "would_create" if dry_run else "created",
                    "partitions": partitions,
                }
            )
        if create and not dry_run:
            await create_topics(admin, create)
        return rows


def run(args: argparse.Namespace, settings: GatewaySettings) -> int:
    """One JSON line per topic and a summary (exit 0), or one error line on stderr (exit 1)."""
    try:
        rows = asyncio.run(
            ensure(
                settings,
                partitions=args.partitions,
                replication_factor=args.replication_factor,
                deadletter_retention_days=args.deadletter_retention_days,
                usage_retention_days=args.usage_retention_days,
                dry_run=args.dry_run,
            )
        )
    except (KafkaError, SecretResolutionError) as exc:  # a refused topic, no broker, TLS files
        sys.stderr.write(orjson.dumps(describe_failure(exc, settings.kafka)).decode() + "\n")
        return 1
    for row in rows:
        sys.stdout.write(orjson.dumps(row).decode() + "\n")
    created = sum(r["action"] in ("created", "would_create") for r in rows)
    sys.stdout.write(orjson.dumps({"summary": {"topics": len(rows), "created": created}}).decode() + "\n")
    return 0
