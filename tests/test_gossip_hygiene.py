"""Gossip hygiene (issue 10): only checked gossip reaches the audit log, once, with the
verified signer as reporter; oversized messages are refused before they are handled."""

from types import SimpleNamespace

import msgpack
import pytest
import numpy as np

from p2p_infer.clock import now_ms
from p2p_infer.identity import Identity
from p2p_infer.net.gossip import MAX_VERDICTS_BYTES, acceptable_size
from p2p_infer.proto.audit import AuditLog, read_chain
from p2p_infer.proto.auditor import Auditor
from p2p_infer.proto.committee_codec import round_message, verdicts_message
from p2p_infer.ml.models import load_model
from p2p_infer.proto.consensus import StageTask, activation_digest, commitment, output_hash, request_hash, sign_commit, sign_reveal
from p2p_infer.proto.reputation import Reputation
from p2p_infer.proto.tensors import array_to_wire
from p2p_infer.testing.population import draw, identities, providers

TASK = b"t" * 32
MODEL = load_model("digits-mlp").model_id
NOW = now_ms()
CLIENT = identities(1, offset=40)[0]
POOL = providers(3, MODEL, 1, 3, NOW - 10_000, offset=41)  # k=3 of 3: every provider is selected
HIDDEN = array_to_wire(np.ones((1, 4), dtype=np.float32))
STAGE = StageTask(request_hash(MODEL, output_hash(HIDDEN), b"", b"n" * 32, CLIENT.public_key), 0, 0, MODEL, 1, 3,
                  activation_digest(output_hash(HIDDEN), b""), 3, NOW, NOW + 60_000, CLIENT.public_key)
CANDIDATES = draw(CLIENT, STAGE, POOL)
MEMBER, OUTSIDER = POOL[0].identity, POOL[1].identity


def member_round(member: Identity = MEMBER, value: float = 1.0, nonce: bytes = b"n" * 32) -> dict:
    task = STAGE.task_id
    output = array_to_wire(np.full((1, 4), value, dtype=np.float32))
    out_hash = output_hash(output)
    commit = sign_commit(member, task, CANDIDATES.id, commitment(task, out_hash, nonce), NOW)
    return round_message(CANDIDATES, commit, sign_reveal(member, task, out_hash, nonce))


def auditor(tmp_path) -> Auditor:
    return Auditor(Reputation(), AuditLog(tmp_path / "a.audit.log", Identity.generate(), now_ms))


def logged(a: Auditor) -> list[dict]:
    return read_chain(a.audit.path)


def test_a_members_own_round_is_logged_once_however_often_it_is_replayed(tmp_path):
    a, member = auditor(tmp_path), MEMBER
    message = member_round(member)
    assert set(message) == {"type", "candidates", "commit", "reveal"}  # topic v6: no output, its hash is in the reveal
    for _ in range(3):
        assert a.observe(member.peer_id, message) == []
    assert [e["kind"] for e in logged(a)] == ["commit", "reveal"]


def test_rounds_from_others_or_inconsistent_pairs_are_not_logged(tmp_path):
    a, member, outsider = auditor(tmp_path), MEMBER, OUTSIDER
    a.observe(outsider.peer_id, member_round(member))  # relayed under another signer
    good, other = member_round(member), member_round(member, value=2.0, nonce=b"m" * 32)
    a.observe(member.peer_id, {**good, "reveal": {**dict(enumerate(other["reveal"]))}})  # not a reveal at all
    a.observe(member.peer_id, {**good, "commit": member_round(OUTSIDER)["commit"]})  # another member's commit
    assert logged(a) == []


def test_an_equivocating_member_is_still_caught_from_its_own_rounds(tmp_path):
    a, member = auditor(tmp_path), MEMBER
    a.observe(member.peer_id, member_round(member))
    evidence = a.observe(member.peer_id, member_round(member, value=3.0, nonce=b"x" * 32))
    assert "equivocation" in [e.kind for e in evidence]


def test_verdicts_are_logged_with_the_signer_as_reporter_and_only_verdict_fields(tmp_path):
    a, client, victim = auditor(tmp_path), Identity.generate(), Identity.generate()
    stage = {"task": TASK, "stage": 0, "verdicts": {victim.peer_id: "agree"}, "reporter": victim.peer_id, "junk": "x" * 1000}
    a.observe(client.peer_id, verdicts_message(client.peer_id, [stage]))
    a.observe(client.peer_id, verdicts_message(client.peer_id, [stage]))  # replayed
    a.observe(client.peer_id, verdicts_message(victim.peer_id, [stage]))  # names someone else as the client
    a.observe(client.peer_id, verdicts_message(client.peer_id, [{**stage, "verdicts": {"m": "x" * 5000}}]))
    a.observe(client.peer_id, verdicts_message(client.peer_id, [stage] * 65))
    entries = logged(a)
    assert [e["kind"] for e in entries] == ["verdict"]
    assert entries[0]["data"] == {"reporter": client.peer_id, "client": client.peer_id, "task": TASK.hex(), "stage": 0,
                                  "verdicts": {victim.peer_id: "agree"}}


