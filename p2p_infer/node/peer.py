"""The peer process: joins the overlay, serves its shards, keeps its record published.

Every peer runs this same code; a bootstrap peer is a peer that serves nothing and whose
address is written in ``bootstrap/peers.txt``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import structlog
import trio
from libp2p.abc import IHost
from libp2p.tools.anyio_service import background_trio_service

from .. import __version__
from ..config import Settings, default_cache_dir
from ..net.dht import Discovery
from ..errors import ArtifactNotFound, NotServed, Overloaded, ProtocolViolation, RemoteError
from .forward import FORWARD_PROTOCOL, RESULT_PROTOCOL, ForwardRequest, forward_reply, parse_forward_request
from ..net.framing import Message
from ..verify.zk import ARTIFACT_PROTOCOL
from ..net.host import add_handler, full_addrs, parse_peer_addr, running_host
from ..identity import Identity, load_or_create_identity
from ..proto.records import all_peers_key, make_record, model_key, shard_key, sign_record
from ..ml.models import Activation
from ..proto.audit import AuditLog
from ..proto.auditor import Auditor, evidence_message
from .committee import COMMITTEE_PROTOCOL, CommitteeMember
from ..net.gossip import Gossip, running_gossip
from ..proto.reputation import Reputation
from ..ml.shards import ServeSpec, ShardServer
from ..net.streams import StreamPool

log = structlog.get_logger("p2p_infer.peer")


PROTOCOLS = (FORWARD_PROTOCOL, COMMITTEE_PROTOCOL, ARTIFACT_PROTOCOL)
REPROVIDE_INTERVAL = 300.0
MAX_PENDING_PROOFS = 64  # uncollected "proof follows" proofs kept per peer


def read_bootstrap_file(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def bootstrap_addrs(settings: Settings) -> list[str]:
    addrs = list(settings.bootstrap)
    if settings.bootstrap_file is not None:
        addrs += read_bootstrap_file(settings.bootstrap_file)
    return addrs


class Peer:
    def __init__(self, settings: Settings, identity: Identity | None = None) -> None:
        self.settings = settings
        self.identity = identity or load_or_create_identity(settings.key)
        self.specs = [ServeSpec.parse(s) for s in settings.serve]
        self.shards: ShardServer | None = None
        self.throughput = 0.0
        self.in_flight = 0
        self.forwards_served = 0
        self.circuits: dict[tuple[str, int, int], Any] = {}  # ZK circuits, built on first use
        self.prover: Any = None  # zk.ProverPool, started on the first critical request
        self.pending_proofs: dict[str, tuple[Any, int, int, Path]] = {}  # "proof follows" tokens
        self.limiter = trio.CapacityLimiter(max(1, settings.max_concurrent))
        self.host: IHost | None = None
        self._nursery: trio.Nursery | None = None  # background forwarding work
        self.pool: StreamPool | None = None  # streams to next hops and clients (forwarding mode)
        self.gossip: Gossip | None = None
        self.member = CommitteeMember(self.identity, None, self._compute_layers, self._publish, settings.test_fault)
        audit_path = settings.audit_log or settings.key.with_suffix(".audit.log")
        self.auditor = Auditor(Reputation(), AuditLog(audit_path, self.identity))
        self.log = log.bind(peer=self.identity.peer_id)

    # ---- lifecycle ----

    async def run(self, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        if self.specs:  # torch is imported only by peers that serve layers
            import torch

            torch.set_num_threads(max(1, self.settings.torch_threads))
            self.shards = await trio.to_thread.run_sync(ShardServer, self.specs, default_cache_dir())
            self.member.shards = self.shards
            self.throughput = await trio.to_thread.run_sync(self.shards.measure_throughput)
        bootstrap = [parse_peer_addr(a) for a in bootstrap_addrs(self.settings)]
        async with running_host(self.identity, self.settings.listen) as host:
            self.host = host
            self.pool = StreamPool(host)
            discovery = Discovery(host, server=True, bootstrap=bootstrap)
            add_handler(host, FORWARD_PROTOCOL, self.handle_forward)
            add_handler(host, COMMITTEE_PROTOCOL, self.member.handle)
            add_handler(host, ARTIFACT_PROTOCOL, self.handle_artifact)
            async with background_trio_service(discovery.kad), running_gossip(host, self.on_gossip) as gossip:
                self.gossip = gossip
                joined = await discovery.join()
                if bootstrap and not joined:
                    self.log.warning("no bootstrap peer reachable; waiting for others to dial in")
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self._publish_loop, discovery)
                    nursery.start_soon(discovery.maintain, self.settings.refresh_interval)
                    addrs = full_addrs(host)
                    self._write_ready_file(addrs)
                    self.log.info(
                        "peer ready",
                        addrs=addrs,
                        serving=[str(s) for s in (self.shards.shards if self.shards else [])],
                        throughput=round(self.throughput, 1),
                    )
                    task_status.started(addrs)
                    try:
                        await trio.sleep_forever()
                    finally:
                        if self.prover is not None:
                            self.prover.close()

    def _write_ready_file(self, addrs: list[str]) -> None:
        path = self.settings.ready_file
        if path is None:
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"peer_id": self.identity.peer_id, "addrs": addrs, "pid": os.getpid()}))
        os.replace(tmp, path)

    async def _publish_loop(self, discovery: Discovery, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish the record now and again before it expires; announce provider keys."""
        shards = self.shards.shards if self.shards else []
        keys = [all_peers_key()] + sorted({model_key(s.model_id) for s in shards}) + [shard_key(s) for s in shards]
        await self._publish_record(discovery)
        task_status.started()
        await discovery.provide(keys)
        last_provided = trio.current_time()
        while True:
            await trio.sleep(self.settings.republish_every())
            await self._publish_record(discovery)
            # Provider records outlive us (48 h in py-libp2p), but the nodes closest to a key
            # change as peers join: re-announce now and then, not with every record.
            if trio.current_time() - last_provided >= REPROVIDE_INTERVAL:
                await discovery.provide(keys)
                last_provided = trio.current_time()

    async def _publish_record(self, discovery: Discovery) -> None:
        assert self.host is not None
        record = make_record(
            self.identity,
            addrs=full_addrs(self.host),
            shards=self.shards.shards if self.shards else [],
            throughput=self.throughput,
            load=self.in_flight / self.limiter.total_tokens,
            software=f"p2p-infer/{__version__}",
            protocols=PROTOCOLS,
            ttl_ms=int(self.settings.record_ttl * 1000),
        )
        await discovery.put_record(self.identity.peer_id, sign_record(record, self.identity))
        self.log.debug("record published", expires_in_s=self.settings.record_ttl)

    # ---- forward protocol ----

    async def handle_forward(self, message: Message) -> Message:
        if message.get("type") == "get_proof":
            return await self._proof_that_followed(message)
        if message.get("type") == "ping":
            return {
                "type": "pong",
                "load": self.in_flight / self.limiter.total_tokens,
                "in_flight": self.in_flight,
                "threads": threading.active_count(),  # lets operators and tests see leaks
            }
        self._dump_request(message)
        req = parse_forward_request(message)
        if self.shards is None:
            raise NotServed("this peer serves no layers")
        model = self.shards.check(req.model_id, req.first, req.last, req.act)
        if self.limiter.statistics().tasks_waiting >= 4 * self.limiter.total_tokens:
            raise Overloaded(f"{self.limiter.statistics().tasks_waiting} requests already queued")
        if req.prove:  # critical mode: the circuit's own output, with a proof of it
            return await self._prove_forward(model, req)
        if req.reply_to:  # forwarding mode: acknowledge, then compute and pass on in the background
            assert self._nursery is not None
            self._nursery.start_soon(self._compute_and_forward, model, req)
            return {"type": "accepted", "request_id": req.request_id}
        hidden, compute_ms, queue_ms = await self._compute(model, req)
        self.forwards_served += 1
        if self.settings.test_fault == "lie-after-trial" and self.forwards_served > 1:
            hidden = hidden + 0.5  # testing aid: behave for the first request (a trial), then lie
        return forward_reply(hidden, compute_ms, queue_ms, req.request_id)

    async def _compute(self, model: Any, req: ForwardRequest) -> tuple[Any, float, float]:
        queued = time.perf_counter()
        self.in_flight += 1
        try:
            async with self.limiter:
                queue_ms = (time.perf_counter() - queued) * 1000
                assert self.shards is not None
                hidden, compute_ms = await trio.to_thread.run_sync(
                    partial(self.shards.compute, model, req.first, req.last, req.act)
                )
        finally:
            self.in_flight -= 1
        return hidden, compute_ms, queue_ms

    async def handle_artifact(self, message: Message) -> Message:
        """Hand out ZK verifier artifacts (settings, verifying keys, SRS) by SHA-256."""
        from ..verify import zk

        sha = message.get("sha256")
        if message.get("type") != "artifact" or not isinstance(sha, str) or len(sha) != 64:
            raise ProtocolViolation("artifact: needs {type: artifact, sha256: 64 hex}")
        path = await trio.to_thread.run_sync(zk.ArtifactStore(default_cache_dir()).find, sha)
        if path is None:
            raise ArtifactNotFound(f"no artifact {sha[:16]}... here")
        return {"type": "artifact", "sha256": sha, "data": path.read_bytes()}

    async def _prove_forward(self, model: Any, req: ForwardRequest) -> Message:
        """Run the shard as its ZK circuit computes it (gen_witness) and prove it, in a
        separate process (ezkl holds the GIL), so this peer keeps serving meanwhile."""
        from ..verify import zk

        assert self.shards is not None
        if not model.provable:
            raise zk.NotProvable(f"{model.name} is not provable: no ZK circuits for it (see docs/zk.md)")
        if not any(s.model_id == req.model_id and (s.first, s.last) == (req.first, req.last) for s in self.shards.shards):
            raise zk.NotProvable(f"critical mode proves whole shards; layers {req.first}-{req.last} are not one served here")
        key = (req.model_id, req.first, req.last)
        if key not in self.circuits:
            built = await trio.to_thread.run_sync(zk.circuits_for, model, [(req.first, req.last)], default_cache_dir())
            self.circuits[key] = built[(req.first, req.last)]
        if self.prover is None:
            self.prover = zk.ProverPool()
        circuit = self.circuits[key]
        workdir = default_cache_dir() / "zk" / "work" / uuid.uuid4().hex
        values = req.act.hidden.flatten().tolist()
        queued = time.perf_counter()
        async with self.limiter:
            queue_ms = (time.perf_counter() - queued) * 1000
            try:
                result = await trio.to_thread.run_sync(self.prover.witness, circuit, values, workdir)
            except BaseException:
                shutil.rmtree(workdir, ignore_errors=True)
                raise
        import torch

        hidden = torch.tensor(result["outputs"], dtype=torch.float32).reshape(req.act.hidden.shape)
        reply = forward_reply(hidden, result["witness_ms"], queue_ms, req.request_id)
        future = self.prover.prove_later(circuit, result["witness"])
        if req.prove == "follow":  # answer now; the proof is fetched with get_proof
            token = uuid.uuid4().hex
            self.pending_proofs[token] = (future, req.first, req.last, workdir)
            while len(self.pending_proofs) > MAX_PENDING_PROOFS:  # clients that never come back
                stale, _, _, stale_dir = self.pending_proofs.pop(next(iter(self.pending_proofs)))
                stale.cancel()  # no effect once running: the directory goes when the proof is done
                stale.add_done_callback(lambda _f, d=stale_dir: shutil.rmtree(d, ignore_errors=True))
            reply["proof_token"] = token
            return reply
        proof = await self._finish_proof(future, req.first, req.last, workdir)
        reply["timing"]["prove_ms"] = proof.pop("prove_ms")
        reply["proof"] = proof
        return reply

    async def _finish_proof(self, future: Any, first: int, last: int, workdir: Path) -> dict[str, Any]:
        from ..verify import zk

        try:
            done = await trio.to_thread.run_sync(future.result)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        wire = zk.ShardProof(first, last, done["proof"], tuple(done["instances"])).to_wire()
        wire["prove_ms"] = done["prove_ms"]
        return wire

    async def _proof_that_followed(self, message: Message) -> Message:
        token = message.get("token")
        entry = self.pending_proofs.pop(token, None) if isinstance(token, str) else None
        if entry is None:
            raise ProtocolViolation("get_proof: unknown or already collected proof token")
        future, first, last, workdir = entry
        proof = await self._finish_proof(future, first, last, workdir)
        proof.pop("prove_ms", None)
        return {"type": "proof", "proof": proof}

    async def _compute_layers(self, model: Any, first: int, last: int, act: Activation) -> Any:
        req = ForwardRequest(model.model_id, first, last, act)
        hidden, _, _ = await self._compute(model, req)
        return hidden

    def _publish(self, message: dict[str, Any]) -> None:
        if self.gossip is not None and self._nursery is not None:
            self.gossip.publish_soon(self._nursery, message)

    async def on_gossip(self, sender: str, message: dict[str, Any]) -> None:
        self.member.on_gossip(message)
        for evidence in self.auditor.observe(sender, message):
            self._publish(evidence_message(evidence))

    async def _compute_and_forward(self, model: Any, req: ForwardRequest) -> None:
        """Forwarding mode: run our layers, hand the output to the next hop, or return the
        result to the client if we are the last. Failures are reported to the client."""
        trace = list(req.trace)
        try:
            hidden, compute_ms, queue_ms = await self._compute(model, req)
            trace.append({"peer": self.identity.peer_id, "first": req.first, "last": req.last,
                          "compute_ms": compute_ms, "queue_ms": queue_ms})
            if req.route:
                nxt, rest = req.route[0], req.route[1:]
                onward = replace(req, first=nxt.first, last=nxt.last, act=Activation(hidden, req.act.mask),
                                 route=rest, trace=trace)
                await self._send_to(nxt.peer, nxt.addrs, FORWARD_PROTOCOL, onward.to_wire())
            else:
                result = forward_reply(hidden, compute_ms, queue_ms, req.request_id)
                result["trace"] = trace
                await self._send_to(req.reply_to, req.reply_addrs, RESULT_PROTOCOL, result)
        except Exception as exc:  # a background task: nothing may escape into the peer's nursery
            code, reason = getattr(exc, "code", "internal"), getattr(exc, "message", f"{type(exc).__name__}: {exc}")
            self.log.info("forwarding failed", request_id=req.request_id, code=code, reason=reason)
            failed_peer = req.route[0].peer if req.route and code == "unreachable" else self.identity.peer_id
            failure = {"type": "forward_failed", "request_id": req.request_id, "code": code, "message": reason,
                       "at": self.identity.peer_id, "failed_peer": failed_peer, "trace": trace}
            try:
                await self._send_to(req.reply_to, req.reply_addrs, RESULT_PROTOCOL, failure)
            except Exception as exc2:
                self.log.info("cannot reach client to report failure", reason=str(exc2))

    async def _send_to(self, peer: str, addrs: tuple[str, ...], protocol: str, message: Message) -> None:
        assert self.pool is not None
        reply = await self.pool.request(peer, protocol, message, timeout=30, addrs=addrs)
        if reply.get("type") not in ("accepted", "ok"):
            raise RemoteError("bad_reply", f"unexpected reply {reply.get('type')!r}", peer)

    def _dump_request(self, message: Message) -> None:
        """Testing and audit aid: with P2P_INFER_DUMP_DIR set, keep every request as received."""
        directory = os.environ.get("P2P_INFER_DUMP_DIR")
        if directory:
            Path(directory, f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.msgpack").write_bytes(
                msgpack.packb(message, use_bin_type=True)
            )


async def run_peer_until_signalled(peer: Peer, on_ready: Callable[[list[str]], None] | None = None) -> None:
    """Run until SIGINT or SIGTERM, then shut down cleanly (host closed, peers told)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(peer.run)
            if on_ready is not None:
                on_ready(addrs)
            async for signum in signals:
                peer.log.info("shutting down", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
