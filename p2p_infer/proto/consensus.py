"""Committee consensus for one stage: commit-reveal, quorum, certificates, evidence.

Sans-IO: plain data and functions; the peer and client adapters do the I/O. Who may sit on
a committee (tasks, tickets, the client's signed candidate set) is :mod:`sortition`'s; the
rules here (``docs/consensus.md``, ``protocols/committee.md``):

* **Commit.** A member computes the stage output *m*, draws a 32-byte nonce *r* and signs
  ``commitment = H(task_id, H(m), r)`` with the id of the candidate set it was selected
  under, before the commit deadline.
* **Reveal.** After the commit phase closes, members reveal ``(H(m), r)`` signed, plus *m*.
  A reveal whose hash differs from the commitment is a fault; so is a missing or late
  commit and a missing reveal.
* **Quorum.** Outputs agree when ``|a - b| <= ATOL + RTOL * |b|`` elementwise. The stage
  result is accepted only if at least ``ceil(2k/3)`` members' valid reveals agree with one
  output; the certificate is their signed commits and reveals, bound to the candidate set.
* **Evidence** counts only against a member its candidate set selects, and wrong-output
  evidence only with a stage certificate that is itself valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, Callable

import msgpack
import numpy as np

from ..errors import BadTensor, ConsensusError, NoQuorum
from ..identity import Identity, peer_id_from_public_key, verify_signature
from .sortition import (
    MAX_CANDIDATES,
    MIN_K,
    Candidate,
    Memo,
    CandidateSet,
    StageTask,
    Ticket,
    _expect,
    h,
    make_ticket,
    rank_tickets,
    request_hash,
    select_committee,
    draw_key,
    sign_candidates,
    ticket_seed,
)
from .tensors import check_wire_tensor
from .wire import is_bin, is_int

__all__ = [
    "ATOL", "CERT_VERSION", "Candidate", "CandidateSet", "Certificate", "Commit", "ConsensusError", "Evidence", "MAX_CANDIDATES",
    "MIN_K", "NOT_ASKED", "NoQuorum", "RTOL", "Reveal", "StageCertificate", "StageDecision", "StageRound", "StageTask", "Ticket",
    "activation_digest", "activation_file", "commitment", "h", "make_ticket", "output_hash", "outputs_agree", "quorum_size",
    "rank_tickets", "read_activation_file", "request_hash", "select_committee", "sign_candidates", "sign_commit", "sign_reveal",
    "draw_key", "ticket_seed",
]

ATOL = 1e-4
RTOL = 1e-4
COMMIT_DOMAIN = b"p2p-infer/commit/v2\n"
REVEAL_DOMAIN = b"p2p-infer/reveal/v1\n"


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


def mask_hash_of(mask: dict[str, Any] | None) -> bytes:
    """The tensor hash of an attention mask, ``b""`` when there is none."""
    return b"" if mask is None else output_hash(mask)


def activation_hash(hidden: dict[str, Any], mask: dict[str, Any] | None) -> bytes:
    """What a stage task (or a forward commitment) binds as its input: the hidden state and its mask, as sent."""
    return activation_digest(output_hash(hidden), mask_hash_of(mask))


def outputs_agree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["dtype"] != b["dtype"] or list(a["shape"]) != list(b["shape"]):
        return False
    if a["data"] == b["data"]:  # the common case (same software): equal bytes agree if finite
        return bool(np.all(np.isfinite(_as_array(a))))
    x, y = _as_array(a).astype(np.float64), _as_array(b).astype(np.float64)
    return bool(np.all(np.isfinite(x)) and np.all(np.abs(x - y) <= ATOL + RTOL * np.abs(y)))


def _tensor(raw: Any, what: str) -> dict[str, Any]:
    """A checked wire tensor in its one canonical form (so an encoding round-trips byte for byte)."""
    try:
        t = check_wire_tensor(raw, field=what)
    except BadTensor as exc:
        raise ConsensusError(exc.message) from None
    return {"dtype": t["dtype"], "shape": list(t["shape"]), "data": t["data"]}


# ---- commit and reveal ----


def commitment(task_id: bytes, out_hash: bytes, nonce: bytes) -> bytes:
    return h(b"p2p-infer/commitment/v1", task_id, out_hash, nonce)


SIGNATURES = Memo()  # (member, key, signed bytes, signature) -> "valid" / "invalid": a commit is met 3-4 times per process


def _signed(member: str, public_key: bytes, message: bytes, signature: bytes) -> bool:
    """The member's key (its peer id embeds it) signed ``message``: checked once per process."""
    key = (member, public_key, message, signature)
    known = SIGNATURES.get(key)
    if known is None:
        known = "valid" if peer_id_from_public_key(public_key) == member and verify_signature(public_key, message, signature) else "invalid"
        SIGNATURES.put(key, known)
    return known == "valid"


