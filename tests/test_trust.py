"""The attacks of issue 9 on certificates and evidence, sans-IO: each is built the way an
attacker reading protocols/committee.md would build it, and must be refused.

What still works (the stated bounds) is tested too: an attacker holding k+1 aged,
puzzle-solved identities can forge a certificate (docs/consensus.md says so)."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import msgpack
import numpy as np
import pytest

from p2p_infer.cli import build_parser, cmd_verify
from p2p_infer.errors import ConsensusError, NotSelected, PuzzleUnsolved
from p2p_infer.identity import PUZZLE_DIFFICULTY, Identity, leading_zero_bits, load_or_create_identity, puzzle_hash, save_identity
from p2p_infer.ml.models import load_model
from p2p_infer.proto.auditor import Auditor
from p2p_infer.proto.committee_codec import round_message
from p2p_infer.proto.committee_member import MemberCore
from p2p_infer.proto.consensus import (
    Candidate,
    CandidateSet,
    Certificate,
    Evidence,
    StageCertificate,
    StageRound,
    StageTask,
    activation_digest,
    activation_file,
    commitment,
    make_ticket,
    output_hash,
    rank_tickets,
    request_hash,
    sign_candidates,
    sign_commit,
    sign_reveal,
)
from p2p_infer.proto.reputation import Reputation
from p2p_infer.proto.sortition import CANDIDATES_DOMAIN, MIN_RECORD_AGE_MS, draw_key
from p2p_infer.testing.population import Provider, draw, identities, provider, providers

DIGITS = load_model("digits-mlp")
MODEL = DIGITS.model_id  # a known model, so the CLI's verify accepts the model and checks the last layer
LAST = len(DIGITS.layers) - 1
NOW = 1_764_000_000_000
CLIENT = identities(1)[0]


def tensor(values) -> dict:
    a = np.asarray(values, dtype="<f4").reshape(1, -1)
    return {"dtype": "float32", "shape": list(a.shape), "data": a.tobytes()}


HIDDEN = tensor(np.ones(16))
HONEST = tensor(np.linspace(-1, 1, 16))
WRONG = tensor(np.linspace(-1, 1, 16) + 0.5)


def task_for(client: Identity, k: int = 3, nonce: bytes = b"n" * 32, hidden: dict = HIDDEN) -> StageTask:
    req = request_hash(MODEL, output_hash(hidden), b"", nonce, client.public_key)
    return StageTask(req, 0, 0, MODEL, 1, LAST, activation_digest(output_hash(hidden), b""), k, NOW, NOW + 2000, client.public_key)


def run_round(signed: CandidateSet, pool: list[Provider], outputs: dict[str, dict]) -> StageRound:
    """Every member of the candidate set's committee commits and reveals outputs.get(member, HONEST)."""
    by_id = {p.peer_id: p.identity for p in pool}
    rnd = StageRound(signed, signed.committee())
    task = signed.task
    nonces = {m: os.urandom(32) for m in rnd.members}
    for m in rnd.members:
        out = outputs.get(m, HONEST)
        rnd.on_commit(sign_commit(by_id[m], task.task_id, signed.id, commitment(task.task_id, output_hash(out), nonces[m]), NOW + 10), NOW + 10)
    for m in rnd.members:
        out = outputs.get(m, HONEST)
        rnd.on_reveal(sign_reveal(by_id[m], task.task_id, output_hash(out), nonces[m]), out)
    return rnd


def certificate(client: Identity, stage: StageCertificate, nonce: bytes = b"n" * 32, hidden: dict = HIDDEN) -> Certificate:
    return Certificate(MODEL, client.public_key, nonce, output_hash(hidden), b"", [stage])


@pytest.fixture(scope="module")
def honest():
    """An honest query: five providers, a committee of three, everyone agrees."""
    pool = providers(5, MODEL, 1, LAST, NOW - 10_000, offset=1)
    signed = draw(CLIENT, task_for(CLIENT), pool)
    rnd = run_round(signed, pool, {})
    return pool, signed, rnd, certificate(CLIENT, rnd.decide().certificate)


