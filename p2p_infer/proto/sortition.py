"""Who may sit on a stage's committee, checkably: tasks, VRF tickets, and the candidate set
the client signs. Sans-IO; time comes in with the task (``requested_at_ms``).

* **Request and seeds.** ``request_hash = H(model_id, hidden_hash, mask_hash, client_nonce,
  client_key)``: every field of a certificate's header, so none can change without
  changing every task. The session's one ticket seed is ``seed = H(client_key, session)``.
* **Tickets.** A candidate proves ``beta = VRF(sk, seed)`` once per client session
  (committee/5.0.0: ``seed = H(client_key, session)``; one VRF proof per candidate and
  session, verified once per process); the request's stage *i*, attempt *a* ranks
  candidates by ``draw = H(beta, request_hash, i, a)``. Nobody can choose its beta for a
  seed. The client chooses its session, and so could grind it; that gives it nothing it
  does not already have, since it signs the candidate list and may list only the k
  candidates it likes (docs/consensus.md, "What a certificate proves").
* **Candidate set.** The client lists every candidate it drew from (ticket + the signed
  capability record it held), signs the list with the task, and sends it with ``execute``.
  A member, an auditor or a certificate's reader checks it alone: the client's key solves
  the identity puzzle and signed it; ``k >= MIN_K``; every ticket verifies on the seed and
  comes from a puzzle-solved identity whose record advertises the stage's layers and was
  issued at least ``MIN_RECORD_AGE_MS`` before the request and still live at it; the
  committee is the k smallest tickets. Spec: ``protocols/committee.md``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Callable
from functools import cached_property
from typing import Any, TypeVar

import msgpack

from . import vrf
from ..bounded import trim_oldest
from ..errors import ConsensusError, RecordError
from ..identity import PUZZLE_DIFFICULTY, Identity, peer_id_from_public_key, solves_puzzle, verify_signature
from .records import CapabilityRecord, check_record_times, verify_record_static
from .wire import is_bin, is_int

MIN_K = 3  # smallest committee a certificate may claim: k=1 is one key's word, k=2 has no majority to outvote a liar
MIN_RECORD_AGE_MS = 1_000  # a listed record was issued at least this long before the request
MAX_COMMIT_WINDOW_MS = 120_000  # requested_at < deadline <= requested_at + this (a member keeps outputs 120 s)
MAX_CANDIDATES = 64  # candidates per stage (bounds a verifier's work: one VRF check each)
MAX_CANDIDATE_RECORD_BYTES = 4096  # honest records are ~400 B; keeps a candidate set well under a frame
CANDIDATES_DOMAIN = b"p2p-infer/candidates/v1\n"
MEMO_ENTRIES = 4096  # verified tickets, records and candidate sets remembered per process (each table)
T = TypeVar("T")


def h(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)  # length-prefixed: no ambiguity
    return digest.digest()


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise ConsensusError(reason)


# ---- requests and seeds ----


def request_hash(model_id: str, hidden_hash: bytes, mask_hash: bytes, client_nonce: bytes, client_key: bytes) -> bytes:
    return h(b"p2p-infer/request/v2", model_id.encode(), hidden_hash, mask_hash, client_nonce, client_key)


NO_SESSION = bytes(32)


def ticket_seed(client_key: bytes, session: bytes = NO_SESSION) -> bytes:
    """The VRF input of every ticket of one client session (committee/5.0.0): every query,
    stage and attempt of the session ranks the same tickets by its own draw."""
    return h(b"p2p-infer/sortition/v3", client_key, session)


def draw_key(beta: bytes, req_hash: bytes, stage: int, attempt: int) -> bytes:
    """What the request's stage ``stage``, attempt ``attempt`` ranks a candidate by (smallest first)."""
    return h(b"p2p-infer/draw/v2", beta, req_hash, stage.to_bytes(4, "big"), attempt.to_bytes(4, "big"))


