"""Providers for tests and simulations without a network: puzzle-solved identities with
signed capability records, and the client's side of a draw (tickets -> signed candidate
set). Identities are cached per process: each costs ~2**PUZZLE_DIFFICULTY key derivations."""

from __future__ import annotations

from dataclasses import dataclass

from ..identity import Identity
from ..proto.consensus import Candidate, CandidateSet, StageTask, make_ticket, rank_tickets, sign_candidates
from ..proto.records import ShardSpec, make_record, sign_record

_POOL: list[Identity] = []


def identities(n: int, offset: int = 0) -> list[Identity]:
    """``n`` puzzle-solved identities, the same ones on every call in this process."""
    while len(_POOL) < offset + n:
        _POOL.append(Identity.generate())
    return _POOL[offset: offset + n]


@dataclass(frozen=True)
class Provider:
    identity: Identity
    record: bytes  # its signed capability record envelope

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


def provider(identity: Identity, model_id: str, first: int, last: int, issued_at_ms: int, ttl_ms: int = 3_600_000) -> Provider:
    record = make_record(identity, addrs=[f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}"], shards=[ShardSpec(model_id, first, last)],
                         throughput=100.0, issued_at_ms=issued_at_ms, ttl_ms=ttl_ms)
    return Provider(identity, sign_record(record, identity))


def providers(n: int, model_id: str, first: int, last: int, issued_at_ms: int, offset: int = 0) -> list[Provider]:
    return [provider(i, model_id, first, last, issued_at_ms) for i in identities(n, offset)]


def draw(client: Identity, task: StageTask, pool: list[Provider]) -> CandidateSet:
    """What an honest client does: every provider's ticket, ranked, signed with its record."""
    records = {p.peer_id: p.record for p in pool}
    ranked = rank_tickets([make_ticket(p.identity, task.seed) for p in pool], task.seed, task.request_hash, task.stage, task.attempt)
    return sign_candidates(client, task, [Candidate(t, records[t.peer_id]) for t in ranked])


def committee_client() -> Identity:
    """The client of :func:`committee_candidates`' sets: a member answers a task only on a
    stream from its client, so a test that must get past that check dials as this identity."""
    return identities(1, offset=60)[0]


def committee_candidates(model_id: str, first: int = 1, last: int = 3, k: int = 3) -> CandidateSet:
    """A well-formed, honestly drawn candidate set for a stage of ``model_id`` (for tests that
    need an execute request to get past parsing: fuzzing, malformed tensors)."""
    from ..clock import now_ms
    from ..proto.consensus import activation_digest, output_hash, request_hash

    client = committee_client()
    hidden = {"dtype": "float32", "shape": [1, 1], "data": bytes(4)}
    now = now_ms()
    task = StageTask(request_hash(model_id, output_hash(hidden), b"", b"n" * 32, client.public_key), 0, 0, model_id, first, last,
                     activation_digest(output_hash(hidden), b""), k, now, now + 3_600_000, client.public_key)
    return draw(client, task, providers(k, model_id, first, last, now - 10_000, offset=61))
