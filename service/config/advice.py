"""Settings that are valid but probably not what was meant: said at start and by `config check`."""

from __future__ import annotations

from service.config.settings import GatewaySettings


def warnings(settings: GatewaySettings) -> list[str]:
    """One sentence per finding, naming the settings involved."""
    out = _cache_sharing(settings)
    if settings.redis is not None:
        return out
    budgets = [p.id for p in settings.partners if _has_budget(p.budget)]
    if budgets:
        out.append(
            f"budgets are set for {', '.join(budgets)} but there is no redis section: spend is counted in "
            "this process only, starts from zero at every restart and is not shared by replicas"
        )
    guarded = [p.id for p in settings.partners if p.signing.required or p.dedupe]
    if guarded:
        out.append(
            f"replay protection is on for {', '.join(guarded)} but there is no redis section: request ids "
            "are remembered in this process only (forgotten on restart, not shared by replicas)"
        )
    cached = [p.id for p in settings.partners if p.cache.enabled]
    if cached:
        out.append(
            f"the response cache is on for {', '.join(cached)} but there is no redis section: each "
            "replica caches in its own memory (response_cache.local_max_bytes), lost on restart"
        )
    return out


def _cache_sharing(settings: GatewaySettings) -> list[str]:
    enabled = {p.id for p in settings.partners if p.cache.enabled}
    return [
        f"response_cache.share[{i}] names {pid!r}, whose cache is not enabled: it neither reads nor "
        "writes the group's entries (set its cache.enabled: true)"
        for i, group in enumerate(settings.response_cache.share)
        for pid in group
        if pid not in enabled
    ]


def _has_budget(budget: object) -> bool:
    fields = ("tokens_per_day", "tokens_per_month", "usd_per_day", "usd_per_month")
    return any(getattr(budget, f, None) is not None for f in fields)