@dataclass(frozen=True)
class Commit:
    task_id: bytes
    candidates_id: bytes  # the candidate set the member was selected under (CandidateSet.id)
    member: str
    public_key: bytes
    commitment: bytes
    committed_at_ms: int
    signature: bytes = b""

    def body(self) -> bytes:
        return msgpack.packb([self.task_id, self.candidates_id, self.member, self.public_key, self.commitment, self.committed_at_ms],
                             use_bin_type=True)

    def valid_signature(self) -> bool:
        return _signed(self.member, self.public_key, COMMIT_DOMAIN + self.body(), self.signature)

    def to_wire(self) -> list[Any]:
        return [self.task_id, self.candidates_id, self.member, self.public_key, self.commitment, self.committed_at_ms, self.signature]

    @classmethod
    def from_wire(cls, raw: Any) -> Commit:
        ok = isinstance(raw, list) and len(raw) == 7 and isinstance(raw[2], str) and is_int(raw[5])
        ok = ok and all(is_bin(raw[i], 32) for i in (0, 1, 3, 4)) and is_bin(raw[6], 64)
        _expect(ok, "commit must be [task_id (32 B), candidates_id (32 B), member, public_key (32 B), commitment (32 B), "
                    "committed_at_ms, signature (64 B)]")
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
        return _signed(self.member, self.public_key, REVEAL_DOMAIN + self.body(), self.signature)

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
        ok = isinstance(raw, list) and len(raw) == 6 and isinstance(raw[1], str)
        ok = ok and all(is_bin(raw[i], 32) for i in (0, 2, 3, 4)) and is_bin(raw[5], 64)
        _expect(ok, "reveal must be [task_id, member, public_key, output_hash, nonce (32 B each), signature (64 B)]")
        return cls(*raw)


def sign_commit(identity: Identity, task_id: bytes, candidates_id: bytes, commit_value: bytes, now_ms: int) -> Commit:
    unsigned = Commit(task_id, candidates_id, identity.peer_id, identity.public_key, commit_value, now_ms)
    return Commit(*unsigned.to_wire()[:6], signature=identity.sign(COMMIT_DOMAIN + unsigned.body()))


def sign_reveal(identity: Identity, task_id: bytes, out_hash: bytes, nonce: bytes) -> Reveal:
    unsigned = Reveal(task_id, identity.peer_id, identity.public_key, out_hash, nonce)
    return Reveal(*unsigned.to_wire()[:5], signature=identity.sign(REVEAL_DOMAIN + unsigned.body()))


# ---- the client's view of one stage round ----

FAULTS = ("missing-commit", "late-commit", "bad-commit", "missing-reveal", "bad-reveal", "wrong-output", "equivocation")
NOT_ASKED = "not-asked"  # a member held back (quorum first) whose round ended before it was sent the task


