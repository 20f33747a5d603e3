"""A committee member's rules, sans-IO: tickets, one commitment per task, pending outputs
that expire, reveals. The clock and the nonces come in as arguments; the trio handler in
``node/committee.py`` decodes, computes and calls these. Spec: ``protocols/committee.md``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ProtocolViolation
from ..identity import Identity
from .committee_codec import WireTensor
from .consensus import Commit, Reveal, StageTask, Ticket, commitment, make_ticket, output_hash, sign_commit, sign_reveal

PENDING_TTL_MS = 120_000  # how long a member keeps an unrevealed output (and its one commitment)


@dataclass(frozen=True)
class Pending:
    """An output committed to and not yet revealed."""

    output: WireTensor
    nonce: bytes
    commit: Commit
    expires_ms: int


@dataclass
class MemberCore:
    identity: Identity
    ttl_ms: int = PENDING_TTL_MS
    committed: dict[bytes, tuple[Commit, int]] = field(default_factory=dict)  # task -> (our one commit, expiry)
    pending: dict[bytes, Pending] = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def ticket(self, seed: bytes) -> Ticket:
        return make_ticket(self.identity, seed)

    def existing_commit(self, task: StageTask, now_ms: int) -> Commit | None:
        """The commitment already signed for this task, if any: a repeated ``execute`` gets
        it back, so a client cannot make an honest member sign two (that is equivocation)."""
        self.expire(now_ms)
        entry = self.committed.get(task.task_id)
        return None if entry is None else entry[0]

    def check_execute(self, task: StageTask, input_hash: bytes, now_ms: int) -> None:
        """What must hold before computing: the input is the task's, the deadline ahead."""
        if input_hash != task.input_hash:
            raise ProtocolViolation("execute: input does not match the task's input hash")
        if now_ms > task.commit_deadline_ms:
            raise ProtocolViolation("execute: the commit deadline has passed")

    def commit(self, task: StageTask, output: WireTensor, nonce: bytes, now_ms: int) -> Commit:
        """Sign the one commitment for ``task`` to ``output``; if a duplicate request raced
        this one and committed first, return that commitment and forget this output."""
        task_id = task.task_id
        known = self.existing_commit(task, now_ms)
        if known is not None:
            return known
        signed = sign_commit(self.identity, task_id, commitment(task_id, output_hash(output), nonce), now_ms)
        expires = now_ms + self.ttl_ms
        self.committed[task_id] = (signed, expires)
        self.pending[task_id] = Pending(output, nonce, signed, expires)
        return signed

    def take(self, task_id: bytes, now_ms: int) -> Pending:
        """Remove and return the unrevealed output of a task (each is revealed once)."""
        self.expire(now_ms)
        entry = self.pending.pop(task_id, None)
        if entry is None:
            raise ProtocolViolation("reveal: no pending output for this task")
        return entry

    def reveal(self, task_id: bytes, now_ms: int) -> tuple[Reveal, Pending]:
        entry = self.take(task_id, now_ms)
        return sign_reveal(self.identity, task_id, output_hash(entry.output), entry.nonce), entry

    def expire(self, now_ms: int) -> None:
        for task_id in [t for t, p in self.pending.items() if p.expires_ms < now_ms]:
            del self.pending[task_id]
        for task_id in [t for t, (_, exp) in self.committed.items() if exp < now_ms]:
            del self.committed[task_id]
