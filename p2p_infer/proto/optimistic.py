"""Optimistic mode: one executor per stage, a signed commitment, and a re-execution by
another provider with probability p, decided after the answer. Sans-IO.

What it means (docs/consensus.md, "Optimistic mode"): the answer is returned *before* its
check. Each executor signs a :class:`ForwardCommitment` over what it returned (model id,
layer range, input digest, output digest, task id, client nonce), so it is bound to it.
Once the answer is back, :class:`OptimisticCheck` draws, per stage, with probability p (the
client's rng, drawn only then, so an executor cannot know whether it will be checked) a
re-execution of the same input by another provider. Agreement (``consensus.outputs_agree``)
closes the stage; a mismatch is settled by a third provider, and whoever the two others
agree against gets :class:`OptimisticEvidence`: its signed commitment and output against
the two agreeing signed re-executions, which anyone can check offline.

A lie is accepted with the probability that it is not checked: a peer that lies on a
share q of its tasks is caught within n tasks with probability
:func:`detection_probability` = 1 - (1 - p*q)^n.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from ..errors import BadCommitment, ConsensusError
from ..identity import Identity, peer_id_from_public_key, verify_signature
from .consensus import activation_hash, output_hash, outputs_agree
from .sortition import h
from .tensors import WireTensor, check_wire_tensor

COMMITMENT_DOMAIN = b"p2p-infer/forward-commitment/v1\n"
TASK_BYTES = 32
NONCE_BYTES = 16
EVIDENCE_KIND = "optimistic-wrong-output"
MIN_WITNESSES = 2  # agreeing re-executions an accusation needs (the checker and the settler)

Outcome = Literal["not-drawn", "agree", "executor-wrong", "checker-wrong", "unresolved", "unchecked"]


# ---- the detection probability ----


def detection_probability(p: float, q: float, n: int) -> float:
    """Chance that a peer lying on a share ``q`` of its tasks is caught within ``n`` tasks
    when each task is re-executed with probability ``p`` (each lie checked is caught)."""
    return 1.0 - (1.0 - p * q) ** n


def tasks_to_detect(p: float, q: float, confidence: float) -> int:
    """The smallest n with ``detection_probability(p, q, n) >= confidence``."""
    if p * q >= 1.0:
        return 1
    return max(1, math.ceil(math.log(1.0 - confidence) / math.log(1.0 - p * q)))


input_digest = activation_hash  # a forward commitment binds its input as a stage task does


# ---- the request's binding and the executor's signed commitment ----


@dataclass(frozen=True)
class CommitRequest:
    """What a forward request carries in optimistic mode: a fresh task id and client nonce
    per request (a re-execution gets its own, so it looks like any other request)."""

    task_id: bytes
    nonce: bytes

    @classmethod
    def draw(cls, rng: random.Random) -> CommitRequest:
        return cls(rng.getrandbits(8 * TASK_BYTES).to_bytes(TASK_BYTES, "big"),
                   rng.getrandbits(8 * NONCE_BYTES).to_bytes(NONCE_BYTES, "big"))

    def to_wire(self) -> dict[str, Any]:
        return {"task": self.task_id, "nonce": self.nonce}

    @classmethod
    def from_wire(cls, raw: object) -> CommitRequest:
        ok = isinstance(raw, dict) and isinstance(raw.get("task"), bytes) and len(raw["task"]) == TASK_BYTES
        ok = ok and isinstance(raw, dict) and isinstance(raw.get("nonce"), bytes) and 8 <= len(raw["nonce"]) <= 32
        if not ok:
            raise BadCommitment(f"forward: 'commit' must be {{task: {TASK_BYTES} bytes, nonce: 8-32 bytes}}")
        assert isinstance(raw, dict)
        return cls(raw["task"], raw["nonce"])


@dataclass(frozen=True)
class ForwardCommitment:
    executor: str
    public_key: bytes
    model_id: str
    first: int
    last: int
    input_digest: bytes
    output_digest: bytes
    task_id: bytes
    nonce: bytes
    signature: bytes = b""

    def body(self) -> bytes:
        return msgpack.packb(self.to_wire()[:9], use_bin_type=True)

    def digest(self) -> bytes:
        """What is signed: H(domain, the nine fields); protocols/forward.md has a test vector."""
        return h(COMMITMENT_DOMAIN, self.body())

    def valid_signature(self) -> bool:
        return (peer_id_from_public_key(self.public_key) == self.executor
                and verify_signature(self.public_key, self.digest(), self.signature))

    def check(self, *, executor: str, model_id: str, first: int, last: int, input_digest: bytes, output: WireTensor,
              request: CommitRequest) -> None:
        """Raise :class:`BadCommitment` unless this is ``executor``'s signature over exactly this answer."""
        expected = (executor, model_id, first, last, input_digest, output_hash(output), request.task_id, request.nonce)
        got = (self.executor, self.model_id, self.first, self.last, self.input_digest, self.output_digest, self.task_id, self.nonce)
        if got != expected:
            fields = ("executor", "model", "first", "last", "input", "output", "task", "nonce")
            wrong = [name for name, a, b in zip(fields, got, expected) if a != b]
            raise BadCommitment(f"commitment from {executor[:16]}... is bound to another {', '.join(wrong)}")
        if not self.valid_signature():
            raise BadCommitment(f"commitment from {executor[:16]}... has a bad signature")

    def to_wire(self) -> list[Any]:
        return [self.executor, self.public_key, self.model_id, self.first, self.last, self.input_digest, self.output_digest,
                self.task_id, self.nonce, self.signature]

    @classmethod
    def from_wire(cls, raw: object) -> ForwardCommitment:
        ok = isinstance(raw, list) and len(raw) == 10 and isinstance(raw[0], str) and isinstance(raw[2], str)
        ok = ok and isinstance(raw, list) and all(type(raw[i]) is int for i in (3, 4))
        ok = ok and isinstance(raw, list) and all(isinstance(raw[i], bytes) for i in (1, 5, 6, 7, 8, 9))
        ok = ok and isinstance(raw, list) and len(raw[1]) == 32 and len(raw[9]) == 64 and len(raw[0]) <= 128 and len(raw[2]) <= 128
        if not ok:
            raise BadCommitment("commitment must be [executor, public_key (32 B), model, first, last, input_digest, "
                                "output_digest, task, nonce, signature (64 B)]")
        assert isinstance(raw, list)
        return cls(*raw)