class Memo:
    """A bounded table of results of pure checks (same bytes in, same verdict out), so a
    process verifies a ticket, record or candidate set once however often it sees it:
    per stage, per member role and again in gossip. Deterministic: no time, no randomness."""

    def __init__(self, size: int = MEMO_ENTRIES) -> None:
        self.size = size
        self.table: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        value = self.table.get(key)
        if value is not None:
            self.table.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self.table[key] = value
        trim_oldest(self.table, self.size)


def memo_check(table: Memo, key: Any, check: Callable[[], T]) -> T:
    """``check()``'s verdict, computed once per ``key``: its value, or the ConsensusError it
    raised (remembered as a refusal and raised again). ``check`` must be pure: what it
    decides may depend only on the bytes in ``key``, never on the time."""
    known = table.get(key)
    if known is None:
        try:
            known = check()
        except ConsensusError as exc:
            known = Refused(exc.message)
        table.put(key, known)
    if isinstance(known, Refused):
        raise ConsensusError(known.reason)
    return known


@dataclass(frozen=True)
class Refused:
    reason: str


BETAS = Memo()  # (public key, proof, seed) -> beta, or the ConsensusError's message
RECORDS = Memo()  # (peer id, envelope) -> record whose time-independent checks passed
COMMITTEES = Memo()  # (candidate set id, signature) -> committee, or the ConsensusError's message


# ---- tickets ----


@dataclass(frozen=True)
class Ticket:
    """A candidate's VRF proof over a stage seed: its lottery ticket for the committee."""

    peer_id: str
    public_key: bytes
    proof: bytes

    def beta(self, seed: bytes) -> bytes:
        """Verify the proof and return the VRF output; raises ConsensusError if invalid
        (verified once per process: the verdict is remembered)."""
        return memo_check(BETAS, (self.peer_id, self.public_key, self.proof, seed), lambda: self._check_proof(seed))

    def _check_proof(self, seed: bytes) -> bytes:
        if peer_id_from_public_key(self.public_key) != self.peer_id:
            raise ConsensusError(f"ticket key does not match peer id {self.peer_id}")
        if not solves_puzzle(self.public_key):
            raise ConsensusError(f"ticket of {self.peer_id}: identity does not solve the puzzle ({PUZZLE_DIFFICULTY} bits)")
        try:
            return vrf.verify(self.public_key, self.proof, seed)
        except vrf.VrfError as exc:
            raise ConsensusError(f"bad VRF proof from {self.peer_id}: {exc}") from None

    def to_wire(self) -> list[Any]:
        return [self.peer_id, self.public_key, self.proof]

    @classmethod
    def from_wire(cls, raw: Any) -> Ticket:
        _expect(isinstance(raw, list) and len(raw) == 3 and isinstance(raw[0], str) and isinstance(raw[1], bytes) and isinstance(raw[2], bytes)
                and len(raw[1]) == 32 and len(raw[2]) == vrf.PROOF_LEN, "ticket must be [peer_id, public_key (32 B), proof (80 B)]")
        return cls(raw[0], raw[1], raw[2])


def make_ticket(identity: Identity, seed: bytes) -> Ticket:
    return Ticket(identity.peer_id, identity.public_key, vrf.prove(identity.seed, seed))


def rank_tickets(tickets: list[Ticket], seed: bytes, req_hash: bytes, stage: int = 0, attempt: int = 0) -> list[Ticket]:
    """Every valid ticket (one per peer), by its draw for the request's stage and attempt, smallest first."""
    ranked, seen = [], set()
    for t in tickets:
        if t.peer_id in seen:
            continue
        try:
            ranked.append((draw_key(t.beta(seed), req_hash, stage, attempt), t))
        except ConsensusError:
            continue  # a forged ticket never displaces the peer's real one
        seen.add(t.peer_id)
    ranked.sort(key=lambda pair: pair[0])
    return [t for _, t in ranked]