def refused(cert: Certificate, match: str) -> None:
    with pytest.raises(ConsensusError, match=match):
        Certificate.decode(cert.encode()).verify()


def aged_sybil(model_id: str = MODEL, first: int = 1, last: int = LAST, offset: int = 0) -> Provider:
    """A fresh puzzle-solved identity with a self-signed, back-dated record: all an attacker needs."""
    return provider(Identity.generate() if offset < 0 else identities(1, offset=20 + offset)[0], model_id, first, last, NOW - 600_000)


# ---- forged certificates ----


def test_a_certificate_built_from_one_fresh_key_with_k1_is_refused():
    """Issue 9: one fresh key, k=1, the client and the only member, another output."""
    me = identities(1, offset=10)[0]
    mine = provider(me, MODEL, 1, LAST, NOW - 600_000)
    task = task_for(me, k=1)
    signed = sign_candidates(me, task, [Candidate(make_ticket(me, task.seed), mine.record)])
    stage = run_round_unchecked(signed, me, WRONG)
    refused(certificate(me, stage), "k=1 is below the minimum of 3")
    task3 = task_for(me, k=3)  # padded to k=3 with itself: still one key
    ticket = make_ticket(me, task3.seed)
    refused(certificate(me, run_round_unchecked(sign_candidates(me, task3, [Candidate(ticket, mine.record)] * 3), me, WRONG)),
            "listed twice")
    with_two = [aged_sybil(offset=8), aged_sybil(offset=9)]  # the client standing as a candidate with two more keys
    listed = [Candidate(make_ticket(me, task3.seed), mine.record)] + [Candidate(make_ticket(s.identity, task3.seed), s.record) for s in with_two]
    refused(certificate(me, run_round_unchecked(sign_candidates(me, task3, listed), me, WRONG)), "client is listed as its own candidate")


def attacker_signs(signer: Identity, task: StageTask, candidates: list[Candidate]) -> CandidateSet:
    """sign_candidates refuses to sign another client's task; an attacker just signs."""
    body = CandidateSet(task, tuple(candidates), b"\0" * 64).body()
    return CandidateSet(task, tuple(candidates), signer.sign(CANDIDATES_DOMAIN + body))


def run_round_unchecked(signed: CandidateSet, member: Identity, output: dict) -> StageCertificate:
    """A stage certificate an attacker writes by hand: its own commit and reveal, no round."""
    task, r = signed.task, b"r" * 32
    commit = sign_commit(member, task.task_id, signed.id, commitment(task.task_id, output_hash(output), r), NOW + 10)
    return StageCertificate(signed, [commit], [sign_reveal(member, task.task_id, output_hash(output), r)], [output])


def ground_keys(task: StageTask, beat: list[bytes], n: int) -> list[Provider]:
    """Grind fresh puzzle-solved keys until n of them rank below every honest ticket in
    the task's draw."""
    found: list[Provider] = []
    while len(found) < n:
        candidate = aged_sybil(offset=-1)
        if draw_key(make_ticket(candidate.identity, task.seed).beta(task.seed), task.request_hash, task.stage, task.attempt) < min(beat):
            found.append(candidate)
    return found


def test_two_ground_sybil_keys_cannot_take_over_an_honest_certificate(honest):
    """Issue 9: two fresh keys ground to rank first and second, signing another output."""
    pool, signed, _, cert = honest
    task = signed.task
    sybils = ground_keys(task, [draw_key(c.ticket.beta(task.seed), task.request_hash, task.stage, task.attempt) for c in signed.candidates], 2)
    listed = [Candidate(make_ticket(s.identity, task.seed), s.record) for s in sybils] + list(signed.candidates)
    stolen = CandidateSet(task, tuple(listed), signed.signature)  # the client's signature kept
    assert rank_tickets([c.ticket for c in listed], task.seed, task.request_hash, task.stage, task.attempt)[0].peer_id in {s.peer_id for s in sybils}
    refused(certificate(CLIENT, sybil_stage(stolen, sybils)), "not signed by the task's client")
    # re-signed by the attacker as client: the task now names another client, so it is another request
    mallory = identities(1, offset=12)[0]
    retask = replace(task, client_key=mallory.public_key)
    resigned = sign_candidates(mallory, retask, [Candidate(make_ticket(s.identity, task.seed), s.record) for s in sybils]
                               + list(signed.candidates))
    forged = certificate(CLIENT, sybil_stage(resigned, sybils))
    refused(forged, "another client's task")
    forged.client_key = mallory.public_key  # and claiming the attacker's client key in the header too
    refused(forged, "bound to another request")


