"""The client's side of critical mode: fetch pinned verifier artifacts, verify every shard's
proof and the hash chain."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..config import default_cache_dir
from ..errors import P2PInferError, ProtocolViolation, UsageError
from ..ml.models import Activation, SplitModel
from ..proto.wire import ARTIFACT_PROTOCOL
from ..verify.chain import local_kits, verify_chain



async def check_proofs(client: Any, model: SplitModel, sent: Activation, received: Activation, proofs: list[Any]) -> dict[str, Any]:
    """Verify every shard's proof and the hash chain from the activation the client sent
    to the one it received. Verifier artifacts (settings, vk, SRS) come from the model's
    ZK manifest pins: local files if present, else fetched from peers and checked against
    the pins. Without a ZK manifest the client builds the circuits from its own weights."""
    from ..verify import zk

    cache = default_cache_dir()
    manifest = zk.load_zk_manifest(cache, model.model_id)
    fetched = 0
    kits: dict[tuple[int, int], zk.VerifierKit] = {}
    if manifest is None:
        kits = await trio.to_thread.run_sync(local_kits, model, [(p.first, p.last) for p in proofs], cache)
        manifest = zk.load_zk_manifest(cache, model.model_id)
        assert manifest is not None
    for proof in proofs:
        if (proof.first, proof.last) in kits:
            continue
        pin = manifest.pin(proof.first, proof.last)
        paths = []
        for sha, what in ((pin.settings_sha256, "settings"), (pin.vk_sha256, "verifying key"), (manifest.srs_for(pin), "SRS")):
            path, got = await artifact(client, sha, what, artifact_sources(client, model))
            fetched += got
            paths.append(path)
        kits[(proof.first, proof.last)] = zk.VerifierKit(*paths)
    work = cache / "zk" / "verify"
    started = time.perf_counter()
    first_hash = zk.hash_values(sent.hidden.flatten().tolist())
    last_hash = zk.hash_values(received.hidden.flatten().tolist())
    # the same coverage rule as `verify --proofs`: from the client's first remote layer to the model's last
    await trio.to_thread.run_sync(partial(verify_chain, proofs, kits, first_hash, last_hash, work,
                                          first_layer=client.local_layers, n_layers=len(model.layers)))
    return {
        "verified": True,
        "shards": [{"first": p.first, "last": p.last, "proof_bytes": len(p.proof),
                    "vk_sha256": manifest.pin(p.first, p.last).vk_sha256,
                    "srs_sha256": manifest.srs_for(manifest.pin(p.first, p.last))} for p in proofs],
        "verify_ms": (time.perf_counter() - started) * 1000,
        "artifacts_fetched": fetched,
        "input_hash": first_hash,
        "output_hash": last_hash,
        "first_layer": client.local_layers,
        "last_layer": len(model.layers) - 1,
        "output": received.hidden.flatten().tolist(),  # the claimed output a saved chain carries
        "chain": [p.to_wire() for p in proofs],
    }


async def verify_followed(client: Any, result: Any) -> dict[str, Any]:
    """Proof-follows mode: collect the proofs of ``result`` from the peers (they were
    proving while the client already had its answer), then verify them and the chain."""
    from ..verify.zk import ShardProof

    if result.proofs is None or id(result.proofs) not in client._followed:
        raise UsageError("this result has no proofs to collect")
    model, sent, received, pending = client._followed.pop(id(result.proofs))
    proofs = []
    for peer, token, first, last in pending:
        reply = await client._request(peer, {"type": "get_proof", "token": token}, timeout=120)
        proof = ShardProof.from_wire(reply.get("proof"))
        if (proof.first, proof.last) != (first, last):
            raise ProtocolViolation(f"{peer} proved layers {proof.first}-{proof.last}, not {first}-{last}")
        proofs.append(proof)
    result.proofs = await check_proofs(client, model, sent, received, proofs)  # ZkError unless the whole chain holds
    for stage in result.verification:
        stage["verified"] = True
    result.verified = True
    return result.proofs


def artifact_sources(client: Any, model: SplitModel) -> list[str]:
    assert client.directory is not None
    return sorted({r.peer_id for r, _ in client.directory.shards_of(model.model_id)})


async def artifact(client: Any, sha: str, what: str, peers: list[str]) -> tuple[Path, int]:
    """A pinned artifact: from the local store, or fetched from a peer and hash-checked."""
    from ..verify import zk

    store = zk.ArtifactStore(default_cache_dir())
    local = await trio.to_thread.run_sync(store.find, sha)
    if local is not None:
        return zk.checked(local, sha, what), 0
    errors = []
    for peer in peers:
        try:
            reply = await client.pool.request(peer, ARTIFACT_PROTOCOL, {"type": "artifact", "sha256": sha}, timeout=30)  # type: ignore[union-attr]
            data = reply.get("data")
            if not isinstance(data, bytes):
                raise ProtocolViolation("artifact reply without data")
            return store.put(sha, data), 1  # put() refuses data that does not hash to the pin
        except (P2PInferError, trio.TooSlowError) as exc:
            errors.append(f"{peer[:12]}..: {getattr(exc, 'message', 'timed out')}")
    raise zk.ZkError(f"no peer supplied the {what} {sha[:16]}... ({'; '.join(errors) or 'no peers'})")

# ---- spot checks: the optimistic mode ----
