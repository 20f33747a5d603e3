"""What a run produced, engine-neutral: the report and plots are made from this alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .scenario import Scenario


@dataclass
class QueryOutcome:
    t0_s: float  # when it was sent, seconds since the run's start
    ok: bool
    wrong: bool  # accepted, and not what the whole model computes
    latency_ms: float
    hops: int = 0  # stages (committee) or route segments (plain)
    retries: int = 0  # failed hops re-routed, plus committee re-runs
    route: list[str] = field(default_factory=list)
    verdicts: dict[str, str] = field(default_factory=dict)  # member -> verdict, committee mode
    code: str = ""  # error code of a failure
    client: str = ""
    lookup_hops: int = 0  # des: Kademlia hops of the lookups this query needed
    consensus_ms: float = 0.0  # des: time spent in committee rounds
    stages: list[dict[str, Any]] = field(default_factory=list)  # processes: per stage {first, last, peers (the quorum), ms}
    judged_s: float | None = None  # committee: when the last member was judged (verdicts final), since the run's start


@dataclass
class RunEvent:
    t_s: float
    kind: str  # kill | restart | ready | join | partition | heal
    peer: str
    peer_id: str = ""


@dataclass
class RunData:
    scenario: Scenario
    queries: list[QueryOutcome] = field(default_factory=list)
    planned: int = 0  # queries the load asked for (a client that died leaves some unreported)
    reputation: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (t, peer id -> R) per client sample
    events: list[RunEvent] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)  # peer id -> "honest" or the adversary kind
    processes_left: int = 0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific figures (des: events/s, ...)
