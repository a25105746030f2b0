"""Fault injection: which call fails on purpose, and how.

One uniform draw per call from the simulator's seeded `random.Random`, and
only when some fault rate is above zero, so a fault-free run draws nothing.
The draw is compared against the cumulative rates in a fixed order:
api_error (500), overloaded (529), spend limit (429), dropped connection.
"""

from __future__ import annotations

import enum
import random

from service.simulator.config import FaultSettings
from service.simulator.errors import ApiError, InternalApiError, OverloadedError, RateLimitError

SPEND_LIMIT_ERROR_CODE = "enforced_spend_limit_reached"


class Fault(enum.Enum):
    """What happens to a call besides the normal path."""

    NONE = "none"
    API_ERROR = "api_error"
    OVERLOADED = "overloaded"
    SPEND_LIMIT = "spend_limit"
    DROP = "drop"


def draw_fault(rng: random.Random, faults: FaultSettings) -> Fault:
    """Pick this call's fault, if any."""
    if faults.total <= 0.0:
        return Fault.NONE
    u = rng.random()
    for rate, fault in (
        (faults.api_error_rate, Fault.API_ERROR),
        (faults.overloaded_rate, Fault.OVERLOADED),
        (faults.spend_limit_rate, Fault.SPEND_LIMIT),
        (faults.drop_rate, Fault.DROP),
    ):
        if u < rate:
            return fault
        u -= rate
    return Fault.NONE


def fault_error(fault: Fault) -> ApiError | None:
    """The error answered at once for `fault`, or None (no fault, or a dropped connection)."""
    if fault is Fault.API_ERROR:
        return InternalApiError("Internal server error (injected by the simulator)")
    if fault is Fault.OVERLOADED:
        return OverloadedError("Overloaded (injected by the simulator)")
    if fault is Fault.SPEND_LIMIT:
        # Shape of anthropic.types.shared.EnforcedSpendLimitReachedError: the SDK maps
        # (429, error.details.error_code) to that class; it is not worth retrying.
        return RateLimitError(
            "Your organization has reached its enforced spend limit for this month "
            "(injected by the simulator).",
            details={"error_code": SPEND_LIMIT_ERROR_CODE},
        )
    return None
