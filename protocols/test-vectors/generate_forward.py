"""Writes forward-commitment.json: one optimistic-mode commitment (protocols/forward.md).

    PYTHONPATH=. python protocols/test-vectors/generate_forward.py

Run it only when the commitment's format changes; tests/test_optimistic.py rebuilds the
commitment from these fields and compares every byte.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from p2p_infer.identity import Identity  # noqa: E402
from p2p_infer.proto.optimistic import CommitRequest, input_digest, sign_commitment  # noqa: E402
from p2p_infer.proto.tensors import array_to_wire  # noqa: E402

MODEL = "f4824c9e60a9654844afb72cd9c0c8e6a9b3739e3f0e11ba507f61518d428823"


def main() -> None:
    seed = hashlib.sha256(b"p2p-infer test vector forward-commitment").digest()
    ident = Identity.from_seed(seed)
    hidden = array_to_wire(np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8))
    output = array_to_wire(np.linspace(0, 2, 8, dtype=np.float32).reshape(1, 8))
    request = CommitRequest(hashlib.sha256(b"task").digest(), hashlib.sha256(b"nonce").digest()[:16])
    c = sign_commitment(ident, MODEL, 1, 2, input_digest(hidden, None), output, request)
    vector = {
        "description": "optimistic-mode forward commitment: body = msgpack([executor, public_key, model, first, last, "
                       "input_digest, output_digest, task, nonce]); digest = H(domain, body); signature = Ed25519(digest)",
        "seed_hex": seed.hex(), "executor": ident.peer_id, "public_key_hex": ident.public_key.hex(),
        "model": MODEL, "first": 1, "last": 2,
        "hidden_shape": hidden["shape"], "hidden_data_hex": hidden["data"].hex(),
        "output_shape": output["shape"], "output_data_hex": output["data"].hex(),
        "task_hex": request.task_id.hex(), "nonce_hex": request.nonce.hex(),
        "input_digest_hex": c.input_digest.hex(), "output_digest_hex": c.output_digest.hex(),
        "body_hex": c.body().hex(), "digest_hex": c.digest().hex(), "signature_hex": c.signature.hex(),
    }
    (Path(__file__).parent / "forward-commitment.json").write_text(json.dumps(vector, indent=1) + "\n")


if __name__ == "__main__":
    main()
