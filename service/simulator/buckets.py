"""Token buckets for the simulated organisation: RPM, ITPM and OTPM.

Pure code with an injectable clock (seconds, monotonic), so it is unit-tested
without sleeping. A bucket's capacity is its per-minute limit and it refills
continuously at limit/60 per second, as Anthropic documents.

Admission takes one request, the input tokens (ITPM counts input plus cache
creation, not cache reads) and `max_tokens` as the output estimate, from all
three buckets at once or from none. `settle_output` then gives back the
unused part of the estimate once the real output is known.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from service.simulator.config import LimitSettings

Clock = Callable[[], float]

#: Limit and remaining reported in headers for an unlimited bucket: large enough
#: that a client syncing its own buckets from the headers never waits.
UNLIMITED_HEADER_VALUE = 1_000_000_000

# Float slack so that waiting exactly the advertised time always suffices.
_EPSILON = 1e-6


class TokenBucket:
    """One continuously refilling bucket. `limit_per_minute` None or 0 = unlimited."""

    __slots__ = ("_clock", "_level", "_rate_per_s", "_stamp", "capacity")

    def __init__(self, limit_per_minute: int | None, clock: Clock) -> None:
        self.capacity: float = float(limit_per_minute or 0)
        self._rate_per_s = self.capacity / 60.0
        self._clock = clock
        self._level = self.capacity
        self._stamp = clock()

    @property
    def unlimited(self) -> bool:
        """True when this bucket never refuses anything."""
        return self.capacity <= 0

    def level(self) -> float:
        """Tokens available now (may be negative after an over-use correction)."""
        if self.unlimited:
            return math.inf
        now = self._clock()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._level = min(self.capacity, self._level + elapsed * self._rate_per_s)
        self._stamp = now
        return self._level

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` is available: 0 if it is now, inf if it never will be."""
        if self.unlimited:
            return 0.0
        missing = amount - self.level()
        if missing <= _EPSILON:
            return 0.0
        if amount > self.capacity:
            return math.inf
        return missing / self._rate_per_s

    def take(self, amount: float) -> None:
        """Remove `amount` unconditionally (call `wait_s` first to check)."""
        if not self.unlimited:
            self._level = self.level() - amount

    def give_back(self, amount: float) -> None:
        """Return `amount` (e.g. an unused output estimate), never above capacity."""
        if not self.unlimited:
            self._level = min(self.capacity, self.level() + amount)

    def full_in_s(self) -> float:
        """Seconds until the bucket is full again."""
        if self.unlimited:
            return 0.0
        return max(0.0, (self.capacity - self.level()) / self._rate_per_s)

    def reset(self, *, empty: bool = False) -> None:
        """Fill the bucket up (or empty it)."""
        self._level = 0.0 if empty else self.capacity
        self._stamp = self._clock()


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call was not admitted: which buckets lacked capacity, and for how long."""

    buckets: tuple[str, ...]
    wait_s: float

    @property
    def retry_after_s(self) -> int:
        """The `retry-after` header: whole seconds, rounded up, at least 1 (60 if never)."""
        if math.isinf(self.wait_s):
            return 60
        return max(1, math.ceil(self.wait_s))

    @property
    def never(self) -> bool:
        """True when the call asks for more than a bucket's whole capacity."""
        return math.isinf(self.wait_s)


class BucketSet:
    """The RPM, ITPM and OTPM buckets of one model class."""

    __slots__ = ("input_tokens", "name", "output_tokens", "requests")

    def __init__(self, name: str, limits: LimitSettings, clock: Clock) -> None:
        self.name = name
        self.requests = TokenBucket(limits.rpm, clock)
        self.input_tokens = TokenBucket(limits.itpm, clock)
        self.output_tokens = TokenBucket(limits.otpm, clock)

    def try_admit(self, input_tokens: int, output_estimate: int) -> Refusal | None:
        """Take 1 request, the input tokens and the output estimate, or nothing and say why."""
        need = (
            ("requests", self.requests, 1),
            ("input_tokens", self.input_tokens, input_tokens),
            ("output_tokens", self.output_tokens, output_estimate),
        )
        short: list[str] = []
        wait = 0.0
        for name, bucket, amount in need:
            w = bucket.wait_s(amount)
            if w > 0:
                short.append(name)
                wait = max(wait, w)
        if short:
            return Refusal(tuple(short), wait)
        for _, bucket, amount in need:
            bucket.take(amount)
        return None

    def try_request(self) -> Refusal | None:
        """Take 1 request and no tokens (a call that generates nothing, e.g. a batch create)."""
        wait = self.requests.wait_s(1)
        if wait > 0:
            return Refusal(("requests",), wait)
        self.requests.take(1)
        return None

    def settle_output(self, estimate: int, actual: int) -> None:
        """Correct the OTPM reservation from the estimate to the real output."""
        if actual < estimate:
            self.output_tokens.give_back(estimate - actual)
        elif actual > estimate:
            self.output_tokens.take(actual - estimate)

    def give_back(self, input_tokens: int, output_estimate: int) -> None:
        """Undo a `try_admit` (another set refused the call)."""
        self.requests.give_back(1)
        self.input_tokens.give_back(input_tokens)
        self.output_tokens.give_back(output_estimate)

    def reset(self, *, empty: bool = False) -> None:
        """Fill (or empty) all three buckets."""
        self.requests.reset(empty=empty)
        self.input_tokens.reset(empty=empty)
        self.output_tokens.reset(empty=empty)

    def snapshot(self) -> dict[str, dict[str, int | float | None]]:
        """Current levels for the stats endpoint (limit None = unlimited)."""
        out: dict[str, dict[str, int | float | None]] = {}
        for name, bucket in (
            ("requests", self.requests),
            ("input_tokens", self.input_tokens),
            ("output_tokens", self.output_tokens),
        ):
            if bucket.unlimited:
                out[name] = {"limit": None, "level": None, "full_in_s": 0.0}
            else:
                out[name] = {
                    "limit": int(bucket.capacity),
                    "level": round(bucket.level(), 3),
                    "full_in_s": round(bucket.full_in_s(), 3),
                }
        return out


