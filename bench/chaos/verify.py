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
  (the policy pays at most one extra call), and its outcome notes the retry: a response
  with `unknown_retry` (see schemas/response.v1.json), or the `outcome_unknown` dead letter
  of a request whose extra call's owner was lost too (its `claim.attempts` is 2: "its one
  extra call was used"). The gateways'
  `gateway_unknown_retries_total` is reported beside it (`unknown_retries_metric`), but only
  as a lower bound: a replica killed with -9 takes its counters with it.
- `outcome_unknown`: dead letters with reason `outcome_unknown`.
- `outcome_unknown_unexplained`: those of them no fault accounts for. Explained means: the
  simulator dropped one of the request's connections after the work (`billed` above `ok`:
  the gateway could not know the answer), or the claim the dead letter reports was made by
  a process that did not stop gracefully (killed with -9, exited by itself or at a
  failpoint, aborted on a stuck stop, or stopped saying it left claimed calls without a
  published answer, exit 75: `ungraceful_pids`). A graceful rebalance never leaves
  one (found by CI: a takeover fenced a replica whose commit with claims was in flight).
- `billed_twice`: more than one `billed` call (a dropped connection then a retry counts);
  reported, not judged.
- `trace_context_lost`: requests that carried a valid W3C `traceparent` (as the gateway
  judges one: `service.telemetry.tracecontext.trace_context`) with an outcome (response or
  dead letter) whose headers carry no valid `traceparent` of the same trace id. The gateway
  copies the request's (tracing off) or sends its own span's, a child in the same trace
  (tracing on), so only trace ids are compared. A request without one is not judged
  (`traced_requests`: those judged, with an outcome); `trace_context_lost_by_outcome` says
  which outcomes lost it (`response/<path>` or `deadletter/<reason>`).