def test_the_gossip_validator_refuses_oversized_and_unknown_messages():
    def msg(message):
        return SimpleNamespace(data=msgpack.packb(message, use_bin_type=True))

    client = Identity.generate().peer_id
    assert acceptable_size(None, msg(verdicts_message(client, [{"task": TASK, "stage": 0, "verdicts": {}}])))
    huge = verdicts_message(client, [{"task": TASK, "stage": 0, "verdicts": {}, "pad": b"x" * (850 * 1024)}])
    assert not acceptable_size(None, msg(huge))  # 10 of these grew every log by 7.9 MB
    assert not acceptable_size(None, msg({"type": "verdicts", "pad": b"x" * (MAX_VERDICTS_BYTES + 1)}))
    assert acceptable_size(None, msg(member_round()))
    assert not acceptable_size(None, msg({"type": "round", "pad": b"x" * (1024 * 1024)}))
    assert not acceptable_size(None, msg({"type": "teleport"}))
    assert not acceptable_size(None, SimpleNamespace(data=b"\xc1"))


def test_a_members_reveal_that_does_not_open_its_commit_is_evidence_not_noise(tmp_path):
    a = auditor(tmp_path)
    good, other = member_round(), member_round(value=2.0, nonce=b"m" * 32)
    evidence = a.observe(MEMBER.peer_id, {**good, "reveal": other["reveal"]})
    assert [e.kind for e in evidence] == ["bad-reveal"]
    assert "evidence" in [e["kind"] for e in logged(a)]


def test_a_client_audits_only_the_rounds_of_its_own_tasks():
    """Clients leave other clients' rounds to the peers (CPU per query); their own are still
    audited, so a member that gossips another commitment than it sent is caught."""
    other_stage = StageTask(request_hash(MODEL, output_hash(HIDDEN), b"", b"o" * 32, CLIENT.public_key), 0, 0, MODEL, 1, 3,
                            activation_digest(output_hash(HIDDEN), b""), 3, NOW, NOW + 60_000, CLIENT.public_key)
    others = draw(CLIENT, other_stage, POOL)
    output = array_to_wire(np.full((1, 4), 1.0, dtype=np.float32))
    commit = sign_commit(MEMBER, other_stage.task_id, others.id, commitment(other_stage.task_id, output_hash(output), b"n" * 32), NOW)
    foreign = round_message(others, commit, sign_reveal(MEMBER, other_stage.task_id, output_hash(output), b"n" * 32))
    client = Auditor(Reputation(), own_rounds_only=True)
    client.remember_committee(CANDIDATES, tuple(CANDIDATES.members))
    assert client.observe(MEMBER.peer_id, foreign) == [] and not client.commits  # another task: left to the peers
    client.observe(MEMBER.peer_id, member_round(MEMBER))
    assert set(client.commits) == {(STAGE.task_id, MEMBER.peer_id)}  # its own: audited
    peer = Auditor(Reputation())
    peer.observe(MEMBER.peer_id, foreign)
    assert set(peer.commits) == {(other_stage.task_id, MEMBER.peer_id)}  # a peer audits every round


def test_a_members_rounds_go_out_in_one_message_and_are_audited_one_by_one(tmp_path):
    """Gossip v5: rounds released within one gossip delay (a query's stages) travel as one
    ``rounds`` message; the receiver handles each entry as a ``round`` from the same signer."""
    from p2p_infer.errors import ProtocolViolation
    from p2p_infer.proto.committee_codec import MAX_BATCH_ROUNDS, batches, unbatch

    one, two = member_round(MEMBER), member_round(OUTSIDER, value=2.0)
    assert batches([one]) == [one] and unbatch(one) == [one]  # alone: a plain round, as before
    [batch] = batches([one, two])
    assert batch["type"] == "rounds" and unbatch(batch) == [one, two]
    assert acceptable_size(None, SimpleNamespace(data=msgpack.packb(batch, use_bin_type=True)))
    assert [len(unbatch(b)) for b in batches([one] * (MAX_BATCH_ROUNDS + 1))] == [MAX_BATCH_ROUNDS, 1]
    for bad in ({"type": "rounds", "rounds": []}, {"type": "rounds", "rounds": [{"type": "verdicts"}]},
                {"type": "rounds", "rounds": [one] * (MAX_BATCH_ROUNDS + 1)}):
        with pytest.raises(ProtocolViolation):
            unbatch(bad)
    a = auditor(tmp_path)
    for item in unbatch(batch):  # what the gossip drain does, signed by MEMBER: only MEMBER's own round counts
        a.observe(MEMBER.peer_id, item)
    assert [(e["kind"], e["data"]["member"]) for e in logged(a)] == [("commit", MEMBER.peer_id), ("reveal", MEMBER.peer_id)]


def test_signature_checks_are_remembered_and_never_admit_a_changed_byte():
    from dataclasses import replace

    from p2p_infer.proto import consensus
    from p2p_infer.proto.consensus import Commit

    commit = Commit.from_wire(member_round(MEMBER, value=3.0)["commit"])
    assert commit.valid_signature() and commit.valid_signature()
    assert ("valid" in {consensus.SIGNATURES.get((commit.member, commit.public_key, consensus.COMMIT_DOMAIN + commit.body(),
                                                  commit.signature))})
    for changed in (replace(commit, committed_at_ms=commit.committed_at_ms + 1), replace(commit, signature=bytes(64)),
                    replace(commit, member=OUTSIDER.peer_id)):
        assert not changed.valid_signature() and not changed.valid_signature()
