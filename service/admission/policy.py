"""Admission checks on a request's params beyond the schema: the model's documented
`max_tokens` maximum and the partner's `policy` (service tier, speed, inference geo, workspace,
server tools). Both dead-letter before anything is reserved or called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.contracts.params import server_tools
from service.contracts.reasons import Reason

if TYPE_CHECKING:
    from service.admission.registry import Partner
    from service.config.prices import ModelPrice


def check_params(partner: Partner, params: dict[str, Any], price: ModelPrice) -> tuple[Reason, str] | None:
    """Why `params` (already valid by the schema) is refused, or None."""
    pid, model = partner.id, params["model"]
    limit = price.max_output_tokens
    if limit is not None and params["max_tokens"] > limit:
        return (
            Reason.MAX_TOKENS_EXCEEDED,
            f"params.max_tokens {params['max_tokens']} exceeds the documented maximum of {model} "
            f"({limit} output tokens, models.{model}.max_output_tokens)",
        )
    policy = partner.settings.policy
    refused = policy.refusal(params, server_tools(params))
    if refused is None:
        return None
    name, value = refused
    allowed = getattr(policy, name)
    where = f"partners[{pid}].policy.{name}"
    if name == "server_tools":
        detail = f"params.tools asks for the server tool {value!r}, which {where} ({allowed}) does not allow"
    else:
        detail = f"params.{name} {str(value)[:64]!r} is not allowed by {where} ({allowed})"
    return Reason.PARAM_NOT_ALLOWED, detail
