"""What one input partition has done above its commit point, kept in the commit's metadata.

Records of a partition finish out of order, so the committed offset (the low
watermark) trails the work really done. Each commit therefore carries, in the
offset commit's metadata string, the state of every offset in the window
above it, as Confluent's Parallel Consumer does:

- *finished*: its outcome was published in the same transaction as a commit;
  the next owner skips it without calling Claude;
- *claimed*: its Claude call may have started (the claim was committed before
  the call); the next owner must not call again silently, the partner's
  `on_unknown` policy decides.

The format is versioned and compact: a bitmap of finished offsets (one bit
per offset of the window) and a list of claims, zlib-compressed and base64
encoded. The broker caps metadata at `offset.metadata.max.bytes` (4096 by
default); the window and the number of claims are bounded so it always fits,
and `encode` refuses (``MetadataTooLarge``) rather than writing a state it
could not keep.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

MAGIC = "cgw1:"
METADATA_MAX_BYTES = 4096
"""The broker's default `offset.metadata.max.bytes`."""


class MetadataTooLarge(ValueError):
    """The state does not fit the broker's metadata limit (raise `offset.metadata.max.bytes`
    on the broker, or lower `kafka.eos_window`/`kafka.eos_max_claims`)."""


class MetadataCorrupt(ValueError):
    """A commit's metadata is not ours or is damaged."""


