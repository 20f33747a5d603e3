"""Writes forward-batch.json: one batched forward request (protocols/forward.md, "Batches").

    PYTHONPATH=. python protocols/test-vectors/generate_forward_batch.py

Run it only when the request's format changes; tests/test_batching.py rebuilds the request
from these fields, compares every byte, and checks a peer's verdicts on it and its variants.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from p2p_infer.proto.forward import ForwardRequest  # noqa: E402
from p2p_infer.proto.tensors import DEFAULT_MAX_BATCH, array_to_wire  # noqa: E402

MODEL = "f4824c9e60a9654844afb72cd9c0c8e6a9b3739e3f0e11ba507f61518d428823"  # minilm-l6


def request() -> tuple[np.ndarray, np.ndarray, bytes]:
    """Two texts of 3 and 2 tokens: [2, 3, 384] hidden, the second row padded (mask 0)."""
    hidden = np.linspace(-1, 1, 2 * 3 * 384, dtype=np.float32).reshape(2, 3, 384)
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64)
    wire = ForwardRequest(MODEL, 1, 5, array_to_wire(hidden), array_to_wire(mask), session="ab" * 16,
                          request_id="cd" * 16).to_wire()
    return hidden, mask, msgpack.packb(wire, use_bin_type=True)


def main() -> None:
    hidden, mask, packed = request()
    vector = {
        "description": "a batched forward request: hidden [B, T, 384] float32, mask [B, T] int64 (0 = padding); "
                       f"B from 1 to the peer's max batch (default {DEFAULT_MAX_BATCH}), else error code batch_too_large",
        "model": MODEL, "first": 1, "last": 5, "session": "ab" * 16, "request_id": "cd" * 16,
        "hidden_shape": list(hidden.shape), "hidden": "np.linspace(-1, 1, 2*3*384, float32).reshape(2, 3, 384)",
        "mask": mask.tolist(), "msgpack_hex": packed.hex(),
        "verdicts": {"as is": "accepted", f"batch {DEFAULT_MAX_BATCH + 1} of the same rows": "batch_too_large",
                     "mask batch 1": "bad_tensor"},
    }
    (Path(__file__).parent / "forward-batch.json").write_text(json.dumps(vector, indent=1) + "\n")


if __name__ == "__main__":
    main()
