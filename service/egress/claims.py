"""What an outcome says about a claim: a call that may have been billed by an owner that is gone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.config.settings import PartnerSettings
from service.contracts.outcomes import DeadLetter, Origin, utc_iso
from service.contracts.reasons import Reason
from service.ingest.ledger import Claim


def claim_doc(claim: Claim) -> dict[str, Any]:
    """The claim an `outcome_unknown` dead letter reports."""
    return {
        "claimed_at": utc_iso(claim.claimed_at_ms / 1000),
        "attempts": claim.attempts,
        "owner": claim.owner,
    }


def previous_claim(claim: Mapping[str, Any]) -> dict[str, Any]:
    """A response's `unknown_retry`: the claim whose outcome was unknown, called again."""
    return {
        "previous_claimed_at": claim["claimed_at"],
        "previous_owner": claim["owner"],
        "previous_attempts": claim["attempts"],
    }


def owner_lost(
    ps: PartnerSettings, inherited: Claim, origin: Origin, request_id: str, max_claims: int
) -> DeadLetter:
    """The `outcome_unknown` dead letter of a request whose claimed call's owner is gone and
    which is not called again (`on_unknown: deadletter`, or its one extra call was used)."""
    detail = (
        f"a call for this request was claimed by {inherited.owner} (attempt {inherited.attempts}) "
        "and its outcome is unknown: that owner stopped before publishing it; "
        f"partners[{ps.id}].on_unknown is {ps.on_unknown}, so it is not called again"
        + (" (its one extra call was used)" if inherited.attempts >= max_claims else "")
    )
    return DeadLetter(
        ps.id,
        Reason.OUTCOME_UNKNOWN,
        detail,
        origin,
        request_id,
        inherited.attempts,
        claim=claim_doc(inherited),
    )
