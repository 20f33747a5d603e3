"""committee/5.0.0 sortition: one VRF ticket per candidate and client session serves every query, stage and
attempt (each ranks by its own draw), and the per-process memos of verified tickets,
records and candidate sets never admit what a fresh check refuses (issue 9, cheap2)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from p2p_infer.errors import ConsensusError
from p2p_infer.identity import Identity
from p2p_infer.proto import sortition, vrf
from p2p_infer.proto.consensus import (
    Candidate,
    CandidateSet,
    StageTask,
    Ticket,
    activation_digest,
    draw_key,
    make_ticket,
    output_hash,
    request_hash,
    select_committee,
    sign_candidates,
)
from p2p_infer.testing.population import identities, provider, providers

MODEL = "ab" * 32
NOW = 1_764_000_000_000
HIDDEN = {"dtype": "float32", "shape": [1, 2], "data": bytes(8)}


def client() -> Identity:
    return identities(1, offset=0)[0]


def task(stage: int = 0, attempt: int = 0, nonce: bytes = b"q" * 32, at: int = NOW, session: bytes = b"s" * 32) -> StageTask:
    c = client()
    req = request_hash(MODEL, output_hash(HIDDEN), b"", nonce, c.public_key)
    return StageTask(req, stage, attempt, MODEL, 1, 3, activation_digest(output_hash(HIDDEN), b""), 3, at, at + 5_000, c.public_key,
                     session)


def signed(t: StageTask, pool, tickets: dict[str, Ticket] | None = None) -> CandidateSet:
    tickets = tickets or {p.peer_id: make_ticket(p.identity, t.seed) for p in pool}
    return sign_candidates(client(), t, [Candidate(tickets[p.peer_id], p.record) for p in pool])


def test_one_ticket_per_session_serves_every_query_stage_and_attempt_with_its_own_draw():
    pool = providers(8, MODEL, 1, 3, NOW - 60_000, offset=1)
    t0 = task()
    assert all(task(s, a, nonce=n).seed == t0.seed for s in range(3) for a in range(3) for n in (b"q" * 32, b"r" * 32))  # one per session
    assert task(session=b"t" * 32).seed != t0.seed  # and a fresh one per session
    tickets = {p.peer_id: make_ticket(p.identity, t0.seed) for p in pool}
    committees = []
    for stage, attempt, nonce in [(0, 0, b"q"), (1, 0, b"q"), (2, 0, b"q"), (0, 1, b"q"), (0, 2, b"q"), (0, 0, b"r"), (0, 0, b"u")]:
        t = task(stage, attempt, nonce=nonce * 32)
        cs = signed(t, pool, tickets)  # the same tickets, signed into each stage's candidate set
        expected = sorted(pool, key=lambda p: draw_key(tickets[p.peer_id].beta(t.seed), t.request_hash, stage, attempt))[:3]
        assert cs.members == [p.peer_id for p in expected]
        assert [x.peer_id for x in select_committee(list(tickets.values()), t.seed, t.request_hash, 3, stage, attempt)] == cs.members
        committees.append(tuple(cs.members))
    assert len(set(committees)) > 1  # the draw depends on request, stage and attempt, not only on the ticket


def test_a_ticket_for_another_session_is_refused_in_every_stage():
    pool = providers(3, MODEL, 1, 3, NOW - 60_000, offset=1)
    other = task(session=b"o" * 32)
    stale = {p.peer_id: make_ticket(p.identity, other.seed) for p in pool}
    for stage in range(3):
        with pytest.raises(ConsensusError, match="bad VRF proof"):
            signed(task(stage), pool, stale).members


def test_the_memos_never_admit_what_a_fresh_check_refuses():
    pool = providers(3, MODEL, 1, 3, NOW - 60_000, offset=1)
    t = task(1)
    honest = signed(t, pool)
    assert len(honest.members) == 3  # verified once: every table now holds it
    # the same body with another signature: a new key, refused although the body was verified
    resigned = CandidateSet(t, honest.candidates, bytes(64))
    for _ in range(2):
        with pytest.raises(ConsensusError, match="not signed by the task's client"):
            CandidateSet.from_wire(resigned.to_wire()).members
    # a ticket with another candidate's proof: refused every time (the refusal is remembered, not the pass)
    a, b = honest.candidates[0].ticket, honest.candidates[1].ticket
    forged = Ticket(a.peer_id, a.public_key, b.proof)
    for _ in range(2):
        with pytest.raises(ConsensusError, match="bad VRF proof"):
            forged.beta(t.seed)
    assert a.beta(t.seed) == vrf.verify(a.public_key, a.proof, t.seed)
    # a record verified at one request has its time window checked again at the next
    short = provider(identities(1, offset=9)[0], MODEL, 1, 3, NOW - 60_000, ttl_ms=65_000)  # expires at NOW + 5 s
    sortition.check_candidate_record(t, short.peer_id, short.record)
    later = replace(t, requested_at_ms=NOW + 10_000, commit_deadline_ms=NOW + 15_000)
    with pytest.raises(ConsensusError, match="expired"):
        sortition.check_candidate_record(later, short.peer_id, short.record)
    with pytest.raises(ConsensusError, match="less than"):  # too young for an earlier request
        sortition.check_candidate_record(replace(t, requested_at_ms=NOW - 60_500), short.peer_id, short.record)


def test_each_ticket_is_verified_once_per_process_across_stages_and_members(monkeypatch):
    """What makes a committee query cheap: stage 2 and 3 (and the auditor that sees the same
    set again in gossip) cost no VRF check once stage 1 checked the candidates' tickets."""
    calls = []
    real = vrf.verify

    def counted(public_key: bytes, proof: bytes, alpha: bytes) -> bytes:
        calls.append(public_key)
        return real(public_key, proof, alpha)

    monkeypatch.setattr(vrf, "verify", counted)
    pool = providers(4, MODEL, 1, 3, NOW - 60_000, offset=1)
    t0 = task(session=b"v" * 32)
    tickets = {p.peer_id: make_ticket(p.identity, t0.seed) for p in pool}
    for nonce in (b"v", b"w", b"x"):  # three queries of one session
        for stage in range(3):
            cs = signed(task(stage, nonce=nonce * 32, session=b"v" * 32), pool, tickets)
            assert len(cs.members) == 3
            assert len(CandidateSet.from_wire(cs.to_wire()).members) == 3  # as a member, then an auditor, decodes it
    assert sorted(calls) == sorted(p.identity.public_key for p in pool)  # one check per candidate for the whole session


def test_memos_are_bounded():
    memo = sortition.Memo(size=4)
    for i in range(10):
        memo.put(i, str(i))
    assert len(memo.table) == 4 and memo.get(0) is None and memo.get(9) == "9"
