"""What a query returns: the result, its route and its evidence."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class HopReport:
    peer: str
    first: int
    last: int
    compute_ms: float = 0.0
    queue_ms: float = 0.0
    round_trip_ms: float = 0.0  # client-driven mode: request sent to reply read


@dataclass
class QueryResult:
    model: str
    model_id: str
    output: dict[str, Any]
    route: list[HopReport]
    local_ms: float
    total_ms: float
    mode: str
    retries: int = 0
    failed_peers: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)  # committee mode: verdicts per stage
    certificate: bytes | None = None  # committee mode: the quorum certificate (Certificate.encode())
    spot_checks: list[dict[str, Any]] = field(default_factory=list)
    proofs: dict[str, Any] | None = None  # critical mode: the verified proof chain
    privacy: dict[str, Any] | None = None  # enhanced privacy: the threshold key's ritual, t and members

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["certificate"] = None if self.certificate is None else f"{len(self.certificate)} bytes"
        if self.proofs is not None:
            data["proofs"] = {k: v for k, v in self.proofs.items() if k not in ("chain", "output")}
        return data
