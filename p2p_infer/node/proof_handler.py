"""Critical mode on the peer: run a whole shard as its ZK circuit computes it (the witness)
and prove it in a separate process (ezkl holds the GIL), so the peer keeps serving; with
"proof follows" the answer goes out first and the proof is collected with ``get_proof``.

Circuits for the provable shards a peer serves are built (or found in the cache) at
start-up, in a separate process, with progress logged; a critical request that arrives
while its circuit is still being built waits for it. Nothing ezkl does runs in the peer's
own process until proofs, which run in the prover pool's processes."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..config import default_cache_dir
from ..errors import NotProvable, ProtocolViolation, ZkError
from ..ml.tensors import encode_tensor
from ..proto.forward import ForwardRequest, forward_reply
from ..proto.wire import PROOF, Message

if TYPE_CHECKING:
    from .peer import Peer

MAX_PENDING_PROOFS = 64  # uncollected "proof follows" proofs kept per peer
log = structlog.get_logger("p2p_infer.peer")


class ProofHandler:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.circuits: dict[tuple[str, int, int], Any] = {}  # ZK circuits of served provable shards
        self.building: dict[tuple[str, int, int], trio.Event] = {}  # set once built (or failed)
        self.failed: dict[tuple[str, int, int], str] = {}
        self.builder: Any = None  # zk.CircuitBuilder while start-up builds run
        self.pool: Any = None  # zk.ProverPool, started on the first critical request
        self.pending: dict[str, tuple[Any, int, int, Path]] = {}  # "proof follows" tokens

    def close(self) -> None:
        for resource in (self.pool, self.builder):
            if resource is not None:
                resource.close()

    def provable_shards(self) -> dict[Any, list[tuple[int, int]]]:
        shards = self.peer.shards
        if shards is None:
            return {}
        found: dict[Any, list[tuple[int, int]]] = {}
        for s in shards.shards:
            model = shards.models[s.model_id]
            if model.provable:
                found.setdefault(model, []).append((s.first, s.last))
        return found

    def start_builds(self) -> None:
        """Mark the served provable shards as being built; :meth:`build_all` builds them."""
        if not self.peer.settings.build_circuits:
            return  # critical mode is then refused (not_provable)
        for model, ranges in self.provable_shards().items():
            for first, last in ranges:
                self.building[(model.model_id, first, last)] = trio.Event()

    async def build_all(self) -> None:
        """Build (or load from the cache) every served provable shard's circuit, one model at
        a time, in the builder process; logs progress. A failure leaves critical mode refused
        for those shards (``zk_error``), the peer keeps serving everything else."""
        from ..verify import zk

        todo = self.provable_shards()
        if not todo or not self.peer.settings.build_circuits:
            return
        self.builder = zk.CircuitBuilder()
        try:
            for model, ranges in todo.items():
                await self._build_model(model, ranges)
        finally:
            self.builder.close()
            self.builder = None

    async def _build_model(self, model: Any, ranges: list[tuple[int, int]]) -> None:
        plog = log.bind(peer=self.peer.identity.peer_id, model=model.name, shards=[f"{f}-{l}" for f, l in ranges])
        plog.info("building ZK circuits (separate process)")
        started = time.perf_counter()
        try:
            # abandon_on_cancel: at shutdown the peer stops waiting at once (the pool is closed behind it)
            built = await trio.to_thread.run_sync(self.builder.build, model.name, ranges, default_cache_dir(), abandon_on_cancel=True)
            for (first, last), circuit in built.items():
                self.circuits[(model.model_id, first, last)] = circuit
            plog.info("ZK circuits ready", seconds=round(time.perf_counter() - started, 1))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            for first, last in ranges:
                self.failed[(model.model_id, first, last)] = reason
            plog.error("ZK circuit build failed; critical mode is refused for these shards", reason=reason)
        finally:
            for first, last in ranges:
                self.building[(model.model_id, first, last)].set()

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
        event = self.building.get(key)
        if event is None:
            raise NotProvable(f"no circuit is being built for layers {req.first}-{req.last} here")
        await event.wait()  # built at start-up; a request during the build waits for it
        if key in self.failed:
            raise ZkError(f"this peer could not build the circuit for layers {req.first}-{req.last}: {self.failed[key]}")
        if self.pool is None:
            self.pool = zk.ProverPool()
        return self.circuits[key]

    async def _witness(self, circuit: Any, values: list[float], workdir: Path) -> tuple[dict[str, Any], float]:
        async with self.peer.scheduler.run(self.peer.admit()) as queue_ms:  # the same fair queue as plain compute
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