def select_committee(tickets: list[Ticket], seed: bytes, req_hash: bytes, k: int, stage: int = 0, attempt: int = 0) -> list[Ticket]:
    """The k valid tickets with the smallest draw (invalid ones never count)."""
    return rank_tickets(tickets, seed, req_hash, stage, attempt)[:k]


# ---- the task a committee executes ----


@dataclass(frozen=True)
class StageTask:
    request_hash: bytes
    stage: int
    attempt: int
    model_id: str
    first: int
    last: int
    input_hash: bytes
    k: int
    requested_at_ms: int  # when the client fixed the candidate set (records are judged at this time)
    commit_deadline_ms: int
    client_key: bytes  # the client's Ed25519 key: it signs the candidate set, and only it may execute or reveal
    session: bytes = NO_SESSION  # the client's session (32 B): with its key, the ticket seed of every query in it

    @cached_property  # derived values of a frozen task, asked for several times per message
    def seed(self) -> bytes:
        """The session's ticket seed: the same for every query, stage and attempt in it."""
        return ticket_seed(self.client_key, self.session)

    @cached_property
    def client_id(self) -> str:
        return peer_id_from_public_key(self.client_key)

    def to_wire(self) -> list[Any]:
        return [self.request_hash, self.stage, self.attempt, self.model_id, self.first, self.last, self.input_hash, self.k,
                self.requested_at_ms, self.commit_deadline_ms, self.client_key, self.session]

    @classmethod
    def from_wire(cls, raw: Any) -> StageTask:
        ok = isinstance(raw, list) and len(raw) == 12 and isinstance(raw[0], bytes) and isinstance(raw[3], str) and isinstance(raw[6], bytes)
        ok = ok and all(is_int(raw[i]) for i in (1, 2, 4, 5, 7, 8, 9)) and all(is_bin(raw[i], 32) for i in (10, 11))
        _expect(ok, "task must be [request_hash, stage, attempt, model_id, first, last, input_hash, k, requested_at, deadline, "
                    "client_key, session]")
        return cls(*raw)

    @cached_property
    def task_id(self) -> bytes:
        return h(b"p2p-infer/task/v3", msgpack.packb(self.to_wire(), use_bin_type=True))


# ---- candidates and the set the client signs ----


def covers(record: CapabilityRecord, task: StageTask) -> bool:
    return any(s.model_id == task.model_id and s.first <= task.first and task.last <= s.last for s in record.shards)


def check_candidate_record(task: StageTask, peer_id: str, envelope: bytes) -> CapabilityRecord:
    """The candidate's own signed record, valid at the request, old enough, for these layers.
    A record seen before skips its signature, schema and puzzle checks (they do not depend
    on time); its time window is checked against this task every time."""
    _expect(len(envelope) <= MAX_CANDIDATE_RECORD_BYTES, f"record of candidate {peer_id} is over {MAX_CANDIDATE_RECORD_BYTES} bytes")
    record = memo_check(RECORDS, (peer_id, envelope), lambda: _record_static(peer_id, envelope))
    try:
        check_record_times(record, task.requested_at_ms)
    except RecordError as exc:
        raise ConsensusError(f"record of candidate {peer_id}: {exc.message}") from None
    _expect(record.issued_at_ms <= task.requested_at_ms - MIN_RECORD_AGE_MS,
            f"record of candidate {peer_id} was issued less than {MIN_RECORD_AGE_MS} ms before the request")
    _expect(covers(record, task), f"record of candidate {peer_id} does not advertise layers {task.first}-{task.last} of the model")
    return record


def _record_static(peer_id: str, envelope: bytes) -> CapabilityRecord:
    try:
        return verify_record_static(envelope, expected_peer_id=peer_id)
    except RecordError as exc:
        raise ConsensusError(f"record of candidate {peer_id}: {exc.message}") from None


