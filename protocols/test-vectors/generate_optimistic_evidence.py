"""Writes optimistic-evidence.json: one optimistic-mode evidence gossip message on topic
consensus/v5 and v6 (protocols/committee.md), byte for byte.

    PYTHONPATH=. python protocols/test-vectors/generate_optimistic_evidence.py

Run it only when the evidence's format changes; tests/test_evidence_optimistic.py rebuilds
the message from these fields, compares every byte and has an auditor accept it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from p2p_infer.identity import Identity, solves_puzzle  # noqa: E402
from p2p_infer.proto.auditor import evidence_message  # noqa: E402
from p2p_infer.proto.optimistic import CommitRequest, OptimisticEvidence, input_digest, sign_commitment  # noqa: E402
from p2p_infer.proto.tensors import array_to_wire  # noqa: E402

MODEL = "f4824c9e60a9654844afb72cd9c0c8e6a9b3739e3f0e11ba507f61518d428823"
OUT = Path(__file__).parent / "optimistic-evidence.json"


def seed_for(name: str) -> bytes:
    """The first seed H(label, name, i) whose key solves the identity puzzle (deterministic)."""
    i = 0
    while True:
        seed = hashlib.sha256(f"p2p-infer test vector optimistic-evidence {name} {i}".encode()).digest()
        if solves_puzzle(Identity.from_seed(seed).public_key):
            return seed
        i += 1


def build(seeds: dict[str, bytes]) -> tuple[OptimisticEvidence, dict]:
    hidden = array_to_wire(np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8))
    true = array_to_wire(np.linspace(0, 2, 8, dtype=np.float32).reshape(1, 8))
    lie = array_to_wire(np.linspace(0, 2, 8, dtype=np.float32).reshape(1, 8) + 0.5)

    def signed(name: str, output: dict, task: bytes) -> object:
        request = CommitRequest(hashlib.sha256(task).digest(), hashlib.sha256(b"nonce " + task).digest()[:16])
        return sign_commitment(Identity.from_seed(seeds[name]), MODEL, 1, 2, input_digest(hidden, None), output, request)

    evidence = OptimisticEvidence(signed("accused", lie, b"task"), lie,
                                  ((signed("checker", true, b"check"), true), (signed("settler", true, b"settle"), true)))
    return evidence, {"hidden": hidden, "true": true, "lie": lie}


def main() -> None:
    seeds = {name: seed_for(name) for name in ("accused", "checker", "settler")}
    evidence, tensors = build(seeds)
    message = msgpack.packb(evidence_message(evidence), use_bin_type=True)
    vector = {
        "description": "optimistic-mode mismatch evidence as gossiped on p2p-infer/consensus/v5 and v6: msgpack({type: evidence, "
                       "evidence: {kind: optimistic-wrong-output, accused: commitment, accused_output: tensor, witnesses: "
                       "[[commitment, tensor], [commitment, tensor]]}}); commitments as in forward-commitment.json; "
                       "tasks H('task'|'check'|'settle'), nonces H('nonce ' + task)[:16], layers 1-2",
        "model": MODEL, "seeds_hex": {k: v.hex() for k, v in seeds.items()},
        "peer_ids": {k: Identity.from_seed(v).peer_id for k, v in seeds.items()},
        "tensors": {k: {"shape": t["shape"], "data_hex": t["data"].hex()} for k, t in tensors.items()},
        "message_hex": message.hex(),
    }
    OUT.write_text(json.dumps(vector, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
