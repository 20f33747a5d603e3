"""protocols/test-vectors/session.json rebuilt from its fields: messages, the step commitment
(digest, signed bytes, Ed25519 signature) and seeded sampling (protocols/session.md)."""

import hashlib
import json
from pathlib import Path

import msgpack
import numpy as np

from p2p_infer.identity import Identity, verify_signature
from p2p_infer.proto.generation import commitment_bytes, output_digest, rows_hash, signed_commitment, to_wire
from p2p_infer.proto.sampling import Sampling, choose, gumbel_noise
from p2p_infer.proto.session import Hop, LinkRequest, OpenRequest, StepRequest, parse_request

V = json.loads((Path(__file__).parent.parent / "protocols" / "test-vectors" / "session.json").read_text())
SESSION = V["session_step"]["session"]


def test_messages():
    fields = V["session_open"]["fields"]
    assert msgpack.packb(fields, use_bin_type=True).hex() == V["session_open"]["msgpack_hex"]
    assert parse_request(fields, 576) == OpenRequest(SESSION, fields["model"], 1, 10, 69, fields["upstream"])
    hidden = (np.arange(576, dtype=np.float32).reshape(1, 576) / 100 - 2.88).astype(np.float32)
    step = StepRequest(SESSION, 0, 0, to_wire(hidden), True).to_wire()
    assert hashlib.sha256(msgpack.packb(step, use_bin_type=True)).hexdigest() == V["session_step"]["msgpack_sha256"]
    f = V["session_step_forwarded"]
    route = tuple(Hop(h["peer"], h["session"], h["step"], h["position"]) for h in f["route"])
    fwd = StepRequest(SESSION, f["step"], f["position"], to_wire(hidden), True, True, route, f["request_id"])
    assert hashlib.sha256(msgpack.packb(fwd.to_wire(), use_bin_type=True)).hexdigest() == f["msgpack_sha256"]
    assert parse_request(fwd.to_wire(), 576) == fwd
    link = V["session_link"]
    assert msgpack.packb(link["fields"], use_bin_type=True).hex() == link["msgpack_hex"]
    assert parse_request(link["fields"], 576) == LinkRequest(SESSION, link["fields"]["upstream"])


def test_commitment():
    ident = Identity.from_seed(bytes.fromhex(V["identity"]["seed_hex"]))
    assert ident.peer_id == V["identity"]["peer_id"]
    out = (np.sin(np.arange(576, dtype=np.float32)).reshape(1, 576) * 3).astype(np.float32)
    digest = output_digest(out)
    c = V["commitment"]
    assert (digest["indices"].hex(), digest["values"].hex(), digest["k"]) == (c["indices_hex"], c["values_hex"], c["k"])
    hidden = (np.arange(576, dtype=np.float32).reshape(1, 576) / 100 - 2.88).astype(np.float32)
    assert (rows_hash(hidden).hex(), rows_hash(out).hex()) == (c["input_sha256_hex"], c["output_sha256_hex"])
    signed = commitment_bytes(ident.peer_id, SESSION, 0, 0, digest, rows_hash(hidden), rows_hash(out))
    assert signed.hex() == c["signed_bytes_hex"]
    assert signed_commitment(ident, SESSION, 0, 0, hidden, out)["signature"].hex() == c["signature_hex"]
    assert verify_signature(ident.public_key, signed, bytes.fromhex(c["signature_hex"]))


def test_sampling():
    logits = np.array(V["sampling"]["logits"])
    for case in V["sampling"]["cases"]:
        s = Sampling(case["temperature"], case["top_k"], case["top_p"], case["seed"])
        assert [choose(logits, s, i) for i in range(8)] == case["tokens"]
    assert gumbel_noise(42, 3, 4).tolist() == V["sampling"]["gumbel_seed_42_index_3_first4"]
