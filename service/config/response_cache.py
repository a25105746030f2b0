"""Settings of the exact response cache: the top-level `response_cache` section and
each partner's `cache` (off by default). How the cache works: service/response_cache/.

    response_cache:
      ttl_s: 3600                    # default entry lifetime for partners without cache.ttl_s
      max_bytes: 268435456           # all entries in Redis together, across replicas
      max_entry_bytes: 1048576       # a larger (compressed) answer is not stored
      local_max_bytes: 67108864      # the in-process LRU when there is no redis section
      compress_min_bytes: 1024       # entries from this size are zlib-compressed, if it pays
      share: [[acme, globex]]        # groups of partners that read each other's entries
    partners:
      - id: acme
        cache: {enabled: true, ttl_s: 600}
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIB = 1024 * 1024


MAX_TTL_S = 366 * 86_400.0
"""The longest an entry may live (a year): beyond, its expiry no longer fits the entry's header."""


class PartnerCacheSettings(BaseModel):
    """`partners[].cache`: whether the partner's answers are cached and served again."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    """Off by default: a partner opts in. Off, its requests are never looked up or stored."""
    ttl_s: float | None = Field(default=None, gt=0, le=MAX_TTL_S)
    """How long an answer stored for this partner lives, and the oldest entry it accepts
    (also one stored by a partner it shares with). None: `response_cache.ttl_s`."""


class ResponseCacheSettings(BaseModel):
    """`response_cache`: the store shared by the partners that enable their `cache`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ttl_s: float = Field(default=3600.0, gt=0, le=MAX_TTL_S)
    max_bytes: int = Field(default=256 * MIB, gt=0)
    """Bound on the bytes of all entries in Redis (every replica together); the oldest are
    evicted to make room. Counts each entry's stored bytes plus a fixed per-entry overhead."""
    max_entry_bytes: int = Field(default=1 * MIB, gt=0)
    """An answer larger than this once encoded (and compressed) is not stored."""
    local_max_bytes: int = Field(default=64 * MIB, gt=0)
    """Bound of the in-process LRU used when there is no `redis` section (per replica)."""
    compress_min_bytes: int = Field(default=1024, ge=0)
    """Entries from this many bytes are zlib-compressed, kept so when that saves a tenth."""
    share: list[list[str]] = Field(default_factory=list)
    """Groups of partner ids that read and write one another's entries. By default a partner
    reads only what was stored for itself."""

    @model_validator(mode="after")
    def _consistent(self) -> ResponseCacheSettings:
        if self.max_entry_bytes > self.max_bytes:
            raise ValueError(
                f"max_entry_bytes ({self.max_entry_bytes}) must not exceed max_bytes ({self.max_bytes})"
            )
        if self.max_entry_bytes > self.local_max_bytes:
            raise ValueError(
                f"max_entry_bytes ({self.max_entry_bytes}) must not exceed local_max_bytes "
                f"({self.local_max_bytes})"
            )
        seen: dict[str, int] = {}
        for i, group in enumerate(self.share):
            if len(set(group)) < 2:
                raise ValueError(f"share[{i}] must name at least two different partners (got {group})")
            if len(set(group)) != len(group):
                raise ValueError(f"share[{i}] names a partner twice (got {group})")
            for pid in group:
                if pid in seen:
                    raise ValueError(
                        f"share: partner {pid!r} is in share[{seen[pid]}] and share[{i}]; "
                        "a partner shares with at most one group (merge the groups)"
                    )
                seen[pid] = i
        return self

    def unknown_partners(self, partner_ids: Iterable[str]) -> list[str]:
        """`share[i]` problems: ids that are not configured partners."""
        known = set(partner_ids)
        return [
            f"response_cache.share[{i}]: {pid!r} is not a configured partner id"
            for i, group in enumerate(self.share)
            for pid in group
            if pid not in known
        ]