def sybil_stage(signed: CandidateSet, sybils: list[Provider]) -> StageCertificate:
    task, r = signed.task, b"s" * 32
    commits = [sign_commit(s.identity, task.task_id, signed.id, commitment(task.task_id, output_hash(WRONG), r), NOW + 10) for s in sybils]
    reveals = [sign_reveal(s.identity, task.task_id, output_hash(WRONG), r) for s in sybils]
    return StageCertificate(signed, commits, reveals, [WRONG] * len(sybils))


def test_dropping_a_faulty_candidates_ticket_breaks_the_certificate():
    """Issue 9: the faulty member's ticket dropped so the fourth-ranked key becomes a member."""
    pool = providers(4, MODEL, 1, LAST, NOW - 10_000, offset=1)
    signed = draw(CLIENT, task_for(CLIENT, nonce=b"d" * 32), pool)
    faulty, fourth = signed.members[0], signed.candidates[3].ticket.peer_id
    rnd = run_round(signed, pool, {faulty: WRONG})
    stage = rnd.decide().certificate
    assert rnd.faults[faulty] == "wrong-output"
    dropped = CandidateSet(signed.task, tuple(c for c in signed.candidates if c.ticket.peer_id != faulty), signed.signature)
    by_id = {p.peer_id: p.identity for p in pool}
    task, r = signed.task, b"f" * 32
    extra = sign_commit(by_id[fourth], task.task_id, dropped.id, commitment(task.task_id, output_hash(HONEST), r), NOW + 10)
    tampered = StageCertificate(dropped, stage.commits + [extra], stage.reveals + [sign_reveal(by_id[fourth], task.task_id, output_hash(HONEST), r)],
                                stage.outputs + [HONEST])
    refused(certificate(CLIENT, tampered, nonce=b"d" * 32), "not signed by the task's client")


@pytest.mark.parametrize("field,value", [("mask_hash", b"m" * 32), ("mask_hash", b""), ("hidden_hash", b"h" * 32),
                                         ("client_nonce", b"x" * 32), ("model_id", "cd" * 32)])
def test_every_header_field_is_bound(honest, field, value):
    """Issue 9: in a one-stage certificate mask_hash was bound to nothing."""
    cert = honest[3]
    cert.verify()
    original = getattr(cert, field)
    if original == value:
        value = b"z" * 32
    setattr(cert, field, value)
    try:
        with pytest.raises(ConsensusError):
            Certificate.decode(cert.encode()).verify()
    finally:
        setattr(cert, field, original)


def test_bytes_outside_the_checked_fields_are_refused(honest):
    raw = msgpack.unpackb(honest[3].encode())
    raw["note"] = "unchecked"
    with pytest.raises(ConsensusError, match="exactly"):
        Certificate.decode(msgpack.packb(raw, use_bin_type=True))
    reordered = dict(reversed(list(msgpack.unpackb(honest[3].encode()).items())))
    with pytest.raises(ConsensusError, match="canonical"):
        Certificate.decode(msgpack.packb(reordered, use_bin_type=True))


def test_the_forging_bound_k_plus_one_aged_puzzle_solved_identities(honest):
    """What a certificate does not prove (docs/consensus.md): an attacker holding k + 1 = 4
    puzzle-solved identities with back-dated records certifies any output it likes."""
    sybils = [aged_sybil(offset=i) for i in range(3)]
    mallory = identities(1, offset=24)[0]
    task = task_for(mallory, nonce=b"f" * 32)
    signed = draw(mallory, task, sybils)
    forged = certificate(mallory, sybil_stage(signed, sybils[:2]), nonce=b"f" * 32)
    assert Certificate.decode(forged.encode()).verify()
    assert forged.output_hash == output_hash(WRONG)


