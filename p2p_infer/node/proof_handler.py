"""Critical mode on the peer: run a whole shard as its ZK circuit computes it (the witness)
and prove it in a separate process (ezkl holds the GIL), so the peer keeps serving; with
"proof follows" the answer goes out first and the proof is collected with ``get_proof``."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..config import default_cache_dir
from ..errors import NotProvable, ProtocolViolation
from ..ml.tensors import encode_tensor
from ..proto.forward import ForwardRequest, forward_reply
from ..proto.wire import PROOF, Message

if TYPE_CHECKING:
    from .peer import Peer

MAX_PENDING_PROOFS = 64  # uncollected "proof follows" proofs kept per peer


class ProofHandler:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.circuits: dict[tuple[str, int, int], Any] = {}  # ZK circuits, built on first use
        self.pool: Any = None  # zk.ProverPool, started on the first critical request
        self.pending: dict[str, tuple[Any, int, int, Path]] = {}  # "proof follows" tokens

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    async def prove_forward(self, model: Any, req: ForwardRequest, act: Any) -> Message:
        circuit = await self._circuit(model, req)
        workdir = default_cache_dir() / "zk" / "work" / uuid.uuid4().hex
        result, queue_ms = await self._witness(circuit, act.hidden.flatten().tolist(), workdir)
        import torch

        hidden = torch.tensor(result["outputs"], dtype=torch.float32).reshape(act.hidden.shape)
        reply = forward_reply(encode_tensor(hidden), result["witness_ms"], queue_ms, req.request_id)
        future = self.pool.prove_later(circuit, result["witness"])
        if req.prove == "follow":  # answer now; the proof is fetched with get_proof
            reply["proof_token"] = self._keep(future, req.first, req.last, workdir)
            return reply
        proof = await self._finish(future, req.first, req.last, workdir)
        reply["timing"]["prove_ms"] = proof.pop("prove_ms")
        reply["proof"] = proof
        return reply

    async def collect(self, message: Message) -> Message:
        token = message.get("token")
        entry = self.pending.pop(token, None) if isinstance(token, str) else None
        if entry is None:
            raise ProtocolViolation("get_proof: unknown or already collected proof token")
        proof = await self._finish(*entry)
        proof.pop("prove_ms", None)
        return {"type": PROOF, "proof": proof}

    async def _circuit(self, model: Any, req: ForwardRequest) -> Any:
        from ..verify import zk

        if not model.provable:
            raise NotProvable(f"{model.name} is not provable: no ZK circuits for it (see docs/zk.md)")
        shards = self.peer.shards.shards if self.peer.shards else []
        if not any(s.model_id == req.model_id and (s.first, s.last) == (req.first, req.last) for s in shards):
            raise NotProvable(f"critical mode proves whole shards; layers {req.first}-{req.last} are not one served here")
        key = (req.model_id, req.first, req.last)
        if key not in self.circuits:
            built = await trio.to_thread.run_sync(zk.circuits_for, model, [(req.first, req.last)], default_cache_dir())
            self.circuits[key] = built[(req.first, req.last)]
        if self.pool is None:
            self.pool = zk.ProverPool()
        return self.circuits[key]

    async def _witness(self, circuit: Any, values: list[float], workdir: Path) -> tuple[dict[str, Any], float]:
        queued = time.perf_counter()
        async with self.peer.limiter:
            queue_ms = (time.perf_counter() - queued) * 1000
            try:
                return await trio.to_thread.run_sync(self.pool.witness, circuit, values, workdir), queue_ms
            except BaseException:
                shutil.rmtree(workdir, ignore_errors=True)
                raise

    def _keep(self, future: Any, first: int, last: int, workdir: Path) -> str:
        token = uuid.uuid4().hex
        self.pending[token] = (future, first, last, workdir)
        while len(self.pending) > MAX_PENDING_PROOFS:  # clients that never come back
            stale, _, _, stale_dir = self.pending.pop(next(iter(self.pending)))
            stale.cancel()  # no effect once running: the directory goes when the proof is done
            stale.add_done_callback(lambda _f, d=stale_dir: shutil.rmtree(d, ignore_errors=True))
        return token

    async def _finish(self, future: Any, first: int, last: int, workdir: Path) -> dict[str, Any]:
        from ..verify import zk

        try:
            done = await trio.to_thread.run_sync(future.result)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        wire = zk.ShardProof(first, last, done["proof"], tuple(done["instances"])).to_wire()
        wire["prove_ms"] = done["prove_ms"]
        return wire