def sign_commitment(identity: Identity, model_id: str, first: int, last: int, in_digest: bytes, output: WireTensor,
                    request: CommitRequest) -> ForwardCommitment:
    unsigned = ForwardCommitment(identity.peer_id, identity.public_key, model_id, first, last, in_digest, output_hash(output),
                                 request.task_id, request.nonce)
    return ForwardCommitment(*unsigned.to_wire()[:9], signature=identity.sign(unsigned.digest()))


# ---- evidence ----


@dataclass(frozen=True)
class OptimisticEvidence:
    """A signed answer against at least two agreeing signed re-executions of the same input.

    It proves that the accused signed an output that differs (beyond the tolerance) from
    what ``MIN_WITNESSES`` other keys signed for the same model, layers and input. It does
    not prove the witnesses honest: colluding identities can accuse an honest peer, as
    colluders forming a committee quorum can (docs/consensus.md)."""

    accused: ForwardCommitment
    accused_output: WireTensor
    witnesses: tuple[tuple[ForwardCommitment, WireTensor], ...]

    @property
    def member(self) -> str:
        return self.accused.executor

    def verify(self) -> None:
        """Raise :class:`ConsensusError` unless the evidence holds, checked offline."""
        everyone = ((self.accused, self.accused_output), *self.witnesses)
        if len(self.witnesses) < MIN_WITNESSES:
            raise ConsensusError(f"optimistic evidence needs {MIN_WITNESSES} agreeing re-executions, has {len(self.witnesses)}")
        if len({c.executor for c, _ in everyone}) != len(everyone):
            raise ConsensusError("optimistic evidence: every commitment must be from a different executor")
        a = self.accused
        for commitment, output in everyone:
            if (commitment.model_id, commitment.first, commitment.last, commitment.input_digest) != (a.model_id, a.first, a.last, a.input_digest):
                raise ConsensusError("optimistic evidence: the commitments are for different stages or inputs")
            if not commitment.valid_signature() or output_hash(output) != commitment.output_digest:
                raise ConsensusError(f"optimistic evidence: {commitment.executor[:16]}...'s commitment does not match its output")
        outputs = [o for _, o in self.witnesses]
        if not all(outputs_agree(x, y) for x in outputs for y in outputs):
            raise ConsensusError("optimistic evidence: the re-executions do not agree with each other")
        if any(outputs_agree(self.accused_output, y) or outputs_agree(y, self.accused_output) for y in outputs):
            raise ConsensusError("optimistic evidence: the accused's output agrees with a re-execution")

    def to_wire(self) -> dict[str, Any]:
        return {"kind": EVIDENCE_KIND, "accused": self.accused.to_wire(), "accused_output": self.accused_output,
                "witnesses": [[c.to_wire(), o] for c, o in self.witnesses]}

    @classmethod
    def from_wire(cls, raw: object) -> OptimisticEvidence:
        if not (isinstance(raw, dict) and raw.get("kind") == EVIDENCE_KIND and isinstance(raw.get("witnesses"), list)
                and len(raw["witnesses"]) <= 8 and all(isinstance(w, list) and len(w) == 2 for w in raw["witnesses"])):
            raise ConsensusError(f"optimistic evidence must be {{kind: {EVIDENCE_KIND}, accused, accused_output, witnesses}}")
        try:
            witnesses = tuple((ForwardCommitment.from_wire(c), _tensor(o)) for c, o in raw["witnesses"])
            return cls(ForwardCommitment.from_wire(raw.get("accused")), _tensor(raw.get("accused_output")), witnesses)
        except BadCommitment as exc:
            raise ConsensusError(exc.message) from None


