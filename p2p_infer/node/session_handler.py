"""The session protocol's handler (``/p2p-infer/session/2.0.0``): a thin driver of
:class:`~p2p_infer.proto.session.SessionTable` that keeps one KV cache per session and runs
steps in worker threads under the peer's fair scheduler, as the forward handler does.
Forwarded steps (decode passed peer to peer): after computing, the output goes on to the
next hop of the step's route, on this peer's pooled stream to it; the last hop sends it to
the client (``forward_result`` on ``/p2p-infer/forward-result/1.0.0``, over the client's own
connection) and every hop answers its sender with its entry and those after it.
Spec: ``protocols/session.md``.

Limits come from the environment (docs/generation.md): ``P2P_INFER_SESSION_TTL`` (seconds),
``P2P_INFER_MAX_SESSIONS``, ``P2P_INFER_MAX_SESSIONS_PER_PEER``, ``P2P_INFER_SESSION_MAX_TOKENS``,
``P2P_INFER_SESSION_MEMORY_MB``.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
import trio

from ..errors import NotServed, ProtocolViolation, UnknownModel
from ..net.framing import remote_peer
from ..proto.session import (LinkRequest, OpenRequest, SessionLimits, SessionTable, StepRequest, closed_reply, forwarded_reply,
                             hop_entry, linked_reply, opened_reply, output_reply, parse_request)
from ..proto.wire import FORWARD_RESULT, SESSION_FORWARDED, SESSION_PROTOCOL, Message

if TYPE_CHECKING:
    from .peer import Peer

log = structlog.get_logger("p2p_infer.sessions")
REAP_INTERVAL = 1.0
KV_BYTES_PER_TOKEN_LAYER = 2 * 3 * 64 * 4  # SmolLM2: key + value, 3 KV heads x 64, float32


def limits_from_env(env: dict[str, str] | None = None) -> SessionLimits:
    env = dict(os.environ if env is None else env)
    d = SessionLimits()
    return SessionLimits(
        max_sessions=int(env.get("P2P_INFER_MAX_SESSIONS", d.max_sessions)),
        max_sessions_per_client=int(env.get("P2P_INFER_MAX_SESSIONS_PER_PEER", d.max_sessions_per_client)),
        max_tokens=int(env.get("P2P_INFER_SESSION_MAX_TOKENS", d.max_tokens)),
        memory_budget=int(float(env.get("P2P_INFER_SESSION_MEMORY_MB", d.memory_budget / 2**20)) * 2**20),
        ttl=float(env.get("P2P_INFER_SESSION_TTL", d.ttl)),
    )


class SessionHandler:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.table = SessionTable(limits_from_env(), KV_BYTES_PER_TOKEN_LAYER)
        self.caches: dict[str, Any] = {}  # session id -> ml.smollm2.KVCache
        self.steps_served = 0

    def _sync(self) -> None:
        """Free the caches of sessions the table no longer holds (expired)."""
        for sid in self.table.expire(time.monotonic()):
            self.caches.pop(sid, None)
            log.info("session expired", session=sid[:8])

    async def reap(self) -> None:
        """Expire idle sessions even when no request comes (TTL frees memory on its own)."""
        while True:
            await trio.sleep(REAP_INTERVAL)
            self._sync()

    async def handle(self, message: Message) -> Message:
        from .forward_handler import dump_request

        dump_request(message)  # P2P_INFER_DUMP_DIR: what a recording peer sees
        self._sync()
        shards = self.peer.shards
        req = parse_request(message, hidden_size=None)
        client = remote_peer.get() or "local"
        if isinstance(req, str):
            self.table.close(client, req)
            self.caches.pop(req, None)
            return closed_reply(req)
        if isinstance(req, LinkRequest):
            self.table.link(client, req)
            return linked_reply(req.session)
        if isinstance(req, OpenRequest):
            if shards is None:
                raise NotServed("this peer serves no layers")
            model = shards.serving(req.model_id, req.first, req.last)
            if not hasattr(model, "run_span"):
                raise UnknownModel(f"{model.name} has no generation sessions (a causal language model is needed)")
            self.table.open(client, req, time.monotonic())
            from ..ml.smollm2 import KVCache

            self.caches[req.session] = KVCache()
            return opened_reply(req.session, req.max_length, self.table.limits.ttl)
        if shards is None:  # refused before _step imports torch, which a peer serving no layers never loads
            raise NotServed("this peer serves no layers")
        return await self._step(client, req)

    async def _step(self, sender: str, req: StepRequest) -> Message:
        from ..ml.models import Activation
        from ..ml.tensors import decode_tensor, encode_tensor

        known = self.table.sessions.get(req.session)
        assert self.peer.shards is not None  # handle() refused the step otherwise
        if known is not None:  # a malformed step is refused before it can cost the session its cache
            model = self.peer.shards.serving(known.model_id, known.first, known.last)
            hidden = decode_tensor(req.hidden, field="hidden")
            model.check_activation(Activation(hidden))
        session, position = self.table.begin_step(sender, req, time.monotonic())
        try:
            cache = self.caches[req.session]
            cache.truncate(position)  # the client's rewind (a no-op otherwise)
            job = self.peer.admit(sender)
            async with self.peer.scheduler.run(job) as queue_ms:
                start = time.perf_counter()
                out = await trio.to_thread.run_sync(partial(model.run_span, hidden, session.first, session.last, cache))
                compute_ms = (time.perf_counter() - start) * 1000
        except BaseException:
            self.table.drop(req.session)  # the cache may be half-updated: the client must replay
            self.caches.pop(req.session, None)
            raise
        self.table.end_step(req.session, req.step, req.tokens, time.monotonic())
        self.steps_served += 1
        out = self.peer.behaviour.forward_output(out)  # identity unless a --test-fault says otherwise
        commitment = None
        if req.commit:  # verified generation: a signed digest of what we answered (protocols/session.md)
            from ..proto.generation import signed_commitment

            commitment = signed_commitment(self.peer.identity, req.session, req.step, req.position, hidden[0].numpy(), out[0].numpy())
        reply = output_reply(req.session, req.step, encode_tensor(out), compute_ms, queue_ms, commitment)
        if not req.forward:
            return reply
        return await self._pass_on(session.client, req, reply)

    async def _pass_on(self, client: str, req: StepRequest, reply: Message) -> Message:
        """A forwarded step: the output to the next hop, or (last hop) to the client; our entry
        and the downstream ones back to the sender, or which hop failed."""
        from ..proto.session import Hop

        me = self.peer.identity.peer_id
        entries, failed = [hop_entry(me, reply)], None
        assert self.peer.pool is not None
        try:
            if req.route:
                nxt: Hop = req.route[0]
                onward = StepRequest(nxt.session, nxt.step, nxt.position, reply["hidden"], req.commit, True, req.route[1:], req.request_id)
                try:
                    down = await self.peer.pool.request(nxt.peer, SESSION_PROTOCOL, onward.to_wire(), timeout=30)
                except Exception as exc:
                    failed = {"peer": nxt.peer, "code": getattr(exc, "code", "internal"), "message": str(exc)[:300]}
                else:
                    if down.get("type") != SESSION_FORWARDED or not isinstance(down.get("hops"), list):
                        raise ProtocolViolation(f"next hop answered {down.get('type')!r}, not {SESSION_FORWARDED}")
                    entries += down["hops"]
                    failed = down.get("failed")
            else:  # pushed without waiting for its ack: the reply chain is the other half of the critical path
                result = {"type": FORWARD_RESULT, "request_id": req.request_id, "hidden": reply["hidden"], "timing": reply["timing"]}
                self.peer.start_background(self._push, client, result)
        except Exception as exc:  # the client learns from our reply; the session stays (the client may rewind)
            failed = {"peer": me, "code": getattr(exc, "code", "internal"), "message": str(exc)[:300]}
        return forwarded_reply(req.session, req.step, entries, failed)

    async def _push(self, client: str, result: Message) -> None:
        """The last hop's output straight to the client (its fast path: the same rows also come
        back in the reply chain, so a lost push only costs the client the chain's latency)."""
        try:
            await self.peer.forward._send_to_client(client, result)
        except Exception as exc:  # a background task: nothing may escape into the peer's nursery
            log.info("could not push a forwarded output to the client", client=client[:16], reason=str(exc)[:200])