# ---- verify --output / --input ----


def cli_main(argv: list[str]) -> int:
    """``p2p-infer verify`` without main(), which would point the process's logging at capsys."""
    return cmd_verify(build_parser().parse_args(argv), None)  # type: ignore[arg-type]


def test_verify_checks_the_output_and_input_it_is_given(honest, tmp_path, capsys):
    cert = honest[3]
    (tmp_path / "c.cert").write_bytes(cert.encode())
    (tmp_path / "right.out").write_bytes(activation_file(HONEST, None))
    (tmp_path / "wrong.out").write_bytes(activation_file(WRONG, None))
    (tmp_path / "right.in").write_bytes(activation_file(HIDDEN, None))
    (tmp_path / "wrong.in").write_bytes(activation_file(tensor(np.zeros(16)), None))
    verify = ["verify", str(tmp_path / "c.cert")]
    assert cli_main(verify + ["--output", str(tmp_path / "right.out"), "--input", str(tmp_path / "right.in")]) == 0
    assert "is the certified output" in capsys.readouterr().out
    assert cli_main(verify + ["--output", str(tmp_path / "wrong.out")]) == 1
    assert "INVALID: the output is not the one the certificate accepted" in capsys.readouterr().out
    assert cli_main(verify + ["--input", str(tmp_path / "wrong.in")]) == 1
    assert "INVALID: the input is not the one" in capsys.readouterr().out


def test_an_output_must_carry_the_certified_mask_or_none_when_there_was_none(honest):
    """The output's mask is the input's, carried through every stage: dropping it (or adding
    one) is a different output, like a different hidden state."""
    cert = honest[3]
    mask = tensor(np.ones(4))
    cert.check_output(HONEST, None)
    with pytest.raises(ConsensusError, match="mask is not the certificate's"):
        cert.check_output(HONEST, mask)
    masked = replace(cert, mask_hash=output_hash(mask))  # the same check on a masked query's certificate
    masked.check_output(HONEST, mask)
    with pytest.raises(ConsensusError, match="mask is not the certificate's"):
        masked.check_output(HONEST, None)


# ---- framing an honest member ----


def test_an_outsiders_made_up_task_is_refused_by_the_honest_member(honest):
    """Issue 9: a peer on no committee sends execute for a task it made up (k=1)."""
    pool = honest[0]
    victim = MemberCore(pool[0].identity)
    outsider = identities(1, offset=13)[0]
    made_up = task_for(outsider, k=1, nonce=b"o" * 32)
    k1 = sign_candidates(outsider, made_up, [Candidate(victim.ticket(made_up.seed), pool[0].record)])
    with pytest.raises(NotSelected, match="below the minimum"):
        victim.check_execute(k1, made_up.input_hash, outsider.peer_id, NOW)
    # k=3, padded with keys that solve no puzzle and have no record
    lazy = [i for i in (Identity.from_seed(bytes([n]) * 32) for n in range(64)) if not i.solves_puzzle][:2]
    made_up3 = task_for(outsider, k=3, nonce=b"p" * 32)
    padded = [Candidate(victim.ticket(made_up3.seed), pool[0].record)] + [Candidate(make_ticket(i, made_up3.seed), b"") for i in lazy]
    with pytest.raises(NotSelected, match="puzzle"):
        victim.check_execute(sign_candidates(outsider, made_up3, padded), made_up3.input_hash, outsider.peer_id, NOW)
    # a real client's task relayed by the outsider: only the task's client may ask
    with pytest.raises(NotSelected, match="task is"):
        MemberCore(pool[0].identity).check_execute(honest[1], honest[1].task.input_hash, outsider.peer_id, NOW)
    assert victim.pending == {} and victim.committed == {}  # it signed nothing