def _tensor(raw: object) -> WireTensor:
    t = check_wire_tensor(raw, field="output")
    return {"dtype": t["dtype"], "shape": list(t["shape"]), "data": t["data"]}


# ---- the check after the answer ----


@dataclass(frozen=True)
class StageRun:
    """One stage as the executor answered it: what it was sent, what it returned, what it signed."""

    first: int
    last: int
    hidden: WireTensor
    mask: WireTensor | None
    output: WireTensor
    commitment: ForwardCommitment

    @property
    def executor(self) -> str:
        return self.commitment.executor


@dataclass(frozen=True)
class ReExecute:
    """Send stage ``stage``'s input to ``peer_id`` with ``request`` (a fresh task and nonce)."""

    stage: int
    peer_id: str
    request: CommitRequest


@dataclass(frozen=True)
class Penalise:
    """Verified evidence against ``evidence.member``: its reputation drops (once per task)."""

    evidence: OptimisticEvidence


@dataclass
class StageOutcome:
    first: int
    last: int
    executor: str
    drawn: bool
    outcome: Outcome = "not-drawn"
    checkers: list[str] = field(default_factory=list)
    wrong: str = ""  # the peer evidence was produced against

    def record(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "executor": self.executor, "checked": self.drawn,
                "outcome": self.outcome, "checkers": list(self.checkers), "wrong": self.wrong}


Action = ReExecute | Penalise


@dataclass
class OptimisticCheck:
    """The after-the-answer checks of one query. Construct it only once the answer is back:
    the draws happen here. ``others[i]`` are stage i's other providers (trusted, admitted)."""

    p: float
    stages: Sequence[StageRun]
    others: Mapping[int, Sequence[str]]
    rng: random.Random
    outcomes: list[StageOutcome] = field(init=False)
    answers: dict[int, list[tuple[ForwardCommitment, WireTensor]]] = field(init=False, default_factory=dict)
    _queue: dict[int, list[str]] = field(init=False, default_factory=dict)
    _waiting: set[int] = field(init=False, default_factory=set)
    evidence: list[OptimisticEvidence] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.outcomes = [StageOutcome(s.first, s.last, s.executor, self.rng.random() < self.p) for s in self.stages]

    @property
    def finished(self) -> bool:
        return not self._waiting

    def start(self) -> list[Action]:
        actions: list[Action] = []
        for i, outcome in enumerate(self.outcomes):
            if outcome.drawn:
                candidates = [p for p in self.others.get(i, ()) if p != outcome.executor]
                self.rng.shuffle(candidates)
                self._queue[i] = candidates
                self.answers[i] = [(self.stages[i].commitment, self.stages[i].output)]
                actions += self._ask(i, "unchecked")
        return actions

    def on_answer(self, stage: int, peer: str, output: WireTensor, commitment: ForwardCommitment) -> list[Action]:
        """A re-execution whose commitment the driver checked against what it returned."""
        if stage not in self._waiting:
            return []
        self._waiting.discard(stage)
        answers = self.answers[stage]
        answers.append((commitment, output))
        self.outcomes[stage].checkers.append(peer)
        if len(answers) == 2:
            if outputs_agree(answers[0][1], output):
                self.outcomes[stage].outcome = "agree"
                return []
            return self._ask(stage, "unresolved")  # a mismatch: a third provider settles it
        return self._settle(stage)

    def on_failure(self, stage: int, peer: str) -> list[Action]:
        """A checker did not answer (or answered with a bad commitment): try the next one."""
        if stage not in self._waiting:
            return []
        self._waiting.discard(stage)
        return self._ask(stage, "unchecked" if len(self.answers[stage]) == 1 else "unresolved")

    def _ask(self, stage: int, if_nobody: Outcome) -> list[Action]:
        queue = self._queue[stage]
        if not queue:
            self.outcomes[stage].outcome = if_nobody
            return []
        self._waiting.add(stage)
        return [ReExecute(stage, queue.pop(0), CommitRequest.draw(self.rng))]

    def _settle(self, stage: int) -> list[Action]:
        """Three signed answers: the one the other two agree against is wrong."""
        answers = self.answers[stage]
        for i, (accused, out) in enumerate(answers):
            rest = tuple(a for j, a in enumerate(answers) if j != i)
            evidence = OptimisticEvidence(accused, out, rest)
            try:
                evidence.verify()
            except ConsensusError:
                continue
            self.outcomes[stage].outcome = "executor-wrong" if i == 0 else "checker-wrong"
            self.outcomes[stage].wrong = accused.executor
            self.evidence.append(evidence)
            return [Penalise(evidence)]
        self.outcomes[stage].outcome = "unresolved"
        return []

    def report(self) -> dict[str, Any]:
        mismatch = any(o.outcome in ("executor-wrong", "unresolved") for o in self.outcomes)
        return {"p": self.p, "ran": any(o.drawn for o in self.outcomes), "mismatch": mismatch,
                "stages": [o.record() for o in self.outcomes], "evidence": len(self.evidence)}
