"""What every peer (and client) does with consensus gossip: check it, notice faults, keep
reputation, and write it all to the audit log. Sans-IO: returns evidence to publish.

Reputation moves here only on verified evidence (``Evidence.verify``): the accused is on
the committee its client-signed candidate set selects, and wrong-output evidence comes
with a stage certificate valid under every rule. A round from a member its candidate set
does not select is dropped before it is remembered, so it can never become evidence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from .audit import AuditLog
from .checkpoints import WitnessTable, witness
from .consensus import CandidateSet, Commit, ConsensusError, Evidence, Reveal
from .reputation import Reputation
from .wire import CHECKPOINT, EVIDENCE, ROUND, VERDICTS, message_type

log = structlog.get_logger("p2p_infer.auditor")


@dataclass
class Auditor:
    reputation: Reputation
    audit: AuditLog | None = None
    commits: dict[tuple[bytes, str], Commit] = field(default_factory=dict)
    punished: dict[tuple[str, str, bytes], None] = field(default_factory=dict)  # (kind, member, task_id), ordered
    committees: dict[bytes, frozenset[str]] = field(default_factory=dict)  # candidate set id -> members (verified)
    witnesses: WitnessTable | None = None  # peers keep others' audit-log checkpoints (proto/checkpoints.py)

    def observe(self, sender: str, message: dict[str, Any]) -> list[Evidence]:
        """Handle one gossip message; return evidence this observer should publish."""
        kind = message_type(message)
        try:
            if kind == ROUND:  # a member's commit and reveal for one task, with its candidate set
                candidates = CandidateSet.from_wire(message.get("candidates"))
                evidence = self.on_commit(Commit.from_wire(message.get("commit")), candidates)
                return evidence + self.on_reveal(Reveal.from_wire(message.get("reveal")), candidates)
            if kind == EVIDENCE:
                self.on_evidence(Evidence.from_wire(message.get("evidence")), reporter=sender)
                return []
            if kind == CHECKPOINT:  # kept, not logged: logging it would change our own log at every checkpoint
                witness(self.witnesses, sender, message)
                return []
            if kind == VERDICTS:  # a client's verdicts on every stage of one query
                for stage in message.get("stages") or []:
                    if isinstance(stage, dict):
                        self._log("verdict", {"reporter": sender, "client": message.get("client"), **_printable(stage)})
                return []
        except ConsensusError as exc:
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
        self.punished[key] = None
        _bound(self.punished)
        before = self.reputation.of(evidence.member)
        after = self.reputation.penalize_task(evidence.member, evidence.commits[0].task_id)
        self._log("evidence", {"kind": evidence.kind, "member": evidence.member, "task": key[2].hex(), "reporter": reporter})
        self._log("reputation", {"peer": evidence.member, "before": before, "after": after, "reason": evidence.kind})
        log.info("fault evidence verified", kind=evidence.kind, member=evidence.member, reputation=round(after, 4))
        return True

    def _log(self, kind: str, data: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(kind, data)


def evidence_message(evidence: Evidence) -> dict[str, Any]:
    """The gossip message carrying fault evidence (protocols/committee.md)."""
    return {"type": EVIDENCE, "evidence": evidence.to_wire()}


MAX_TRACKED = 10_000  # commits and punished faults remembered (oldest forgotten first)


def _bound(table: dict[Any, Any]) -> None:
    """Gossip is unbounded input: forget the oldest entries past MAX_TRACKED."""
    while len(table) > MAX_TRACKED:
        table.pop(next(iter(table)))


def _printable(message: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in message.items() if k != "type"}
