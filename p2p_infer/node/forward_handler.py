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

from ..errors import NotServed, Overloaded, RemoteError
from ..ml.tensors import activation_from_wire, encode_tensor
from ..proto.forward import ForwardRequest, forward_reply, parse_forward_request
from ..proto.wire import ACCEPTED, FORWARD_FAILED, FORWARD_PROTOCOL, GET_PROOF, OK, PING, PONG, RESULT_PROTOCOL, Message, expect

if TYPE_CHECKING:
    from .peer import Peer

log = structlog.get_logger("p2p_infer.peer")
MAX_QUEUED_PER_SLOT = 4  # queued requests per compute slot before ``overloaded``


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
        _dump_request(message)
        req = parse_forward_request(message)
        model, act = self._admit(req)
        if req.prove:  # critical mode: the circuit's own output, with a proof of it
            return await self.peer.prover.prove_forward(model, req, act)
        if req.reply_to:  # forwarding mode: acknowledge, then compute and pass on in the background
            self.peer.start_background(self._compute_and_forward, model, req, act)
            return {"type": ACCEPTED, "request_id": req.request_id}
        hidden, compute_ms, queue_ms = await self.peer.compute(model, req.first, req.last, act)
        self.forwards_served += 1
        hidden = self.peer.behaviour.forward_output(hidden)  # identity unless a --test-fault says otherwise
        await self.peer.behaviour.pace()  # no pause unless a --test-fault says otherwise
        return forward_reply(encode_tensor(hidden), compute_ms, queue_ms, req.request_id)

    def _pong(self) -> Message:
        return {
            "type": PONG,
            "load": self.peer.load(),
            "in_flight": self.peer.in_flight,
            "threads": threading.active_count(),  # lets operators and tests see leaks
        }

    def _admit(self, req: ForwardRequest) -> tuple[Any, Any]:
        """The served model for the request and its activation, or the error that refuses it."""
        shards = self.peer.shards
        if shards is None:
            raise NotServed("this peer serves no layers")
        act = activation_from_wire(req.hidden, req.mask)
        model = shards.check(req.model_id, req.first, req.last, act)
        waiting = self.peer.limiter.statistics().tasks_waiting
        if waiting >= MAX_QUEUED_PER_SLOT * self.peer.limiter.total_tokens:
            raise Overloaded(f"{waiting} requests already queued")
        return model, act

    async def _compute_and_forward(self, model: Any, req: ForwardRequest, act: Any) -> None:
        """Forwarding mode: run our layers, hand the output to the next hop, or return the
        result to the client if we are the last. Failures are reported to the client."""
        trace = list(req.trace)
        me = self.peer.identity.peer_id
        try:
            hidden, compute_ms, queue_ms = await self.peer.compute(model, req.first, req.last, act)
            trace.append({"peer": me, "first": req.first, "last": req.last, "compute_ms": compute_ms, "queue_ms": queue_ms})
            if req.route:
                nxt, rest = req.route[0], req.route[1:]
                onward = replace(req, first=nxt.first, last=nxt.last, hidden=encode_tensor(hidden), route=rest, trace=trace)
                await self._send_to(nxt.peer, nxt.addrs, FORWARD_PROTOCOL, onward.to_wire())
            else:
                result = forward_reply(encode_tensor(hidden), compute_ms, queue_ms, req.request_id)
                result["trace"] = trace
                await self._send_to(req.reply_to, req.reply_addrs, RESULT_PROTOCOL, result)
        except Exception as exc:  # a background task: nothing may escape into the peer's nursery
            await self._report_failure(req, exc, trace)

    async def _report_failure(self, req: ForwardRequest, exc: Exception, trace: list[dict[str, Any]]) -> None:
        code, reason = getattr(exc, "code", "internal"), getattr(exc, "message", f"{type(exc).__name__}: {exc}")
        me = self.peer.identity.peer_id
        log.info("forwarding failed", peer=me, request_id=req.request_id, code=code, reason=reason)
        failed_peer = req.route[0].peer if req.route and code == "unreachable" else me
        failure = {"type": FORWARD_FAILED, "request_id": req.request_id, "code": code, "message": reason,
                   "at": me, "failed_peer": failed_peer, "trace": trace}
        try:
            await self._send_to(req.reply_to, req.reply_addrs, RESULT_PROTOCOL, failure)
        except Exception as exc2:
            log.info("cannot reach client to report failure", peer=me, reason=str(exc2))

    async def _send_to(self, peer: str, addrs: tuple[str, ...], protocol: str, message: Message) -> None:
        assert self.peer.pool is not None
        reply = await self.peer.pool.request(peer, protocol, message, timeout=30, addrs=addrs)
        if reply.get("type") not in (ACCEPTED, OK):
            raise RemoteError("bad_reply", f"unexpected reply {reply.get('type')!r}", peer)


def _dump_request(message: Message) -> None:
    """Testing and audit aid: with P2P_INFER_DUMP_DIR set, keep every request as received."""
    directory = os.environ.get("P2P_INFER_DUMP_DIR")
    if directory:
        Path(directory, f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.msgpack").write_bytes(msgpack.packb(message, use_bin_type=True))