@dataclass(frozen=True, slots=True)
class Claim:
    """An offset whose Claude call may have started."""

    offset: int
    claimed_at_ms: int
    attempts: int
    """How many times this request has been claimed, across owners."""
    owner: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state a commit recorded."""

    commit: int
    finished: frozenset[int] = frozenset()
    claims: tuple[Claim, ...] = ()
    owner: str = ""
    written_at_ms: int = 0
    seq: int = 0


# -- codec --------------------------------------------------------------------------------


def _varint(n: int, out: bytearray) -> None:
    if n < 0:
        raise ValueError("varints are unsigned")
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def varint(self) -> int:
        shift = result = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise MetadataCorrupt("truncated varint")
            b = self.data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MetadataCorrupt("truncated field")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def encode(snapshot: Snapshot, max_bytes: int = METADATA_MAX_BYTES) -> str:
    """The metadata string for `snapshot`; `MetadataTooLarge` when it would not fit."""
    commit = snapshot.commit
    out = bytearray([1])
    _varint(snapshot.seq, out)
    _varint(snapshot.written_at_ms, out)
    owners = sorted({snapshot.owner, *(c.owner for c in snapshot.claims)})
    _varint(len(owners), out)
    for name in owners:
        raw = name.encode()[:64]
        _varint(len(raw), out)
        out += raw
    _varint(owners.index(snapshot.owner), out)
    ahead = [o - commit for o in snapshot.finished if o >= commit]
    bitmap = bytearray((max(ahead) // 8 + 1) if ahead else 0)
    for d in ahead:
        bitmap[d >> 3] |= 1 << (d & 7)
    _varint(len(bitmap), out)
    out += bitmap
    claims = sorted((c for c in snapshot.claims if c.offset >= commit), key=lambda c: c.offset)
    _varint(len(claims), out)
    for c in claims:
        _varint(c.offset - commit, out)
        _varint(c.claimed_at_ms, out)
        _varint(c.attempts, out)
        _varint(owners.index(c.owner), out)
    text = MAGIC + base64.b64encode(zlib.compress(bytes(out), 6)).decode("ascii")
    if len(text) > max_bytes:
        raise MetadataTooLarge(f"{len(text)} bytes of commit metadata, limit {max_bytes}")
    return text


def decode(commit: int, metadata: str | None) -> Snapshot:
    """The state recorded with a commit at `commit`. Empty metadata (a commit made
    without this ledger) means nothing is known above the commit point."""
    if not metadata:
        return Snapshot(commit)
    if not metadata.startswith(MAGIC):
        raise MetadataCorrupt("not gateway commit metadata")
    try:
        data = zlib.decompress(base64.b64decode(metadata[len(MAGIC) :], validate=True))
    except (binascii.Error, zlib.error, ValueError) as exc:
        raise MetadataCorrupt(f"undecodable: {type(exc).__name__}") from exc
    r = _Reader(data)
    if r.take(1) != b"\x01":
        raise MetadataCorrupt("unknown metadata version")
    seq, written = r.varint(), r.varint()
    try:
        owners = [r.take(r.varint()).decode() for _ in range(r.varint())]
        owner = owners[r.varint()]
        bitmap = r.take(r.varint())
        finished = frozenset(
            commit + i * 8 + bit for i, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1
        )
        claims = tuple(
            Claim(commit + r.varint(), r.varint(), r.varint(), owners[r.varint()]) for _ in range(r.varint())
        )
    except (IndexError, UnicodeDecodeError) as exc:
        raise MetadataCorrupt(f"inconsistent: {type(exc).__name__}") from exc
    return Snapshot(commit, finished, claims, owner, written, seq)


# -- the owner's live state ---------------------------------------------------------------


@dataclass
class PartitionLedger:
    """The owner's view of one partition: started offsets, finished ones, claims.

    Offsets start in order (as fetched) and finish in any order. The commit point
    is the first started offset not finished. What the previous owner recorded
    (`inherited`) is consulted as records arrive again.
    """

    restored: Snapshot
    _pending: deque[int] = field(default_factory=deque)
    _done: set[int] = field(default_factory=set)
    _next: int = -1
    claims: dict[int, Claim] = field(default_factory=dict)
    """Claims recorded in a committed transaction and not yet resolved (ours and inherited)."""
    seq: int = 0

    def __post_init__(self) -> None:
        self._next = self.restored.commit
        self._inherited_done = set(self.restored.finished)
        self._inherited_claims = {c.offset for c in self.restored.claims}
        self.claims = {c.offset: c for c in self.restored.claims}
        self.seq = self.restored.seq

    # -- records arriving

    def accept(self, offset: int) -> bool:
        """Whether a fetched record is new work here (False: below the commit point or
        already seen, e.g. a stale fetch position before the restore's seek)."""
        return offset >= self._next

    def start(self, offset: int) -> None:
        self._next = offset + 1
        self._pending.append(offset)

    def pass_to(self, position: int) -> bool:
        """The consumer's position, once every record below it was given here (`start`): the
        offsets between the last record and it hold nothing to answer (transaction markers,
        records of aborted transactions, compacted gaps), so the commit point may pass them.
        Without this the committed offset stays below a partner's last transaction marker and
        the partition's lag never reaches 0. Returns whether the commit point moves now
        (nothing unfinished; not on a partition with no commit point yet)."""
        if position <= self._next:
            return False
        known = self._next >= 0
        self._next = position
        return known and not self._pending

    def finished_before(self, offset: int) -> bool:
        """The previous owner published this record's outcome: skip it."""
        return offset in self._inherited_done

    def inherited_claim(self, offset: int) -> Claim | None:
        """A claim on this offset left by an owner that is gone (the call may have happened)."""
        return self.claims.get(offset) if offset in self._inherited_claims else None

    # -- committed changes

    def apply(
        self, finished: Iterable[int], claims: Iterable[Claim], seq: int, released: Iterable[int] = ()
    ) -> None:
        """Record what a committed transaction made true (`released`: claims dropped, their
        offsets left unfinished)."""
        for c in claims:
            self.claims[c.offset] = c
            self._inherited_claims.discard(c.offset)
        finished = tuple(finished)
        for o in (*released, *finished):  # no claim stands on either any more
            self.claims.pop(o, None)
            self._inherited_claims.discard(o)
        for o in finished:
            self._inherited_done.discard(o)
            if self._pending and self._pending[0] == o:
                self._pending.popleft()
                while self._pending and self._pending[0] in self._done:
                    self._done.discard(self._pending.popleft())
            else:
                self._done.add(o)
        self.seq = seq

    def snapshot(
        self,
        owner: str,
        now_ms: int,
        finished: Iterable[int] = (),
        claims: Iterable[Claim] = (),
        released: Iterable[int] = (),
    ) -> Snapshot:
        """The state as it will be once `finished`, `claims` and `released` are committed too."""
        done = self._done | set(finished)
        commit = self._next
        for o in self._pending:
            if o not in done:
                commit = o
                break
        ahead = {o for o in done if o >= commit} | {o for o in self._inherited_done if o >= commit}
        all_claims = {**self.claims, **{c.offset: c for c in claims}}
        for o in (*done, *released):
            all_claims.pop(o, None)
        return Snapshot(commit, frozenset(ahead), tuple(all_claims.values()), owner, now_ms, self.seq + 1)

    # -- figures

    @property
    def low_watermark(self) -> int:
        """The first started offset not finished (the head of `_pending` never is)."""
        return self._pending[0] if self._pending else self._next

    @property
    def next_offset(self) -> int:
        return self._next

    @property
    def window(self) -> int:
        """Offsets between the commit point and the last fetched (what metadata must describe)."""
        return self._next - self.low_watermark

    @property
    def in_flight(self) -> int:
        return len(self._pending) - len(self._done)

    def pending_offsets(self) -> Iterator[int]:
        return (o for o in self._pending if o not in self._done)
