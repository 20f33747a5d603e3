"""The one ZK chain verifier, for the client's critical queries and ``p2p-infer verify --proofs``.

A chain is accepted when it **covers** the remote part of the model, every shard's proof
verifies against its verifier kit (settings, verifying key, SRS), and the hashes link:

* coverage: the shards are contiguous, the first starts at the client's first remote layer
  and the last ends at the model's last layer, counted from the verifier's own model
  manifest, never from the chain or the file (a chain with its last shard dropped and its
  output hash adjusted is otherwise a perfectly linked chain of valid proofs);
* links: the first proof's input hash is the hash of the activation the client sent, each
  proof's output hash is the next one's input hash, and the last output hash is the hash
  of the output claimed (the activation the client received).

The saved form (:class:`ProofChainFile`, ``protocols/artifact.md``) carries the claimed
output itself, not only its hash, so the offline check hashes what the file claims.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ..errors import ZkError
from . import zk

Kits = Mapping[tuple[int, int], zk.VerifierKit]
CHAIN_FILE_VERSION = 2  # v1 had neither the covered layers nor the claimed output


def local_kits(model: Any, ranges: Sequence[tuple[int, int]], cache_dir: Path) -> dict[tuple[int, int], zk.VerifierKit]:
    """Verifier kits built (or taken from the cache) from this machine's own copy of the weights."""
    circuits = zk.circuits_for(model, list(ranges), cache_dir)
    return {key: zk.VerifierKit(c.settings, c.vk, c.srs) for key, c in circuits.items()}


def check_coverage(ranges: Sequence[tuple[int, int]], first_layer: int, n_layers: int) -> None:
    """Raise ZkError unless ``ranges`` run exactly layers ``first_layer..n_layers-1``, in order.

    Checked before any proof is verified: it is cheap, and a cut chain must fail even if
    every proof in it is valid."""
    last_layer = n_layers - 1
    if first_layer < 1 or first_layer > last_layer:
        raise ZkError(f"chain must start at a remote layer in 1-{last_layer} (the client runs layer 0), not {first_layer}")
    if not ranges:
        raise ZkError(f"no proofs: layers {first_layer}-{last_layer} are not proven")
    if ranges[0][0] != first_layer:
        raise ZkError(f"chain starts at layer {ranges[0][0]}, not at the client's first remote layer {first_layer}")
    for (a_first, a_last), (b_first, b_last) in zip(ranges, ranges[1:]):
        if b_first > a_last + 1:
            raise ZkError(f"gap in the chain: layers {a_first}-{a_last}, then {b_first}-{b_last} "
                          f"(layers {a_last + 1}-{b_first - 1} not proven)")
        if b_first != a_last + 1:
            raise ZkError(f"proofs do not cover contiguous layers ({a_first}-{a_last}, then {b_first}-{b_last})")
    if ranges[-1][1] != last_layer:
        raise ZkError(f"chain ends at layer {ranges[-1][1]}, but the model's last layer is {last_layer} "
                      f"(layers {ranges[-1][1] + 1}-{last_layer} not proven: the chain was cut)")


def verify_chain(proofs: Sequence[zk.ShardProof], kits: Kits, input_hash: str, output_hash: str, workdir: Path, *,
                 first_layer: int, n_layers: int) -> None:
    """Raise ZkError naming the first gap, proof or link that fails."""
    check_coverage([(p.first, p.last) for p in proofs], first_layer, n_layers)
    for proof in proofs:
        kit = kits.get((proof.first, proof.last))
        if kit is None:
            raise ZkError(f"no verifier kit for layers {proof.first}-{proof.last}")
        zk.verify_proof(proof, kit.settings, kit.vk, kit.srs, workdir)
    zk.check_chain(list(proofs), input_hash, output_hash)


# ---- the saved file (--save-proofs) ----


