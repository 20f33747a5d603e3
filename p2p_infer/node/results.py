"""What a query returns: the result, its route, how each stage was verified, and its evidence."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

# the array ``QueryResult.numpy()`` returns when no key is named, by what the output holds
PRIMARY_KEYS = ("embedding", "probabilities", "next_token")


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
    # True only if every stage was checked before this result was returned (committee, proven
    # shards, or a spot check that ran on it); optimistic results are False: their check follows
    verified: bool = False
    # per stage: {"first", "last", "check": "committee k=3" | "zk" | "optimistic p=0.1" | "spot-check p=.." | "none", "verified"}
    verification: list[dict[str, Any]] = field(default_factory=list)
    # optimistic mode: the check that runs after the answer (``await result.check`` -> its report)
    check: Any = None
    # committee mode: members answering after a stage's quorum are judged after the answer
    # (``await result.judged``; ``stages[i]["verdicts"]`` are final then, "pending" before)
    judged: Any = None
    # inputs answered by this one query: > 1 when ``run`` was given a list; then every value
    # of ``output`` is a list with one entry per input, in order (``{"embedding": [[...], ...]}``)
    batch: int = 1

    def numpy(self, key: str | None = None) -> np.ndarray:
        """``output[key]`` as a numpy array (a copy): by default the embedding (float32 ``[384]``,
        or ``[B, 384]`` for a batch) or the class probabilities (``[10]`` / ``[B, 10]``)."""
        if key is None:
            key = next((k for k in PRIMARY_KEYS if k in self.output), None)
            if key is None:
                raise KeyError(f"no default array in output {sorted(self.output)}; name one")
        value = self.output[key]
        kind = np.int64 if key in ("class", "next_token") else np.float32
        return np.asarray(value, dtype=kind)

    @property
    def array(self) -> np.ndarray:
        """The default array of :meth:`numpy`."""
        return self.numpy()

    def to_json(self) -> dict[str, Any]:
        data = asdict(replace(self, check=None, judged=None))
        data["certificate"] = None if self.certificate is None else f"{len(self.certificate)} bytes"
        if self.proofs is not None:
            data["proofs"] = {k: v for k, v in self.proofs.items() if k not in ("chain", "output")}
        if self.check is not None:
            data["check"] = self.check.report if self.check.done else {"pending": True}
        return data


def stage_labels(check: str, label: str, route: list[HopReport], spot_checks: list[dict[str, Any]],
                 proofs: dict[str, Any] | None) -> list[dict[str, Any]]:
    """How each stage of a finished query was verified, for ``QueryResult.verification``."""
    out = []
    for hop in route:
        if check == "committee":
            verified = True  # a quorum certificate covers it, else the query failed
        elif check == "zk":
            verified = proofs is not None and proofs.get("verified") is True
        elif check == "spot-check":
            verified = any(c["first"] == hop.first and c["last"] == hop.last and c.get("outcome") in ("agree", "disagree")
                           for c in spot_checks)
        else:  # none, or optimistic (checked after the answer, if drawn)
            verified = False
        out.append({"first": hop.first, "last": hop.last, "check": label, "verified": verified})
    return out
