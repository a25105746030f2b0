"""Which outcome is a request's: the rules, without Kafka.

The gateway publishes one outcome per request *record*: a response, or a dead letter
that names the record it is about (`original`: topic, partition, offset). A request id
has several records when it was sent more than once (a send retried after a lost
acknowledgement, the caller sending again). The gateway processes the first it reads
and, with replay protection on (`signing.required` or `dedupe`), dead-letters every
later copy as `replay`. Those dead letters are the copies' fate, not the request's.

For one request id this client sent (attempts 0, 1, ... in order; each acknowledged
with its partition and offset, or not, when the send failed or timed out), the outcome is

- a response (without replay protection, copies are answered too: the first wins);
- a `replay` dead letter only when it is about the record of attempt 0: the id had
  been used before this client sent it. One about a later attempt, or about a record
  this client does not know (an attempt whose acknowledgement was lost, or someone
  else's) is a copy's: held, and looked at again when an acknowledgement arrives
  (a dead letter can be read before its record's acknowledgement);
- any other dead letter, unless it is about an attempt after one already
  acknowledged (a later copy's). A copy is signed again when sent, so it fails
  admission only as the first would (the same body).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REPLAY = "replay"


@dataclass(frozen=True, slots=True)
class RecordRef:
    """Where a request record was written."""

    topic: str
    partition: int
    offset: int


def original_of(doc: dict[str, Any]) -> RecordRef | None:
    """The record a dead letter is about, when it says."""
    original = doc.get("original")
    if not isinstance(original, dict):
        return None
    topic, partition, offset = original.get("topic"), original.get("partition"), original.get("offset")
    if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
        return RecordRef(topic, partition, offset)
    return None


class Correlation:
    """What this client knows of one request id: its attempts, and its outcome once known."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._attempts: list[RecordRef | None] = []
        self._held: list[dict[str, Any]] = []
        self.outcome: dict[str, Any] | None = None
        self.dead_lettered = False
        """The outcome is a dead letter (else a response)."""

    @property
    def decided(self) -> bool:
        return self.outcome is not None

    @property
    def ignored(self) -> list[dict[str, Any]]:
        """Dead letters seen for this id that are (so far) not its outcome."""
        return list(self._held)

    def attempt(self) -> int:
        """A send begins; its index."""
        self._attempts.append(None)
        return len(self._attempts) - 1

    def acknowledged(self, attempt: int, where: RecordRef) -> bool:
        """The broker wrote `attempt` at `where`; True when that decides the outcome."""
        self._attempts[attempt] = where
        if self.decided:
            return False
        for doc in self._held:
            if self._is_outcome(doc):
                self._held.remove(doc)
                return self._decide(doc, dead=True)
        return False

    def on_response(self, doc: dict[str, Any]) -> bool:
        """A response for this id; True when it is the outcome (the first one is)."""
        return False if self.decided else self._decide(doc, dead=False)

    def on_dead_letter(self, doc: dict[str, Any]) -> bool:
        """A dead letter for this id; True when it is the outcome, else it is held."""
        if self.decided:
            return False
        if self._is_outcome(doc):
            return self._decide(doc, dead=True)
        self._held.append(doc)
        return False

    def _is_outcome(self, doc: dict[str, Any]) -> bool:
        where = original_of(doc)
        attempt = self._attempts.index(where) if where is not None and where in self._attempts else None
        if doc.get("reason") == REPLAY:
            return attempt == 0
        if attempt is None:  # ours only if one of our records is not acknowledged (yet)
            return any(a is None for a in self._attempts)
        return all(earlier is None for earlier in self._attempts[:attempt])

    def _decide(self, doc: dict[str, Any], *, dead: bool) -> bool:
        self.outcome = doc
        self.dead_lettered = dead
        return True