@dataclass(frozen=True)
class ProofChainFile:
    """A verified chain as ``--save-proofs`` writes it: what was proven, about what, to what end."""

    model_id: str
    first_layer: int  # the client's first remote layer (it ran 0..first_layer-1 itself)
    last_layer: int  # the model's last layer, as the client's manifest says
    input_hash: str  # Poseidon hash of the activation the client sent
    output: tuple[float, ...]  # the claimed output: the activation after last_layer, as received
    proofs: tuple[zk.ShardProof, ...]
    result: dict[str, Any] | None = None  # what the client made of the output (class, probabilities)
    # per proof, the SHA-256 of the verifying key and SRS it was checked with ({"vk_sha256", "srs_sha256"});
    # optional (older files lack it): lets a verifier with another SRS say so instead of "invalid"
    pins: tuple[dict[str, str], ...] = ()

    def encode(self) -> bytes:
        return msgpack.packb({"version": CHAIN_FILE_VERSION, "model_id": self.model_id, "first_layer": self.first_layer,
                              "last_layer": self.last_layer, "input_hash": self.input_hash, "output": list(self.output),
                              "result": self.result, "chain": [p.to_wire() for p in self.proofs],
                              **({"pins": list(self.pins)} if self.pins else {})}, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> ProofChainFile:
        try:
            raw = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.ExtraData) as exc:
            raise ZkError(f"not a proof chain file: {exc}") from None
        if not isinstance(raw, dict):
            raise ZkError("not a proof chain file")
        if raw.get("version") != CHAIN_FILE_VERSION:
            raise ZkError(f"proof chain file version {raw.get('version')!r}, expected {CHAIN_FILE_VERSION} "
                          "(version 1 files record neither the layers covered nor the output: re-run the query)")
        ints = all(isinstance(raw.get(k), int) and not isinstance(raw.get(k), bool) for k in ("first_layer", "last_layer"))
        output = raw.get("output")
        if not (ints and isinstance(raw.get("model_id"), str) and isinstance(raw.get("input_hash"), str)
                and isinstance(output, list) and all(isinstance(v, (int, float)) for v in output)
                and isinstance(raw.get("chain"), list) and isinstance(raw.get("result"), (dict, type(None)))):
            raise ZkError("proof chain file: fields missing or of the wrong type")
        return cls(raw["model_id"], raw["first_layer"], raw["last_layer"], raw["input_hash"],
                   tuple(float(v) for v in output), tuple(zk.ShardProof.from_wire(p) for p in raw["chain"]), raw["result"],
                   _pins(raw.get("pins")))


def _pins(raw: Any) -> tuple[dict[str, str], ...]:
    if raw is None:
        return ()
    ok = isinstance(raw, list) and all(isinstance(p, dict) and all(isinstance(p.get(k), str) for k in ("vk_sha256", "srs_sha256"))
                                       for p in raw)
    if not ok:
        raise ZkError("proof chain file: pins must be [{vk_sha256, srs_sha256}]")
    return tuple({"vk_sha256": p["vk_sha256"], "srs_sha256": p["srs_sha256"]} for p in raw)


def verify_saved(saved: ProofChainFile, model: Any, n_layers: int, cache_dir: Path) -> list[str]:
    """Check a saved chain with only this machine's weights and manifest; lines describing
    what it proves, or ZkError. ``n_layers`` comes from the verifier's model manifest."""
    if saved.last_layer != n_layers - 1:
        raise ZkError(f"file says the chain ends the model at layer {saved.last_layer}; "
                      f"the manifest says the last layer is {n_layers - 1}")
    ranges = [(p.first, p.last) for p in saved.proofs]
    check_coverage(ranges, saved.first_layer, n_layers)
    kits = local_kits(model, ranges, cache_dir)
    verify_chain(saved.proofs, kits, saved.input_hash, zk.hash_values(list(saved.output)), cache_dir / "zk" / "verify",
                 first_layer=saved.first_layer, n_layers=n_layers)
    lines = [f"layers {saved.first_layer}-{saved.last_layer} of 0-{n_layers - 1} proven "
             f"(the client ran layers 0-{saved.first_layer - 1} itself): "
             + ", ".join(f"{a}-{b}" for a, b in ranges),
             f"claimed output ({len(saved.output)} values) is the output the last proof is about"]
    if saved.result is not None:
        lines.append(_check_result(saved, model))
    return lines


def _check_result(saved: ProofChainFile, model: Any) -> str:
    """The file's stated result must be what the proven output gives (the head runs here)."""
    import torch

    from ..ml.models import Activation

    ours = model.finish(Activation(torch.tensor([list(saved.output)], dtype=torch.float32)))
    claimed = saved.result or {}
    for key, value in ours.items():
        got = claimed.get(key)
        if isinstance(value, list):
            same = isinstance(got, list) and len(got) == len(value) and all(
                isinstance(a, (int, float)) and abs(a - b) <= 1e-5 for a, b in zip(got, value))
        else:
            same = got == value
        if not same:
            raise ZkError(f"the file claims {key} {_short(got)}, but the proven output gives {_short(value)}")
    return "claimed result " + ", ".join(f"{k} {_short(v)}" for k, v in ours.items()) + " is what the proven output gives"


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"[{', '.join(f'{v:.3g}' if isinstance(v, float) else repr(v) for v in value[:3])}{', ...' if len(value) > 3 else ''}]"
    return repr(value)
