"""Committee consensus for one stage: sortition, commit-reveal, quorum, certificates.

Sans-IO: plain data and functions; the peer and client adapters do the I/O. The rules
(``docs/consensus.md``, ``protocols/committee.md``):

* **Request and seeds.** ``request_hash = H(model_id, input_hash, client_nonce)``; the
  sortition seed of stage *i*, attempt *a* is ``H(request_hash, i, a)``. Each candidate
  (a provider of the stage's layers) proves ``beta = VRF(sk, seed)``; the committee is the
  k candidates with the smallest beta. Nobody can choose its beta for a given seed, and
  the seed is fixed before anyone sees a VRF output.
* **Commit.** A member computes the stage output *m*, draws a 32-byte nonce *r* and signs
  ``commitment = H(task_id, H(m), r)`` before the commit deadline.
* **Reveal.** After the commit phase closes, members reveal ``(H(m), r)`` signed, plus *m*.
  A reveal whose hash differs from the commitment is a fault; so is a missing or late
  commit and a missing reveal.
* **Quorum.** Outputs agree when ``|a - b| <= ATOL + RTOL * |b|`` elementwise. The stage
  result is accepted only if at least ``ceil(2k/3)`` members' valid reveals agree with one
  output; the certificate is their signed commits and reveals, bound to the task.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from . import vrf
from ..errors import ConsensusError, NoQuorum
from ..identity import Identity, peer_id_from_public_key, verify_signature

ATOL = 1e-4
RTOL = 1e-4
MAX_TICKETS = 64  # candidates listed per stage in a certificate (bounds a verifier's work)
COMMIT_DOMAIN = b"p2p-infer/commit/v1\n"
REVEAL_DOMAIN = b"p2p-infer/reveal/v1\n"


def h(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)  # length-prefixed: no ambiguity
    return digest.digest()


def quorum_size(k: int) -> int:
    return math.ceil(2 * k / 3)


# ---- outputs (wire tensors: {"dtype", "shape", "data"}) ----


def output_hash(tensor: dict[str, Any]) -> bytes:
    return h(b"tensor", str(tensor["dtype"]).encode(), ",".join(map(str, tensor["shape"])).encode(), tensor["data"])


def _as_array(tensor: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(tensor["data"], dtype=np.dtype(str(tensor["dtype"])).newbyteorder("<")).reshape(tensor["shape"])


def activation_digest(hidden_hash: bytes, mask_hash: bytes) -> bytes:
    """A stage's input: the hidden state and its attention mask (``b""`` when there is none)."""
    return h(b"activation", hidden_hash, mask_hash)


def outputs_agree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["dtype"] != b["dtype"] or list(a["shape"]) != list(b["shape"]):
        return False
    x, y = _as_array(a).astype(np.float64), _as_array(b).astype(np.float64)
    return bool(np.all(np.isfinite(x)) and np.all(np.abs(x - y) <= ATOL + RTOL * np.abs(y)))


# ---- requests, seeds and sortition ----


def request_hash(model_id: str, input_hash: bytes, client_nonce: bytes) -> bytes:
    return h(b"p2p-infer/request/v1", model_id.encode(), input_hash, client_nonce)


def stage_seed(req_hash: bytes, stage: int, attempt: int) -> bytes:
    return h(b"p2p-infer/sortition/v1", req_hash, stage.to_bytes(4, "big"), attempt.to_bytes(4, "big"))


@dataclass(frozen=True)
class Ticket:
    """A candidate's VRF proof over a stage seed: its lottery ticket for the committee."""

    peer_id: str
    public_key: bytes
    proof: bytes

    def beta(self, seed: bytes) -> bytes:
        """Verify the proof and return the VRF output; raises ConsensusError if invalid."""
        if peer_id_from_public_key(self.public_key) != self.peer_id:
            raise ConsensusError(f"ticket key does not match peer id {self.peer_id}")
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


def select_committee(tickets: Sequence[Ticket], seed: bytes, k: int) -> list[Ticket]:
    """The k valid tickets with the smallest VRF output (invalid ones never count)."""
    return rank_tickets(tickets, seed)[:k]


