"""What every peer (and client) does with consensus gossip: check it, notice faults, keep
reputation, and write it all to the audit log. Sans-IO: returns evidence to publish.

Reputation moves here only on verified evidence (``Evidence.verify``): the accused is on
the committee its client-signed candidate set selects, and wrong-output evidence comes
with a stage certificate valid under every rule. A round from a member its candidate set
does not select is dropped before it is remembered, so it can never become evidence.

Gossip is any sender's input, and it lands in a signed log on disk, so nothing is logged
unless it checks out (issue 10): ``sender`` is the gossip signer, verified by gossipsub's
strict signing, and it is the ``reporter`` of everything logged from the message;

* a ``round`` is logged only when its commit and reveal are both the sender's own, both
  validly signed, for one task, and its candidate set
  selects the member (a reveal that does not open the commit is then bad-reveal
  evidence); a round already logged is not logged again;
* ``verdicts`` only from the client named in them (``client`` = sender), only the fields
  a verdict has, bounded in number and size, once per (client, task, stage);
* ``evidence`` only once verified, once per (kind, member, task). Optimistic evidence
  (kind ``optimistic-wrong-output``, ``OptimisticEvidence``) moves reputation under the same
  rule: the accused's own signed forward commitment is the evidence, so an outsider cannot
  make it sign what it did not return; it is checked against at least two agreeing signed
  re-executions by other puzzle-solved identities (docs/consensus.md: what that proves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from ..bounded import trim_oldest
from ..errors import BadTensor
from .audit import AuditLog
from .checkpoints import WitnessTable, witness
from ..identity import solves_puzzle
from .consensus import CandidateSet, Commit, ConsensusError, Evidence, Reveal
from .optimistic import EVIDENCE_KIND as OPTIMISTIC_KIND, OptimisticEvidence
from .reputation import Reputation
from .wire import CHECKPOINT, EVIDENCE, ROUND, VERDICTS, message_type

MAX_VERDICT_STAGES = 64
MAX_VERDICT_MEMBERS = 64
MAX_ID_CHARS = 128
MAX_VERDICT_CHARS = 32

log = structlog.get_logger("p2p_infer.auditor")


@dataclass
class Auditor:
    reputation: Reputation
    audit: AuditLog | None = None
    commits: dict[tuple[bytes, str], Commit] = field(default_factory=dict)
    punished: dict[tuple[str, str, bytes], None] = field(default_factory=dict)  # (kind, member, task_id), ordered
    committees: dict[bytes, frozenset[str]] = field(default_factory=dict)  # candidate set id -> members (verified)
    witnesses: WitnessTable | None = None  # peers keep others' audit-log checkpoints (proto/checkpoints.py)
    verdicts_seen: dict[tuple[str, bytes, int], None] = field(default_factory=dict)  # (client, task, stage)
    # a client audits only the rounds of its own tasks (equivocation against what it was sent);
    # peers audit every round. Evidence, verdicts and checkpoints are handled either way
    own_rounds_only: bool = False

    def observe(self, sender: str, message: dict[str, Any]) -> list[Evidence]:
        """Handle one gossip message signed by ``sender``; return evidence to publish."""
        kind = message_type(message)
        try:
            if kind == ROUND:  # a member's commit and reveal for one task
                return self.on_round(sender, message)
            if kind == EVIDENCE:
                raw = message.get("evidence")
                if isinstance(raw, dict) and raw.get("kind") == OPTIMISTIC_KIND:
                    self.on_optimistic(OptimisticEvidence.from_wire(raw), reporter=sender)
                else:
                    self.on_evidence(Evidence.from_wire(raw), reporter=sender)
                return []
            if kind == CHECKPOINT:  # kept, not logged: logging it would change our own log at every checkpoint
                witness(self.witnesses, sender, message)
                return []
            if kind == VERDICTS:  # a client's verdicts on every stage of one query
                self.on_verdicts(sender, message)
                return []
        except (ConsensusError, BadTensor) as exc:
            log.info("gossip rejected", kind=kind, sender=sender, reason=exc.message)
            return []
        log.info("unknown gossip message type", kind=kind, sender=sender)
        return []

    def selected(self, candidates: CandidateSet, member: str, task_id: bytes) -> None:
        """Raise unless ``member`` is on the committee ``candidates`` selects for ``task_id``
        (each candidate set is verified once: N VRF proofs and records)."""
        if candidates.task.task_id != task_id:
            raise ConsensusError("the candidate set is for another task")
        members = self.committees.get(candidates.id)
        if members is None:
            members = self.committees[candidates.id] = frozenset(candidates.members)
            _bound(self.committees)
        if member not in members:
            raise ConsensusError(f"{member} is not on the committee its candidate set selects")

    def remember_committee(self, candidates: CandidateSet, members: tuple[str, ...]) -> None:
        """A client's own candidate set: it ranked the tickets itself, so it vouches for the
        committee to its own auditor without verifying every proof again."""
        self.committees[candidates.id] = frozenset(members)
        _bound(self.committees)

    def on_round(self, sender: str, message: dict[str, Any]) -> list[Evidence]:
        """A member's own consistent commit/reveal pair; anything else is refused unlogged."""
        if self.own_rounds_only and CandidateSet.from_wire(message.get("candidates")).id not in self.committees:
            return []  # another client's task: the peers audit it; a client's CPU stays with its own queries
        commit, reveal = Commit.from_wire(message.get("commit")), Reveal.from_wire(message.get("reveal"))
        if not (commit.member == reveal.member == sender):
            raise ConsensusError(f"round for member {commit.member[:16]}... not signed by that member")
        if not (commit.valid_signature() and reveal.valid_signature() and reveal.task_id == commit.task_id):
            raise ConsensusError("round: a bad signature, or a commit and a reveal for different tasks")
        # a reveal that does not open its commit is not refused: signed by the member, it is
        # the bad-reveal evidence on_reveal publishes (v6 rounds carry no output: its hash is in the reveal)
        known = self.commits.get((commit.task_id, commit.member))
        if known is not None and known.commitment == commit.commitment:
            return []  # a replay (or a commit the client already logged directly): once is enough
        candidates = CandidateSet.from_wire(message.get("candidates"))
        if commit.candidates_id != candidates.id:  # the client's StageRound judges this bad-commit
            raise ConsensusError("round: the commit was made under another candidate set than the round carries")
        return self.on_commit(commit, candidates) + self.on_reveal(reveal, candidates)

    def on_verdicts(self, sender: str, message: dict[str, Any]) -> None:
        if message.get("client") != sender:
            raise ConsensusError("verdicts not signed by the client they name")
        stages = message.get("stages")
        if not isinstance(stages, list) or len(stages) > MAX_VERDICT_STAGES:
            raise ConsensusError(f"verdicts: 'stages' must be a list of at most {MAX_VERDICT_STAGES}")
        for stage in stages:
            task, number, verdicts = _verdict(stage)
            key = (sender, task, number)
            if key in self.verdicts_seen:
                continue
            self.verdicts_seen[key] = None
            _bound(self.verdicts_seen)
            self._log("verdict", {"reporter": sender, "client": sender, "task": task.hex(), "stage": number, "verdicts": verdicts})

    def on_commit(self, commit: Commit, candidates: CandidateSet) -> list[Evidence]:
        if not commit.valid_signature():
            return []
        self.selected(candidates, commit.member, commit.task_id)
        self._log("commit", {"task": commit.task_id.hex(), "member": commit.member, "commitment": commit.commitment.hex()})
        key = (commit.task_id, commit.member)
        known = self.commits.setdefault(key, commit)
        _bound(self.commits)
        if known.commitment != commit.commitment:
            evidence = Evidence("equivocation", commit.member, [known, commit], candidates=candidates)
            self.on_evidence(evidence, reporter="self")
            return [evidence]
        return []

    def on_reveal(self, reveal: Reveal, candidates: CandidateSet) -> list[Evidence]:
        if not reveal.valid_signature():
            return []
        self.selected(candidates, reveal.member, reveal.task_id)
        self._log("reveal", {"task": reveal.task_id.hex(), "member": reveal.member, "output_hash": reveal.output_hash.hex()})
        commit = self.commits.get((reveal.task_id, reveal.member))
        if commit is not None and not reveal.opens(commit):
            evidence = Evidence("bad-reveal", reveal.member, [commit], reveal, candidates=candidates)
            self.on_evidence(evidence, reporter="self")
            return [evidence]
        return []

    def on_evidence(self, evidence: Evidence, reporter: str) -> bool:
        """Verify evidence and, the first time, apply the penalty. Returns True if applied."""
        if not evidence.commits:
            raise ConsensusError("evidence without commits")
        key = (evidence.kind, evidence.member, evidence.commits[0].task_id)
        if key in self.punished:
            return False  # checked before verifying: a replayed message costs nothing
        evidence.verify()  # legitimate member, legitimate committee, valid certificate: else nothing moves
        self._punish(key, reporter)
        return True

    def on_optimistic(self, evidence: OptimisticEvidence, reporter: str) -> bool:
        """Optimistic mismatch evidence: verified offline, then the accused's task counts as
        a fault, once. Returns True if applied."""
        accused = evidence.accused
        key = (OPTIMISTIC_KIND, accused.executor, accused.task_id)
        if key in self.punished:
            return False
        evidence.verify()  # the accused's signed answer against >= 2 agreeing signed re-executions
        for commitment in (accused, *(c for c, _ in evidence.witnesses)):  # costly identities, as on a committee
            if not solves_puzzle(commitment.public_key):
                raise ConsensusError(f"optimistic evidence: {commitment.executor[:16]}... does not solve the identity puzzle")
        self._punish(key, reporter)
        return True

    def _punish(self, key: tuple[str, str, bytes], reporter: str) -> None:
        kind, member, task = key
        self.punished[key] = None
        _bound(self.punished)
        before = self.reputation.of(member)
        after = self.reputation.penalize_task(member, task)
        self._log("evidence", {"kind": kind, "member": member, "task": task.hex(), "reporter": reporter})
        self._log("reputation", {"peer": member, "before": before, "after": after, "reason": kind})
        log.info("fault evidence verified", kind=kind, member=member, reputation=round(after, 4))

    def _log(self, kind: str, data: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(kind, data)


def evidence_message(evidence: Evidence | OptimisticEvidence) -> dict[str, Any]:
    """The gossip message carrying fault evidence (protocols/committee.md)."""
    return {"type": EVIDENCE, "evidence": evidence.to_wire()}


MAX_TRACKED = 10_000  # commits and punished faults remembered (oldest forgotten first)


def _bound(table: dict[Any, Any]) -> None:
    """Gossip is unbounded input: forget the oldest entries past MAX_TRACKED."""
    trim_oldest(table, MAX_TRACKED)


def _verdict(stage: object) -> tuple[bytes, int, dict[str, str]]:
    """One stage's verdicts, with only the fields a verdict has (``Judgement.record``)."""
    if not isinstance(stage, dict):
        raise ConsensusError("verdicts: each stage must be a map")
    task, number, verdicts = stage.get("task"), stage.get("stage"), stage.get("verdicts")
    ok = (isinstance(task, bytes) and len(task) == 32 and type(number) is int and 0 <= number < 2**16
          and isinstance(verdicts, dict) and len(verdicts) <= MAX_VERDICT_MEMBERS
          and all(isinstance(m, str) and len(m) <= MAX_ID_CHARS and isinstance(v, str) and len(v) <= MAX_VERDICT_CHARS
                  for m, v in verdicts.items()))
    if not ok:
        raise ConsensusError("verdicts: a stage is {task: 32 bytes, stage: int, verdicts: {member: verdict}}")
    assert isinstance(task, bytes) and isinstance(number, int) and isinstance(verdicts, dict)
    return task, number, verdicts