class KeyedBuckets(BucketSet):
    """A workspace's buckets and the org pool's, drawn on together, all or nothing. Its
    `requests`, `input_tokens` and `output_tokens` are the org pool's; the headers show,
    per dimension, whichever has less left (ANTHROPIC.md: the most restrictive in effect)."""

    __slots__ = ("org", "workspace")

    def __init__(self, workspace: BucketSet, org: BucketSet) -> None:  # no super(): shares org's
        self.workspace, self.org = workspace, org
        self.name = org.name
        self.requests, self.input_tokens, self.output_tokens = (
            org.requests,
            org.input_tokens,
            org.output_tokens,
        )

    def tightest(self) -> tuple[TokenBucket, TokenBucket, TokenBucket]:
        pairs = zip(
            (self.workspace.requests, self.workspace.input_tokens, self.workspace.output_tokens),
            (self.org.requests, self.org.input_tokens, self.org.output_tokens),
            strict=True,
        )
        out = [w if not w.unlimited and (o.unlimited or w.level() < o.level()) else o for w, o in pairs]
        return out[0], out[1], out[2]

    def try_admit(self, input_tokens: int, output_estimate: int) -> Refusal | None:
        refusal = self.workspace.try_admit(input_tokens, output_estimate)
        if refusal is not None:
            return Refusal(tuple(f"workspace {b}" for b in refusal.buckets), refusal.wait_s)
        refusal = self.org.try_admit(input_tokens, output_estimate)
        if refusal is not None:
            self.workspace.give_back(input_tokens, output_estimate)
        return refusal

    def try_request(self) -> Refusal | None:
        refusal = self.workspace.try_request()
        if refusal is not None:
            return Refusal(tuple(f"workspace {b}" for b in refusal.buckets), refusal.wait_s)
        refusal = self.org.try_request()
        if refusal is not None:
            self.workspace.requests.give_back(1)
        return refusal

    def settle_output(self, estimate: int, actual: int) -> None:
        self.workspace.settle_output(estimate, actual)
        self.org.settle_output(estimate, actual)


class RateLimiter:
    """The organisation's buckets: a default set plus one per `model_limits` entry.

    A model uses the first `model_limits` key that is a substring of its id
    (e.g. "opus"), otherwise the default set.
    """

    DEFAULT = "default"

    def __init__(
        self,
        limits: LimitSettings,
        model_limits: Mapping[str, LimitSettings] | None = None,
        count_tokens_rpm: int | None = None,
        clock: Clock = time.monotonic,
        workspaces: Mapping[str, tuple[Sequence[str], LimitSettings]] | None = None,
    ) -> None:
        self._clock = clock
        self.default = BucketSet(self.DEFAULT, limits, clock)
        self._classes = {key: BucketSet(key, lim, clock) for key, lim in (model_limits or {}).items()}
        self.count_tokens = TokenBucket(count_tokens_rpm, clock)
        self._by_model: dict[str, BucketSet] = {}
        self._workspaces = {
            n: BucketSet(f"workspace:{n}", lim, clock) for n, (_, lim) in (workspaces or {}).items()
        }
        self._workspace_of = {key: n for n, (keys, _) in (workspaces or {}).items() for key in keys}

    def workspace_of(self, key_name: str | None) -> str | None:
        """The workspace a key belongs to (None: the organisation's default workspace)."""
        return self._workspace_of.get(key_name or "")

    def for_key(self, key_name: str | None, buckets: BucketSet) -> BucketSet:
        """What a call with this key draws on: `buckets`, and its workspace's when it has one."""
        workspace = self._workspace_of.get(key_name or "")
        return buckets if workspace is None else KeyedBuckets(self._workspaces[workspace], buckets)

    def for_model(self, model: str | None) -> BucketSet:
        """The bucket set that `model` draws on (the default one for None)."""
        if model is None:
            return self.default
        found = self._by_model.get(model)
        if found is None:
            found = next((s for key, s in self._classes.items() if key in model), self.default)
            if len(self._by_model) < 10_000:
                self._by_model[model] = found
        return found

    def try_count_tokens(self) -> Refusal | None:
        """Take one request from the count_tokens RPM bucket, or say how long to wait."""
        wait = self.count_tokens.wait_s(1)
        if wait > 0:
            return Refusal(("requests",), wait)
        self.count_tokens.take(1)
        return None

    def reset(self, *, empty: bool = False) -> None:
        """Fill (or empty) every bucket."""
        self.default.reset(empty=empty)
        for s in (*self._classes.values(), *self._workspaces.values()):
            s.reset(empty=empty)
        self.count_tokens.reset()

    def snapshot(self) -> dict[str, dict[str, dict[str, int | float | None]]]:
        """Levels of every bucket set, by class name, plus `count_tokens`."""
        out = {self.DEFAULT: self.default.snapshot()}
        out.update({key: s.snapshot() for key, s in self._classes.items()})
        out.update({s.name: s.snapshot() for s in self._workspaces.values()})
        ct = self.count_tokens
        out["count_tokens"] = {
            "requests": {
                "limit": None if ct.unlimited else int(ct.capacity),
                "level": None if ct.unlimited else round(ct.level(), 3),
                "full_in_s": round(ct.full_in_s(), 3),
            }
        }
        return out
