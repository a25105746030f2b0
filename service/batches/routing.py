"""Which path a request takes: real time, or a Message Batch when its deadline leaves room.

A request names its class (`service_class`: `realtime`, `batch`, `auto`; default the
partner's) and may carry a deadline (`respond_by`, RFC 3339 with a zone). With
`batches.enabled`:

- `realtime` is served now; `batch` goes to a batch whatever its deadline (the partner
  asked for it);
- `auto` goes to a batch when `respond_by - now >= expected turnaround x
  turnaround_factor + margin_s`, else real time; without a deadline it goes to a batch.

The expected turnaround is the 95th percentile of the batches this replica saw end
(the last 50) once 20 have, before that `batches.expected_turnaround_s` (or the median
seen, if larger, once five have).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from service.config.batching import BatchSettings

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})", re.IGNORECASE)
"""RFC 3339's `date-time` (section 5.6; `T` and `Z` in either case, or a space for `T`): ISO 8601's
other forms (week dates, no seconds, basic format), which `datetime.fromisoformat` also reads,
are refused."""

Route = Literal["realtime", "batch"]
CLASSES = ("realtime", "batch", "auto")
CUSTOM_ID_MAX = 64
P95_MIN = 20
"""Observed turnarounds needed before their p95 is trusted over the configured prior."""


@dataclass(frozen=True, slots=True)
class Urgency:
    service_class: str
    respond_by: float | None
    """Epoch seconds."""


REALTIME = Urgency("realtime", None)


class UrgencyError(ValueError):
    """`respond_by` or `service_class` is malformed (a sentence a partner can act on)."""


def parse_urgency(doc: Mapping[str, Any], default_class: str) -> Urgency:
    cls = doc.get("service_class", default_class)
    if cls not in CLASSES:
        raise UrgencyError(f"service_class must be one of {', '.join(CLASSES)}, not {str(cls)[:40]!r}")
    raw = doc.get("respond_by")
    if raw is None:
        return Urgency(cls, None)
    if not isinstance(raw, str) or len(raw) > 64:
        raise UrgencyError("respond_by must be an RFC 3339 time with a zone, e.g. 2026-12-01T18:00:00Z")
    if _RFC3339.fullmatch(raw) is None:
        if _RFC3339.fullmatch(raw + "Z") is not None:
            raise UrgencyError(f"respond_by {raw!r} has no zone (add Z or an offset)")
        raise UrgencyError(f"respond_by {raw!r} is not an RFC 3339 time, e.g. 2026-12-01T18:00:00Z")
    try:
        when = datetime.fromisoformat(raw.upper())
    except ValueError:  # a month 13, a second 60
        raise UrgencyError(f"respond_by {raw!r} is not an RFC 3339 time") from None
    return Urgency(cls, when.timestamp())


class Turnaround:
    """Observed batch turnarounds (created to ended), and what to expect from the next."""

    def __init__(self, settings: BatchSettings, keep: int = 50) -> None:
        self.settings = settings
        self.keep = keep
        self._seen: deque[float] = deque(maxlen=keep)
        self._unshared: list[float] = []
        """Observed here, not yet pushed to the other replicas (`shared_turnaround.py`)."""

    def observe(self, seconds: float) -> None:
        if math.isfinite(seconds) and seconds >= 0:
            self._seen.append(seconds)
            self._unshared = [*self._unshared, seconds][-self.keep :]

    def take_unshared(self) -> list[float]:
        taken, self._unshared = self._unshared, []
        return taken

    def unshare(self, seconds: list[float]) -> None:
        """`take_unshared`'s observations could not be pushed: again at the next sync."""
        self._unshared = [*seconds, *self._unshared][-self.keep :]

    def replace(self, seen: list[float]) -> None:
        """Every replica's observations (oldest first), as shared: the view from now on."""
        self._seen = deque(seen[-self.keep :], maxlen=self.keep)

    @property
    def expected_s(self) -> float:
        return self.expected(self.settings)

    def expected(self, settings: BatchSettings) -> float:
        """The p95 of the batches seen, once there are `P95_MIN` of them; before, the prior
        (`settings`: the current ones, a reload changes it) or the median seen if larger. (The
        nearest-rank p95 of fewer than 20 is their maximum: one batch that took 24 h made every
        `auto` request real time, and then no batch was formed that could lower it again.)"""
        ordered = sorted(self._seen)
        if len(ordered) < P95_MIN:
            if len(ordered) < 5:
                return settings.expected_turnaround_s
            return max(settings.expected_turnaround_s, ordered[len(ordered) // 2])
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class Router:
    def __init__(self, turnaround: Turnaround) -> None:
        self.turnaround = turnaround

    def route(self, settings: BatchSettings, urgency: Urgency, now: float) -> Route:
        if not settings.enabled or urgency.service_class == "realtime":
            return "realtime"
        if urgency.service_class == "batch" or urgency.respond_by is None:
            return "batch"
        needed = self.turnaround.expected(settings) * settings.turnaround_factor + settings.margin_s
        return "batch" if urgency.respond_by - now >= needed else "realtime"

    def can_go_realtime(self, settings: BatchSettings, respond_by: float | None, now: float) -> bool:
        """An expired or errored batch request still has time for a real-time call."""
        return respond_by is None or respond_by - now >= settings.realtime_reserve_s

    def can_batch_again(self, settings: BatchSettings, respond_by: float | None, now: float) -> bool:
        needed = self.turnaround.expected(settings) * settings.turnaround_factor + settings.margin_s
        return respond_by is None or respond_by - now >= needed


def custom_id(partner: str, request_id: str) -> str:
    """The batch entry's `custom_id`, stable per partner and request id, within Anthropic's
    `[A-Za-z0-9_-]{1,64}`: up to 20 characters of the partner id, a dash, and 43 hex digits
    of SHA-256(partner, request id)."""
    digest = hashlib.sha256(f"{partner}\0{request_id}".encode()).hexdigest()
    head = partner[:20]
    return f"{head}-{digest[: CUSTOM_ID_MAX - len(head) - 1]}"