Message Batch entries are counted by the simulator under their `custom_id`
(`batch_calls_by_custom_id`); the gateway's is `service.batches.routing.custom_id(partner,
request_id)`. A request's calls are its real-time calls plus its batch entries: `ok` and
`billed` above are those sums (a batch entry is `ok` and `billed` when it succeeded). For
the requests sent to the batch path (`batch_*` figures, a subset of the ones above):

- `batch_lost`, `batch_duplicated`: as `lost` and `duplicate_outcomes`.
- `batch_billed_twice`: billed more than once in all: in two batches
  (`batch_in_two_batches`), in a batch and in real time (`batch_and_realtime`), or twice in
  real time after the batch path sent it there.
- `batch_billed_twice_unexplained`: `batch_billed_twice` except, and only, the real-time
  rule above applied to `billed`: never billed in a batch, partner `on_unknown: retry`,
  billed exactly twice in real time, and the response notes the retry. The batch path has
  no `outcome_unknown`: any other double billing is unexplained.
- `batch_served` / `batch_served_in_realtime`: responses marked `served_by.path: batch` /
  answered in real time (expired or errored in their batch).
- `realtime_in_a_batch`: requests that did not ask for the batch path yet have a batch
  entry (routing must never do that).

`failures` (only when there are any) shows up to `EXAMPLES` requests of each failing count
with their outcomes and calls, to start the investigation from; `open_transactions` the
outcome partitions whose last stable offset stays below their end once every gateway
stopped (what lies past it is invisible to read_committed readers: "lost" until aborted).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from bench.chaos.procs import http_text
from bench.chaos.traffic import Request
from service.batches.routing import custom_id
from service.telemetry.tracecontext import named_values, trace_context, valid_traceparent

OUTCOME_UNKNOWN = "outcome_unknown"
EXAMPLES = 5
UNKNOWN_RETRIES_METRIC = "gateway_unknown_retries_total"


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # "response" or "deadletter"
    reason: str | None
    unknown_retry: bool
    """The outcome notes an `on_unknown: retry` extra call (see the module docstring)."""
    path: str = "realtime"
    """A response's `served_by.path` (`batch` from a Message Batch; absent: real time)."""
    claim_pid: int | None = None
    """The process that made the claim a dead letter reports (`claim.owner`: host-pid-random)."""
    trace_id: str | None = None
    """The trace id of the outcome's `traceparent` header (the first), when in W3C form."""


@dataclass
class Tally:
    """Every outcome record read, by request id."""

    by_request: dict[str, list[Outcome]] = field(default_factory=dict)
    records: int = 0
    unreadable: int = 0

    def add(self, kind: str, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] = ()) -> None:
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
        served_by = doc.get("served_by")
        path = served_by.get("path") if isinstance(served_by, dict) else None
        claim = doc.get("claim")
        extra_call_used = (
            doc.get("reason") == OUTCOME_UNKNOWN and isinstance(claim, dict) and claim.get("attempts") == 2
        )
        retried = bool(doc.get("unknown_retry")) or extra_call_used
        outcome = Outcome(
            kind, doc.get("reason"), retried, str(path or "realtime"), _pid(claim), trace_id_of(headers)
        )
        self.by_request.setdefault(request_id, []).append(outcome)

    def missing(self, requests: Iterable[Request]) -> int:
        return sum(1 for r in requests if r.request_id not in self.by_request)


def trace_id_of(headers: Sequence[tuple[str, bytes | None]]) -> str | None:
    """The trace id of the first `traceparent` header, if it is in W3C form."""
    value = next(named_values(headers, "traceparent"), None)
    return value[3:35].decode() if value is not None and valid_traceparent(value) else None


def expected_trace_id(req: Request) -> str | None:
    """The trace id the outcomes of `req` must carry: its `traceparent`'s, when the gateway
    takes it for a valid one (None: nothing to judge)."""
    return trace_id_of(trace_context(req.headers))


def _pid(claim: object) -> int | None:
    owner = claim.get("owner") if isinstance(claim, dict) else None
    parts = owner.rsplit("-", 2) if isinstance(owner, str) else []
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


class OutcomeReader:
    """Reads the outcome topics (read_committed) in the background into a `Tally`."""

    def __init__(
        self, bootstrap: str, topics: Mapping[str, str], partitions: int, note: Callable[[str], None]
    ) -> None:
        """`topics`: topic -> kind ("response" or "deadletter")."""
        self.kinds = dict(topics)
        self.bootstrap = bootstrap
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
                self.tally.add(kind, record.value, record.headers)

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

    async def open_transactions(self) -> dict[str, int]:
        """Outcome partitions whose last stable offset is below their end, with how many
        records lie past it: a transaction still open (none should be once every gateway
        stopped) hides them from read_committed readers until it is aborted."""
        stable: dict[TopicPartition, int] = await self._consumer.end_offsets(self.tps)
        probe = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, isolation_level="read_uncommitted", client_id="chaos-verifier"
        )
        await probe.start()
        try:
            ends: dict[TopicPartition, int] = await probe.end_offsets(self.tps)
        finally:
            await probe.stop()
        return {
            f"{tp.topic}[{tp.partition}]": ends[tp] - stable[tp] for tp in self.tps if ends[tp] > stable[tp]
        }

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


BATCH_GAUGES = ("gateway_batches", "gateway_batch_requests")


def batch_load(metrics_url: str) -> float:
    """Open batches plus requests forming one on a replica (0 but on the batch worker), or
    -1 when it does not answer."""
    try:
        text = http_text(metrics_url, 2.0)
    except OSError:
        return -1.0
    return sum(
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in BATCH_GAUGES
    )


#: Log events of the batch path counted in the replicas' logs (each kept across restarts):
#: figure name -> (event, required field value or None).
BATCH_LOG_EVENTS: dict[str, tuple[str, tuple[str, str] | None]] = {
    "worker_starts_with_open_batches": ("batch worker started", None),
    "intents_recovered_found": ("batch intent without an id recovered", ("outcome", "found")),
    "intents_recovered_created_anew": ("batch intent without an id recovered", ("outcome", "created_anew")),
    "results_for_no_member": ("a batch result for no member; ignored", None),
    "members_gone_from_pending": ("a batch member is gone from the pending topic", None),
    "batch_steps_failed": ("batch step failed; trying again", None),
    "forming_failed": ("forming a batch failed; the worker restarts from its committed state", None),
}


def batch_log_events(logs: Iterable[Path]) -> dict[str, int]:
    """How often each of `BATCH_LOG_EVENTS` was logged (JSON lines with `event`); a worker
    start counts only when it found open batches to resume."""
    wanted = {event for event, _ in BATCH_LOG_EVENTS.values()}
    counts = dict.fromkeys(BATCH_LOG_EVENTS, 0)
    for path in logs:
        with contextlib.suppress(OSError), path.open("rb") as f:
            for line in f:
                if b"batch" not in line or not line.startswith(b"{"):
                    continue
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                event = doc.get("event") if isinstance(doc, dict) else None
                if event not in wanted:
                    continue
                for name, (ev, field_value) in BATCH_LOG_EVENTS.items():
                    if ev != event:
                        continue
                    if field_value is not None and doc.get(field_value[0]) != field_value[1]:
                        continue
                    if name == "worker_starts_with_open_batches" and not doc.get("open_batches"):
                        continue
                    counts[name] += 1
    return counts


def summarise(
    requests: list[Request],
    tally: Tally,
    calls: Mapping[str, Mapping[str, int]],
    retry_partners: set[str],
    batch_calls: Mapping[str, Mapping[str, int]] | None = None,
    ungraceful_pids: Iterable[int] = (),
) -> dict[str, Any]:
    """The verdict figures (see the module docstring) for the acknowledged `requests`;
    `calls` by `partner:request_id`, `batch_calls` by custom_id; `ungraceful_pids`: the
    gateway processes that did not stop gracefully."""
    batch_calls = batch_calls or {}
    ungraceful = set(ungraceful_pids)
    lost = duplicates = called_twice = unexplained = billed_twice = unknown = unknown_unexplained = 0
    responses = dead_letters = response_without_call = traced = trace_lost = 0
    reasons: dict[str, int] = {}
    trace_lost_by: dict[str, int] = {}
    b: dict[str, int] = dict.fromkeys(BATCH_FIGURES, 0)
    failures: dict[str, list[dict[str, Any]]] = {}

    def failed(kind: str, req: Request, outcomes: list[Outcome], rt: Any, entries: Any, **more: Any) -> None:
        examples = failures.setdefault(kind, [])
        if len(examples) < EXAMPLES:
            seen = [o.reason or o.path if o.kind == "deadletter" else o.path for o in outcomes]
            noted = [o.unknown_retry for o in outcomes]
            examples.append(
                {"request_id": req.request_id, "urgency": req.urgency, "outcomes": seen,
                 "unknown_retry": noted, "realtime_calls": dict(rt), "batch_entries": dict(entries),
                 **more}
            )  # fmt: skip

    for req in requests:
        outcomes = tally.by_request.get(req.request_id, [])
        rt = calls.get(req.key, {})
        entries = batch_calls.get(custom_id(req.partner, req.request_id), {})
        rt_billed, in_batches = rt.get("billed", 0), entries.get("billed", 0)
        ok = rt.get("ok", 0) + entries.get("ok", 0)
        billed = rt_billed + in_batches
        noted = any(o.unknown_retry for o in outcomes)
        if not outcomes:
            lost += 1
            failed("lost", req, outcomes, rt, entries)
        elif len(outcomes) > 1:
            duplicates += 1
            failed("duplicate_outcomes", req, outcomes, rt, entries)
        for o in outcomes:
            if o.kind == "response":
                responses += 1
            else:
                dead_letters += 1
                reason = o.reason or "?"
                reasons[reason] = reasons.get(reason, 0) + 1
                if reason == OUTCOME_UNKNOWN:
                    unknown += 1
                    dropped = rt_billed > rt.get("ok", 0)
                    if not dropped and o.claim_pid not in ungraceful:
                        unknown_unexplained += 1
                        failed("outcome_unknown_unexplained", req, outcomes, rt, entries)
        if any(o.kind == "response" for o in outcomes) and ok == 0:
            response_without_call += 1
        trace_id = expected_trace_id(req) if outcomes else None
        if trace_id is not None:
            traced += 1
            wrong = [o for o in outcomes if o.trace_id != trace_id]
            if wrong:
                trace_lost += 1
                for o in wrong:
                    which = f"response/{o.path}" if o.kind == "response" else f"deadletter/{o.reason}"
                    trace_lost_by[which] = trace_lost_by.get(which, 0) + 1
                failed(
                    "trace_context_lost", req, outcomes, rt, entries, content=req.content,
                    trace_id=trace_id, outcome_trace_ids=[o.trace_id for o in outcomes],
                )  # fmt: skip
        if billed > 1:
            billed_twice += 1
        if ok > 1:
            called_twice += 1
            if not (req.partner in retry_partners and ok == 2 and noted and in_batches == 0):
                unexplained += 1
                failed("called_twice_unexplained", req, outcomes, rt, entries)
        if not req.batch:
            if entries.get("all", 0) > 0:
                b["realtime_in_a_batch"] += 1
                failed("realtime_in_a_batch", req, outcomes, rt, entries)
            continue
        b["batch_requests"] += 1
        b["batch_lost"] += not outcomes
        b["batch_duplicated"] += len(outcomes) > 1
        b["batch_served"] += sum(o.kind == "response" and o.path == "batch" for o in outcomes)
        b["batch_served_in_realtime"] += sum(o.kind == "response" and o.path != "batch" for o in outcomes)
        b["batch_dead_letters"] += sum(o.kind == "deadletter" for o in outcomes)
        b["batch_in_two_batches"] += in_batches > 1
        b["batch_and_realtime"] += in_batches > 0 and rt_billed > 0
        if billed > 1:
            b["batch_billed_twice"] += 1
            retried = req.partner in retry_partners and in_batches == 0 and rt_billed == 2 and noted
            if not retried:
                b["batch_billed_twice_unexplained"] += 1
                failed("batch_billed_twice_unexplained", req, outcomes, rt, entries)
    return {
        "lost": lost,
        "duplicate_outcomes": duplicates,
        "called_twice": called_twice,
        "called_twice_unexplained": unexplained,
        "outcome_unknown": unknown,
        "outcome_unknown_unexplained": unknown_unexplained,
        "billed_twice": billed_twice,
        "responses": responses,
        "dead_letters": dead_letters,
        "dead_letter_reasons": dict(sorted(reasons.items())),
        "responses_without_a_billed_call": response_without_call,
        "traced_requests": traced,
        "trace_context_lost": trace_lost,
        "trace_context_lost_by_outcome": dict(sorted(trace_lost_by.items())),
        **b,
        "failures": failures,
    }


BATCH_HEADLINE = (
    "batch_requests",
    "batch_lost",
    "batch_duplicated",
    "batch_billed_twice",
    "batch_billed_twice_unexplained",
)
BATCH_DETAILS = (
    "batch_in_two_batches",
    "batch_and_realtime",
    "batch_served",
    "batch_served_in_realtime",
    "batch_dead_letters",
    "realtime_in_a_batch",
)
BATCH_FIGURES = BATCH_HEADLINE + BATCH_DETAILS
"""The batch path's figures `summarise` adds (see the module docstring): the headline ones
first in a run's result line, the details after."""
