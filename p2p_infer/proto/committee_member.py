"""A committee member's rules, sans-IO: tickets, the check that it was selected, one
commitment per task, and one answer (commit + reveal + output) per task, to the task's
client only, repeated unchanged if asked again; answers expire. The
clock, the nonces and who is asking come in as arguments; the trio handler in
``node/committee.py`` decodes, computes and calls these. Spec: ``protocols/committee.md``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..bounded import trim_oldest
from ..errors import ConsensusError, NotSelected, ProtocolViolation
from ..identity import Identity
from .committee_codec import MemberAnswer, WireTensor
from .consensus import CandidateSet, Commit, Reveal, StageTask, Ticket, commitment, make_ticket, output_hash, sign_commit, sign_reveal
from .records import CLOCK_SKEW_MS

PENDING_TTL_MS = 120_000  # how long a member keeps an unrevealed output (and its one commitment)
MAX_ANSWERS = 1024  # answers (with their outputs) kept for repeated requests; memory stays bounded


@dataclass(frozen=True)
class Pending:
    """An output committed to and not yet revealed."""

    output: WireTensor
    nonce: bytes
    commit: Commit
    candidates: CandidateSet
    expires_ms: int


@dataclass
class MemberCore:
    identity: Identity
    ttl_ms: int = PENDING_TTL_MS
    committed: dict[bytes, tuple[Commit, int]] = field(default_factory=dict)  # task -> (our one commit, expiry)
    pending: dict[bytes, Pending] = field(default_factory=dict)
    answers: dict[bytes, tuple[MemberAnswer, int]] = field(default_factory=dict)  # task -> (our one answer, expiry)

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

    def check_execute(self, candidates: CandidateSet, input_hash: bytes, requester: str, now_ms: int) -> None:
        """What must hold before computing: the task's own client asks, the input is the
        task's, the deadline is ahead, and the candidate set the client signed selects us.
        Anything else is a task nobody legitimately gave us, and evidence about it could
        only be a frame."""
        task = candidates.task
        check_client(task, requester)
        if input_hash != task.input_hash:
            raise ProtocolViolation("execute: input does not match the task's input hash")
        if now_ms > task.commit_deadline_ms:
            raise ProtocolViolation("execute: the commit deadline has passed")
        if task.requested_at_ms > now_ms + CLOCK_SKEW_MS:
            raise ProtocolViolation("execute: the task is dated in the future")
        try:
            members = candidates.members
        except ConsensusError as exc:
            raise NotSelected(f"execute: invalid candidate set: {exc.message}") from None
        if self.peer_id not in members:
            raise NotSelected("execute: this member is not among the k smallest tickets of the candidate set")

    def commit(self, candidates: CandidateSet, output: WireTensor, nonce: bytes, now_ms: int) -> Commit:
        """Sign the one commitment for the task to ``output``; if a duplicate request raced
        this one and committed first, return that commitment and forget this output."""
        task = candidates.task
        task_id = task.task_id
        known = self.existing_commit(task, now_ms)
        if known is not None:
            return known
        signed = sign_commit(self.identity, task_id, candidates.id, commitment(task_id, output_hash(output), nonce), now_ms)
        expires = now_ms + self.ttl_ms
        self.committed[task_id] = (signed, expires)
        self.pending[task_id] = Pending(output, nonce, signed, candidates, expires)
        return signed

    def repeated_answer(self, task: StageTask, requester: str, now_ms: int) -> MemberAnswer | None:
        """The answer already given, for a repeated ``execute`` from the task's own client.
        Anyone else is refused before the lookup: a replayed request (the candidate set is no
        secret to fellow members) would otherwise be handed the output."""
        check_client(task, requester)
        return self.existing_answer(task, now_ms)

    def existing_answer(self, task: StageTask, now_ms: int) -> MemberAnswer | None:
        """The answer already given for this task: a repeated ``execute`` gets it back."""
        self.expire(now_ms)
        entry = self.answers.get(task.task_id)
        return None if entry is None else entry[0]

    def answer(self, candidates: CandidateSet, output: WireTensor, nonce: bytes, now_ms: int, *, reveal: bool = True) -> MemberAnswer:
        """Commit to ``output`` and open the commitment at once (since committee/3.0.0: one round
        trip); the answer is kept so a repeated request gets the same one."""
        task_id = candidates.task.task_id
        known = self.existing_answer(candidates.task, now_ms)
        if known is not None:
            return known
        signed = self.commit(candidates, output, nonce, now_ms)
        if not reveal or task_id not in self.pending:  # withheld (a test fault), or a racing request committed first
            answer = MemberAnswer(signed, None, None)
        else:
            opened, entry = self.reveal(task_id, candidates.task.client_id, now_ms)
            answer = MemberAnswer(signed, opened, entry.output)
        self.answers[task_id] = (answer, now_ms + self.ttl_ms)
        trim_oldest(self.answers, MAX_ANSWERS)
        return answer

    def take(self, task_id: bytes, requester: str, now_ms: int) -> Pending:
        """Remove and return the unrevealed output of a task (each is revealed once, and
        only to the task's client: anyone else asking early could copy it)."""
        self.expire(now_ms)
        entry = self.pending.get(task_id)
        if entry is None:
            raise ProtocolViolation("reveal: no pending output for this task")
        if requester != entry.candidates.task.client_id:
            raise NotSelected("reveal: only the task's client may ask for the reveal")
        del self.pending[task_id]
        return entry

    def reveal(self, task_id: bytes, requester: str, now_ms: int) -> tuple[Reveal, Pending]:
        entry = self.take(task_id, requester, now_ms)
        return sign_reveal(self.identity, task_id, output_hash(entry.output), entry.nonce), entry

    def expire(self, now_ms: int) -> None:
        """Drop what has expired. Entries go in with ``now + ttl``, so each table is in expiry
        order and only its head is looked at (called several times per execute: a scan of
        every task held cost a member more than its compute). Answers, which hold outputs,
        are also bounded in number (``MAX_ANSWERS``, where an answer is kept); the commitment
        outlives its answer, so a task asked again after that gets its one commitment back,
        never a second one."""
        _expire_head(self.pending, lambda p: p.expires_ms, now_ms)
        _expire_head(self.committed, lambda entry: entry[1], now_ms)
        _expire_head(self.answers, lambda entry: entry[1], now_ms)


def _expire_head(table: dict[bytes, Any], expiry: Callable[[Any], int], now_ms: int) -> None:
    while table:
        first = next(iter(table))
        if expiry(table[first]) >= now_ms:
            return
        del table[first]


def check_client(task: StageTask, requester: str) -> None:
    """Only the task's client (the stream's Noise-authenticated peer) may ask for it."""
    if requester != task.client_id:
        raise NotSelected(f"execute: the task is {task.client_id}'s, not {requester or 'an unknown peer'}'s")