def fabricated_evidence(honest) -> list[tuple[Evidence, str]]:
    """What an outsider with one sybil can say against an honest member, using the member's
    real signed commit, reveal and output from a real round (they are gossiped)."""
    pool, signed, rnd, _ = honest
    victim = signed.members[0]
    commit, (reveal, output) = rnd.commits[victim], rnd.reveals[victim]
    outsider, sybil = identities(1, offset=14)[0], aged_sybil(offset=5)
    task = signed.task
    out: list[tuple[Evidence, str]] = []
    # 1. the recipe: a k=1 certificate of one sybil with another output, for the real task
    own = attacker_signs(outsider, task, [Candidate(make_ticket(sybil.identity, task.seed), sybil.record)])
    out.append((Evidence("wrong-output", victim, [commit], reveal, output, sybil_stage(own, [sybil])), "not signed by the task's client"))
    # 2. the real candidate set, with sybil commits as the "quorum"
    out.append((Evidence("wrong-output", victim, [commit], reveal, output, sybil_stage(signed, [sybil, aged_sybil(offset=6)])),
                "is not on the committee the candidate set selects"))
    # 3. the outsider's own made-up task with the victim listed (it never executed it)
    made_up = task_for(outsider, nonce=b"q" * 32)
    victim_provider = next(p for p in pool if p.peer_id == victim)
    listed = draw(outsider, made_up, [victim_provider, sybil, aged_sybil(offset=6)])
    out.append((Evidence("wrong-output", victim, [commit], reveal, output, sybil_stage(listed, [sybil, aged_sybil(offset=6)])),
                "not the member's signed commits for the task"))
    # 4. equivocation with a second "commit" signed by the sybil, and bad-reveal with a sybil's reveal
    fake = sign_commit(sybil.identity, task.task_id, signed.id, b"c" * 32, NOW)
    out.append((Evidence("equivocation", victim, [commit, fake], candidates=signed), "not the member's signed commits"))
    out.append((Evidence("bad-reveal", victim, [commit], sign_reveal(sybil.identity, task.task_id, b"o" * 32, b"r" * 32), candidates=signed),
                "needs the member's signed reveal"))
    # 5. the victim's real commit and reveal under a candidate set the outsider made for the real task
    out.append((Evidence("bad-reveal", victim, [commit], reveal, candidates=own), "not signed by the task's client"))
    return out


def test_fabricated_evidence_is_refused_by_every_auditor_and_moves_no_reputation(honest):
    """Issue 9: the outsider gossips wrong-output evidence; every peer must refuse it."""
    victim = honest[1].members[0]
    auditors = [Auditor(Reputation()) for _ in range(3)]
    for evidence, reason in fabricated_evidence(honest):
        wire = Evidence.from_wire(msgpack.unpackb(msgpack.packb(evidence.to_wire(), use_bin_type=True)))
        for auditor in auditors:
            with pytest.raises(ConsensusError, match=reason):
                auditor.on_evidence(wire, reporter="outsider")
            assert auditor.observe("outsider", {"type": "evidence", "evidence": evidence.to_wire()}) == []
    for auditor in auditors:
        assert auditor.reputation.of(victim) == 1.0 and auditor.reputation.scores == {} and auditor.punished == {}


def test_a_round_under_a_made_up_candidate_set_is_not_remembered(honest):
    """Gossiped rounds with the victim's real commit but someone else's candidate set never
    reach the tables equivocation evidence is built from."""
    pool, signed, rnd, _ = honest
    victim = signed.members[0]
    outsider, sybil = identities(1, offset=15)[0], aged_sybil(offset=7)
    own = attacker_signs(outsider, signed.task, [Candidate(make_ticket(sybil.identity, signed.task.seed), sybil.record)])
    auditor = Auditor(Reputation())
    reveal, _ = rnd.reveals[victim]
    assert auditor.observe("outsider", round_message(own, rnd.commits[victim], reveal)) == []
    assert auditor.commits == {}
    assert auditor.observe(victim, round_message(signed, rnd.commits[victim], reveal)) == []  # the real one counts
    assert (signed.task.task_id, victim) in auditor.commits and auditor.reputation.scores == {}


