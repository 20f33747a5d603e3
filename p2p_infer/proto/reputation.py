"""Reputation: R in [0.1, 10], R0 = 1, and after each task R' = R * 0.8^M * 1.01^(1-M),
where M = 1 for a wrong, missing or late result and 0 otherwise.

Each peer and client keeps its own table from what it observes itself and from verified
fault evidence; routing and sortition skip peers under ``threshold``. A peer's table moves
only through :meth:`Auditor.on_evidence` (``proto/auditor.py``): evidence against a member
its client-signed candidate set selects, with a valid certificate for wrong outputs. A peer new to this
observer is on probation until it passes a trial task with a known answer. Sans-IO.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..bounded import trim_oldest

R_MIN, R_MAX, R_START = 0.1, 10.0, 1.0
PENALTY, REWARD = 0.8, 1.01
DEFAULT_THRESHOLD = 0.5
MAX_OUTCOMES = 10_000  # per-task outcomes kept, so late evidence can still revise a reward


def updated(r: float, fault: bool) -> float:
    m = 1 if fault else 0
    return min(R_MAX, max(R_MIN, r * PENALTY**m * REWARD ** (1 - m)))


@dataclass
class Reputation:
    scores: dict[str, float] = field(default_factory=dict)
    admitted: set[str] = field(default_factory=set)  # passed a trial task
    threshold: float = DEFAULT_THRESHOLD
    outcomes: dict[tuple[str, bytes], bool] = field(default_factory=dict)  # (peer, task) -> fault

    def record_task(self, peer: str, task: bytes, fault: bool) -> float:
        """One update per task: a later fault for the same task replaces the reward."""
        if (peer, task) in self.outcomes:
            return self.penalize_task(peer, task) if fault else self.of(peer)
        self.outcomes[(peer, task)] = fault
        trim_oldest(self.outcomes, MAX_OUTCOMES)  # old tasks can no longer be revised
        return self.record(peer, fault)

    def penalize_task(self, peer: str, task: bytes) -> float:
        """Make ``task`` count as a fault for ``peer`` (evidence that arrived late)."""
        previous = self.outcomes.get((peer, task))
        if previous is True:
            return self.of(peer)
        if previous is False:  # undo the reward this task earned, then apply the penalty
            self.scores[peer] = min(R_MAX, max(R_MIN, self.of(peer) / REWARD))
        self.outcomes[(peer, task)] = True
        return self.record(peer, fault=True)

    def of(self, peer: str) -> float:
        return self.scores.get(peer, R_START)

    def record(self, peer: str, fault: bool) -> float:
        self.scores[peer] = updated(self.of(peer), fault)
        return self.scores[peer]

    def trusted(self, peer: str) -> bool:
        return self.of(peer) >= self.threshold

    def admit(self, peer: str) -> None:
        self.admitted.add(peer)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"scores": self.scores, "admitted": sorted(self.admitted)}, indent=1))

    @classmethod
    def load(cls, path: Path, threshold: float = DEFAULT_THRESHOLD) -> Reputation:
        if not path.exists():
            return cls(threshold=threshold)
        data = json.loads(path.read_text())
        return cls(scores={k: float(v) for k, v in data.get("scores", {}).items()}, admitted=set(data.get("admitted", [])), threshold=threshold)