@dataclass(frozen=True)
class Candidate:
    ticket: Ticket
    record: bytes  # the candidate's signed capability record envelope, as the client held it

    def to_wire(self) -> list[Any]:
        return [self.ticket.to_wire(), self.record]

    @classmethod
    def from_wire(cls, raw: Any) -> Candidate:
        _expect(isinstance(raw, list) and len(raw) == 2 and isinstance(raw[1], bytes), "candidate must be [ticket, record]")
        return cls(Ticket.from_wire(raw[0]), raw[1])


@dataclass(frozen=True)
class CandidateSet:
    """The task and every candidate the client drew its committee from, signed by the client."""

    task: StageTask
    candidates: tuple[Candidate, ...]
    signature: bytes

    def body(self) -> bytes:
        return msgpack.packb([self.task.to_wire(), [c.to_wire() for c in self.candidates]], use_bin_type=True)

    @cached_property
    def id(self) -> bytes:
        """What members bind their commits to: this exact candidate set."""
        return h(b"p2p-infer/candidates/v1", self.body())

    def to_wire(self) -> list[Any]:
        return [self.task.to_wire(), [c.to_wire() for c in self.candidates], self.signature]

    @classmethod
    def from_wire(cls, raw: Any) -> CandidateSet:
        ok = isinstance(raw, list) and len(raw) == 3 and isinstance(raw[1], list) and isinstance(raw[2], bytes) and len(raw[2]) == 64
        _expect(ok, "candidate set must be [task, [candidate, ...], signature (64 B)]")
        _expect(len(raw[1]) <= MAX_CANDIDATES, f"at most {MAX_CANDIDATES} candidates per stage")
        return cls(StageTask.from_wire(raw[0]), tuple(Candidate.from_wire(c) for c in raw[1]), raw[2])

    @property
    def members(self) -> list[str]:
        return [t.peer_id for t in self.committee()]

    def committee(self) -> list[Ticket]:
        """Verify everything (once) and return the committee: the k smallest tickets."""
        return list(self._committee)

    @cached_property
    def _committee(self) -> tuple[Ticket, ...]:
        return memo_check(COMMITTEES, (self.id, self.signature), self._verify)

    def _verify(self) -> tuple[Ticket, ...]:
        task = self.task
        _expect(task.k >= MIN_K, f"committee of k={task.k} is below the minimum of {MIN_K}")
        _expect(task.requested_at_ms < task.commit_deadline_ms <= task.requested_at_ms + MAX_COMMIT_WINDOW_MS,
                f"commit deadline must fall within {MAX_COMMIT_WINDOW_MS} ms after the request")
        _expect(solves_puzzle(task.client_key), f"client {task.client_id} does not solve the identity puzzle")
        _expect(verify_signature(task.client_key, CANDIDATES_DOMAIN + self.body(), self.signature),
                "candidate set is not signed by the task's client")
        ids = [c.ticket.peer_id for c in self.candidates]
        _expect(task.k <= len(ids) <= MAX_CANDIDATES, f"{len(ids)} candidates for a committee of {task.k}")
        _expect(len(set(ids)) == len(ids), "a candidate is listed twice")
        _expect(task.client_id not in ids, "the client is listed as its own candidate")
        ranked = []
        for c in self.candidates:
            beta = c.ticket.beta(task.seed)
            check_candidate_record(task, c.ticket.peer_id, c.record)
            ranked.append((draw_key(beta, task.request_hash, task.stage, task.attempt), c.ticket))
        ranked.sort(key=lambda pair: pair[0])
        return tuple(t for _, t in ranked[: task.k])


def sign_candidates(client: Identity, task: StageTask, candidates: list[Candidate]) -> CandidateSet:
    if client.public_key != task.client_key:
        raise ConsensusError("a candidate set is signed by the task's own client")
    unsigned = CandidateSet(task, tuple(candidates), b"\0" * 64)
    return CandidateSet(task, tuple(candidates), client.sign(CANDIDATES_DOMAIN + unsigned.body()))
