"""Writes record-v2.json, record-v3.json, committee-v3.json and checkpoint.json from fixed seeds and fields.

    PYTHONPATH=. python protocols/test-vectors/generate.py

Run it only when a protocol version changes: the vectors pin the bytes, and
tests/test_vectors.py rebuilds every one of them from the fields and compares.
Keys are ``seed_for(name)``: the first ``SHA-256("p2p-infer test vector " || name || u32be(n))``
whose key solves the identity puzzle.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from p2p_infer.identity import PUZZLE_DIFFICULTY, Identity, leading_zero_bits, puzzle_hash  # noqa: E402
from p2p_infer.proto import vrf  # noqa: E402
from p2p_infer.proto.consensus import (  # noqa: E402
    Candidate,
    Certificate,
    StageCertificate,
    StageTask,
    activation_digest,
    commitment,
    draw_key,
    make_ticket,
    output_hash,
    rank_tickets,
    request_hash,
    sign_candidates,
    sign_commit,
    sign_reveal,
)
from p2p_infer.proto.records import SIGNING_DOMAIN, ShardSpec, all_peers_key, make_record, model_key, record_key, shard_key, sign_record  # noqa: E402

HERE = Path(__file__).parent
MODEL = "f4824c9e60a9654844afb72cd9c0c8e6a9b3739e3f0e11ba507f61518d428823"
ISSUED = 1_764_000_000_000
REQUESTED = ISSUED + 60_000


def seed_for(name: str) -> tuple[bytes, int]:
    n = 0
    while True:
        seed = hashlib.sha256(b"p2p-infer test vector " + name.encode() + n.to_bytes(4, "big")).digest()
        if Identity.from_seed(seed).solves_puzzle:
            return seed, n
        n += 1


def identity_vector(name: str) -> tuple[Identity, dict]:
    seed, n = seed_for(name)
    ident = Identity.from_seed(seed)
    return ident, {"name": name, "counter": n, "seed_hex": seed.hex(), "public_key_hex": ident.public_key.hex(), "peer_id": ident.peer_id,
                   "puzzle_hash_hex": puzzle_hash(ident.public_key).hex(), "leading_zero_bits": leading_zero_bits(puzzle_hash(ident.public_key))}


def record_fields(ident: Identity, first: int = 1, last: int = 2) -> dict:
    return {"peer_id": ident.peer_id, "addrs": [f"/ip4/127.0.0.1/tcp/4001/p2p/{ident.peer_id}"], "shards": [[MODEL, first, last]],
            "throughput": 1234.5, "load": 0.25, "software": "p2p-infer/0.1.0", "protocols": ["/p2p-infer/committee/4.0.0"],
            "issued_at_ms": ISSUED, "ttl_ms": 120_000}


def signed_record(ident: Identity, f: dict) -> bytes:
    rec = make_record(ident, addrs=f["addrs"], shards=[ShardSpec(*s) for s in f["shards"]], throughput=f["throughput"], load=f["load"],
                      software=f["software"], protocols=f["protocols"], ttl_ms=f["ttl_ms"], issued_at_ms=f["issued_at_ms"])
    return sign_record(rec, ident)


def record_vector() -> dict:
    ident, idv = identity_vector("record")
    f = record_fields(ident)
    env = signed_record(ident, f)
    body = msgpack.unpackb(env)[1]
    rec = make_record(ident, addrs=f["addrs"], shards=[ShardSpec(*s) for s in f["shards"]], issued_at_ms=ISSUED)
    return {
        "description": "Capability record, schema 2, signed by a puzzle-solved key (see protocols/records.md).",
        "puzzle_difficulty": PUZZLE_DIFFICULTY, "identity": idv, "record": f, "signing_domain": SIGNING_DOMAIN.decode(),
        "body_hex": body.hex(), "signed_bytes_hex": (SIGNING_DOMAIN + body).hex(), "signature_hex": msgpack.unpackb(env)[2].hex(),
        "envelope_hex": env.hex(), "dht_value_key": record_key(ident.peer_id),
        "provider_keys": {"all_peers": all_peers_key(), "model": model_key(MODEL), "shard": shard_key(rec.shards[0])},
        "verify_at_ms": ISSUED + 60_000,
    }


def record_v3_vector() -> dict:
    """A schema 3 record: tee "simulated" with an attestation over a fixed code hash and layer hashes."""
    from p2p_infer.verify import tee

    ident, idv = identity_vector("record")
    f = record_fields(ident)
    code = bytes([0x11]) * 32
    layer_hashes = [hashlib.sha256(f"layer {i}".encode()).hexdigest() for i in (1, 2)]
    shards = [(MODEL, 1, 2, layer_hashes)]
    measured = tee.measurement(code, shards)
    attestation = tee.SimAttester().attest(ident.public_key, measured, code, ISSUED)
    rec = make_record(ident, addrs=f["addrs"], shards=[ShardSpec(*s) for s in f["shards"]], throughput=f["throughput"], load=f["load"],
                      software=f["software"], protocols=f["protocols"], ttl_ms=f["ttl_ms"], issued_at_ms=f["issued_at_ms"],
                      tee="simulated", tee_attestation=attestation)
    env = sign_record(rec, ident)
    return {
        "description": "Capability record, schema 3: tee simulated with its attestation (see protocols/records.md, protocols/tee.md).",
        "identity": idv, "record": f, "code_hash_hex": code.hex(), "layer_hashes": layer_hashes,
        "sim_root_public_key_hex": tee.sim_root_public_key().hex(), "measurement_hex": measured.hex(),
        "report_data_hex": tee.report_data(ident.public_key, measured).hex(), "attestation_hex": attestation.hex(),
        "body_hex": msgpack.unpackb(env)[1].hex(), "envelope_hex": env.hex(), "verify_at_ms": ISSUED + 60_000,
    }


def committee_vector() -> dict:
    client, client_v = identity_vector("client")
    idents = [identity_vector(f"member-{i}") for i in range(3)]
    hidden = {"dtype": "float32", "shape": [1, 4], "data": bytes.fromhex("0000803f000000400000404000008040")}  # 1 2 3 4
    output = {"dtype": "float32", "shape": [1, 4], "data": bytes.fromhex("000000400000804000c0004100000041")}
    nonce = bytes(range(32))
    hidden_hash, mask_hash = output_hash(hidden), b""
    req = request_hash(MODEL, hidden_hash, mask_hash, nonce, client.public_key)
    session = bytes(range(32, 64))
    task = StageTask(req, 0, 0, MODEL, 1, 2, activation_digest(hidden_hash, mask_hash), 3, REQUESTED, REQUESTED + 2000, client.public_key,
                     session)
    records = {i.peer_id: signed_record(i, record_fields(i)) for i, _ in idents}
    tickets = [make_ticket(i, task.seed) for i, _ in idents]
    ranked = rank_tickets(tickets, task.seed, task.request_hash, task.stage, task.attempt)
    signed = sign_candidates(client, task, [Candidate(t, records[t.peer_id]) for t in ranked])
    by_id = {i.peer_id: i for i, _ in idents}
    agreeing = [by_id[t.peer_id] for t in ranked[:2]]
    nonces = [bytes([0xA0 + n]) * 32 for n in range(2)]
    commits = [sign_commit(m, task.task_id, signed.id, commitment(task.task_id, output_hash(output), r), REQUESTED + 500)
               for m, r in zip(agreeing, nonces)]
    reveals = [sign_reveal(m, task.task_id, output_hash(output), r) for m, r in zip(agreeing, nonces)]
    stage = StageCertificate(signed, commits, reveals, [output, output])
    cert = Certificate(MODEL, client.public_key, nonce, hidden_hash, mask_hash, [stage])
    cert.verify()
    return {
        "description": "One committee stage end to end: puzzle-solved keys, task, tickets, the client's signed candidate set, "
                       "two agreeing members' commits and reveals, and the certificate (see protocols/committee.md).",
        "puzzle_difficulty": PUZZLE_DIFFICULTY, "client": client_v, "members": [v for _, v in idents],
        "model_id": MODEL, "client_nonce_hex": nonce.hex(), "session_hex": session.hex(), "hidden": {**hidden, "data": hidden["data"].hex()},
        "hidden_hash_hex": hidden_hash.hex(), "mask_hash_hex": "", "request_hash_hex": req.hex(),
        "task": {"fields": [f.hex() if isinstance(f, bytes) else f for f in task.to_wire()],
                 "msgpack_hex": msgpack.packb(task.to_wire(), use_bin_type=True).hex(), "task_id_hex": task.task_id.hex(), "seed_hex": task.seed.hex()},
        "records_issued_at_ms": ISSUED,
        "candidates": [{"peer_id": c.ticket.peer_id, "record_hex": c.record.hex(), "vrf_proof_hex": c.ticket.proof.hex(),
                        "beta_hex": vrf.proof_to_hash(c.ticket.proof).hex(),
                        "draw_hex": draw_key(vrf.proof_to_hash(c.ticket.proof), task.request_hash, task.stage, task.attempt).hex()} for c in signed.candidates],
        "candidate_set": {"body_hex": signed.body().hex(), "signature_hex": signed.signature.hex(), "id_hex": signed.id.hex(),
                          "committee": signed.members},
        "output": {**output, "data": output["data"].hex()}, "output_hash_hex": output_hash(output).hex(),
        "commits": [{"nonce_hex": r.hex(), "committed_at_ms": REQUESTED + 500, "wire_hex": msgpack.packb(c.to_wire(), use_bin_type=True).hex()}
                    for c, r in zip(commits, nonces)],
        "reveals": [msgpack.packb(r.to_wire(), use_bin_type=True).hex() for r in reveals],
        "certificate_hex": cert.encode().hex(),
    }


def checkpoint_vector() -> dict:
    """An audit-log checkpoint (committee.md, gossip "checkpoint") by a puzzle-solved key, so a
    witness keeps it; the head is an arbitrary fixed hash (the log's last entry's)."""
    from p2p_infer.proto.checkpoints import checkpoint_message, sign_checkpoint

    ident, ident_v = identity_vector("checkpoint")
    head = hashlib.sha256(b"p2p-infer test vector checkpoint head").digest()
    cp = sign_checkpoint(ident, 42, head, ISSUED)
    return {"description": "Audit-log checkpoint signed by a puzzle-solved test key: body, signed bytes, signature and the "
                           "whole gossip message (see protocols/committee.md, gossip 'checkpoint').",
            **{k: ident_v[k] for k in ("counter", "seed_hex", "public_key_hex", "peer_id", "puzzle_hash_hex", "leading_zero_bits")},
            "count": 42, "head_hex": head.hex(), "time_ms": ISSUED, "body_hex": cp.body().hex(),
            "signed_bytes_hex": cp.signed_bytes().hex(), "signature_hex": cp.signature.hex(),
            "gossip_message_hex": msgpack.packb(checkpoint_message(cp), use_bin_type=True).hex()}


if __name__ == "__main__":
    for name, vector in (("record-v2.json", record_vector()), ("record-v3.json", record_v3_vector()),
                         ("committee-v3.json", committee_vector()), ("checkpoint.json", checkpoint_vector())):
        (HERE / name).write_text(json.dumps(vector, indent=2) + "\n")
        print("wrote", HERE / name)
