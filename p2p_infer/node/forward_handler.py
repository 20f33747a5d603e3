"""The forward protocol's handler (``/p2p-infer/forward/1.0.0``): compute a layer range and
answer, or (forwarding mode) acknowledge, compute and pass the result on; ``ping``; and
``get_proof`` for proofs that follow their answer. Spec: ``protocols/forward.md``."""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import structlog

from libp2p.peer.id import ID

from ..errors import NotServed, PeerUnreachable, ProtocolViolation, RemoteError
from ..net.framing import Held, current_reservation
from ..ml.tensors import activation_from_wire, encode_tensor
from ..proto.forward import ForwardRequest, forward_reply, parse_forward_request
from ..proto.optimistic import input_digest, sign_commitment
from ..proto.wire import ACCEPTED, FORWARD_FAILED, FORWARD_PROTOCOL, GET_PROOF, OK, PING, PONG, RESULT_PROTOCOL, Message, expect

if TYPE_CHECKING:
    from .peer import Peer
    from .scheduler import Job

log = structlog.get_logger("p2p_infer.peer")


class ForwardHandler:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.forwards_served = 0

    async def handle(self, message: Message) -> Message:
        kind = expect(FORWARD_PROTOCOL, message)
        if kind == GET_PROOF:
            return await self.peer.prover.collect(message)
        if kind == PING:
            return self._pong()
        dump_request(message)
        req = parse_forward_request(message)
        model, act = self._admit(req)
        if req.commit is not None and (req.prove or req.reply_to):  # optimistic mode is client-driven and unproven
            raise ProtocolViolation("forward: 'commit' is only for client-driven requests without 'prove'")
        if req.prove:  # critical mode: the circuit's own output, with a proof of it
            return await self.peer.prover.prove_forward(model, req, act)
        job = self.peer.admit()  # this peer's share of the queue, or Overloaded before any work
        if req.reply_to:  # forwarding mode: acknowledge, then compute and pass on in the background
            held = current_reservation.get()  # the request's bytes stay reserved until it is passed on
            try:
                self.peer.start_background(self._compute_and_forward, model, req, act, job, held.keep() if held else None)
            except BaseException:  # shutting down: nothing will run it
                self.peer.scheduler.release(job)
                if held is not None:
                    held.release()
                raise
            return {"type": ACCEPTED, "request_id": req.request_id}
        hidden, compute_ms, queue_ms = await self.peer.compute(model, req.first, req.last, act, job)
        self.forwards_served += 1
        hidden = self.peer.behaviour.forward_output(hidden)  # identity unless a --test-fault says otherwise
        await self.peer.behaviour.pace()  # no pause unless a --test-fault says otherwise
        out = encode_tensor(hidden)
        commitment = None
        if req.commit is not None:  # optimistic mode: bound to exactly what is returned, lie or not
            commitment = sign_commitment(self.peer.identity, req.model_id, req.first, req.last,
                                         input_digest(req.hidden, req.mask), out, req.commit)
        return forward_reply(out, compute_ms, queue_ms, req.request_id, commitment)

    def _pong(self) -> Message:
        host = self.peer.host
        return {
            "type": PONG,
            "load": self.peer.load(),
            "in_flight": self.peer.scheduler.in_flight,
            "threads": threading.active_count(),  # lets operators and tests see leaks
            "connections": len(host.get_network().get_connections()) if host is not None else 0,
            "max_batch": self.peer.shards.max_batch if self.peer.shards is not None else 0,  # inputs per request
        }

    def _admit(self, req: ForwardRequest) -> tuple[Any, Any]:
        """The served model for the request and its activation, or the error that refuses it."""
        shards = self.peer.shards
        if shards is None:
            raise NotServed("this peer serves no layers")
        act = activation_from_wire(req.hidden, req.mask)
        return shards.check(req.model_id, req.first, req.last, act), act

    async def _compute_and_forward(self, model: Any, req: ForwardRequest, act: Any, job: Job, held: Held | None) -> None:
        """Forwarding mode: run our layers, hand the output to the next hop, or return the
        result to the client if we are the last. Failures are reported to the client."""
        trace = list(req.trace)
        me = self.peer.identity.peer_id
        try:
            hidden, compute_ms, queue_ms = await self.peer.compute(model, req.first, req.last, act, job)
            trace.append({"peer": me, "first": req.first, "last": req.last, "compute_ms": compute_ms, "queue_ms": queue_ms})
            if req.route:
                nxt, rest = req.route[0], req.route[1:]
                onward = replace(req, first=nxt.first, last=nxt.last, hidden=encode_tensor(hidden), route=rest, trace=trace)
                await self._send_to(nxt.peer, FORWARD_PROTOCOL, onward.to_wire())
            else:
                result = forward_reply(encode_tensor(hidden), compute_ms, queue_ms, req.request_id)
                result["trace"] = trace
                await self._send_to_client(req.reply_to, result)
        except Exception as exc:  # a background task: nothing may escape into the peer's nursery
            await self._report_failure(req, exc, trace)
        finally:
            self.peer.scheduler.release(job)  # no-op once it ran
            if held is not None:
                held.release()

    async def _report_failure(self, req: ForwardRequest, exc: Exception, trace: list[dict[str, Any]]) -> None:
        code, reason = getattr(exc, "code", "internal"), getattr(exc, "message", f"{type(exc).__name__}: {exc}")
        me = self.peer.identity.peer_id
        log.info("forwarding failed", peer=me, request_id=req.request_id, code=code, reason=reason)
        failed_peer = req.route[0].peer if req.route and code == "unreachable" else me
        failure = {"type": FORWARD_FAILED, "request_id": req.request_id, "code": code, "message": reason,
                   "at": me, "failed_peer": failed_peer, "trace": trace}
        try:
            await self._send_to_client(req.reply_to, failure)
        except Exception as exc2:
            log.info("cannot reach client to report failure", peer=me, reason=str(exc2))

    async def _send_to(self, peer: str, protocol: str, message: Message) -> None:
        """To a next hop: dialled, if need be, only at the addresses of its verified record
        (the pool's address book), never at addresses the request names."""
        assert self.peer.pool is not None
        reply = await self.peer.pool.request(peer, protocol, message, timeout=30)
        if reply.get("type") not in (ACCEPTED, OK):
            raise RemoteError("bad_reply", f"unexpected reply {reply.get('type')!r}", peer)

    async def _send_to_client(self, client: str, message: Message) -> None:
        """Clients publish no record, so the result goes back only over a connection the client
        itself opened (it connects to every hop of its route before sending): a request can
        never make this peer dial an address (protocols/forward.md, "Replies")."""
        host = self.peer.host
        assert host is not None
        try:
            connected = ID.from_base58(client) in host.get_connected_peers()
        except Exception:
            connected = False
        if not connected:
            raise PeerUnreachable(f"no connection to the client {client[:16]}...; forwarding peers never dial clients")
        await self._send_to(client, RESULT_PROTOCOL, message)


def dump_request(message: Message) -> None:
    """Testing and audit aid: with P2P_INFER_DUMP_DIR set, keep every request as received."""
    directory = os.environ.get("P2P_INFER_DUMP_DIR")
    if directory:
        Path(directory, f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.msgpack").write_bytes(msgpack.packb(message, use_bin_type=True))
