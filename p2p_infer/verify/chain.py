"""The one ZK chain verifier, for the client's critical queries and ``p2p-infer verify --proofs``.

A chain is accepted when every shard's proof verifies against its verifier kit (settings,
verifying key, SRS) and the hashes link: the first proof's input hash is the hash of the
activation the client sent, each proof's output hash is the next one's input hash, and the
last output hash is the hash of what the client received.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ZkError
from . import zk

Kits = Mapping[tuple[int, int], zk.VerifierKit]


def local_kits(model: Any, ranges: Sequence[tuple[int, int]], cache_dir: Path) -> dict[tuple[int, int], zk.VerifierKit]:
    """Verifier kits built (or taken from the cache) from this machine's own copy of the weights."""
    circuits = zk.circuits_for(model, list(ranges), cache_dir)
    return {key: zk.VerifierKit(c.settings, c.vk, c.srs) for key, c in circuits.items()}


def verify_chain(proofs: Sequence[zk.ShardProof], kits: Kits, input_hash: str, output_hash: str, workdir: Path) -> None:
    """Raise ZkError naming the first proof or link that fails."""
    for proof in proofs:
        kit = kits.get((proof.first, proof.last))
        if kit is None:
            raise ZkError(f"no verifier kit for layers {proof.first}-{proof.last}")
        zk.verify_proof(proof, kit.settings, kit.vk, kit.srs, workdir)
    zk.check_chain(list(proofs), input_hash, output_hash)
