"""Crash points for the crash tests: kill the process at an exact step of a tick.

`GATEWAY_FAILPOINT=<name>:<n>` makes the n-th passage through `hit(<name>)` end the
process at once (`os._exit(137)`, as kill -9 would: no cleanup, no flush). Unset in
production, where `hit` is a dictionary lookup. The names:

- `tick.sent`: a tick's outcomes are sent inside the open transaction, not committed;
- `tick.committed`: the transaction committed; nobody in the process knows it yet.
- `batch.intent`, `batch.created`: a batch's intent recorded; the batch created, its id not;
- `batch.settled`: a chunk of a batch's results settled the budget, not yet published;
- `batch.published`: that chunk's transaction committed.
"""

from __future__ import annotations

import os
import sys

_ARMED: dict[str, int] = {}


def arm(spec: str | None) -> None:
    """Arm from a `<name>:<n>` spec (the environment's, at import)."""
    _ARMED.clear()
    if spec:
        name, _, count = spec.partition(":")
        _ARMED[name] = int(count or "1")


def hit(name: str) -> None:
    left = _ARMED.get(name)
    if left is None:
        return
    if left <= 1:
        sys.stderr.write(f"failpoint {name}: exiting as if killed\n")
        sys.stderr.flush()
        os._exit(137)
    _ARMED[name] = left - 1


arm(os.environ.get("GATEWAY_FAILPOINT"))
