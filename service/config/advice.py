"""Settings that are valid but probably not what was meant: said at start and by `config check`."""

from __future__ import annotations

from service.config.settings import GatewaySettings


def warnings(settings: GatewaySettings) -> list[str]:
    """One sentence per finding, naming the settings involved."""
    out: list[str] = []
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
    return out


def _has_budget(budget: object) -> bool:
    fields = ("tokens_per_day", "tokens_per_month", "usd_per_day", "usd_per_month")
    return any(getattr(budget, f, None) is not None for f in fields)