def rank_tickets(tickets: Sequence[Ticket], seed: bytes) -> list[Ticket]:
    """Every valid ticket (one per peer), by VRF output, smallest first."""
    ranked, seen = [], set()
    for t in tickets:
        if t.peer_id in seen:
            continue
        try:
            ranked.append((t.beta(seed), t))
        except ConsensusError:
            continue  # a forged ticket never displaces the peer's real one
        seen.add(t.peer_id)
    ranked.sort(key=lambda pair: pair[0])
    return [t for _, t in ranked]


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
    commit_deadline_ms: int

    @property
    def seed(self) -> bytes:
        return stage_seed(self.request_hash, self.stage, self.attempt)

    def to_wire(self) -> list[Any]:
        return [self.request_hash, self.stage, self.attempt, self.model_id, self.first, self.last, self.input_hash, self.k, self.commit_deadline_ms]

    @classmethod
    def from_wire(cls, raw: Any) -> StageTask:
        ok = isinstance(raw, list) and len(raw) == 9 and isinstance(raw[0], bytes) and isinstance(raw[3], str) and isinstance(raw[6], bytes)
        ok = ok and all(isinstance(raw[i], int) for i in (1, 2, 4, 5, 7, 8))
        _expect(ok, "task must be [request_hash, stage, attempt, model_id, first, last, input_hash, k, deadline]")
        return cls(*raw)

    @property
    def task_id(self) -> bytes:
        return h(b"p2p-infer/task/v1", msgpack.packb(self.to_wire(), use_bin_type=True))


def commitment(task_id: bytes, out_hash: bytes, nonce: bytes) -> bytes:
    return h(b"p2p-infer/commitment/v1", task_id, out_hash, nonce)


@dataclass(frozen=True)
class Commit:
    task_id: bytes
    member: str
    public_key: bytes
    commitment: bytes
    committed_at_ms: int
    signature: bytes = b""

    def body(self) -> bytes:
        return msgpack.packb([self.task_id, self.member, self.public_key, self.commitment, self.committed_at_ms], use_bin_type=True)

    def valid_signature(self) -> bool:
        return peer_id_from_public_key(self.public_key) == self.member and verify_signature(self.public_key, COMMIT_DOMAIN + self.body(), self.signature)

    def to_wire(self) -> list[Any]:
        return [self.task_id, self.member, self.public_key, self.commitment, self.committed_at_ms, self.signature]

    @classmethod
    def from_wire(cls, raw: Any) -> Commit:
        ok = isinstance(raw, list) and len(raw) == 6 and isinstance(raw[1], str) and isinstance(raw[4], int)
        ok = ok and all(isinstance(raw[i], bytes) for i in (0, 2, 3, 5)) and len(raw[2]) == 32 and len(raw[5]) == 64
        _expect(ok, "commit must be [task_id, member, public_key (32 B), commitment, committed_at_ms, signature (64 B)]")
        return cls(*raw)


@dataclass(frozen=True)
class Reveal:
    task_id: bytes
    member: str
    public_key: bytes
    output_hash: bytes
    nonce: bytes
    signature: bytes = b""

    def body(self) -> bytes:
        return msgpack.packb([self.task_id, self.member, self.public_key, self.output_hash, self.nonce], use_bin_type=True)

    def valid_signature(self) -> bool:
        return peer_id_from_public_key(self.public_key) == self.member and verify_signature(self.public_key, REVEAL_DOMAIN + self.body(), self.signature)

    def opens(self, commit: Commit) -> bool:
        return (
            commit.task_id == self.task_id
            and commit.member == self.member
            and commitment(self.task_id, self.output_hash, self.nonce) == commit.commitment
        )

    def to_wire(self) -> list[Any]:
        return [self.task_id, self.member, self.public_key, self.output_hash, self.nonce, self.signature]

    @classmethod
    def from_wire(cls, raw: Any) -> Reveal:
        ok = isinstance(raw, list) and len(raw) == 6 and isinstance(raw[1], str) and all(isinstance(raw[i], bytes) for i in (0, 2, 3, 4, 5))
        ok = ok and len(raw[2]) == 32 and len(raw[5]) == 64
        _expect(ok, "reveal must be [task_id, member, public_key (32 B), output_hash, nonce, signature (64 B)]")
        return cls(*raw)


def sign_commit(identity: Identity, task_id: bytes, commit_value: bytes, now_ms: int) -> Commit:
    unsigned = Commit(task_id, identity.peer_id, identity.public_key, commit_value, now_ms)
    return Commit(*unsigned.to_wire()[:5], signature=identity.sign(COMMIT_DOMAIN + unsigned.body()))