@dataclass
class StageRound:
    """Collects one committee's commits and reveals and decides the stage.

    Feed it with :meth:`on_commit` (with the time it arrived) and :meth:`on_reveal`, then
    call :meth:`decide`. Every member ends with a verdict: ``agree`` or one of FAULTS.
    ``committee`` is the candidate set's k smallest tickets, as the client ranked them.
    """

    candidates: CandidateSet
    committee: list[Ticket]
    commits: dict[str, Commit] = field(default_factory=dict)
    reveals: dict[str, tuple[Reveal, dict[str, Any]]] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)
    bad_reveals: dict[str, Reveal] = field(default_factory=dict)
    excused: set[str] = field(default_factory=set)  # never sent the task: judged NOT_ASKED, not at fault

    @property
    def task(self) -> StageTask:
        return self.candidates.task

    def excuse(self, members: Iterable[str]) -> None:
        self.excused.update(m for m in members if m in self.members)

    def largest_agreement(self) -> int:
        """How many valid reveals agree on one output, so far."""
        return len(self._best_group())

    @property
    def members(self) -> list[str]:
        return [t.peer_id for t in self.committee]

    def on_commit(self, commit: Commit, received_at_ms: int) -> None:
        member = commit.member
        if member not in self.members or not commit.valid_signature():
            return  # unsigned words blame no one
        if commit.task_id != self.task.task_id or commit.candidates_id != self.candidates.id:
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
        if not reveal.opens(commit) or output_hash(output) != reveal.output_hash:
            self.faults[member] = "bad-reveal"
            self.bad_reveals[member] = reveal  # signed proof of the fault
            return
        self.reveals[member] = (reveal, output)

    def decide(self) -> StageDecision:
        """Close the round: agreeing group of size >= quorum, or NoQuorum with what disagreed."""
        self._close_faults()
        decision = self.quorum()
        if decision is None:
            best = self._best_group()
            need = quorum_size(self.task.k)
            detail = {m: self.faults.get(m, "disagrees") for m in self.members}
            raise NoQuorum(f"stage {self.task.stage} (layers {self.task.first}-{self.task.last}): {len(best)} of {self.task.k} agree, {need} needed; {detail}")
        return self.judge_rest(decision)

    def quorum(self) -> StageDecision | None:
        """The decision as soon as a quorum of valid reveals agrees, before every member has
        answered (members not yet judged are ``pending``): since a quorum is more than half
        of k, no other output can reach one. :meth:`judge_rest` judges the rest later."""
        best = self._best_group()
        if len(best) < quorum_size(self.task.k):
            return None
        cert = StageCertificate(
            candidates=self.candidates,
            commits=[self.commits[m] for m in best],
            reveals=[self.reveals[m][0] for m in best],
            outputs=[self.reveals[m][1] for m in best],
        )
        verdicts = {m: "agree" if m in best else self.faults.get(m, "pending") for m in self.members}
        return StageDecision(output=self.reveals[best[0]][1], certificate=cert, verdicts=verdicts)

    def judge_rest(self, decision: StageDecision) -> StageDecision:
        """Once every member answered or the deadline passed: the verdict of each member the
        decision's certificate does not hold, against the output already accepted (filled in
        ``decision.verdicts`` in place, so reports that hold it see the final verdicts)."""
        self._close_faults()
        quorum = {c.member for c in decision.certificate.commits}
        for m in self.members:  # every member not faulted (or excused) by now has a valid reveal
            if m not in quorum and m not in self.faults and m not in self.excused and not outputs_agree(self.reveals[m][1], decision.output):
                self.faults[m] = "wrong-output"
        decision.verdicts.update({m: self.faults.get(m, NOT_ASKED if m in self.excused else "agree") for m in self.members})
        return decision

    def _close_faults(self) -> None:
        for member in self.members:
            if member not in self.faults and member not in self.excused:
                if member not in self.commits:
                    self.faults[member] = "missing-commit"
                elif member not in self.reveals:
                    self.faults[member] = "missing-reveal"

    def _best_group(self) -> list[str]:
        valid = [m for m in self.members if m in self.reveals and m not in self.faults]
        best: list[str] = []
        for anchor in valid:  # members in VRF rank order: ties go to the better-ranked anchor
            group = [anchor] + [m for m in valid if m != anchor and outputs_agree(self.reveals[m][1], self.reveals[anchor][1])]
            if len(group) > len(best):
                best = group  # best[0] is the anchor: its output is the one every member agrees with
        return best


@dataclass
class StageDecision:
    output: dict[str, Any]
    certificate: StageCertificate
    verdicts: dict[str, str]  # member -> "agree" or a fault


STAGE_FIELDS = ("candidates", "commits", "reveals", "outputs")