def test_a_round_whose_commit_names_another_candidate_set_is_refused(honest):
    """The commit binds the candidate set it was made under (as the client's round checks):
    paired with another set, even a valid one that selects the member, it is not logged."""
    pool, signed, rnd, _ = honest
    victim = signed.members[0]
    identity = next(p.identity for p in pool if p.peer_id == victim)
    real = rnd.commits[victim]
    elsewhere = sign_commit(identity, real.task_id, b"x" * 32, real.commitment, real.committed_at_ms)
    reveal, _ = rnd.reveals[victim]
    auditor = Auditor(Reputation())
    with pytest.raises(ConsensusError, match="under another candidate set"):
        auditor.on_round(victim, round_message(signed, elsewhere, reveal))
    assert auditor.observe(victim, round_message(signed, elsewhere, reveal)) == [] and auditor.commits == {}


def test_wrong_output_evidence_without_its_stage_certificate_is_refused(honest):
    pool, signed, rnd, _ = honest
    victim = signed.members[0]
    reveal, output = rnd.reveals[victim]
    with pytest.raises(ConsensusError, match="no stage certificate"):
        Evidence("wrong-output", victim, [rnd.commits[victim]], reveal, output, None, candidates=signed).verify()


def test_real_evidence_against_a_real_member_still_counts(honest):
    pool = providers(4, MODEL, 1, LAST, NOW - 10_000, offset=1)
    signed = draw(CLIENT, task_for(CLIENT, nonce=b"w" * 32), pool)
    liar = signed.members[1]
    rnd = run_round(signed, pool, {liar: WRONG})
    decision = rnd.decide()
    evidence = Evidence("wrong-output", liar, [rnd.commits[liar]], *rnd.reveals[liar], decision.certificate)
    auditor = Auditor(Reputation())
    assert auditor.on_evidence(Evidence.from_wire(evidence.to_wire()), reporter="client")
    assert auditor.reputation.of(liar) == pytest.approx(0.8)


# ---- the identity puzzle ----


def test_identities_solve_the_puzzle_and_those_that_do_not_are_refused(tmp_path):
    started = time.perf_counter()
    fresh = [Identity.generate() for _ in range(5)]
    assert (time.perf_counter() - started) / 5 < 1.0  # key creation stays well under a second
    assert all(leading_zero_bits(puzzle_hash(i.public_key)) >= PUZZLE_DIFFICULTY for i in fresh)
    lazy = next(i for i in (Identity.from_seed(bytes([n]) * 32) for n in range(256)) if not i.solves_puzzle)
    task = task_for(CLIENT, nonce=b"z" * 32)
    with pytest.raises(ConsensusError, match="puzzle"):
        make_ticket(lazy, task.seed).beta(task.seed)
    assert rank_tickets([make_ticket(lazy, task.seed)], task.seed, task.request_hash) == []
    lazy_client_task = task_for(lazy, nonce=b"z" * 32)
    pool = providers(3, MODEL, 1, LAST, NOW - 10_000, offset=1)
    with pytest.raises(ConsensusError, match="client .* does not solve the identity puzzle"):
        draw(lazy, lazy_client_task, pool).members
    save_identity(lazy, tmp_path / "old.key")
    with pytest.raises(PuzzleUnsolved, match="does not solve the identity puzzle"):
        load_or_create_identity(tmp_path / "old.key")


@pytest.mark.parametrize("issued,first,last,reason", [
    (NOW - MIN_RECORD_AGE_MS + 1, 1, LAST, "less than"),  # minted just before the request
    (NOW - 3_600_000 * 2, 1, LAST, "expired"),  # dead at the request (records live 1 h here)
    (NOW - 10_000, 1, 1, "does not advertise"),  # serves other layers
])
def test_candidate_records_must_be_aged_live_and_for_the_layers(issued, first, last, reason):
    pool = providers(2, MODEL, 1, LAST, NOW - 10_000, offset=1) + [provider(identities(1, offset=3)[0], MODEL, first, last, issued)]
    with pytest.raises(ConsensusError, match=reason):
        draw(CLIENT, task_for(CLIENT, nonce=b"a" * 32), pool).members
