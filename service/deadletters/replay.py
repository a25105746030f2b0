"""`claude-gateway dlq replay` and `dlq show`: look at dead letters, and send them back.

Replay re-produces a dead letter's original bytes, key and headers to its
original request topic, with an operator signature (`x-gateway-replay`, see
`service.contracts.operator_replay`) that the gateway accepts through its
signature and replay checks. A dead letter is skipped when:

- its reason is not selected (default: the retryable reasons and `stale_timestamp`);
- its original is not whole (value, key or headers cut to fit the dead letter), or it
  has no request id;
- a response exists for its request id (the response topic is read from the time
  of the oldest dead letter considered);
- the same request was already replayed after this dead letter was written (the
  request topic is read for `x-gateway-replay` records): never twice;
- a newer dead letter of the same request is also selected (only the newest goes).

It reports one JSON line per dead letter considered and a summary line.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import SecretStr

from service.config.kafka import client_kwargs, running
from service.config.secrets import SecretResolutionError
from service.config.settings import GatewaySettings
from service.contracts import operator_replay as contract
from service.contracts.reasons import RETRYABLE_REASONS, Reason
from service.deadletters.reading import consumer, read

DEFAULT_REASONS = frozenset({*RETRYABLE_REASONS, Reason.STALE_TIMESTAMP})
Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Selection:
    partners: Sequence[str]
    reasons: frozenset[str] = frozenset(r.value for r in DEFAULT_REASONS)
    since_ms: int | None = None
    until_ms: int | None = None
    request_ids: frozenset[str] = frozenset()


@dataclass(slots=True)
class Letter:
    partner: str
    ref: str
    """`topic/partition/offset` of the dead letter."""
    timestamp_ms: int
    doc: dict[str, Any]

    @property
    def request_id(self) -> str | None:
        rid = self.doc.get("request_id")
        return rid if isinstance(rid, str) else None

    @property
    def reason(self) -> str:
        return str(self.doc.get("reason"))

    def not_whole(self) -> str | None:
        o = self.doc.get("original") or {}
        if o.get("value_b64") is None:
            return "the original has no value"
        if o.get("truncated"):
            return "the original value was cut to fit the dead letter"
        if o.get("key_truncated"):
            return "the original key was cut to fit the dead letter"
        if o.get("headers_truncated") or any(
            h.get("truncated") or "key_b64" in h for h in o.get("headers", [])
        ):
            return "the original headers were cut to fit the dead letter"
        return None


@dataclass(slots=True)
class Report:
    considered: int = 0
    replayed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def _letter(partner: str, rec: ConsumerRecord[Any, Any]) -> Letter | None:
    try:
        doc = orjson.loads(rec.value)
    except (orjson.JSONDecodeError, TypeError):
        return None
    if not isinstance(doc, dict):
        return None
    return Letter(partner, f"{rec.topic}/{rec.partition}/{rec.offset}", rec.timestamp, doc)


async def dead_letters(settings: GatewaySettings, sel: Selection) -> list[Letter]:
    """The dead letters of the selected partners within the time range."""
    async with running(consumer(settings.kafka)) as c:
        out: list[Letter] = []
        for pid in sel.partners:
            async for rec in read(c, [settings.deadletter_topic(pid)], sel.since_ms):
                if sel.until_ms is not None and rec.timestamp > sel.until_ms:
                    continue
                letter = _letter(pid, rec)
                if letter is not None:
                    out.append(letter)
        return out


def summarize(letters: Iterable[Letter]) -> dict[str, Any]:
    """`dlq show`: counts by partner and reason, what could be replayed, the time range."""
    by: dict[str, Counter[str]] = {}
    whole, stamps = 0, []
    for letter in letters:
        by.setdefault(letter.partner, Counter())[letter.reason] += 1
        whole += letter.not_whole() is None and letter.request_id is not None
        stamps.append(letter.timestamp_ms)
    total = sum(sum(c.values()) for c in by.values())
    return {
        "dead_letters": total,
        "replayable_originals": whole,
        "first": _iso(min(stamps)) if stamps else None,
        "last": _iso(max(stamps)) if stamps else None,
        "by_partner": {pid: dict(c.most_common()) for pid, c in sorted(by.items())},
        "retryable_reasons": sorted(r.value for r in RETRYABLE_REASONS),
    }


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


async def _history(
    settings: GatewaySettings, letters: list[Letter], keys: Mapping[str, str] | None = None
) -> tuple[set[tuple[str, str]], dict[tuple[str, str], int], set[str]]:
    """(partner, request id) pairs that have a response, the last time each was replayed, and
    the dead letters (`topic/partition/offset`) replayed already. Only a replay mark that
    `keys` (operator key id -> secret) verify counts: a partner can write its own request
    topic, with any header and any record timestamp."""
    answered: set[tuple[str, str]] = set()
    replayed: dict[tuple[str, str], int] = {}
    refs: set[str] = set()
    if not letters:
        return answered, replayed, refs
    since = min(min(_original_ms(x), x.timestamp_ms) for x in letters)
    async with running(consumer(settings.kafka)) as c:
        for pid in sorted({x.partner for x in letters}):
            async for rec in read(c, [settings.response_topic(pid)], since - 60_000):
                if rec.key is not None:
                    answered.add((pid, rec.key.decode("utf-8", "replace")))
        topics = sorted({str(x.doc["original"]["topic"]) for x in letters})
        registry = {settings.request_topic(p): p.id for p in settings.partners}
        async for rec in read(c, topics, since):
            marks = [v for k, v in rec.headers if k == contract.HEADER]
            if len(marks) != 1:
                continue
            rid = _request_id(rec.value)
            owner = registry.get(rec.topic)
            mark = contract.parse(marks[0] or b"")
            if rid is None or owner is None or mark is None:
                continue
            if keys is not None:
                secret = keys.get(mark.key_id)
                if secret is None or not contract.valid(mark, secret, rec.topic, rid, rec.value or b""):
                    continue  # not the operators' mark: a partner's record, refused by the gateway
            refs.add(mark.deadletter)
            replayed[(owner, rid)] = max(replayed.get((owner, rid), 0), rec.timestamp)
        return answered, replayed, refs


def _original_ms(letter: Letter) -> int:
    ts = (letter.doc.get("original") or {}).get("timestamp_ms")
    return int(ts) if isinstance(ts, int) else letter.timestamp_ms


def _request_id(value: bytes | None) -> str | None:
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    rid = doc.get("request_id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) else None


def plan(
    letters: list[Letter],
    sel: Selection,
    answered: set[tuple[str, str]],
    replayed: dict[tuple[str, str], int],
    emit: Emit,
    report: Report,
    replayed_refs: frozenset[str] | set[str] = frozenset(),
) -> list[Letter]:
    """The dead letters to replay; every other one reported with why it is skipped."""
    newest: dict[tuple[str, str], Letter] = {}
    chosen: list[Letter] = []
    for letter in sorted(letters, key=lambda x: x.timestamp_ms):
        rid = letter.request_id
        why: str | None = None
        if letter.reason not in sel.reasons:
            why = "reason_not_selected"
        elif sel.request_ids and rid not in sel.request_ids:
            why = "request_id_not_selected"
        elif rid is None:
            why = "no_request_id"
        elif letter.not_whole() is not None:
            why = "original_not_whole"
        elif (letter.partner, rid) in answered:
            why = "has_response"
        elif letter.ref in replayed_refs or replayed.get((letter.partner, rid), -1) >= letter.timestamp_ms:
            why = "already_replayed"  # by its dead letter: the clocks of the tool and the gateway differ
        if why in ("reason_not_selected", "request_id_not_selected"):
            continue  # not part of the selection: not reported
        report.considered += 1
        if why is not None:
            report.skipped[why] += 1
            emit({"action": "skipped", "why": why, **_ids(letter)})
            continue
        assert rid is not None
        previous = newest.get((letter.partner, rid))
        if previous is not None:
            chosen.remove(previous)
            report.skipped["newer_dead_letter"] += 1
            emit({"action": "skipped", "why": "newer_dead_letter", **_ids(previous)})
        newest[(letter.partner, rid)] = letter
        chosen.append(letter)
    return chosen


def _ids(letter: Letter) -> dict[str, Any]:
    return {
        "partner": letter.partner,
        "request_id": letter.request_id,
        "reason": letter.reason,
        "deadletter": letter.ref,
    }


async def replay(
    settings: GatewaySettings,
    sel: Selection,
    *,
    key_id: str,
    secret: SecretStr,
    dry_run: bool,
    emit: Emit,
) -> Report:
    report = Report()
    letters = await dead_letters(settings, sel)
    keys = {key_id: secret.get_secret_value()}
    for kid, ref in (settings.operator_replay.keys if settings.operator_replay else {}).items():
        with contextlib.suppress(SecretResolutionError, ValueError):
            keys.setdefault(kid, ref.resolve().get_secret_value())
    answered, replayed, refs = await _history(settings, letters, keys)
    chosen = plan(letters, sel, answered, replayed, emit, report, refs)
    if dry_run:
        for letter in chosen:
            emit({"action": "would_replay", **_ids(letter)})
        return report
    producer = AIOKafkaProducer(
        **client_kwargs(settings.kafka), acks="all", enable_idempotence=True, linger_ms=5
    )
    async with running(producer):
        for letter in chosen:
            o = letter.doc["original"]
            value = base64.b64decode(o["value_b64"])
            key = None if o.get("key_b64") is None else base64.b64decode(o["key_b64"])
            headers = [
                (h["key"], None if h.get("value_b64") is None else base64.b64decode(h["value_b64"]))
                for h in o.get("headers", [])
                if h["key"] != contract.HEADER
            ]
            assert letter.request_id is not None
            mark = contract.sign(
                secret.get_secret_value(),
                key_id,
                o["topic"],
                letter.request_id,
                letter.ref,
                value,
                int(time.time() * 1000),
            )
            headers.append((contract.HEADER, mark.encode()))
            meta = await producer.send_and_wait(o["topic"], value, key=key, headers=headers)
            report.replayed += 1
            emit({"action": "replayed", **_ids(letter), "to": f"{meta.topic}/{meta.partition}/{meta.offset}"})
    return report