@dataclass
class StageCertificate:
    candidates: CandidateSet  # the task, every candidate's ticket and record, signed by the client
    commits: list[Commit]
    reveals: list[Reveal]
    outputs: list[dict[str, Any]]

    @property
    def task(self) -> StageTask:
        return self.candidates.task

    @property
    def output_hash(self) -> bytes:
        return output_hash(self.outputs[0])

    def to_wire(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates.to_wire(),
            "commits": [c.to_wire() for c in self.commits],
            "reveals": [r.to_wire() for r in self.reveals],
            "outputs": [_tensor(o, "output") for o in self.outputs],
        }

    @classmethod
    def from_wire(cls, raw: Any) -> StageCertificate:
        _expect(isinstance(raw, dict) and set(raw) == set(STAGE_FIELDS), f"a stage certificate has exactly {', '.join(STAGE_FIELDS)}")
        _expect(all(isinstance(raw[k], list) for k in STAGE_FIELDS[1:]), "commits, reveals and outputs must be lists")
        return cls(
            candidates=CandidateSet.from_wire(raw["candidates"]),
            commits=[Commit.from_wire(c) for c in raw["commits"]],
            reveals=[Reveal.from_wire(r) for r in raw["reveals"]],
            outputs=[_tensor(o, "output") for o in raw["outputs"]],
        )

    def verify(self) -> None:
        """Check everything a third party can check offline; raise ConsensusError saying what failed."""
        task = self.task
        committee = set(self.candidates.members)  # signature, k, puzzle, tickets, records: sortition.py
        _expect(bool(self.outputs) and len(self.commits) == len(self.reveals) == len(self.outputs), "commits, reveals and outputs must pair up")
        _expect(len(self.commits) >= quorum_size(task.k), f"stage {task.stage}: {len(self.commits)} agreeing members, quorum is {quorum_size(task.k)}")
        _expect(len({c.member for c in self.commits}) == len(self.commits), "a member is counted twice")
        for commit, reveal, output in zip(self.commits, self.reveals, self.outputs):
            _expect(commit.member in committee, f"{commit.member} is not on the committee the candidate set selects")
            _expect(commit.task_id == task.task_id, f"commit of {commit.member} is for another task")
            _expect(commit.candidates_id == self.candidates.id, f"commit of {commit.member} is under another candidate set")
            _expect(commit.valid_signature(), f"bad commit signature from {commit.member}")
            _expect(commit.committed_at_ms <= task.commit_deadline_ms, f"commit of {commit.member} is after the deadline")
            _expect(reveal.valid_signature(), f"bad reveal signature from {reveal.member}")
            _expect(reveal.opens(commit), f"reveal of {reveal.member} does not open its commitment")
            _expect(output_hash(output) == reveal.output_hash, f"output of {reveal.member} does not match its reveal")
            _expect(outputs_agree(output, self.outputs[0]), f"output of {reveal.member} disagrees with the accepted output")


# ---- whole-request certificate ----

CERT_VERSION = 2
HEADER_FIELDS = ("version", "model_id", "client_key", "client_nonce", "hidden_hash", "mask_hash", "stages")