def sign_reveal(identity: Identity, task_id: bytes, out_hash: bytes, nonce: bytes) -> Reveal:
    unsigned = Reveal(task_id, identity.peer_id, identity.public_key, out_hash, nonce)
    return Reveal(*unsigned.to_wire()[:5], signature=identity.sign(REVEAL_DOMAIN + unsigned.body()))


# ---- the client's view of one stage round ----

FAULTS = ("missing-commit", "late-commit", "bad-commit", "missing-reveal", "bad-reveal", "wrong-output", "equivocation")


@dataclass
class StageRound:
    """Collects one committee's commits and reveals and decides the stage.

    Feed it with :meth:`on_commit` (with the time it arrived) and :meth:`on_reveal`, then
    call :meth:`decide`. Every member ends with a verdict: ``agree`` or one of FAULTS.
    """

    task: StageTask
    committee: list[Ticket]
    tickets: list[Ticket] = field(default_factory=list)  # every candidate's ticket, for the certificate
    commits: dict[str, Commit] = field(default_factory=dict)
    reveals: dict[str, tuple[Reveal, dict[str, Any]]] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)
    bad_reveals: dict[str, Reveal] = field(default_factory=dict)

    @property
    def members(self) -> list[str]:
        return [t.peer_id for t in self.committee]

    def on_commit(self, commit: Commit, received_at_ms: int) -> None:
        member = commit.member
        if member not in self.members or not commit.valid_signature():
            return  # unsigned words blame no one
        if commit.task_id != self.task.task_id:
            self.faults.setdefault(member, "bad-commit")
            return
        if received_at_ms > self.task.commit_deadline_ms or commit.committed_at_ms > self.task.commit_deadline_ms:
            self.faults.setdefault(member, "late-commit")
            return
        known = self.commits.get(member)
        if known is not None and known.commitment != commit.commitment:
            self.faults[member] = "equivocation"
            return
        self.commits[member] = commit

    def on_reveal(self, reveal: Reveal, output: dict[str, Any]) -> None:
        member = reveal.member
        commit = self.commits.get(member)
        if commit is None or member in self.faults or member in self.reveals:
            return  # no valid, timely commit (or already revealed): this reveal cannot count
        if not reveal.valid_signature():
            return  # unsigned words blame no one
        if not reveal.valid_signature() or not reveal.opens(commit) or output_hash(output) != reveal.output_hash:
            self.faults[member] = "bad-reveal"
            if reveal.valid_signature() and reveal.member == member:
                self.bad_reveals[member] = reveal  # signed proof of the fault
            return
        self.reveals[member] = (reveal, output)

    def decide(self) -> StageDecision:
        """Close the round: agreeing group of size >= quorum, or NoQuorum with what disagreed."""
        for member in self.members:
            if member not in self.faults:
                if member not in self.commits:
                    self.faults[member] = "missing-commit"
                elif member not in self.reveals:
                    self.faults[member] = "missing-reveal"
        valid = [m for m in self.members if m in self.reveals and m not in self.faults]
        best: list[str] = []
        for anchor in valid:  # members in VRF rank order: ties go to the better-ranked anchor
            group = [anchor] + [m for m in valid if m != anchor and outputs_agree(self.reveals[m][1], self.reveals[anchor][1])]
            if len(group) > len(best):
                best = group  # best[0] is the anchor: its output is the one every member agrees with
        need = quorum_size(self.task.k)
        if len(best) < need:
            detail = {m: self.faults.get(m, "disagrees") for m in self.members}
            raise NoQuorum(f"stage {self.task.stage} (layers {self.task.first}-{self.task.last}): {len(best)} of {self.task.k} agree, {need} needed; {detail}")
        for m in valid:
            if m not in best:
                self.faults[m] = "wrong-output"
        accepted = self.reveals[best[0]][1]
        cert = StageCertificate(
            task=self.task,
            tickets=list(self.tickets or self.committee),
            commits=[self.commits[m] for m in best],
            reveals=[self.reveals[m][0] for m in best],
            outputs=[self.reveals[m][1] for m in best],
        )
        verdicts = {m: self.faults.get(m, "agree") for m in self.members}
        return StageDecision(output=accepted, certificate=cert, verdicts=verdicts)


@dataclass
class StageDecision:
    output: dict[str, Any]
    certificate: StageCertificate
    verdicts: dict[str, str]  # member -> "agree" or a fault


