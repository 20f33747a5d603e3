"""protocols/test-vectors/committee-v3.json rebuilt byte for byte from its fields: puzzle
hashes, request hash, task, tickets, the signed candidate set, commits, reveals and the
certificate (protocols/committee.md)."""

import json
from pathlib import Path

import msgpack

from p2p_infer.identity import PUZZLE_DIFFICULTY, Identity, leading_zero_bits, puzzle_hash
from p2p_infer.proto import vrf
from p2p_infer.proto.consensus import (
    Candidate,
    Certificate,
    StageCertificate,
    StageTask,
    activation_digest,
    commitment,
    draw_key,
    make_ticket,
    output_hash,
    request_hash,
    sign_candidates,
    sign_commit,
    sign_reveal,
)

V = json.loads((Path(__file__).parent.parent / "protocols" / "test-vectors" / "committee-v3.json").read_text())


def ident(entry: dict) -> Identity:
    i = Identity.from_seed(bytes.fromhex(entry["seed_hex"]))
    assert (i.public_key.hex(), i.peer_id) == (entry["public_key_hex"], entry["peer_id"])
    assert puzzle_hash(i.public_key).hex() == entry["puzzle_hash_hex"]
    assert leading_zero_bits(puzzle_hash(i.public_key)) == entry["leading_zero_bits"] >= PUZZLE_DIFFICULTY == V["puzzle_difficulty"]
    return i


def tensor(entry: dict) -> dict:
    return {"dtype": entry["dtype"], "shape": entry["shape"], "data": bytes.fromhex(entry["data"])}


def test_committee_vector_byte_for_byte():
    client, members = ident(V["client"]), {m["peer_id"]: ident(m) for m in V["members"]}
    hidden, output = tensor(V["hidden"]), tensor(V["output"])
    assert output_hash(hidden).hex() == V["hidden_hash_hex"] and output_hash(output).hex() == V["output_hash_hex"]
    nonce = bytes.fromhex(V["client_nonce_hex"])
    req = request_hash(V["model_id"], output_hash(hidden), b"", nonce, client.public_key)
    assert req.hex() == V["request_hash_hex"]
    fields = [bytes.fromhex(f) if isinstance(f, str) and i in (0, 6, 10, 11) else f for i, f in enumerate(V["task"]["fields"])]
    task = StageTask(*fields)
    assert task == StageTask(req, 0, 0, V["model_id"], 1, 2, activation_digest(output_hash(hidden), b""), 3,
                             task.requested_at_ms, task.commit_deadline_ms, client.public_key, bytes.fromhex(V["session_hex"]))
    assert msgpack.packb(task.to_wire(), use_bin_type=True).hex() == V["task"]["msgpack_hex"]
    assert (task.task_id.hex(), task.seed.hex()) == (V["task"]["task_id_hex"], V["task"]["seed_hex"])
    candidates = []
    for c in V["candidates"]:
        ticket = make_ticket(members[c["peer_id"]], task.seed)
        assert ticket.proof.hex() == c["vrf_proof_hex"] and vrf.proof_to_hash(ticket.proof).hex() == c["beta_hex"]
        assert draw_key(ticket.beta(task.seed), task.request_hash, task.stage, task.attempt).hex() == c["draw_hex"]
        candidates.append(Candidate(ticket, bytes.fromhex(c["record_hex"])))
    signed = sign_candidates(client, task, candidates)
    cs = V["candidate_set"]
    assert (signed.body().hex(), signed.signature.hex(), signed.id.hex()) == (cs["body_hex"], cs["signature_hex"], cs["id_hex"])
    assert signed.members == cs["committee"]
    commits, reveals = [], []
    for peer, c, r in zip(cs["committee"], V["commits"], V["reveals"]):
        r_nonce = bytes.fromhex(c["nonce_hex"])
        commits.append(sign_commit(members[peer], task.task_id, signed.id, commitment(task.task_id, output_hash(output), r_nonce),
                                   c["committed_at_ms"]))
        reveals.append(sign_reveal(members[peer], task.task_id, output_hash(output), r_nonce))
        assert msgpack.packb(commits[-1].to_wire(), use_bin_type=True).hex() == c["wire_hex"]
        assert msgpack.packb(reveals[-1].to_wire(), use_bin_type=True).hex() == r
    cert = Certificate(V["model_id"], client.public_key, nonce, output_hash(hidden), b"", [StageCertificate(signed, commits, reveals, [output] * 2)])
    assert cert.encode().hex() == V["certificate_hex"]
    decoded = Certificate.decode(bytes.fromhex(V["certificate_hex"]))
    assert decoded.verify() and decoded.encode() == cert.encode()