@dataclass
class Certificate:
    """Every header field is in ``request_hash``, which every task (and so every signature
    in the certificate) binds; the encoding is canonical, so no byte can change unnoticed."""

    model_id: str
    client_key: bytes  # the client's Ed25519 key: it signed every stage's candidate set
    client_nonce: bytes
    hidden_hash: bytes  # tensor hash of the hidden state the client sent to the first stage
    mask_hash: bytes  # tensor hash of the attention mask every stage received (b"" if none)
    stages: list[StageCertificate]

    @property
    def request_hash(self) -> bytes:
        return request_hash(self.model_id, self.hidden_hash, self.mask_hash, self.client_nonce, self.client_key)

    @property
    def input_hash(self) -> bytes:
        return activation_digest(self.hidden_hash, self.mask_hash)

    @property
    def output_hash(self) -> bytes:
        return self.stages[-1].output_hash

    def encode(self) -> bytes:
        return msgpack.packb(
            {"version": CERT_VERSION, "model_id": self.model_id, "client_key": self.client_key, "client_nonce": self.client_nonce,
             "hidden_hash": self.hidden_hash, "mask_hash": self.mask_hash, "stages": [s.to_wire() for s in self.stages]},
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        try:
            raw = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            raise ConsensusError(f"certificate is not msgpack: {exc}") from None
        _expect(isinstance(raw, dict) and raw.get("version") == CERT_VERSION, f"unknown certificate version (this reader knows {CERT_VERSION})")
        _expect(set(raw) == set(HEADER_FIELDS), f"a certificate has exactly {', '.join(HEADER_FIELDS)}")
        ok = isinstance(raw["model_id"], str) and all(isinstance(raw[k], bytes) for k in HEADER_FIELDS[2:6])
        ok = ok and len(raw["client_key"]) == 32 and len(raw["client_nonce"]) == 32 and len(raw["hidden_hash"]) == 32
        _expect(ok and len(raw["mask_hash"]) in (0, 32), "certificate header fields missing or malformed")
        _expect(isinstance(raw["stages"], list) and raw["stages"], "certificate has no stages")
        cert = cls(raw["model_id"], raw["client_key"], raw["client_nonce"], raw["hidden_hash"], raw["mask_hash"],
                   [StageCertificate.from_wire(s) for s in raw["stages"]])
        _expect(cert.encode() == data, "certificate is not in its canonical encoding")  # no byte is outside what is checked
        return cert

    def verify(self, known_layers: Callable[[str], int] | None = None) -> list[str]:
        """Verify every stage and the chain between them; return one line per stage."""
        lines = []
        expected_input, expected_first = self.input_hash, None
        for i, stage in enumerate(self.stages):
            task = stage.task
            _expect(task.request_hash == self.request_hash, f"stage {i} is bound to another request")
            _expect(task.client_key == self.client_key, f"stage {i} is another client's task")
            _expect(task.model_id == self.model_id, f"stage {i} is for another model")
            _expect(task.stage == i, f"stage {i} claims index {task.stage}")
            _expect(task.input_hash == expected_input, f"stage {i} input is not the previous stage's accepted output")
            _expect(expected_first is None or task.first == expected_first, f"stage {i} does not start where stage {i - 1} ended")
            stage.verify()
            lines.append(f"stage {i}: layers {task.first}-{task.last}, {len(stage.commits)}/{task.k} agree of "
                         f"{len(stage.candidates.candidates)} candidates (attempt {task.attempt})")
            expected_input, expected_first = activation_digest(stage.output_hash, self.mask_hash), task.last + 1
        if known_layers is not None:
            _expect(self.stages[-1].task.last == known_layers(self.model_id) - 1, "certificate does not cover the model's last layer")
        return lines

    def check_output(self, hidden: dict[str, Any], mask: dict[str, Any] | None) -> None:
        """``hidden`` and its mask (the input's, carried through every stage; none when the input
        had none) are exactly the output this certificate accepted."""
        _expect(output_hash(hidden) == self.output_hash, "the output is not the one the certificate accepted")
        _expect(mask_hash_of(mask) == self.mask_hash, "the output's mask is not the certificate's")

    def check_input(self, hidden: dict[str, Any], mask: dict[str, Any] | None) -> None:
        """``hidden`` and ``mask`` are exactly what the client sent the first stage."""
        _expect(output_hash(hidden) == self.hidden_hash, "the input is not the one the certificate's client sent")
        _expect(mask_hash_of(mask) == self.mask_hash, "the input's mask is not the certificate's")


ACTIVATION_FILE_VERSION = 1


def activation_file(hidden: dict[str, Any], mask: dict[str, Any] | None) -> bytes:
    """A saved activation (``--save-output``, ``--save-input``): what ``verify`` checks a certificate against."""
    return msgpack.packb({"version": ACTIVATION_FILE_VERSION, "hidden": _tensor(hidden, "hidden"),
                          "mask": None if mask is None else _tensor(mask, "mask")}, use_bin_type=True)


def read_activation_file(data: bytes) -> tuple[dict[str, Any], dict[str, Any] | None]:
    try:
        raw = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise ConsensusError(f"activation file is not msgpack: {exc}") from None
    _expect(isinstance(raw, dict) and raw.get("version") == ACTIVATION_FILE_VERSION and "hidden" in raw, "not an activation file")
    return _tensor(raw["hidden"], "hidden"), None if raw.get("mask") is None else _tensor(raw["mask"], "mask")


# ---- fault evidence anyone can check ----

EVIDENCE_KINDS = ("equivocation", "bad-reveal", "wrong-output")


@dataclass
class Evidence:
    """Signed data proving a member misbehaved, checkable by any peer without trust.

    Always: the member is on the committee its (valid) candidate set selects, and its
    commits are for that task, the first under that very set.

    * ``equivocation``: two commits by the member for one task with different commitments.
    * ``bad-reveal``: the member's commit and a reveal it signed that does not open it.
    * ``wrong-output``: the member's commit and reveal (opening it) of an output that
      disagrees with the output a valid stage certificate for the same task accepted; the
      certificate's candidate set is the one the member was selected under.
    """

    kind: str
    member: str
    commits: list[Commit]
    reveal: Reveal | None = None
    output: dict[str, Any] | None = None
    stage: StageCertificate | None = None
    candidates: CandidateSet | None = None  # equivocation and bad-reveal (wrong-output: the stage's)

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "member": self.member,
            "commits": [c.to_wire() for c in self.commits],
            "reveal": None if self.reveal is None else self.reveal.to_wire(),
            "output": self.output,
            "stage": None if self.stage is None else self.stage.to_wire(),
            "candidates": None if self.candidates is None else self.candidates.to_wire(),
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Evidence:
        _expect(isinstance(raw, dict) and raw.get("kind") in EVIDENCE_KINDS, "unknown evidence kind")
        _expect(isinstance(raw.get("commits"), list) and len(raw["commits"]) <= 2, "evidence holds one or two commits")
        _expect(isinstance(raw.get("member"), str), "evidence names the accused member (a peer id)")
        return cls(
            kind=raw["kind"],
            member=raw["member"],
            commits=[Commit.from_wire(c) for c in raw["commits"]],
            reveal=None if raw.get("reveal") is None else Reveal.from_wire(raw["reveal"]),
            output=None if raw.get("output") is None else _tensor(raw["output"], "output"),
            stage=None if raw.get("stage") is None else StageCertificate.from_wire(raw["stage"]),
            candidates=None if raw.get("candidates") is None else CandidateSet.from_wire(raw["candidates"]),
        )

    @property
    def selection(self) -> CandidateSet | None:
        """The candidate set the accused was selected under."""
        return self.stage.candidates if self.kind == "wrong-output" and self.stage is not None else self.candidates

    def verify(self) -> None:
        selection = self.selection
        _expect(selection is not None, "evidence needs the candidate set the member was selected under")
        assert selection is not None
        _expect(self.member in selection.members, f"{self.member} is not on the committee its candidate set selects")
        task_id = selection.task.task_id
        _expect(bool(self.commits) and all(c.member == self.member and c.valid_signature() and c.task_id == task_id for c in self.commits),
                "evidence commits are not the member's signed commits for the task")
        _expect(self.commits[0].candidates_id == selection.id, "the member's commit is under another candidate set")
        if self.kind == "equivocation":
            _expect(len(self.commits) == 2 and self.commits[0].commitment != self.commits[1].commitment, "no two conflicting commits for one task")
            return
        commit, reveal = self.commits[0], self.reveal
        _expect(reveal is not None and reveal.member == self.member and reveal.task_id == task_id and reveal.valid_signature(),
                "evidence needs the member's signed reveal for the task")
        assert reveal is not None
        if self.kind == "bad-reveal":
            _expect(not reveal.opens(commit), "the reveal opens the commitment")
            return
        self._verify_wrong_output(commit, reveal)

    def _verify_wrong_output(self, commit: Commit, reveal: Reveal) -> None:
        _expect(self.stage is not None, "wrong-output evidence carries no stage certificate")
        _expect(reveal.opens(commit), "the reveal does not open the commitment")
        _expect(self.output is not None and output_hash(self.output) == reveal.output_hash, "evidence output does not match the reveal")
        assert self.stage is not None and self.output is not None  # for the type checker: both checked above
        self.stage.verify()  # the quorum it contradicts must itself be valid under every rule
        _expect(not outputs_agree(self.output, self.stage.outputs[0]), "the member's output agrees with the quorum")
        _expect(self.member not in {c.member for c in self.stage.commits}, "the accused is in the quorum it contradicts")