@dataclass
class StageCertificate:
    task: StageTask
    tickets: list[Ticket]
    commits: list[Commit]
    reveals: list[Reveal]
    outputs: list[dict[str, Any]]

    @property
    def output_hash(self) -> bytes:
        return output_hash(self.outputs[0])

    def to_wire(self) -> dict[str, Any]:
        return {
            "task": self.task.to_wire(),
            "tickets": [t.to_wire() for t in self.tickets],
            "commits": [c.to_wire() for c in self.commits],
            "reveals": [r.to_wire() for r in self.reveals],
            "outputs": self.outputs,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> StageCertificate:
        _expect(isinstance(raw, dict) and {"task", "tickets", "commits", "reveals", "outputs"} <= set(raw), "stage certificate fields missing")
        outputs = raw["outputs"]
        _expect(isinstance(outputs, list) and all(isinstance(o, dict) and {"dtype", "shape", "data"} == set(o) for o in outputs), "outputs must be tensors")
        _expect(isinstance(raw["tickets"], list) and len(raw["tickets"]) <= MAX_TICKETS, f"at most {MAX_TICKETS} tickets per stage")
        return cls(
            task=StageTask.from_wire(raw["task"]),
            tickets=[Ticket.from_wire(t) for t in raw["tickets"]],
            commits=[Commit.from_wire(c) for c in raw["commits"]],
            reveals=[Reveal.from_wire(r) for r in raw["reveals"]],
            outputs=outputs,
        )

    def verify(self) -> None:
        """Check everything a third party can check offline; raise ConsensusError saying what failed."""
        task, seed = self.task, self.task.seed
        _expect(len({t.peer_id for t in self.tickets}) == len(self.tickets), "a candidate is listed twice")
        ranked = rank_tickets(self.tickets, seed)  # each VRF proof checked once
        _expect(len(ranked) == len(self.tickets), f"stage {task.stage}: a listed candidate's VRF ticket is invalid")
        committee = {t.peer_id for t in ranked[: task.k]}
        _expect(len(committee) == task.k, f"stage {task.stage}: {len(committee)} valid tickets for a committee of {task.k}")
        _expect(len(self.commits) == len(self.reveals) == len(self.outputs), "commits, reveals and outputs must pair up")
        _expect(len(self.commits) >= quorum_size(task.k), f"stage {task.stage}: {len(self.commits)} agreeing members, quorum is {quorum_size(task.k)}")
        _expect(len({c.member for c in self.commits}) == len(self.commits), "a member is counted twice")
        for commit, reveal, output in zip(self.commits, self.reveals, self.outputs):
            _expect(commit.member in committee, f"{commit.member} is not on the committee the VRF tickets select")
            _expect(commit.task_id == task.task_id, f"commit of {commit.member} is for another task")
            _expect(commit.valid_signature(), f"bad commit signature from {commit.member}")
            _expect(commit.committed_at_ms <= task.commit_deadline_ms, f"commit of {commit.member} is after the deadline")
            _expect(reveal.valid_signature(), f"bad reveal signature from {reveal.member}")
            _expect(reveal.opens(commit), f"reveal of {reveal.member} does not open its commitment")
            _expect(output_hash(output) == reveal.output_hash, f"output of {reveal.member} does not match its reveal")
            _expect(outputs_agree(output, self.outputs[0]), f"output of {reveal.member} disagrees with the accepted output")


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise ConsensusError(reason)


# ---- whole-request certificate ----

CERT_VERSION = 1


@dataclass
class Certificate:
    model_id: str
    client_nonce: bytes
    input_hash: bytes  # activation digest of what the client sent to the first stage
    mask_hash: bytes  # output_hash of the attention mask every stage received (b"" if none)
    stages: list[StageCertificate]

    @property
    def request_hash(self) -> bytes:
        return request_hash(self.model_id, self.input_hash, self.client_nonce)

    @property
    def output_hash(self) -> bytes:
        return self.stages[-1].output_hash

    def encode(self) -> bytes:
        return msgpack.packb(
            {"version": CERT_VERSION, "model_id": self.model_id, "client_nonce": self.client_nonce,
             "input_hash": self.input_hash, "mask_hash": self.mask_hash, "stages": [s.to_wire() for s in self.stages]},
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        try:
            raw = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            raise ConsensusError(f"certificate is not msgpack: {exc}") from None
        _expect(isinstance(raw, dict) and raw.get("version") == CERT_VERSION, "unknown certificate version")
        header_ok = isinstance(raw.get("model_id"), str) and all(isinstance(raw.get(k), bytes) for k in ("client_nonce", "input_hash", "mask_hash"))
        _expect(header_ok, "certificate header fields missing")
        _expect(isinstance(raw.get("stages"), list) and raw["stages"], "certificate has no stages")
        return cls(raw["model_id"], raw["client_nonce"], raw["input_hash"], raw["mask_hash"], [StageCertificate.from_wire(s) for s in raw["stages"]])

    def verify(self, known_layers: Callable[[str], int] | None = None) -> list[str]:
        """Verify every stage and the chain between them; return one line per stage."""
        lines = []
        expected_input, expected_first = self.input_hash, None
        for i, stage in enumerate(self.stages):
            task = stage.task
            _expect(task.request_hash == self.request_hash, f"stage {i} is bound to another request")
            _expect(task.model_id == self.model_id, f"stage {i} is for another model")
            _expect(task.stage == i, f"stage {i} claims index {task.stage}")
            _expect(task.input_hash == expected_input, f"stage {i} input is not the previous stage's accepted output")
            _expect(expected_first is None or task.first == expected_first, f"stage {i} does not start where stage {i - 1} ended")
            stage.verify()
            lines.append(f"stage {i}: layers {task.first}-{task.last}, {len(stage.commits)}/{task.k} agree (attempt {task.attempt})")
            expected_input, expected_first = activation_digest(stage.output_hash, self.mask_hash), task.last + 1
        if known_layers is not None:
            _expect(self.stages[-1].task.last == known_layers(self.model_id) - 1, "certificate does not cover the model's last layer")
        return lines


# ---- fault evidence anyone can check ----


@dataclass
class Evidence:
    """Signed data proving a member misbehaved, checkable by any peer without trust.

    * ``equivocation``: two commits by the member for one task with different commitments.
    * ``bad-reveal``: the member's commit and a reveal it signed that does not open it.
    * ``wrong-output``: the member's commit and reveal (opening it) of an output that
      disagrees with the output a quorum certificate for the same task accepted.
    """

    kind: str
    member: str
    commits: list[Commit]
    reveal: Reveal | None = None
    output: dict[str, Any] | None = None
    stage: StageCertificate | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "member": self.member,
            "commits": [c.to_wire() for c in self.commits],
            "reveal": None if self.reveal is None else self.reveal.to_wire(),
            "output": self.output,
            "stage": None if self.stage is None else self.stage.to_wire(),
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Evidence:
        _expect(isinstance(raw, dict) and raw.get("kind") in ("equivocation", "bad-reveal", "wrong-output"), "unknown evidence kind")
        return cls(
            kind=raw["kind"],
            member=str(raw.get("member")),
            commits=[Commit.from_wire(c) for c in raw.get("commits") or []],
            reveal=None if raw.get("reveal") is None else Reveal.from_wire(raw["reveal"]),
            output=raw.get("output"),
            stage=None if raw.get("stage") is None else StageCertificate.from_wire(raw["stage"]),
        )

    def verify(self) -> None:
        _expect(bool(self.commits) and all(c.member == self.member and c.valid_signature() for c in self.commits), "evidence commits are not the member's")
        if self.kind == "equivocation":
            a, b = self.commits[:2] if len(self.commits) >= 2 else (self.commits[0], self.commits[0])
            _expect(a.task_id == b.task_id and a.commitment != b.commitment, "no two conflicting commits for one task")
            return
        commit, reveal = self.commits[0], self.reveal
        _expect(reveal is not None and reveal.member == self.member and reveal.valid_signature(), "evidence needs the member's signed reveal")
        assert reveal is not None
        if self.kind == "bad-reveal":
            _expect(reveal.task_id == commit.task_id and not reveal.opens(commit), "the reveal opens the commitment")
            return
        _expect(reveal.opens(commit), "the reveal does not open the commitment")
        _expect(self.output is not None and output_hash(self.output) == reveal.output_hash, "evidence output does not match the reveal")
        _expect(self.stage is not None, "wrong-output evidence needs the stage certificate")
        assert self.stage is not None and self.output is not None
        _expect(self.stage.task.task_id == commit.task_id, "certificate is for another task")
        self.stage.verify()
        _expect(not outputs_agree(self.output, self.stage.outputs[0]), "the member's output agrees with the quorum")
