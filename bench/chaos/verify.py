"""The verifier: outcomes as a downstream consumer sees them, and calls as Claude bills them.

- Outcomes are read from every response and dead-letter topic with
  `isolation_level=read_committed`, from the beginning, throughout the run (so the harness
  knows when every request has one) and once more at the end, after every gateway stopped,
  up to the partitions' last stable offsets.
- Calls come from the simulator's per-request counts (`GET /_sim/calls`): `ok` = answered
  2xx (billed, even when the caller was gone by then), `billed` = `ok` + dropped after the work.

What is counted (only requests whose produce was acknowledged):

- `lost`: no outcome at the end.
- `duplicate_outcomes`: more than one outcome record (responses and dead letters together).
- `called_twice`: more than one `ok` call.
- `called_twice_unexplained`: `called_twice` not accounted for by the `on_unknown: retry`
  policy. Explained means, and only means: the request's partner is configured
  `on_unknown: retry` (and the gateway knows that setting), it was `ok` exactly twice
  (the policy pays at most one extra call), and its response notes the retry
  (`unknown_retry`, see schemas/response.v1.json). The gateways'
  `gateway_unknown_retries_total` is reported beside it (`unknown_retries_metric`), but only
  as a lower bound: a replica killed with -9 takes its counters with it.
- `outcome_unknown`: dead letters with reason `outcome_unknown`.
- `billed_twice`: more than one `billed` call (a dropped connection then a retry counts);
  reported, not judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from bench.chaos.procs import http_text
from bench.chaos.traffic import Request

OUTCOME_UNKNOWN = "outcome_unknown"
UNKNOWN_RETRIES_METRIC = "gateway_unknown_retries_total"


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # "response" or "deadletter"
    reason: str | None
    unknown_retry: bool


@dataclass
class Tally:
    """Every outcome record read, by request id."""

    by_request: dict[str, list[Outcome]] = field(default_factory=dict)
    records: int = 0
    unreadable: int = 0

    def add(self, kind: str, value: bytes | None) -> None:
        self.records += 1
        try:
            doc = orjson.loads(value or b"")
        except orjson.JSONDecodeError:
            self.unreadable += 1
            return
        request_id = doc.get("request_id") if isinstance(doc, dict) else None
        if not isinstance(request_id, str):
            self.unreadable += 1
            return
        outcome = Outcome(kind, doc.get("reason"), bool(doc.get("unknown_retry")))
        self.by_request.setdefault(request_id, []).append(outcome)

    def missing(self, requests: Iterable[Request]) -> int:
        return sum(1 for r in requests if r.request_id not in self.by_request)


class OutcomeReader:
    """Reads the outcome topics (read_committed) in the background into a `Tally`."""

    def __init__(
        self, bootstrap: str, topics: Mapping[str, str], partitions: int, note: Callable[[str], None]
    ) -> None:
        """`topics`: topic -> kind ("response" or "deadletter")."""
        self.kinds = dict(topics)
        self.tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        self.tally = Tally()
        self._note = note
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="chaos-verifier",
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self.tps)
        await self._consumer.seek_to_beginning(*self.tps)
        self._task = asyncio.create_task(self._loop(), name="chaos-verifier")

    async def _read_once(self, timeout_ms: int) -> None:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=5_000)
        for tp, records in batches.items():
            kind = self.kinds[tp.topic]
            for record in records:
                self.tally.add(kind, record.value)

    async def _loop(self) -> None:
        while True:
            try:
                await self._read_once(500)
            except KafkaError as exc:  # e.g. while the broker restarts: the consumer reconnects
                self._note(f"verifier read failed ({type(exc).__name__}); retrying")
                await asyncio.sleep(1.0)

    async def drain(self, timeout_s: float = 60.0) -> bool:
        """Stop the background reads, then read up to the last stable offsets; False on timeout."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        deadline = time.monotonic() + timeout_s
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(self.tps)
        while time.monotonic() < deadline:
            behind = [tp for tp in self.tps if await self._consumer.position(tp) < ends[tp]]
            if not behind:
                return True
            with contextlib.suppress(KafkaError):
                await self._read_once(500)
        return False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._consumer.stop()


def unknown_retries(metrics_urls: Iterable[str]) -> dict[str, float]:
    """`gateway_unknown_retries_total` by partner, summed over the replicas that answer."""
    total: dict[str, float] = {}
    for url in metrics_urls:
        try:
            text = http_text(url, 5.0)
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == UNKNOWN_RETRIES_METRIC:
                    partner = sample.labels.get("partner", "")
                    total[partner] = total.get(partner, 0.0) + float(sample.value)
    return total


def summarise(
    requests: list[Request],
    tally: Tally,
    calls: Mapping[str, Mapping[str, int]],
    retry_partners: set[str],
) -> dict[str, Any]:
    """The verdict figures (see the module docstring) for the acknowledged `requests`."""
    lost = duplicates = called_twice = unexplained = billed_twice = unknown = 0
    responses = dead_letters = response_without_call = 0
    reasons: dict[str, int] = {}
    for req in requests:
        outcomes = tally.by_request.get(req.request_id, [])
        counts = calls.get(req.key, {})
        ok, billed = counts.get("ok", 0), counts.get("billed", 0)
        if not outcomes:
            lost += 1
        elif len(outcomes) > 1:
            duplicates += 1
        for o in outcomes:
            if o.kind == "response":
                responses += 1
            else:
                dead_letters += 1
                reason = o.reason or "?"
                reasons[reason] = reasons.get(reason, 0) + 1
                unknown += reason == OUTCOME_UNKNOWN
        if any(o.kind == "response" for o in outcomes) and ok == 0:
            response_without_call += 1
        if billed > 1:
            billed_twice += 1
        if ok > 1:
            called_twice += 1
            noted = any(o.unknown_retry for o in outcomes)
            if not (req.partner in retry_partners and ok == 2 and noted):
                unexplained += 1
    return {
        "lost": lost,
        "duplicate_outcomes": duplicates,
        "called_twice": called_twice,
        "called_twice_unexplained": unexplained,
        "outcome_unknown": unknown,
        "billed_twice": billed_twice,
        "responses": responses,
        "dead_letters": dead_letters,
        "dead_letter_reasons": dict(sorted(reasons.items())),
        "responses_without_a_billed_call": response_without_call,
    }
